"""What a feature sees: CLIP-Dissect's SoftWPMI between its top-activating images and a concept vocabulary.

CLIP-Dissect (Oikarinen & Weng, ICLR 2023) scores concept t for a unit whose top-activating images
are x_1 … x_K (best first) as

    SoftWPMI(t) = log p(t | D) − λ · log p(t),
    log p(t | D) = Σ_k log(1 + p_k (P(t | x_k) − 1)),    p_k linear from p_start (k = 1) to p_end,
    log p(t) = log mean_f exp(log p(t | D_f))             over the units f of the same layer,

where P(t | x) = softmax_t(a · cos(image x, text t)) is the image–text similarity of the
dissecting CLIP (the backbone itself when it has a text tower) turned into a distribution over the
vocabulary, and p_k is the soft chance that x_k belongs to the unit's top set. Constants follow
the reference implementation (a = 10, λ = 1, p_start = 0.998, p_end = 0.97; a small floor inside
the log).

Two changes from the reference, both measured on the demo world (docs/browser.md): the softmax runs
within each group of the vocabulary (the demo world's attribute families; class names apart from
words), so a two-valued attribute such as size is not drowned by the forty-eight class names; and
concepts are ranked by their score minus their shuffled baseline, since scores of groups of
different sizes are on different scales.

Each label carries that shuffled baseline: the mean score of the same concept when the feature's
images are replaced by as many drawn at random from the probe set (`null_baselines`). A label whose score does not beat the
99th percentile of its baseline is one the dissector cannot tell from noise, and is not shown.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitclt.browser.concepts import ConceptLabels

SOFTMAX_SCALE = 10.0
"""a: the inverse temperature of the similarity softmax over concepts."""
LAMBDA = 1.0
"""λ: the weight of the concept's prior log p(t)."""
P_START, P_END = 0.998, 0.97
"""Soft membership of the best and of the K-th top image."""
LOG_FLOOR = 1e-7
"""Added inside the log, as in the reference implementation."""


def concept_probs(image_NP: Tensor, text_VP: Tensor, scale: float = SOFTMAX_SCALE, groups: list[str] | None = None) -> Tensor:
    """P_NV = softmax over concepts of scale · cos(image, text), within each group of concepts if `groups` names them."""
    image = torch.nn.functional.normalize(image_NP.double(), dim=-1)
    text = torch.nn.functional.normalize(text_VP.double(), dim=-1)
    logits = scale * image @ text.T
    if groups is None:
        return torch.softmax(logits, dim=-1)
    out = torch.empty_like(logits)
    for g in dict.fromkeys(groups):
        cols = torch.tensor([i for i, x in enumerate(groups) if x == g])
        out[:, cols] = torch.softmax(logits[:, cols], dim=-1)
    return out


def membership(k: int) -> Tensor:
    """p_k for ranks 1 … k: linear from P_START to P_END (as the reference: p_start − i/k · (p_start − p_end))."""
    return P_START - torch.arange(k, dtype=torch.float64) / k * (P_START - P_END)


def log_p_given_top(probs_NV: Tensor, top_FK: Tensor, valid_FK: Tensor | None = None) -> Tensor:
    """log p(t | D_u) for U top sets of K image indices each (best first); invalid slots add nothing. Returns (U, C)."""
    U, K = top_FK.shape
    p_K = membership(K)
    P_FKV = probs_NV[top_FK.clamp_min(0)]
    terms = torch.log(1 + p_K[None, :, None] * (P_FKV - 1) + LOG_FLOOR)
    if valid_FK is not None:
        terms = terms * valid_FK[..., None].double()
    return terms.sum(1)


def soft_wpmi(log_p_FV: Tensor, lam: float = LAMBDA) -> tuple[Tensor, Tensor]:
    """SoftWPMI_FV of F features from their log p(t | D_f), and the prior log p(t) (V,) estimated over those features."""
    U = log_p_FV.shape[0]
    log_prior_V = torch.logsumexp(log_p_FV, 0) - torch.log(torch.tensor(float(max(U, 1)), dtype=log_p_FV.dtype))
    return log_p_FV - lam * log_prior_V, log_prior_V


def null_baselines(probs_NV: Tensor, k: int, sizes: list[int], log_prior_V: Tensor, draws: int = 200, seed: int = 0,
                   lam: float = LAMBDA) -> tuple[Tensor, Tensor]:
    """Mean and 99th percentile (each (len(sizes), V)) of the SoftWPMI of n images drawn at random, for each n in `sizes`.

    A feature with n < k images holds them in its first n ranks, so its null is the first n terms of a random set of k
    (the soft membership is that of k ranks); the sums run rank by rank, keeping only (draws, V) at a time.
    """
    N = probs_NV.shape[0]
    g = torch.Generator().manual_seed(seed)
    top_RK = torch.stack([torch.randperm(N, generator=g)[:k] if k <= N else torch.randint(N, (k,), generator=g)
                          for _ in range(draws)])
    p_K = membership(k)
    want = {n: i for i, n in enumerate(sizes)}
    mean = torch.zeros(len(sizes), probs_NV.shape[1], dtype=torch.float64)
    q99 = torch.zeros_like(mean)
    total_RV = torch.zeros(draws, probs_NV.shape[1], dtype=torch.float64)
    for rank in range(k):
        total_RV += torch.log(1 + p_K[rank] * (probs_NV[top_RK[:, rank]] - 1) + LOG_FLOOR)
        if rank + 1 in want:
            score_RV = total_RV - lam * log_prior_V
            mean[want[rank + 1]], q99[want[rank + 1]] = score_RV.mean(0), score_RV.quantile(0.99, dim=0)
    return mean, q99


def sees_labels(probs_NV: Tensor, top_LFK: Tensor, valid_LFK: Tensor, value_LFK: Tensor, k: int = 5, draws: int = 200,
                seed: int = 0) -> ConceptLabels:
    """Top-k concepts of every feature by SoftWPMI of its top images above the shuffled baseline.

    `top_LFK` holds image indices (-1 / invalid where none). Images are ranked by `value_LFK` (the feature's
    activation) before the soft membership is applied; the prior log p(t) of each layer is estimated over
    that layer's features with any top image.
    """
    L, F, K = top_LFK.shape
    C = probs_NV.shape[1]
    k = min(k, C)
    order = value_LFK.masked_fill(~valid_LFK, -torch.inf).argsort(-1, descending=True)
    top_LFK, valid_LFK = top_LFK.gather(-1, order), valid_LFK.gather(-1, order)
    out = [torch.zeros(L, F, k, dtype=torch.long)] + [torch.full((L, F, k), torch.nan, dtype=torch.float64)
                                                       for _ in range(3)]
    for layer in range(L):
        alive_F = valid_LFK[layer].any(-1)
        if not alive_F.any():
            continue
        log_p = log_p_given_top(probs_NV, top_LFK[layer][alive_F], valid_LFK[layer][alive_F])
        score_FV, log_prior_V = soft_wpmi(log_p)
        # Each feature's baseline is that of as many random images as it has.
        sizes, which_F = valid_LFK[layer][alive_F].sum(-1).unique(return_inverse=True)
        mean, q99 = null_baselines(probs_NV, K, sizes.tolist(), log_prior_V, draws, seed + layer)
        base_FV, thr_FV = mean[which_F], q99[which_F]
        i = (score_FV - base_FV).topk(k, dim=-1).indices
        out[0][layer][alive_F], out[1][layer][alive_F] = i, score_FV.gather(1, i)
        out[2][layer][alive_F], out[3][layer][alive_F] = base_FV.gather(1, i), thr_FV.gather(1, i)
    return ConceptLabels(*out)
