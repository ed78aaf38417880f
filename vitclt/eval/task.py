"""The task head an evaluation scores accuracy with: chosen for the backbone, built once from the clean model.

`vitclt eval`, `vitclt reproduce` and `vitclt zeroshot` call `task_head`: zero-shot from the text
tower (CLIP, SigLIP, open_clip), the checkpoint's own classifier (timm), or a linear probe fitted on
the clean embeddings of the *training* split (DINOv2), never on the split being evaluated. The head
is then fixed: under a replacement only the image embeddings move (`vitclt.backbones.heads`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from vitclt.backbones import Backbone
from vitclt.backbones.heads import TaskHead, build_task_head
from vitclt.errors import ConfigError
from vitclt.eval.options import HeadOptions
from vitclt.runtime import RuntimeConfig

HELD_OUT_SPLITS = ("test", "val", "eval", "validation")
"""Names of the held-out split: a probe fitted on one of them would be fitted on the evaluated images."""

HEAD_NAMES = {"zeroshot": "zero-shot from the text tower", "own": "the checkpoint's own classifier",
              "probe": "a linear probe"}
"""How each head kind is named in notes and the report."""


class Task(NamedTuple):
    """The head and what metrics.json records about it."""

    head: TaskHead
    kind: str
    """"zeroshot", "own" or "probe"."""
    probe_split: str | None
    """The split the probe was fitted on (None for other heads)."""
    probe_images: int | None
    """How many images it was fitted on (None for other heads)."""

    @property
    def note(self) -> str:
        """One line saying which head scores the accuracies."""
        fit = f", fitted on {self.probe_images} images of the {self.probe_split} split" if self.kind == "probe" else ""
        return f"task head: {HEAD_NAMES[self.kind]}{fit}"


def head_kind(backbone: Backbone, asked: str) -> str:
    """The head `asked` resolves to: "auto" picks zeroshot with a text tower, else own with a classifier, else probe.

    `--head zeroshot` on a model without a text tower is refused in one line.
    """
    if asked == "zeroshot" and not backbone.has_text_tower:
        raise ConfigError(f"--head zeroshot: {backbone.name} has no text tower; use --head probe (a linear probe fitted "
                          "on the training split) or --head auto")
    if asked != "auto":
        return asked
    if backbone.has_text_tower:
        return "zeroshot"
    return "own" if backbone.own_head() is not None else "probe"


def task_head(backbone: Backbone, dataset, templates: Sequence[str], options: HeadOptions, dataset_spec: str,
              eval_split: str, runtime: RuntimeConfig, classnames: str | Path | None = None) -> Task:
    """Build the head for `dataset` (the evaluated split `eval_split` of `dataset_spec`) before any replacement.

    A probe is fitted on `options.probe_split` of the same dataset (its first `options.probe_images`
    images, class-stratified with the run's seed), which must not be the evaluated split.
    """
    from vitclt.data.batches import image_batches
    from vitclt.data.datasets import load_dataset

    options.validate()
    kind = head_kind(backbone, options.head)
    train_batches = None
    probe_split = n_probe = None
    if kind == "probe":
        probe_split = options.probe_split
        if probe_split == eval_split or (probe_split in HELD_OUT_SPLITS and eval_split in HELD_OUT_SPLITS) \
                or eval_split == "all":
            raise ConfigError(f"the linear probe would be fitted on the evaluated images (--probe-split {probe_split}, "
                              f"--split {eval_split}): fit it on the training split (--probe-split train) and evaluate "
                              "on a held-out one (--split test)")
        train = load_dataset(dataset_spec, probe_split, max_images=options.probe_images, seed=runtime.seed,
                             classnames=classnames)
        if list(train.classnames) != list(dataset.classnames):
            raise ConfigError(f"the {probe_split} split has classes {list(train.classnames)[:5]}…, the {eval_split} split "
                              f"{list(dataset.classnames)[:5]}…: a probe needs both splits to share their classes")
        n_probe = len(train)
        train_batches = image_batches(train, runtime.images_per_forward, workers=runtime.workers)
    head = build_task_head(backbone, dataset.classnames, templates, train_batches=train_batches, kind=kind)
    return Task(head, head.kind, probe_split, n_probe)
