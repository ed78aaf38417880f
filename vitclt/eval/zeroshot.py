"""CLIP zero-shot classification, optionally with some layers' MLP outputs replaced.

The classifier is CLIP's: for each class, the text embeddings of every prompt template filled with
the class name are L2-normalised, averaged and renormalised; an image is assigned the class whose
vector has the largest cosine with its embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from vitclt.backbones import Backbone, Replacement
from vitclt.data.batches import image_batches
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


@torch.inference_mode()
def build_classifier(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256) -> Tensor:
    """Class vectors (C, P): the renormalised mean of each class's normalised template embeddings."""
    if not templates or any("{}" not in t for t in templates):
        raise ConfigError("every prompt template must contain '{}' where the class name goes: fix the templates file")
    prompts = [t.format(name) for name in classnames for t in templates]
    emb = torch.cat([backbone.text_embeds(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)])
    emb_CTP = F.normalize(emb, dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(emb_CTP.mean(dim=1), dim=-1)


def embed_images(backbone: Backbone, pixels_BCHW: Tensor, replacement: Replacement | None = None) -> Tensor:
    """Normalised image embeddings (B, P), with `replacement` applied to the MLPs if given."""
    if replacement is None:
        return backbone.image_embeds(pixels_BCHW)
    with backbone.replace(*replacement):
        return backbone.image_embeds(pixels_BCHW)


def topk_correct(emb_BP: Tensor, classifier_CP: Tensor, labels_B: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
    """Per image: whether the label is the top-1 class, and whether it is among the top-k."""
    logits_BC = emb_BP @ classifier_CP.T.to(emb_BP)
    top_BK = logits_BC.topk(min(k, logits_BC.shape[1]), dim=1).indices.cpu()
    hit_BK = top_BK == labels_B.view(-1, 1)
    return hit_BK[:, 0], hit_BK.any(dim=1)


def evaluate(
    backbone: Backbone,
    dataset,
    classifier_CP: Tensor,
    images_per_forward: int = 64,
    replacement: Replacement | None = None,
    workers: int = 0,
    progress: bool = True,
) -> ZeroShotResult:
    """Zero-shot top-1 / top-5 of `backbone` on `dataset` against `classifier_CP`."""
    if len(dataset) == 0:
        raise ConfigError("the dataset is empty: nothing to evaluate; check --dataset and --split")
    n1 = n5 = n = 0
    bar = tqdm(total=len(dataset), desc="zero-shot", unit="img", disable=not progress)
    for images, labels_B in image_batches(dataset, images_per_forward, workers=workers):
        emb_BP = embed_images(backbone, backbone.preprocess(images), replacement)
        hit1, hit5 = topk_correct(emb_BP, classifier_CP, labels_B)
        n1, n5, n = n1 + int(hit1.sum()), n5 + int(hit5.sum()), n + len(labels_B)
        bar.update(len(labels_B))
        bar.set_postfix(top1=f"{100 * n1 / n:.2f}")
    bar.close()
    return ZeroShotResult(top1=100 * n1 / n, top5=100 * n5 / n, n_images=n)


def zero_mlp(layer: int, x_BTD: Tensor, y_BTD: Tensor) -> Tensor:
    """A replacement that removes the MLP's contribution: the control every replacement is judged by."""
    return torch.zeros_like(y_BTD)
