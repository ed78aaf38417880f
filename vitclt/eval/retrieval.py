"""Cross-layer retrieval: an image's nearest neighbours by each layer's transcoder code.

Each image is described at layer ℓ by a dense code vector of F features: by default its CLS
token's code z_ℓ (inactive features are 0), or with `pool="patches"` the mean of its patch tokens'
codes. Similarity is the cosine between two images' vectors (an all-zero code has similarity 0 with
everything). The gallery is the eval set; a query's own image is never its neighbour.

Quantitatively, `precision_at_k[ℓ]` is the fraction of each image's k nearest neighbours at layer ℓ
that share its label, averaged over every image as a query: it rises with depth when later layers
encode class semantics. `chance` is the same fraction for neighbours drawn at random.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vitclt.eval.replacement import select_rows
from vitclt.nn import LayerCodes

POOLS = ("cls", "patches")
"""How an image's vector is formed from its tokens' codes."""

QUERY_CHUNK = 1024
"""Queries per similarity block (a block holds QUERY_CHUNK × N similarities)."""


class CodeGallery:
    """Every eval image's code vector at every layer, collected batch by batch.

    Vectors are kept on the CPU as sparse tensors (a CLS code has at most K nonzeros out of F), so
    a gallery of thousands of images costs megabytes, not N·L·F floats.
    """

    def __init__(self, n_layers: int, n_features: int, n_tokens: int, n_prefix: int, pool: str = "cls"):
        if pool not in POOLS:
            raise ValueError(f"unknown retrieval pool {pool!r}: use one of {POOLS}")
        self.L, self.F, self.T, self.n_prefix, self.pool = n_layers, n_features, n_tokens, n_prefix, pool
        self.parts: list[list[Tensor]] = [[] for _ in range(n_layers)]
        self.labels: list[Tensor] = []

    def update(self, codes: Sequence[LayerCodes], labels_B: Tensor) -> None:
        """Add a batch: each layer's codes over B·T image-major rows, and the images' labels."""
        for layer, c in enumerate(codes):
            if self.pool == "cls":
                vectors_BF = select_rows(c, self.T, slice(0, 1)).to_dense(self.F).float()
            else:
                patches = select_rows(c, self.T, slice(self.n_prefix, self.T))
                vectors_BF = patches.to_dense(self.F).float().unflatten(0, (len(labels_B), -1)).mean(1)
            self.parts[layer].append(vectors_BF.cpu().to_sparse())
        self.labels.append(labels_B.cpu())

    def vectors(self, layer: int) -> Tensor:
        """All images' vectors at `layer`, dense and L2-normalised (N, F)."""
        return F.normalize(torch.cat(self.parts[layer]).to_dense(), dim=-1)

    @property
    def labels_N(self) -> Tensor:
        """Every gallery image's label."""
        return torch.cat(self.labels)


def nearest(vectors_NF: Tensor, queries: Sequence[int], k: int) -> tuple[Tensor, Tensor]:
    """Indices and cosines (Q, k) of each query's k nearest other images among normalised `vectors_NF`."""
    q = torch.as_tensor(list(queries), dtype=torch.long)
    sim_QN = vectors_NF[q] @ vectors_NF.T
    sim_QN[torch.arange(len(q)), q] = -torch.inf
    top = sim_QN.topk(min(k, vectors_NF.shape[0] - 1), dim=1)
    return top.indices, top.values


def precision_at_k(vectors_NF: Tensor, labels_N: Tensor, k: int) -> float:
    """Mean over all images as queries of the fraction of their k nearest neighbours with their label."""
    n = vectors_NF.shape[0]
    if n < 2:
        raise ValueError("retrieval needs at least two gallery images")
    hits = 0.0
    for lo in range(0, n, QUERY_CHUNK):
        idx, _ = nearest(vectors_NF, range(lo, min(lo + QUERY_CHUNK, n)), k)
        hits += float((labels_N[idx] == labels_N[lo : lo + len(idx), None]).float().mean(1).sum())
    return hits / n


def chance_precision(labels_N: Tensor) -> float:
    """Expected precision of neighbours drawn uniformly from the other images."""
    n = len(labels_N)
    counts = torch.bincount(labels_N).double()
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))


class RetrievalResult(NamedTuple):
    """Per-layer precision@k, its chance level, and the neighbours of the figure's query images."""

    pool: str
    k: int
    precision_at_k: list[float]
    chance: float
    queries: list[int]
    neighbours: list[list[list[int]]]
    """neighbours[q][ℓ]: gallery indices of query q's nearest images at layer ℓ."""
    similarities: list[list[list[float]]]


def pick_queries(n_images: int, n_queries: int, seed: int = 0) -> list[int]:
    """`n_queries` distinct gallery indices chosen with `seed`."""
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_images, size=min(n_queries, n_images), replace=False))


def evaluate_retrieval(gallery: CodeGallery, k: int = 5, n_queries: int = 2, n_neighbours: int = 3,
                       seed: int = 0) -> RetrievalResult:
    """Precision@k per layer over the whole gallery, and the top neighbours of a few queries."""
    labels_N = gallery.labels_N
    queries = pick_queries(len(labels_N), n_queries, seed)
    precision, neighbours, sims = [], [[] for _ in queries], [[] for _ in queries]
    for layer in range(gallery.L):
        vectors_NF = gallery.vectors(layer)
        precision.append(precision_at_k(vectors_NF, labels_N, k))
        idx, sim = nearest(vectors_NF, queries, n_neighbours)
        for q in range(len(queries)):
            neighbours[q].append(idx[q].tolist())
            sims[q].append(sim[q].tolist())
    return RetrievalResult(gallery.pool, k, precision, chance_precision(labels_N), queries, neighbours, sims)
