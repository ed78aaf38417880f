"""Per-feature JumpReLU thresholds for a TopK transcoder, fitted on a sample, so that the JumpReLU keeps about k.

circuit-tracer (and any JumpReLU consumer) needs a threshold per feature. A TopK sparsifier only
tracks one running threshold per layer, an average dominated by early training, which keeps far
fewer (or more) than k features per row. The rule here is **frequency matching**: on a sample of
N rows, feature f is selected by the TopK (with a positive value) in c_f rows; its threshold θ_f lies
midway between the c_f-th largest of its N rectified pre-activations and the next smaller distinct
one (0, the ReLU floor, when there is none), so exactly the c_f rows where it is largest fire. Summed
over features the JumpReLU therefore fires as often as the TopK on the sample (the same mean L0),
each feature as often as before, on the rows where it is strongest. Midway, not on a sample value:
the exported copy's folded encoder rounds differently (~1e-6), and a threshold equal to the
(c_f + 1)-th value lets that row through. Values tied with the c_f-th all fire (no threshold splits
equal values), the one case where a feature fires more than c_f times. A feature never selected
gets twice its largest absolute pre-activation, so it stays silent on the sample with a wide margin.

The pre-activations are the model's own encoder applied to its normalised input (what
``Transcoder.encode`` ranks); the TopK selection is the sparsifier's: a per-row top-k for
ReLU-TopK, the batch-wide top k·N for BatchTopK. Abs-TopK keeps negative values, which no JumpReLU
can, and is refused.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitclt.errors import ConfigError


class Calibration(NamedTuple):
    """Fitted thresholds and how the JumpReLU they make compares with the original on the sample."""

    threshold_LF: Tensor
    """Per-feature thresholds, raw pre-activation units (what circuit-tracer's threshold_{i} holds)."""
    n_rows: int
    """Rows of the sample."""
    k_L: list[int]
    """The TopK model's k per layer."""
    l0_original_L: list[float]
    """Mean active features per row and layer of the original model on the sample."""
    l0_exported_L: list[float]
    """The same for the JumpReLU with the fitted thresholds."""
    fvu_original_L: list[float] | None
    """Fraction of variance unexplained per layer of the original model (None without targets)."""
    fvu_exported_L: list[float] | None
    """The same for the JumpReLU (None without targets)."""

    def summary(self) -> dict:
        """JSON-ready: the rule, the sample size and the per-layer and mean L0 and FVU of both models."""
        mean = lambda v: None if v is None else sum(v) / len(v)  # noqa: E731
        return {
            "rule": "frequency matching: theta_f = midway between the c_f-th largest rectified pre-activation of feature f "
                    "on the sample and the next smaller one, c_f = rows where the TopK selects f "
                    "(never selected: twice its largest |pre-activation|)",
            "n_rows": self.n_rows, "k_L": self.k_L,
            "l0_original": mean(self.l0_original_L), "l0_exported": mean(self.l0_exported_L),
            "fvu_original": mean(self.fvu_original_L), "fvu_exported": mean(self.fvu_exported_L),
            "l0_original_L": self.l0_original_L, "l0_exported_L": self.l0_exported_L,
            "fvu_original_L": self.fvu_original_L, "fvu_exported_L": self.fvu_exported_L,
        }

    def describe(self) -> str:
        """One line: mean L0 and FVU of the original and the exported JumpReLU."""
        s = self.summary()
        line = (f"calibrated JumpReLU thresholds on {self.n_rows} rows: L0 {s['l0_exported']:.2f} "
                f"(original {s['l0_original']:.2f}, k {sum(self.k_L) / len(self.k_L):g})")
        if s["fvu_exported"] is not None:
            line += f", FVU {s['fvu_exported']:.4f} (original {s['fvu_original']:.4f})"
        return line


def _selection_counts(model: nn.Module, pre_NF: Tensor, layer: int) -> Tensor:
    """c_F: rows in which the sparsifier's TopK selects each feature with a positive value."""
    name, k = model.cfg.sparsifier, model.cfg.k_layers[layer]
    score_NF = pre_NF.relu()
    if name == "relu-topk":
        top = pre_NF.topk(k, dim=1)
        keep = top.values > 0
        return torch.bincount(top.indices[keep], minlength=pre_NF.shape[1])
    if name == "batch-topk":
        n_keep = min(k * pre_NF.shape[0], score_NF.numel())
        top = score_NF.flatten().topk(n_keep)
        kept = top.indices[top.values > 0] % pre_NF.shape[1]
        return torch.bincount(kept, minlength=pre_NF.shape[1])
    fix = "train with relu-topk or batch-topk" if name == "abs-topk" else "export it without a calibration sample"
    raise ConfigError(f"per-feature calibration fits a TopK sparsifier's thresholds; {name} has none to fit: {fix}")


def _frequency_matched(pre_NF: Tensor, count_F: Tensor) -> Tensor:
    """θ_F midway between each feature's c-th largest rectified pre-activation and the next smaller distinct one."""
    score_NF = pre_NF.relu()
    sorted_NF = score_NF.sort(dim=0, descending=True).values
    # c_f ≥ 1 positive values were selected, so the c_f-th largest is positive; zeros (the ReLU floor) lie below it,
    # which covers c_f = N and features positive only where selected.
    last_F = sorted_NF.gather(0, (count_F - 1).clamp_min(0)[None]).squeeze(0)
    below_F = torch.where(sorted_NF < last_F, sorted_NF, 0.0).amax(0)
    # Never selected: twice the feature's largest magnitude, well clear of every sample value (0 only for a feature
    # that is identically 0, which then never passes any threshold).
    silent_F = 2 * pre_NF.abs().amax(0)
    return torch.where(count_F > 0, (last_F + below_F) / 2, silent_F)


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, x_NLD: Tensor) -> Tensor:
    """threshold_LF fitted on the sample x_NLD (raw MLP inputs) by frequency matching (see the module docstring)."""
    if x_NLD.dim() != 3 or tuple(x_NLD.shape[1:]) != (model.n_layers, model.d_model):
        raise ConfigError(f"the calibration sample must have shape (rows, {model.n_layers}, {model.d_model}), "
                          f"got {tuple(x_NLD.shape)}: pass the MLP inputs of every layer")
    xn_NLD = (x_NLD.float().to(model.b_enc.device) - model.x_mean_LD) / model.x_scale_L[:, None]
    thresholds = []
    for i in range(model.n_layers):
        pre_NF = F.linear(xn_NLD[:, i], model.W_enc[i], model.b_enc[i]).float()
        thresholds.append(_frequency_matched(pre_NF, _selection_counts(model, pre_NF, i)))
    # Folding keeps pre-activations (and so thresholds) in raw units: see Transcoder.folded_state.
    return torch.stack(thresholds)


def jumprelu_state(state: dict[str, Tensor], threshold_LF: Tensor) -> dict[str, Tensor]:
    """`state` with its sparsifier entries replaced by a JumpReLU's, thresholds `threshold_LF` (raw units)."""
    out = {k: v for k, v in state.items() if not k.startswith("sparsifier.")}
    # As Sparsifier.to_jumprelu: θ is stored as log θ, so a zero threshold becomes a tiny positive one.
    out["sparsifier.log_threshold_LF"] = threshold_LF.float().clamp_min(1e-12).log()
    return out


def jumprelu_copy(model: nn.Module, threshold_LF: Tensor) -> nn.Module:
    """A frozen copy of `model` (a `Transcoder`; normalisation folded) whose sparsifier is a JumpReLU with thresholds
    `threshold_LF`."""
    cfg = dataclasses.replace(model.cfg, sparsifier="jumprelu")
    copy = type(model)(cfg, device=model.b_enc.device, initialize=False)
    copy.load_state_dict(jumprelu_state(model.folded_state(), threshold_LF.to(model.b_enc.device)), strict=True, assign=True)
    return copy.eval().requires_grad_(False)


def _l0_fvu(model: nn.Module, x_NLD: Tensor, y_NLD: Tensor | None) -> tuple[list[float], list[float] | None]:
    codes = model.encode(x_NLD)
    l0_L = (codes.values_NLK != 0).sum(-1).float().mean(0).tolist()
    if y_NLD is None:
        return l0_L, None
    y = y_NLD.float().to(codes.values_NLK.device)
    err_L = (model.decode(codes) - y).pow(2).sum((0, 2))
    return l0_L, (err_L / (y - y.mean(0)).pow(2).sum((0, 2)).clamp_min(1e-12)).tolist()


@torch.no_grad()
def calibrate_jumprelu(model: nn.Module, x_NLD: Tensor, y_NLD: Tensor | None = None) -> Calibration:
    """Fit per-feature thresholds on x_NLD and measure L0 (and FVU against y_NLD, raw MLP outputs) of both models."""
    if model.cfg.topology == "sae":
        raise ConfigError("calibration fits a transcoder's encoder on MLP inputs; an sae reads MLP outputs: pass a clt or plt")
    was_training = model.training
    model.eval()
    try:
        threshold_LF = calibrate_thresholds(model, x_NLD)
        l0_before, fvu_before = _l0_fvu(model, x_NLD, y_NLD)
        l0_after, fvu_after = _l0_fvu(jumprelu_copy(model, threshold_LF), x_NLD, y_NLD)
    finally:
        model.train(was_training)
    return Calibration(threshold_LF, x_NLD.shape[0], list(model.cfg.k_layers), l0_before, l0_after, fvu_before, fvu_after)
