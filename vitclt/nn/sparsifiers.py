"""Sparsifiers: the nonlinearity that turns a layer's dense pre-activations into a sparse code.

Every sparsifier works in two steps so that the encoder can use a sparse backward:

1. ``select(pre_NF, layer, update_stats)`` looks at the detached dense pre-activations and
   returns a ``Selection``: for every row the feature indices worth keeping (padded to a common
   width K with inactive entries) and which of them are active. Running statistics (the TopK
   threshold) change only when the caller passes ``update_stats=True``, which
   ``Transcoder.forward`` does in a training step and nothing else does.
2. ``activate(pre_NK, selection, layer)`` maps the pre-activations *gathered at those
   indices* (differentiable) to the code values; inactive entries get value 0.

Because every gradient of the code with respect to the pre-activations lives on the
selected entries, the encoder never needs the dense (N, F) gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from vitclt.errors import ConfigError


class Selection(NamedTuple):
    """Which features of each row a sparsifier keeps."""

    indices_NK: Tensor
    """Feature indices (long), distinct within a row; padding entries are inactive."""
    active_NK: Tensor
    """True where the entry is part of the code (False for padding)."""


def _pack(score_NF: Tensor, keep_NF: Tensor) -> Selection:
    """Pack the kept entries of every row into a dense (N, K) index block, K = max kept per row.

    Uses topk on the score so that padding indices are distinct from the kept ones.
    """
    n_keep = int(keep_NF.sum(1).max()) if keep_NF.numel() else 0
    n_keep = max(n_keep, 1)
    masked_NF = score_NF.masked_fill(~keep_NF, -math.inf)
    indices_NK = masked_NF.topk(n_keep, dim=1, sorted=False).indices
    return Selection(indices_NK, keep_NF.gather(1, indices_NK))


def top_k_first(score_NF: Tensor, k: int) -> Tensor:
    """indices_NK: the ``k`` largest entries of each row, ties at the k-th value going to the lowest positions.

    ``torch.topk`` breaks ties in no documented order; this rule makes a code a function of its scores alone,
    so a feature-sharded run (`vitclt.nn.sharded`), whose candidates are laid out in feature order, selects
    exactly the features one process does. No device sync: a second top-k, of the smallest keys, where an
    entry above the k-th value has key -1, one equal to it its position (exact in float32 below 2^24), any
    other +inf.
    """
    kth_N1 = score_NF.topk(k, dim=1, sorted=False).values.min(1, keepdim=True).values
    position_F = torch.arange(score_NF.shape[1], device=score_NF.device, dtype=torch.float32)
    key_NF = torch.where(score_NF > kth_N1, -1.0, torch.where(score_NF == kth_N1, position_F, math.inf))
    return key_NF.topk(k, dim=1, largest=False, sorted=False).indices


def _select_top_k(score_NF: Tensor, k: int) -> tuple[Selection, Tensor]:
    """The `top_k_first` entries of each row, and the k-th score of each row."""
    indices_NK = top_k_first(score_NF, k)
    kept_NK = score_NF.gather(1, indices_NK)
    return Selection(indices_NK, torch.ones_like(indices_NK, dtype=torch.bool)), kept_NK.min(1).values


class Sparsifier(nn.Module):
    """Base class: per-layer sparsification of pre-activations, see the module docstring."""

    name: str = ""
    zero_values_have_gradients: bool = True
    """Whether a code slot with value 0 can pass a gradient back to the encoder (see `TopKSparsifier`): when not,
    the decode may skip such slots' gradients, which on CUDA spares BatchTopK's padding its memory traffic."""

    def __init__(self, n_layers: int, n_features: int) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.n_features = n_features
        self.sparsity_coefficient = 0.0

    def select(self, pre_NF: Tensor, layer: int, update_stats: bool = False) -> Selection:
        """Choose the entries of each row that can be nonzero (no gradient); ``update_stats``: update running statistics."""
        raise NotImplementedError

    def activate(self, pre_NK: Tensor, selection: Selection, layer: int) -> Tensor:
        """Code values from the gathered pre-activations (differentiable; 0 where inactive)."""
        raise NotImplementedError

    def penalty(self, pre_NK: Tensor, selection: Selection, layer: int) -> Tensor:
        """Sparsity penalty for one layer, already scaled by the sparsity coefficient (0 by default)."""
        return pre_NK.new_zeros((), dtype=torch.float32)

    def thresholds(self) -> Tensor:
        """Per-feature JumpReLU thresholds (L, F) equivalent to this sparsifier at eval time."""
        raise NotImplementedError(f"{self.name} has no JumpReLU equivalent")

    def to_jumprelu(self, bandwidth: float = 0.1) -> "JumpReLU":
        """A JumpReLU sparsifier with this sparsifier's eval-time thresholds (for circuit-tracer export)."""
        threshold_LF = self.thresholds().float()
        jump = JumpReLU(self.n_layers, self.n_features, bandwidth=bandwidth).to(threshold_LF.device)
        with torch.no_grad():
            jump.log_threshold_LF.copy_(threshold_LF.clamp_min(1e-12).log())
        return jump


class _JumpReLUFn(torch.autograd.Function):
    """z = pre·H(pre − θ); the threshold gets the rectangle-kernel pseudo-derivative −(θ/ε)·K((pre−θ)/ε)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((pre - threshold).abs() < eps / 2).to(grad_out.dtype)
        grad_pre = grad_out * (pre > threshold)
        grad_threshold = -(threshold / eps) * in_window * grad_out
        return grad_pre, grad_threshold, None


class _StepFn(torch.autograd.Function):
    """H(pre − θ) for the L0 count; only the threshold gets a (rectangle-kernel) gradient, −(1/ε)·K."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((pre - threshold).abs() < eps / 2).to(grad_out.dtype)
        return None, -(1.0 / eps) * in_window * grad_out, None


class JumpReLU(Sparsifier):
    """JumpReLU with a learned per-feature threshold θ (Rajamanoharan et al., 2024).

    Train: z = pre·H(pre − θ). The step has no gradient, so the threshold learns through a
    straight-through estimator whose pseudo-derivative is a rectangle kernel of width
    ``bandwidth`` (ε) around θ, from both the reconstruction and the L0 penalty
    ``sparsity_coefficient · Σ_layers mean_rows L0``. Entries within ε/2 below θ are carried in
    the code with value 0 so that their threshold gradient reaches θ without a dense decode.
    Eval: the same hard threshold, no window. θ is stored as log θ in float32, always, because a
    bf16 threshold silently stops learning.
    """

    name = "jumprelu"

    def __init__(
        self,
        n_layers: int,
        n_features: int,
        bandwidth: float = 0.1,
        init_threshold: float = 1.0,
        sparsity_coefficient: float = 1e-3,
    ) -> None:
        super().__init__(n_layers, n_features)
        self.bandwidth = bandwidth
        self.sparsity_coefficient = sparsity_coefficient
        self.log_threshold_LF = nn.Parameter(
            torch.full((n_layers, n_features), math.log(init_threshold), dtype=torch.float32)
        )

    def _apply(self, fn, recurse=True):
        # Casting the model to bf16 must not round the threshold: restore it in float32 afterwards.
        keep = self.log_threshold_LF.detach().clone()
        out = super()._apply(fn, recurse)
        if self.log_threshold_LF.dtype != torch.float32:
            self.log_threshold_LF.data = keep.to(self.log_threshold_LF.device)
        return out

    def _threshold_F(self, layer: int) -> Tensor:
        return self.log_threshold_LF[layer].exp()

    @torch.no_grad()
    def fit_threshold(self, layer: int, pre_NF: Tensor, target_l0: float, floor: float = 1e-3) -> None:
        """Set layer ``layer``'s θ so that about ``target_l0`` features per row fire on ``pre_NF``.

        Each feature's θ is the (1 − target_l0/F) quantile of its own pre-activations over the
        sample (linear interpolation, as ``torch.quantile``), so every feature fires on the same
        fraction of rows and the expected L0 is ``target_l0``. θ is floored at ``floor`` (it is
        stored as log θ); a floor only lowers L0. A single sorted top slice per feature, not a
        full sort, so a sample of thousands of rows at F = 6144 costs little.
        """
        n, n_features = pre_NF.shape
        if n < 2:
            raise ValueError(f"JumpReLU threshold initialisation needs at least 2 rows, got {n}")
        q = 1.0 - min(max(float(target_l0), 0.0), n_features) / n_features
        position = q * (n - 1)
        low = min(math.floor(position), n - 2)
        frac = position - low
        # Ascending ranks low and low + 1 are the last two of the top n - low values.
        top = pre_NF.float().topk(n - low, dim=0).values  # (n - low, F)
        at_low_F, above_F = top[-1], top[-2]
        threshold_F = at_low_F + frac * (above_F - at_low_F)
        self.log_threshold_LF[layer].copy_(threshold_F.clamp_min(floor).log())

    @torch.no_grad()
    def scale_threshold(self, layer: int, pre_NF: Tensor, target_l0: float) -> float:
        """Multiply layer ``layer``'s θ by one factor so that on ``pre_NF`` about ``target_l0`` features per row fire.

        Entry (n, f) fires under the scaled θ iff pre/θ_f > factor, so the factor lies between the m-th
        and (m+1)-th largest ratio, m = round(target_l0 · rows): the mean L0 on the sample is then
        m / rows exactly (ties aside), and every feature keeps its threshold relative to the others.
        Returns the factor (1 when the sample cannot reach the target: fewer positive entries than m).
        """
        n, n_features = pre_NF.shape
        m = min(max(round(float(target_l0) * n), 1), n * n_features - 1)
        top = (pre_NF.float() / self._threshold_F(layer)).flatten().topk(m + 1).values
        if not top[m - 1] > 0:
            return 1.0
        factor = float((top[m - 1] + top[m].clamp_min(0)) / 2)
        self.log_threshold_LF[layer] += math.log(factor)
        return factor

    def select(self, pre_NF: Tensor, layer: int, update_stats: bool = False) -> Selection:
        """Train: entries above θ − ε/2 (the kernel window included); eval: entries above θ."""
        threshold_F = self._threshold_F(layer).detach()
        margin = self.bandwidth / 2 if self.training else 0.0
        score_NF = pre_NF.float() - threshold_F
        return _pack(score_NF, score_NF > -margin)

    def activate(self, pre_NK: Tensor, selection: Selection, layer: int) -> Tensor:
        """pre·H(pre − θ) through the straight-through estimator (float32)."""
        threshold_NK = self._threshold_F(layer)[selection.indices_NK]
        z_NK = _JumpReLUFn.apply(pre_NK.float(), threshold_NK, self.bandwidth)
        return z_NK * selection.active_NK

    def penalty(self, pre_NK: Tensor, selection: Selection, layer: int) -> Tensor:
        """sparsity_coefficient (a number, or one per layer) × mean over rows of the layer's L0 (straight-through to θ)."""
        coefficient = self.sparsity_coefficient
        if isinstance(coefficient, Tensor):
            coefficient = coefficient[layer]
        elif coefficient == 0:
            return pre_NK.new_zeros((), dtype=torch.float32)
        threshold_NK = self._threshold_F(layer)[selection.indices_NK]
        l0_NK = _StepFn.apply(pre_NK.float(), threshold_NK, self.bandwidth) * selection.active_NK
        return coefficient * l0_NK.sum(1).mean()

    def thresholds(self) -> Tensor:
        """θ for every layer and feature."""
        return self.log_threshold_LF.detach().exp()

    def to_jumprelu(self, bandwidth: float | None = None) -> "JumpReLU":
        """Already a JumpReLU: itself."""
        return self


class TopKSparsifier(Sparsifier):
    """Shared state of the TopK sparsifiers: per-layer k and a running per-layer threshold.

    The threshold is an exponential moving average (over training steps only) of the smallest kept
    activation, so that a JumpReLU with that threshold keeps about k features per row; it
    is what BatchTopK uses at eval and what the circuit-tracer export writes.
    """

    def __init__(
        self, n_layers: int, n_features: int, k: int | Sequence[int], threshold_ema: float = 0.99
    ) -> None:
        super().__init__(n_layers, n_features)
        k_L = [k] * n_layers if isinstance(k, int) else list(k)
        if len(k_L) != n_layers:
            raise ValueError(f"k has {len(k_L)} entries but the transcoder has {n_layers} layers")
        if any(not 0 < kk <= n_features for kk in k_L):
            raise ValueError(f"every k must be in 1..{n_features} (features per layer), got {k_L}")
        self.k_L = k_L
        self.threshold_ema = threshold_ema
        self.register_buffer("threshold_L", torch.zeros(n_layers, dtype=torch.float32))
        self.register_buffer("threshold_seen_L", torch.zeros(n_layers, dtype=torch.bool))

    def score(self, pre_NF: Tensor) -> Tensor:
        """What the TopK ranks (relu or magnitude)."""
        return pre_NF.relu()

    @torch.no_grad()
    def _update_threshold(self, layer: int, smallest_kept: Tensor) -> None:
        # Chosen on the device: asking the host whether this is the first update would wait for it every step.
        value = smallest_kept.float()
        m = self.threshold_ema
        seen = self.threshold_seen_L[layer]
        self.threshold_L[layer] = torch.where(seen, m * self.threshold_L[layer] + (1 - m) * value, value)
        self.threshold_seen_L[layer] = torch.ones_like(seen)

    def select_aux(self, pre_NF: Tensor, dead_F: Tensor, k_aux: int) -> Selection:
        """AuxK: the top ``k_aux`` dead features of each row by the same score."""
        k_aux = max(1, min(k_aux, pre_NF.shape[1]))
        score_NF = self.score(pre_NF).float().masked_fill(~dead_F, -math.inf)
        selection, _ = _select_top_k(score_NF, k_aux)
        return Selection(selection.indices_NK, dead_F[selection.indices_NK])

    # A value is relu(pre)·active: where it is 0, relu's gradient (0 at 0) or the inactive mask (padding) stops
    # any gradient. Abs-TopK, whose values are signed, overrides both.
    zero_values_have_gradients = False

    def activate(self, pre_NK: Tensor, selection: Selection, layer: int) -> Tensor:
        """relu(pre) on the active entries."""
        return pre_NK.relu() * selection.active_NK

    def thresholds(self) -> Tensor:
        """The running per-layer threshold, broadcast over features."""
        if not bool(self.threshold_seen_L.all()):
            raise ConfigError(
                f"{self.name}: no threshold statistics yet; train the transcoder for some steps "
                "(model.train(); model(x, y) with gradients on) before converting or exporting it"
            )
        return self.threshold_L[:, None].expand(self.n_layers, self.n_features).clone()


class ReLUTopK(TopKSparsifier):
    """ReLU-TopK: keep the k largest pre-activations of each row, then ReLU.

    Train and eval: the same per-row top-k (a row may have fewer than k nonzeros when some of
    its top-k pre-activations are negative). Training steps also track the mean k-th
    largest activation, which is the threshold used by ``to_jumprelu``.
    """

    name = "relu-topk"

    def select(self, pre_NF: Tensor, layer: int, update_stats: bool = False) -> Selection:
        """Per-row top-k of the pre-activations (ties to the lower feature index)."""
        selection, kth_N = _select_top_k(pre_NF, self.k_L[layer])
        if update_stats:
            self._update_threshold(layer, kth_N.relu().mean())
        return selection


class AbsTopK(TopKSparsifier):
    """Abs-TopK: keep the k pre-activations of largest magnitude in each row, sign kept.

    Train and eval: the same per-row top-k by |pre|; values are the raw pre-activations, so
    codes can be negative. It has no JumpReLU equivalent (JumpReLU cannot emit negative values),
    so it cannot be exported to circuit-tracer.
    """

    name = "abs-topk"

    def score(self, pre_NF: Tensor) -> Tensor:
        """Magnitude."""
        return pre_NF.abs()

    def select(self, pre_NF: Tensor, layer: int, update_stats: bool = False) -> Selection:
        """Per-row top-k of |pre| (ties to the lower feature index)."""
        selection, kth_N = _select_top_k(pre_NF.abs(), self.k_L[layer])
        if update_stats:
            self._update_threshold(layer, kth_N.mean())
        return selection

    # An active entry whose pre-activation is exactly 0 has value 0 and gradient 1.
    zero_values_have_gradients = True

    def activate(self, pre_NK: Tensor, selection: Selection, layer: int) -> Tensor:
        """The signed pre-activation on the active entries."""
        return pre_NK * selection.active_NK

    def thresholds(self) -> Tensor:
        """Not representable: JumpReLU cannot keep negative activations."""
        raise ConfigError(
            "abs-topk keeps negative activations, which a JumpReLU threshold cannot express; "
            "train with relu-topk, batch-topk or jumprelu to export to circuit-tracer"
        )


class BatchTopK(TopKSparsifier):
    """BatchTopK (Bussmann et al., 2024): top k·N activations over the whole batch, per layer.

    Train: ReLU, then keep the k·N largest activations among all N rows of the batch, so
    busy rows may use more than k features and quiet rows fewer; the smallest kept activation
    updates a running per-layer threshold (like BatchNorm's running statistics).
    Eval: a JumpReLU with that per-layer threshold, so a row's code no longer depends on the
    other rows of its batch.
    """

    name = "batch-topk"

    def select(self, pre_NF: Tensor, layer: int, update_stats: bool = False) -> Selection:
        """Train: batch-wide top k·N; eval: relu(pre) above the running threshold."""
        score_NF = pre_NF.relu()
        if self.training:
            n_keep = min(self.k_L[layer] * pre_NF.shape[0], score_NF.numel())
            smallest = score_NF.flatten().topk(n_keep, sorted=False).values.min()
            if update_stats:
                self._update_threshold(layer, smallest)
            keep_NF = (score_NF >= smallest) & (score_NF > 0)
        else:
            keep_NF = score_NF > self.threshold_L[layer]
        return _pack(score_NF.float(), keep_NF)


SPARSIFIERS: dict[str, type[Sparsifier]] = {
    cls.name: cls for cls in (JumpReLU, ReLUTopK, AbsTopK, BatchTopK)
}
"""Sparsifier classes by their config name."""
