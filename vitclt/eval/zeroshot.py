"""Classification accuracy under a task head, optionally with some layers' MLP outputs replaced.

The head (`vitclt.backbones.heads.TaskHead`) is built once from the clean model: CLIP's zero-shot
classifier for a model with a text tower (for each class, the text embeddings of every prompt
template filled with the class name are L2-normalised, averaged and renormalised; an image gets the
class whose vector has the largest cosine with its embedding), the checkpoint's own classifier, or a
linear probe (`vitclt.eval.task`). Under a replacement only the image embeddings change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vitclt.backbones import Backbone, Replacement
from vitclt.backbones.heads import TaskHead, zero_shot_head
from vitclt.data.batches import pixel_batches
from vitclt.errors import ConfigError


class ZeroShotResult(NamedTuple):
    """Accuracies in percent, and how many images they are over."""

    top1: float
    top5: float
    n_images: int


def dataset_templates(dataset) -> list[str]:
    """The dataset's own prompt templates (`.templates`), else its named shipped set."""
    from vitclt.data.prompts import get_templates

    templates = getattr(dataset, "templates", None)
    return list(templates) if templates else get_templates(dataset.template_set)


def build_classifier(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256) -> Tensor:
    """Class vectors (C, P): the renormalised mean of each class's normalised template embeddings
    (the zero-shot head's, `vitclt.backbones.heads.zero_shot_head`)."""
    return zero_shot_head(backbone, classnames, templates, batch_size).classifier_CP


def embed_images(backbone: Backbone, pixels_B3HW: Tensor, replacement: Replacement | None = None) -> Tensor:
    """Image embeddings (B, P) as the task head reads them, with `replacement` applied to the MLPs if given."""
    if replacement is None:
        return backbone.image_embeds(pixels_B3HW)
    with backbone.replace(*replacement):
        return backbone.image_embeds(pixels_B3HW)


@torch.inference_mode()
def evaluate(
    backbone: Backbone,
    dataset,
    head: TaskHead,
    images_per_forward: int = 64,
    replacement: Replacement | None = None,
    workers: int = 0,
    progress: bool = True,
    fast_decode: bool = False,
) -> ZeroShotResult:
    """Top-1 / top-5 of `backbone` on `dataset` under `head` (zero-shot, a probe or the model's own classifier)."""
    if len(dataset) == 0:
        raise ConfigError("the dataset is empty: nothing to evaluate; check --dataset and --split")
    n1 = n5 = n = 0
    bar = tqdm(total=len(dataset), desc=f"top-1 ({head.kind} head)", unit="img", disable=not progress)
    for pixels_B3HW, labels_B in pixel_batches(backbone, dataset, images_per_forward, workers, fast_decode):
        emb_BP = embed_images(backbone, pixels_B3HW, replacement)
        hit1, hit5 = head.correct(emb_BP, labels_B)
        n1, n5, n = n1 + int(hit1.sum()), n5 + int(hit5.sum()), n + len(labels_B)
        bar.update(len(labels_B))
        bar.set_postfix(top1=f"{100 * n1 / n:.2f}")
    bar.close()
    return ZeroShotResult(top1=100 * n1 / n, top5=100 * n5 / n, n_images=n)


def zero_mlp(layer: int, x_BTD: Tensor, y_BTD: Tensor) -> Tensor:
    """A replacement that removes the MLP's contribution: the control every replacement is judged by."""
    return torch.zeros_like(y_BTD)
