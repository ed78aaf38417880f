"""Task heads as classifiers on image embeddings: a zero-shot head from class vectors, a linear head.

What `heads` builds from a backbone and what `Backbone.own_head` returns; nothing here needs a
backbone, so the backbone base class can name these types.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import BackboneError


class TaskHead(abc.ABC):
    """Class logits from the image representation `Backbone.image_embeds` returns."""

    kind: str
    """"zeroshot", "probe" or "own": how the head was made (reported next to its accuracy)."""

    @property
    @abc.abstractmethod
    def n_classes(self) -> int:
        """Number of classes C."""

    @abc.abstractmethod
    def logits(self, embeds_BP: Tensor) -> Tensor:
        """Class logits (B, C); the predicted class is their argmax."""

    def correct(self, embeds_BP: Tensor, labels_B: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
        """Per image: whether the label is the top-1 class, and whether it is among the top-k."""
        logits_BC = self.logits(embeds_BP)
        top_BK = logits_BC.topk(min(k, logits_BC.shape[1]), dim=1).indices.cpu()
        hit_BK = top_BK == labels_B.cpu().view(-1, 1)
        return hit_BK[:, 0], hit_BK.any(dim=1)


@dataclass(frozen=True)
class ZeroShotHead(TaskHead):
    """Zero-shot classification: ``scale · embeds_BP @ classifier_CPᵀ + bias`` (embeddings L2-normalised)."""

    classifier_CP: Tensor
    """Per class, the renormalised mean of its prompts' normalised text embeddings."""
    scale: float = 1.0
    """The model's logit scale (exp of its learned log-scale)."""
    bias: float = 0.0
    """The model's logit bias (SigLIP; 0 for CLIP)."""
    kind: str = "zeroshot"

    @property
    def n_classes(self) -> int:
        return self.classifier_CP.shape[0]

    def logits(self, embeds_BP: Tensor) -> Tensor:
        return self.scale * (embeds_BP.float() @ self.classifier_CP.T.to(embeds_BP.device, torch.float32)) + self.bias


@dataclass(frozen=True)
class LinearHead(TaskHead):
    """An affine classifier ``embeds_BP @ W_CPᵀ + b_C``: a fitted probe or a checkpoint's own head."""

    W_CP: Tensor
    """Weights, one row per class."""
    b_C: Tensor
    """Biases, one per class."""
    labels: tuple[str, ...] | None = None
    """Class names in row order, where the checkpoint names them."""
    kind: str = "probe"

    @property
    def n_classes(self) -> int:
        return self.W_CP.shape[0]

    def logits(self, embeds_BP: Tensor) -> Tensor:
        W_CP = self.W_CP.to(embeds_BP.device, torch.float32)
        return embeds_BP.float() @ W_CP.T + self.b_C.to(embeds_BP.device, torch.float32)

    def subset(self, rows: Sequence[int]) -> LinearHead:
        """The head restricted to these classes, in this order (a 1000-class head on a 100-class subset)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        labels = tuple(self.labels[i] for i in idx.tolist()) if self.labels else None
        return replace(self, W_CP=self.W_CP[idx], b_C=self.b_C[idx], labels=labels)

    def for_classes(self, classnames: Sequence[str]) -> LinearHead:
        """The rows of `classnames`, matched to `labels` ignoring case, spaces and underscores."""
        if self.labels is None:
            if len(classnames) != self.n_classes:
                raise BackboneError(f"the model's classifier has {self.n_classes} unnamed classes but the dataset has "
                                    f"{len(classnames)}: use a dataset labelled like the checkpoint, "
                                    "or a linear probe (head 'probe')")
            return self
        key = {_norm(name): i for i, name in enumerate(self.labels)}
        rows = []
        for name in classnames:
            if _norm(name) not in key:
                raise BackboneError(f"class {name!r} is not among the model's {self.n_classes} classifier labels "
                                    f"(e.g. {', '.join(self.labels[:3])}): use a linear probe (head 'probe') for this dataset")
            rows.append(key[_norm(name)])
        return self.subset(rows)

    @classmethod
    def fit(cls, embeds_NP: Tensor, labels_N: Tensor, n_classes: int, ridge: float = 1e-3) -> LinearHead:
        """Ridge regression of one-hot labels on the embeddings, in closed form (float64).

        With X the centred embeddings and Y the one-hot labels, ``W = (XᵀX + λI)⁻¹ XᵀY`` with
        ``λ = ridge · tr(XᵀX) / P`` (so `ridge` is relative to the mean feature variance) and the
        bias putting the mean embedding on the mean label. Deterministic: no seed, no iterations.
        """
        if embeds_NP.shape[0] != labels_N.shape[0] or embeds_NP.shape[0] == 0:
            raise BackboneError(f"a probe needs one label per embedding and at least one of each, got "
                                f"{embeds_NP.shape[0]} embeddings and {labels_N.shape[0]} labels")
        X = embeds_NP.detach().to("cpu", torch.float64)
        Y = F.one_hot(labels_N.detach().cpu().long(), n_classes).to(torch.float64)
        mu_P, ybar_C = X.mean(0), Y.mean(0)
        Xc = X - mu_P
        gram_PP = Xc.T @ Xc
        lam = ridge * float(gram_PP.diagonal().sum()) / X.shape[1]
        W_PC = torch.linalg.solve(gram_PP + lam * torch.eye(X.shape[1], dtype=torch.float64), Xc.T @ (Y - ybar_C))
        b_C = ybar_C - mu_P @ W_PC
        return cls(W_CP=W_PC.T.float().contiguous(), b_C=b_C.float(), kind="probe")


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())
