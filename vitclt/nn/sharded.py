"""A transcoder split over a grid of processes: S feature shards × R data replicas, equal to one process.

Rank ``replica · S + shard`` holds a contiguous slice of every layer's features (encoder rows and bias,
all their decoder rows, JumpReLU thresholds; the trainer keeps their dead counters and Adam moments)
and reads its replica's rows of the global batch. The decoder bias, the normalisation and the TopK
running thresholds are replicated. Per step (`ShardedTranscoder.forward`):

- every shard encodes its features; a TopK selection is exact across shards: each shard takes its
  local top k by `top_k_first`, the candidates' scores are gathered over the feature group in feature
  order, and the global `top_k_first` (ties to the lower global feature index) picks the winners, so
  every shard keeps exactly the features one process keeps. BatchTopK's threshold is the k·N-th
  largest activation of the global batch (local top values gathered over the world); AuxK counts dead
  features over every shard and picks the global top dead features the same way; JumpReLU is local.
- each shard decodes its codes into a partial reconstruction; an all-reduce over the feature group
  sums them (its backward is the identity: every shard computes the same loss from the same sum).
- the target statistics (mean, variance), FVU, L0 and the penalties are over the global batch; the
  loss each rank backpropagates (`objective`) is its share of the one-process loss, so summing the
  shares' gradients over the replica group (`sync_gradients`) gives the one-process gradient.

Everything else (Adam, dead counters) is elementwise per feature, so a slice of the one-process state
evolves exactly as the same slice of a one-process run. `shard_state` and `gather_state` convert a
one-process state dict to a rank's slice and back (`FEATURE_AXIS`), which is also how checkpoints
stay independent of the grid. Without torch.distributed initialised the grid is 1 × 1 and nothing is
communicated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vitclt.errors import ConfigError
from vitclt.nn.config import TranscoderConfig
from vitclt.nn.sparse import Codes, LayerCodes, stack_codes
from vitclt.nn.sparsifiers import (
    AbsTopK,
    BatchTopK,
    JumpReLU,
    ReLUTopK,
    Selection,
    Sparsifier,
    TopKSparsifier,
    _pack,
    _select_top_k,
    top_k_first,
)
from vitclt.nn.transcoder import Transcoder


@dataclass(frozen=True)
class Grid:
    """Where this process sits in the grid of S feature shards × R data replicas (rank = replica · S + shard)."""

    shards: int
    """S: feature shards (ranks that read the same rows and hold different features)."""
    replicas: int
    """R: data replicas (ranks that hold the same features and read different rows)."""
    shard: int = 0
    """This rank's feature shard."""
    replica: int = 0
    """This rank's data replica."""
    feature_group: object = None
    """Process group of this rank's feature shards (None: S = 1)."""
    replica_group: object = None
    """Process group of this rank's replicas (None: R = 1)."""

    @classmethod
    def single(cls) -> Grid:
        """One process: nothing is sharded or replicated."""
        return cls(1, 1)

    @classmethod
    def create(cls, shards: int) -> Grid:
        """This rank's place in a grid of ``shards`` feature shards over the initialised default process group.

        Every rank must call it (with the same ``shards``): it creates every group of the grid.
        """
        if not dist.is_initialized():
            if shards != 1:
                raise ConfigError(f"--feature-shards {shards} needs several processes: launch with torchrun --nproc-per-node N")
            return cls.single()
        world, rank = dist.get_world_size(), dist.get_rank()
        if shards < 1 or world % shards:
            raise ConfigError(f"--feature-shards {shards} must divide the {world} processes: choose a divisor of {world}")
        replicas = world // shards
        feature_groups = [dist.new_group([r * shards + s for s in range(shards)]) for r in range(replicas)]
        replica_groups = [dist.new_group([r * shards + s for r in range(replicas)]) for s in range(shards)]
        replica, shard = divmod(rank, shards)
        return cls(shards, replicas, shard, replica,
                   feature_groups[replica] if shards > 1 else None, replica_groups[shard] if replicas > 1 else None)

    @property
    def size(self) -> int:
        """N = S · R processes."""
        return self.shards * self.replicas

    def feature_slice(self, n_features: int) -> slice:
        """This shard's contiguous range of a layer's features."""
        if n_features % self.shards:
            raise ConfigError(f"{n_features} features per layer do not split into {self.shards} equal shards: "
                              f"choose --feature-shards dividing {n_features}, or change --n-features/--expansion")
        width = n_features // self.shards
        return slice(self.shard * width, (self.shard + 1) * width)

    def batch_slice(self, batch_size: int) -> slice:
        """This replica's rows of a global batch."""
        if batch_size % self.replicas:
            raise ConfigError(f"--batch-size {batch_size} does not split into {self.replicas} data replicas: "
                              f"choose a multiple of {self.replicas}")
        rows = batch_size // self.replicas
        return slice(self.replica * rows, (self.replica + 1) * rows)

    def sum_features(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over the feature group, in place (no gradient)."""
        if self.feature_group is not None:
            dist.all_reduce(t, group=self.feature_group)
        return t

    def sum_replicas(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over the replica group, in place (no gradient)."""
        if self.replica_group is not None:
            dist.all_reduce(t, group=self.replica_group)
        return t

    def gather_features(self, t: Tensor, dim: int) -> Tensor:
        """``t`` of every feature shard concatenated along ``dim``, in shard order."""
        if self.feature_group is None:
            return t
        parts = [torch.empty_like(t) for _ in range(self.shards)]
        dist.all_gather(parts, t.contiguous(), group=self.feature_group)
        return torch.cat(parts, dim)

    def gather_features_to_lead(self, t: Tensor, dim: int) -> Tensor | None:
        """``t`` of every feature shard concatenated along ``dim`` on shard 0 of this replica (None on the others).

        What a checkpoint needs: only the rank that writes holds the whole tensor.
        """
        if self.feature_group is None:
            return t
        lead = self.shard == 0
        parts = [torch.empty_like(t) for _ in range(self.shards)] if lead else None
        dist.gather(t.contiguous(), parts, dst=self.replica * self.shards, group=self.feature_group)
        return torch.cat(parts, dim) if lead else None

    def gather_world(self, t: Tensor) -> Tensor:
        """``t`` of every rank concatenated along dim 0."""
        if self.size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)


class _SumFeatures(torch.autograd.Function):
    """Σ over the feature group of the partial reconstructions; backward: the identity (every shard holds the same loss)."""

    @staticmethod
    def forward(ctx, grid: Grid, partial: Tensor) -> Tensor:
        return grid.sum_features(partial.clone())

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, grad


# Sparsifiers that select across shards. Each keeps its one-process class's state names, so that a slice of a
# one-process state dict loads into it unchanged; `grid` is set by `ShardedTranscoder`.


class _ShardedSelect:
    """Shared: the grid, and the penalty as this rank's share of the global batch's."""

    grid: Grid

    def penalty(self, pre_NK: Tensor, selection: Selection, layer: int) -> Tensor:
        """This replica's share of the global mean over rows (the penalty is a mean over rows)."""
        return super().penalty(pre_NK, selection, layer) / self.grid.replicas

    def _global_top_k(self, score_NF: Tensor, k: int) -> tuple[Selection, Tensor]:
        """This shard's part of the global `top_k_first` of each row, and each row's global k-th score."""
        k_local = min(k, score_NF.shape[1])
        local, _ = _select_top_k(score_NF, k_local)
        # In feature order, so that the gathered candidates are in global feature order and `top_k_first`'s
        # lowest-position rule is the lowest-global-index rule.
        indices_NK = local.indices_NK.sort(1).values
        candidates_NK = self.grid.gather_features(score_NF.gather(1, indices_NK), 1)
        keep_NK = torch.zeros_like(candidates_NK, dtype=torch.bool).scatter_(1, top_k_first(candidates_NK, k), True)
        mine = slice(self.grid.shard * k_local, (self.grid.shard + 1) * k_local)
        kth_N = candidates_NK.masked_fill(~keep_NK, float("inf")).min(1).values
        return Selection(indices_NK, keep_NK[:, mine]), kth_N

    def _mean_rows(self, v_N: Tensor) -> Tensor:
        """Mean over the global batch of a per-row value (each replica holds its rows')."""
        return self.grid.sum_replicas(v_N.float().sum().reshape(1))[0] / (v_N.shape[0] * self.grid.replicas)

    def select_aux(self, pre_NF: Tensor, dead_F: Tensor, k_aux: int) -> Selection:
        """AuxK: the global top ``k_aux`` dead features of each row, over every shard."""
        k_aux = max(1, min(k_aux, self.n_features))
        score_NF = self.score(pre_NF).float().masked_fill(~dead_F, -float("inf"))
        selection, _ = self._global_top_k(score_NF, k_aux)
        return Selection(selection.indices_NK, selection.active_NK & dead_F[selection.indices_NK])


class ShardedJumpReLU(_ShardedSelect, JumpReLU):
    """JumpReLU on a shard: selection is per feature, so local; only the penalty is a share."""


class ShardedReLUTopK(_ShardedSelect, ReLUTopK):
    """ReLU-TopK, exact across shards."""

    def select(self, pre_NF: Tensor, layer: int, update_stats: bool = False) -> Selection:
        """This shard's part of the per-row global top-k of the pre-activations."""
        selection, kth_N = self._global_top_k(pre_NF, self.k_L[layer])
        if update_stats:
            self._update_threshold(layer, self._mean_rows(kth_N.relu()))
        return selection


class ShardedAbsTopK(_ShardedSelect, AbsTopK):
    """Abs-TopK, exact across shards."""

    def select(self, pre_NF: Tensor, layer: int, update_stats: bool = False) -> Selection:
        """This shard's part of the per-row global top-k of |pre|."""
        selection, kth_N = self._global_top_k(pre_NF.abs(), self.k_L[layer])
        if update_stats:
            self._update_threshold(layer, self._mean_rows(kth_N))
        return selection


class ShardedBatchTopK(_ShardedSelect, BatchTopK):
    """BatchTopK with the k·N-th largest activation taken over the global batch and every feature."""

    def select(self, pre_NF: Tensor, layer: int, update_stats: bool = False) -> Selection:
        """Train: this shard's entries at or above the global batch's k·N-th activation; eval: as one process."""
        if not self.training:
            return super().select(pre_NF, layer, update_stats)
        score_NF = pre_NF.relu()
        grid = self.grid
        n_keep = min(self.k_L[layer] * pre_NF.shape[0] * grid.replicas, score_NF.numel() * grid.size)
        # The global k·N largest are among the union of every rank's local k·N largest.
        local = score_NF.flatten().topk(min(n_keep, score_NF.numel()), sorted=False).values
        smallest = grid.gather_world(local).topk(n_keep, sorted=False).values.min()
        if update_stats:
            self._update_threshold(layer, smallest)
        return _pack(score_NF.float(), (score_NF >= smallest) & (score_NF > 0))


SHARDED_SPARSIFIERS: dict[type[Sparsifier], type[Sparsifier]] = {
    JumpReLU: ShardedJumpReLU, ReLUTopK: ShardedReLUTopK, AbsTopK: ShardedAbsTopK, BatchTopK: ShardedBatchTopK,
}
"""The sharded class of each one-process sparsifier."""

FEATURE_AXIS: dict[str, int] = {"W_enc.": 0, "W_dec.": 0, "b_enc": 1, "sparsifier.log_threshold_LF": 1}
"""State-dict name prefix → the axis along which the tensor holds features (absent: replicated)."""


def feature_axis(name: str) -> int | None:
    """The feature axis of a transcoder state-dict entry (or a per-feature counter ending in ``_LF``), None if replicated."""
    if name.endswith("_LF") and not name.startswith("sparsifier."):
        return 1
    return next((axis for prefix, axis in FEATURE_AXIS.items() if name.startswith(prefix)), None)


def shard_state(state: dict[str, Tensor], grid: Grid, n_features: int) -> dict[str, Tensor]:
    """This rank's slice of a one-process state dict (replicated entries as they are)."""
    part = grid.feature_slice(n_features)
    out = {}
    for name, t in state.items():
        axis = feature_axis(name)
        out[name] = t if axis is None else t.narrow(axis, part.start, part.stop - part.start).clone()
    return out


def gather_state(state: dict[str, Tensor], grid: Grid, lead_only: bool = False) -> dict[str, Tensor] | None:
    """The one-process state dict from every feature shard's slice (a collective over the feature group).

    ``lead_only``: only shard 0 receives it (the others get None), so no other rank holds the whole model.
    """
    gather = grid.gather_features_to_lead if lead_only else grid.gather_features
    out = {name: t if feature_axis(name) is None else gather(t, feature_axis(name)) for name, t in state.items()}
    return None if lead_only and grid.shard != 0 else out


class ShardedOutput(NamedTuple):
    """What one sharded training forward returns; ``objective`` is what this rank backpropagates."""

    codes: Codes
    """This shard's codes of this replica's rows; indices are local (add ``feature_offset`` for global ones)."""
    recon_NLD: Tensor
    """Reconstruction of this replica's rows (every shard's features), raw units."""
    fvu_L: Tensor
    """FVU per layer over the global batch."""
    fvu: Tensor
    """Sum of fvu_L."""
    sparsity_loss: Tensor
    """JumpReLU L0 penalty over the global batch and every feature."""
    auxk_loss: Tensor
    """AuxK loss over the global batch."""
    l0_L: Tensor
    """Mean nonzero features per row and layer, over the global batch and every feature."""
    loss: Tensor
    """fvu + sparsity_loss + auxk_loss: the one-process loss (detached)."""
    objective: Tensor
    """This rank's share of ``loss``: the shares' gradients summed over replicas are the one-process gradient."""


class ShardedTranscoder(nn.Module):
    """One rank's slice of a `Transcoder`; see the module docstring. ``local`` is a Transcoder of the slice's size."""

    def __init__(self, cfg: TranscoderConfig, grid: Grid, device: torch.device | str | None = None) -> None:
        """An uninitialised slice: fill it with `from_transcoder` or `load_state_dict`."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.grid = grid
        part = grid.feature_slice(cfg.features)
        self.feature_offset = part.start
        width = part.stop - part.start
        # The slice is a Transcoder of `width` features; its k is clipped only to pass validation: the sharded
        # sparsifier selects with the full model's k.
        local_cfg = dataclasses.replace(cfg, n_features=width, k=min(cfg.k, width),
                                        k_per_layer=tuple(min(k, width) for k in cfg.k_per_layer))
        self.local = Transcoder(local_cfg, device=device, initialize=False)
        self.local.sparsifier = self._make_sparsifier(width).to(device)

    def _make_sparsifier(self, width: int) -> Sparsifier:
        cfg = self.cfg
        if cfg.sparsifier == "jumprelu":
            sparsifier = ShardedJumpReLU(cfg.n_layers, width, bandwidth=cfg.jumprelu_bandwidth,
                                         init_threshold=cfg.jumprelu_init_threshold,
                                         sparsity_coefficient=cfg.sparsity_coefficient)
        else:
            classes = {c.name: c for c in SHARDED_SPARSIFIERS.values()}
            sparsifier = classes[cfg.sparsifier](cfg.n_layers, cfg.features, cfg.k_layers, threshold_ema=cfg.threshold_ema)
        sparsifier.grid = self.grid
        return sparsifier

    @classmethod
    def from_transcoder(cls, model: Transcoder, grid: Grid) -> ShardedTranscoder:
        """This rank's slice of a one-process model (e.g. the full initialisation drawn with the run's seed)."""
        sharded = cls(model.cfg, grid, device=model.b_dec.device)
        sharded.load_state_dict(shard_state(model.state_dict(), grid, model.n_features))
        sharded.sparsity_coefficient = model.sparsity_coefficient
        return sharded.train(model.training)

    def to_transcoder(self, lead_only: bool = False) -> Transcoder | None:
        """The one-process model (a collective over the feature group: every shard must call it).

        ``lead_only``: built on shard 0 only (None elsewhere).
        """
        state = gather_state(self.state_dict(), self.grid, lead_only)
        if state is None:
            return None
        model = Transcoder(self.cfg, device=self.local.b_dec.device, initialize=False)
        model.load_state_dict(state)
        model.sparsity_coefficient = self.sparsity_coefficient
        return model.train(self.training)

    def match_l0(self, x_NLD: Tensor, y_NLD: Tensor) -> list[float]:
        """`Transcoder.match_l0` of the one-process model (a collective over the feature group; every rank holds the same
        rows, so every rank finds the same factors), applied to this shard's slice of the thresholds."""
        factors = self.to_transcoder().match_l0(x_NLD, y_NLD)
        with torch.no_grad():
            for layer, factor in enumerate(factors):
                self.local.sparsifier.log_threshold_LF[layer] += math.log(factor)
        return factors

    def state_dict(self, *args, **kwargs):
        """The slice's state, under the one-process model's names."""
        return self.local.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a slice's state (one-process names, see `shard_state`)."""
        return self.local.load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def n_layers(self) -> int:
        """Number of layers L."""
        return self.cfg.n_layers

    @property
    def n_features(self) -> int:
        """Features per layer of the whole model."""
        return self.cfg.features

    @property
    def local_features(self) -> int:
        """Features per layer on this shard."""
        return self.local.n_features

    @property
    def sparsity_coefficient(self) -> float:
        """JumpReLU L0 penalty coefficient λ (the trainer may schedule it)."""
        return self.local.sparsity_coefficient

    @sparsity_coefficient.setter
    def sparsity_coefficient(self, value: float) -> None:
        self.local.sparsity_coefficient = value

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Sum every parameter's gradient over the replica group (each replica's is its share's)."""
        if self.grid.replica_group is None:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            # One collective for all parameters, not one per decoder.
            flat = torch.cat([g.reshape(-1) for g in grads])
            self.grid.sum_replicas(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def forward(self, x_NLD: Tensor, y_NLD: Tensor, dead_mask_LF: Tensor | None = None) -> ShardedOutput:
        """Encode this shard's features of this replica's rows, decode across shards, and compute the losses.

        ``dead_mask_LF``: this shard's dead features (L, local features), the same on every replica.
        """
        m, grid = self.local, self.grid
        m._check_shape("y", y_NLD)
        if self.cfg.topology == "sae":
            x_NLD = y_NLD
        m._check_shape("x", x_NLD)
        xn_NLD = m._normalize_input(x_NLD)
        yn_NLD = m._normalize_target(y_NLD)
        n_global = x_NLD.shape[0] * grid.replicas
        update_stats = self.training and torch.is_grad_enabled()
        auxk = dead_mask_LF is not None and isinstance(m.sparsifier, TopKSparsifier)
        # Dead features counted over every shard: a layer takes part in AuxK on every shard or on none.
        dead_L = grid.sum_features(dead_mask_LF.sum(1)).tolist() if auxk else [0] * self.n_layers
        main, aux, penalties = [], [], []
        for i in range(self.n_layers):
            dead_F = dead_mask_LF[i] if dead_L[i] else None
            codes_i, aux_i, penalty_i = m._encode_layer(i, xn_NLD[:, i], dead_F, update_stats)
            main.append(codes_i)
            aux.append(aux_i)
            penalties.append(penalty_i)
        codes = stack_codes(main)
        partial_NLD = m._decoder(codes)(codes, m.decoder_weights(), m.pairs, self.n_layers)
        recon_NLD = _SumFeatures.apply(grid, partial_NLD) + m.b_dec

        with torch.no_grad():
            mean_LD = grid.sum_replicas(yn_NLD.sum(0)) / n_global
            total_var_L = grid.sum_replicas((yn_NLD - mean_LD).pow(2).sum((0, 2))).clamp_min(1e-12)
        fvu_share_L = (recon_NLD - yn_NLD).pow(2).sum((0, 2)) / total_var_L
        penalty_share = torch.stack(penalties).sum()
        auxk_share = self._auxk_share(aux, dead_L, yn_NLD - recon_NLD.detach(), total_var_L)
        objective = fvu_share_L.sum() + penalty_share + auxk_share
        with torch.no_grad():
            fvu_L = grid.sum_replicas(fvu_share_L.detach().clone())
            sums = torch.stack([penalty_share.detach().float(), auxk_share.detach().float()])
            penalty_total = grid.sum_replicas(grid.sum_features(sums[:1].clone()))[0]
            auxk_total = grid.sum_replicas(sums[1:].clone())[0]
            nonzero_L = grid.sum_replicas(grid.sum_features((codes.values_NLK != 0).sum(-1).sum(0).float()))
        l0_L = nonzero_L / n_global
        fvu = fvu_L.sum()
        return ShardedOutput(
            codes=codes,
            recon_NLD=recon_NLD * m.y_scale_L[:, None] + m.y_mean_LD,
            fvu_L=fvu_L, fvu=fvu, sparsity_loss=penalty_total, auxk_loss=auxk_total, l0_L=l0_L,
            loss=fvu + penalty_total + auxk_total, objective=objective,
        )

    def _auxk_share(self, aux: list[LayerCodes | None], dead_L: list[int], residual_NLD: Tensor,
                    total_var_L: Tensor) -> Tensor:
        """This replica's share of `Transcoder._auxk_loss`, the AuxK codes decoded across shards."""
        m = self.local
        zero = total_var_L.new_zeros(())
        sources = [i for i, a in enumerate(aux) if a is not None]
        if not sources:
            return zero
        pairs = [(i, j) for (i, j) in m.pairs if i in sources]
        weights = [m.decoder(i, j) for (i, j) in pairs]
        template = aux[sources[0]]
        idle = LayerCodes(torch.zeros_like(template.values_NK[:, :1]), torch.zeros_like(template.indices_NK[:, :1]))
        aux_codes = stack_codes([idle if a is None else a for a in aux])
        ehat_NLD = _SumFeatures.apply(self.grid, m._decoder(aux_codes)(aux_codes, weights, pairs, self.n_layers))
        err_L = (ehat_NLD - residual_NLD).pow(2).sum((0, 2)) / total_var_L
        k_aux = self.cfg.auxk_k or self.cfg.d_model // 2
        n_dead = float(sum(dead_L[i] for i in sources))
        scale = min(n_dead / (k_aux * len(sources)), 1.0)
        err_J = torch.stack([err_L[j] for j in sorted({j for _, j in pairs})])
        return self.cfg.auxk_alpha * scale * err_J.sum()

    @torch.no_grad()
    def fired_LF(self, codes: Codes) -> Tensor:
        """Which of this shard's features fired on any row of the global batch (summed over replicas)."""
        L, width = self.n_layers, self.local_features
        indices_NLK, values_NLK = codes.indices_NLK, codes.values_NLK
        offset_1L1 = (torch.arange(L, device=indices_NLK.device) * width).view(1, -1, 1)
        counts = torch.zeros(L * width, dtype=torch.long, device=indices_NLK.device)
        counts.index_add_(0, (indices_NLK + offset_1L1).flatten(), (values_NLK != 0).flatten().long())
        return self.grid.sum_replicas(counts).view(L, width) > 0
