"""Reconstruction fidelity of a transcoder on clean activations, per layer and per token group.

For each layer ℓ and token group (CLS, patches, all), over every token of the eval set:

- `mse`: mean over tokens and dimensions of (ŷ − y)²;
- `r2`: variance explained, 1 − SSE/SST, SST taken around the per-dimension mean of y over the
  group's tokens (pooled over dimensions);
- `fvu`: fraction of variance unexplained, SSE/SST: the training objective's quantity, so equal
  to 1 − `r2` here (both over the whole eval set rather than one training batch);
- `cosine`: mean over tokens of cos(ŷ, y) (a token with ŷ = 0 or y = 0 counts as 0);
- `l0`: mean number of active features per token;
- `dead_pct`: percentage of the layer's features never active on any of the group's tokens.

Layer averages are plain means over layers (the paper's "layer-averaged" numbers); `dead_pct`'s
average is over all L·F features, which is the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vitclt.eval.replacement import TOKEN_SETS, select_rows
from vitclt.nn import LayerCodes

METRICS = ("mse", "r2", "cosine", "fvu", "l0", "dead_pct")
"""The reconstruction metrics, in report order."""


class Reconstruction(NamedTuple):
    """One token group's metrics: per layer (lists of L floats) and their layer averages."""

    per_layer: dict[str, list[float]]
    mean: dict[str, float]
    n_tokens: int


class ReconstructionAccumulator:
    """Running sums for every reconstruction metric, per token group, over batches of tokens."""

    def __init__(self, n_layers: int, d_model: int, n_features: int, token_index: dict[str, slice | Tensor],
                 device: torch.device | str = "cpu"):
        self.L, self.D, self.F = n_layers, d_model, n_features
        self.token_index = token_index
        zeros = lambda *shape, dtype=torch.float64: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.n = dict.fromkeys(token_index, 0)
        self.sse_L = {g: zeros(n_layers) for g in token_index}
        self.sum_y_LD = {g: zeros(n_layers, d_model) for g in token_index}
        self.sumsq_y_L = {g: zeros(n_layers) for g in token_index}
        self.cos_L = {g: zeros(n_layers) for g in token_index}
        self.l0_L = {g: zeros(n_layers) for g in token_index}
        self.fired_LF = {g: zeros(n_layers, n_features, dtype=torch.bool) for g in token_index}

    def update(self, y_BTLD: Tensor, y_hat_BTLD: Tensor, codes: Sequence[LayerCodes]) -> None:
        """Add a batch: true and reconstructed outputs (B, T, L, D) and each layer's codes (B·T rows)."""
        T = y_BTLD.shape[1]
        # Elementwise work in float32, sums in float64: a float64 copy of (B, T, L, D) is large.
        y, y_hat = y_BTLD.float(), y_hat_BTLD.float()
        err_BTL = (y_hat - y).square().sum(-1, dtype=torch.float64)
        cos_BTL = F.cosine_similarity(y_hat, y, dim=-1, eps=1e-12).double()
        for g, idx in self.token_index.items():
            y_g = y[:, idx].flatten(0, 1)
            self.n[g] += y_g.shape[0]
            self.sse_L[g] += err_BTL[:, idx].flatten(0, 1).sum(0)
            self.sum_y_LD[g] += y_g.sum(0, dtype=torch.float64)
            self.sumsq_y_L[g] += y_g.square().sum((0, 2), dtype=torch.float64)
            self.cos_L[g] += cos_BTL[:, idx].flatten(0, 1).sum(0)
            # Layer by layer: a JumpReLU code's width K varies with the layer.
            for layer, c in enumerate(codes):
                sel = select_rows(c, T, idx)
                active_NK = sel.values_NK != 0
                self.l0_L[g][layer] += float(active_NK.sum())
                self.fired_LF[g][layer, sel.indices_NK[active_NK].long()] = True

    def result(self) -> dict[str, Reconstruction]:
        """Every metric per layer and averaged, per token group."""
        out = {}
        for g in self.token_index:
            n = self.n[g]
            if n == 0:
                raise ValueError(f"no {g} tokens were seen: nothing to measure reconstruction on")
            sst_L = self.sumsq_y_L[g] - self.sum_y_LD[g].square().sum(-1) / n
            fvu_L = self.sse_L[g] / sst_L.clamp_min(1e-30)
            per_layer = {
                "mse": self.sse_L[g] / (n * self.D),
                "r2": 1 - fvu_L,
                "cosine": self.cos_L[g] / n,
                "fvu": fvu_L,
                "l0": self.l0_L[g] / n,
                "dead_pct": 100 * (~self.fired_LF[g]).double().mean(-1),
            }
            out[g] = Reconstruction(
                per_layer={k: v.tolist() for k, v in per_layer.items()},
                mean={k: float(v.mean()) for k, v in per_layer.items()},
                n_tokens=n,
            )
        return out


def token_groups(backbone, groups: Sequence[str] | None = None) -> dict[str, slice | Tensor]:
    """Positions of each named token group in the backbone's sequence; default: every group it has
    (`TOKEN_SETS`, without "cls" on a model without a CLS token)."""
    if groups is None:
        groups = [g for g in TOKEN_SETS if g != "cls" or backbone.has_cls_token]
    return {g: backbone.token_index(g) for g in groups}
