"""Task heads: image embeddings → class logits, built once from the clean model and then kept fixed.

Replacement and faithfulness evaluations score a backbone on a labelled task. The head that scores
it is built from the clean model only, so under a replacement the image embeddings move and the head
does not: a change in accuracy is the replacement's alone. Every family has one:

- a text tower (CLIP, SigLIP, open_clip): `ZeroShotHead`, class vectors from class names × prompt
  templates, scored the model's own way (CLIP: scale · cosine; SigLIP: scale · cosine + bias,
  whose sigmoid is SigLIP's probability; the argmax is the same either way);
- a classifier in the checkpoint (timm): `Backbone.own_head()`, a `LinearHead` on the pre-logits;
- neither (DINOv2): a `LinearHead` fitted on the clean embeddings (CLS token after the final norm)
  of the training split by ridge regression onto one-hot labels: closed form, deterministic, no seed.

`build_task_head` picks the right one; `TaskHead.logits(embeds_BP)` is all an evaluation calls. The
heads themselves (`TaskHead`, `ZeroShotHead`, `LinearHead`) are in `classifiers`, which needs no backbone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .base import Backbone
from .classifiers import LinearHead, TaskHead, ZeroShotHead
from .errors import BackboneError

HEAD_KINDS = ("auto", "zeroshot", "probe", "own")
"""`build_task_head(kind=...)`: auto picks zeroshot (text tower), else own (a classifier), else probe."""


@torch.inference_mode()
def zero_shot_head(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                   batch_size: int = 256) -> ZeroShotHead:
    """CLIP's zero-shot protocol with the model's own scoring: each class's template embeddings,
    normalised, averaged and renormalised, scored by `Backbone.logit_scale_bias`."""
    if not backbone.has_text_tower:
        raise BackboneError(f"{backbone.name} has no text tower, so it cannot classify zero-shot: use head 'probe'")
    if not templates or any("{}" not in t for t in templates):
        raise BackboneError("every prompt template must contain '{}' where the class name goes")
    prompts = [t.format(name) for name in classnames for t in templates]
    emb = torch.cat([backbone.text_embeds(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)])
    emb_CMP = F.normalize(emb, dim=-1).view(len(classnames), len(templates), -1)
    scale, bias = backbone.logit_scale_bias()
    return ZeroShotHead(F.normalize(emb_CMP.mean(dim=1), dim=-1), scale=scale, bias=bias)


@torch.inference_mode()
def embed_batches(backbone: Backbone, batches: Iterable[tuple[Sequence[Image.Image], Tensor]]) -> tuple[Tensor, Tensor]:
    """Clean `image_embeds` and labels of every (images, labels_B) batch: (N, P) on the CPU and (N,)."""
    embeds, labels = [], []
    for images, labels_B in batches:
        embeds.append(backbone.image_embeds(backbone.preprocess(images)).cpu())
        labels.append(torch.as_tensor(labels_B).cpu())
    if not embeds:
        raise BackboneError("the probe's training split is empty: a linear probe needs labelled training images")
    return torch.cat(embeds), torch.cat(labels)


def fit_probe(backbone: Backbone, batches: Iterable[tuple[Sequence[Image.Image], Tensor]], n_classes: int,
              ridge: float = 1e-3) -> LinearHead:
    """A linear probe on the clean embeddings of `batches` (the training split): see `LinearHead.fit`."""
    return LinearHead.fit(*embed_batches(backbone, batches), n_classes, ridge)


def build_task_head(
    backbone: Backbone,
    classnames: Sequence[str],
    templates: Sequence[str] | None = None,
    train_batches: Iterable[tuple[Sequence[Image.Image], Tensor]] | None = None,
    kind: str = "auto",
    ridge: float = 1e-3,
) -> TaskHead:
    """The head an evaluation scores `backbone` with on a task of `classnames` (in label order).

    kind "auto": zero-shot from `templates` with a text tower, else the checkpoint's own classifier
    restricted to `classnames`, else a probe fitted on `train_batches` ((images, labels) of the
    training split). "zeroshot", "probe" and "own" force one. Build it before any replacement.
    """
    if kind not in HEAD_KINDS:
        raise BackboneError(f"unknown task head {kind!r}: use one of {', '.join(HEAD_KINDS)}")
    own = backbone.own_head() if kind in ("auto", "own") else None
    if kind == "zeroshot" or (kind == "auto" and backbone.has_text_tower):
        if not templates:
            raise BackboneError("a zero-shot head needs prompt templates (each containing '{}')")
        return zero_shot_head(backbone, classnames, templates)
    if own is not None:
        return own.for_classes(classnames)
    if kind == "own":
        raise BackboneError(f"{backbone.name} has no classifier of its own: use head 'probe' (or 'zeroshot' with a text tower)")
    if train_batches is None:
        raise BackboneError(f"{backbone.name} has no text tower and no classifier, so its task head is a linear probe, "
                            "which needs the labelled training split")
    return fit_probe(backbone, train_batches, len(classnames), ridge)
