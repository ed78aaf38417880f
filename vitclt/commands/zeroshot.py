"""`vitclt zeroshot`: top-1/top-5 of a backbone on a dataset under its task head, optionally with MLPs ablated."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

from tyro.conf import OmitArgPrefixes

from vitclt.eval.options import HeadOptions
from vitclt.nn.config import TokenSet
from vitclt.runtime import RuntimeConfig


@dataclass
class ZeroShotConfig:
    """`vitclt zeroshot`: top-1/top-5 of a backbone on a dataset (zero-shot, or a probe / the model's own classifier)."""

    backbone: str = "demo"
    """Backbone: a hub id (openai/clip-vit-base-patch32), a local model directory or checkpoint, or `demo`."""
    dataset: str = "demo"
    """Dataset spec, e.g. cifar100:/data/cifar-100-python, imagenet100:/data/imagenet, coco:/data/coco, folder:DIR."""
    split: str = "test"
    """Split to evaluate: test (= val, held out), train, or all (the whole of a folder: dataset without split folders)."""
    templates: str | None = None
    """Prompt templates (zero-shot head): a file (one per line, with {}) or a shipped set: cifar100, imagenet, imagenet7, coco."""
    classnames: Path | None = None
    """File of class names, one per line in label order; default: the dataset's shipped names."""
    max_images: int | None = None
    """Evaluate on a class-stratified subset of this many images (quick runs)."""
    ablate_layers: tuple[str, ...] = ()
    """Zero the MLP outputs of these layer windows (START-END, N, all or last:N; e.g. 3-11 or 0,4,7): the replacement control."""
    ablate_tokens: TokenSet = "all"
    """Tokens whose MLP output is zeroed with --ablate-layers: cls, patches or all."""
    task: Annotated[HeadOptions, OmitArgPrefixes] = field(default_factory=HeadOptions)
    """The task head: zero-shot with a text tower; without one, the checkpoint's classifier or a linear probe."""
    runtime: Annotated[RuntimeConfig, OmitArgPrefixes] = field(default_factory=lambda: RuntimeConfig(workers=0))
    """Device, threads, image decoding, seed (of the --max-images subset), progress bars."""
    out: Path | None = None
    """Write the result as JSON to this file."""


def run(cfg: ZeroShotConfig) -> dict:
    """Run `vitclt zeroshot`: print top-1/top-5 and write them to `cfg.out` if given."""
    from vitclt.backbones import Replacement, load_backbone
    from vitclt.data.datasets import load_dataset
    from vitclt.data.prompts import get_templates
    from vitclt.errors import ConfigError
    from vitclt.eval.task import task_head
    from vitclt.eval.windows import check_windows, parse_windows, union_layers
    from vitclt.eval.zeroshot import dataset_templates, evaluate, zero_mlp
    from vitclt.io import jsonable, write_json
    from vitclt.runtime import check_writable_file, setup

    if cfg.out:
        check_writable_file(cfg.out)
    cfg.task.validate()
    check_windows(cfg.ablate_layers, "--ablate-layers")
    device = setup(cfg.runtime)
    rt = cfg.runtime
    # The cheap inputs first, so a wrong path fails before a large model loads.
    dataset = load_dataset(cfg.dataset, cfg.split, max_images=cfg.max_images, seed=rt.seed, classnames=cfg.classnames)
    if getattr(dataset, "split_note", ""):
        print(f"note: {dataset.split_note}")
    templates = get_templates(cfg.templates) if cfg.templates else dataset_templates(dataset)
    backbone = load_backbone(cfg.backbone, device=device)
    replacement = None
    if cfg.ablate_layers:
        if cfg.ablate_tokens == "cls" and not backbone.has_cls_token:
            raise ConfigError(f"--ablate-tokens cls: {backbone.name} has no CLS token (it pools its patch tokens); "
                              "use patches or all")
        layers = union_layers(parse_windows(cfg.ablate_layers, backbone.n_layers))
        replacement = Replacement(zero_mlp, layers, cfg.ablate_tokens)
    task = task_head(backbone, dataset, templates, cfg.task, cfg.dataset, cfg.split, rt, cfg.classnames)
    print(task.note)
    result = evaluate(backbone, dataset, task.head, rt.images_per_forward, replacement, workers=rt.workers,
                      progress=rt.progress, fast_decode=rt.fast_decode)
    record = {
        **result._asdict(),
        "head": task.kind,
        "probe_split": task.probe_split,
        "probe_images": task.probe_images,
        "backbone": cfg.backbone,
        "dataset": cfg.dataset,
        "split": cfg.split,
        "n_classes": len(dataset.classnames),
        "n_templates": len(templates) if task.kind == "zeroshot" else 0,
        "ablated_layers": list(replacement.layers) if replacement else [],
        "ablated_tokens": cfg.ablate_tokens if replacement else None,
        "config": jsonable(asdict(cfg)),
    }
    print(f"{cfg.backbone} on {cfg.dataset} ({cfg.split}, {result.n_images} images, {len(dataset.classnames)} classes, "
          f"{task.kind} head): top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%")
    if cfg.out:
        print(f"wrote {write_json(cfg.out, record)}")
    return record
