"""Linear decomposition and cross-layer contribution scores (paper §5).

A CLT's reconstruction of target layer j is a sum of source terms, ŷ_j = Σ_{i≤j} c_{i→j} + b_j, with
c_{i→j} = z_i W_dec^{i→j}. The contribution score of source i to target j is

    C_proj[i, j] = mean over images and the chosen tokens of ⟨c_{i→j}, ŷ_j⟩ / ‖ŷ_j‖²,

computed on the codes of the clean forward. Here ŷ_j = Σ_i c_{i→j} *without* the decoder bias, so
every column sums to exactly 1 (the paper's published matrices do too). Tokens where ŷ_j = 0 (no
active source feature) have no direction to project on and are left out of column j; `skipped`
counts them. The bias's share is reported separately: `bias_share[j]` is the mean of
⟨b_j, ŷ_j + b_j⟩ / ‖ŷ_j + b_j‖², i.e. its score if it were counted as one more source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from vitclt.eval.replacement import select_rows
from vitclt.nn import LayerCodes, Transcoder

ROW_CHUNK = 4096
"""Rows per contributions call: c_NID holds N·I·D floats (I: source layers)."""


class ContributionScores(NamedTuple):
    """One token group's scores: `matrix[i][j]` for source i, target j (0 where i > j)."""

    matrix: list[list[float]]
    bias_share: list[float]
    skipped: list[int]
    """Per target: tokens left out because ŷ_j was exactly zero."""
    n_tokens: int


def projection_sums(c_NID: Tensor) -> tuple[Tensor, int]:
    """Σ over rows of ⟨c_i, ŷ⟩ / ‖ŷ‖² per source i, with ŷ = Σ_i c_i; and how many rows counted.

    Rows where ŷ = 0 are skipped, so dividing the sums by the count gives scores that sum to 1
    (to float64 rounding: the arithmetic is done in float64).
    """
    c_NID = c_NID.double()
    y_hat_ND = c_NID.sum(1)
    norm_N = y_hat_ND.square().sum(-1)
    valid_N = norm_N > 0
    score_NI = torch.einsum("nid,nd->ni", c_NID[valid_N], y_hat_ND[valid_N]) / norm_N[valid_N, None]
    return score_NI.sum(0), int(valid_N.sum())


def bias_share_sum(y_hat_ND: Tensor, b_D: Tensor) -> float:
    """Σ over rows of ⟨b, ŷ + b⟩ / ‖ŷ + b‖²: the bias's score if it counted as a source."""
    full_ND = y_hat_ND.double() + b_D.double()
    norm_N = full_ND.square().sum(-1)
    valid_N = norm_N > 0
    return float(((full_ND[valid_N] @ b_D.double()) / norm_N[valid_N]).sum())


class ContributionAccumulator:
    """Running C_proj sums for each token group over batches of clean codes."""

    def __init__(self, n_layers: int, n_tokens: int, token_index: dict[str, slice | Tensor]):
        self.L, self.T = n_layers, n_tokens
        self.token_index = token_index
        self.sums_IJ = {g: torch.zeros(n_layers, n_layers, dtype=torch.float64) for g in token_index}
        self.counts_J = {g: torch.zeros(n_layers, dtype=torch.long) for g in token_index}
        self.bias_J = {g: torch.zeros(n_layers, dtype=torch.float64) for g in token_index}
        self.n = dict.fromkeys(token_index, 0)

    @torch.inference_mode()
    def update(self, transcoder: Transcoder, codes: Sequence[LayerCodes]) -> None:
        """Add a batch: each layer's clean codes over B·T image-major rows."""
        for g, idx in self.token_index.items():
            sel = [select_rows(c, self.T, idx) for c in codes]
            n = sel[0].values_NK.shape[0]
            self.n[g] += n
            for j in range(self.L):
                b_D = transcoder.b_dec_LD[j]
                for lo in range(0, n, ROW_CHUNK):
                    rows = slice(lo, lo + ROW_CHUNK)
                    chunk = [LayerCodes(c.values_NK[rows], c.indices_NK[rows]) for c in sel[: j + 1]]
                    c_NID = transcoder.contributions_layer(j, chunk)
                    sums_I, count = projection_sums(c_NID)
                    self.sums_IJ[g][transcoder.sources(j), j] += sums_I.cpu()
                    self.counts_J[g][j] += count
                    self.bias_J[g][j] += bias_share_sum(c_NID.sum(1), b_D)

    def result(self) -> dict[str, ContributionScores]:
        """The score matrices (source × target) per token group."""
        out = {}
        for g in self.token_index:
            counts = self.counts_J[g].clamp_min(1).double()
            out[g] = ContributionScores(
                matrix=(self.sums_IJ[g] / counts).tolist(),
                bias_share=(self.bias_J[g] / max(self.n[g], 1)).tolist(),
                skipped=(self.n[g] - self.counts_J[g]).tolist(),
                n_tokens=self.n[g],
            )
        return out


def rank_sources(matrix: Sequence[Sequence[float]], target: int | None = None) -> list[int]:
    """Source layers by their score into `target` (default: the last layer), highest first."""
    target = len(matrix) - 1 if target is None else target
    scores = [matrix[s][target] for s in range(target + 1)]
    return sorted(range(target + 1), key=lambda s: (-scores[s], s))
