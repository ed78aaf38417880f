"""Training under torchrun: the process grid, the sharded trainer, and which rank writes.

`start` joins the process group torchrun describes (NCCL on CUDA, gloo on CPU; nothing without torchrun) and
returns the `Grid` of ``--feature-shards`` S × R replicas. `make_trainer` slices the one-process models (drawn
and initialised exactly as one process draws them) into `ShardedTranscoder`s and returns a `DistributedTrainer`:
every rank reads the same seeded global batch of ``--batch-size`` rows and trains on its replica's rows; the
trainer's dead counters and Adam moments are per feature, so each rank keeps its slice. Checkpoints hold the
one-process tensors (gathered over the feature shards, written by rank 0 only), so a run resumes at any grid
shape, and the finished transcoder directory is the ordinary one.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor

from vitclt.data.stream import Batch
from vitclt.nn import Transcoder
from vitclt.nn.sharded import Grid, ShardedTranscoder, feature_axis
from vitclt.training.config import TrainConfig, TrainingError
from vitclt.training.trainer import Trainer

TIMEOUT_S = 600
"""How long a collective waits for a silent rank before it fails (a killed rank usually fails it at once)."""


def start(cfg: TrainConfig, device: torch.device) -> tuple[Grid, torch.device]:
    """The grid this process trains in, and its device (cuda:LOCAL_RANK under torchrun on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Grid.create(cfg.feature_shards) if dist.is_initialized() else _single(cfg), device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
    grid = Grid.create(cfg.feature_shards)
    grid.batch_slice(cfg.optim.batch_size)  # refuses a batch that does not split, on every rank alike
    return grid, device


def _single(cfg: TrainConfig) -> Grid:
    if cfg.feature_shards != 1:
        raise TrainingError(f"--feature-shards {cfg.feature_shards} needs several processes: launch with "
                            f"torchrun --nproc-per-node N -m vitclt train ... (N a multiple of {cfg.feature_shards})")
    return Grid.single()


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if dist.is_initialized() else 0


def agree(error: BaseException | None) -> None:
    """A step only some ranks may fail (rank 0's file checks): every rank learns whether any failed.

    The failing rank re-raises its own error; the others stop with a line naming it, instead of waiting in
    the next collective for a rank that is gone.
    """
    if dist.is_initialized():
        failed = torch.tensor([rank() if error is not None else -1])
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if error is None and int(failed) >= 0:
            raise TrainingError(f"rank {int(failed)} stopped (its message says why); this rank stops with it")
    if error is not None:
        raise error


def make_trainer(cfg: TrainConfig, models: dict[str, Transcoder], device: torch.device, grid: Grid) -> Trainer:
    """The trainer of one process (`Trainer`), or of this rank's slices of ``models`` (`DistributedTrainer`)."""
    if grid.size == 1:
        return Trainer(cfg, models, device)
    return DistributedTrainer(cfg, {name: ShardedTranscoder.from_transcoder(m, grid) for name, m in models.items()},
                              device, grid)


class SplitHarvest:
    """A row source whose loads are split over every rank: each runs the backbone on its share, the rows are all-gathered.

    Every rank then holds the whole block, as one process does: the stream's seeded order sends any row of a block to
    any replica, and keeping the stream itself unchanged keeps its state one integer (exact resume at any grid shape).
    N ranks harvest a block about N times faster, for an all-gather of the block's rows (docs/distributed.md).
    """

    def __init__(self, source, device: torch.device):
        self.source = source
        self.device = device
        for name in ("n_images", "rows_per_image", "n_layers", "d_model", "token_positions", "backbone_fingerprint"):
            setattr(self, name, getattr(source, name, ""))

    def _share(self, images) -> list[int]:
        images, n = list(images), dist.get_world_size()
        return images[rank() * len(images) // n:(rank() + 1) * len(images) // n]

    def load(self, images) -> tuple[Tensor, Tensor]:
        """Rows of ``images`` (every rank must call it with the same images)."""
        images, n = list(images), dist.get_world_size()
        if len(images) < n:
            return self.source.load(images)
        rpi = self.rows_per_image
        widest = -(-len(images) // n) * rpi
        mine = [t.to(self.device) for t in self.source.load(self._share(images))]
        rows = mine[0].shape[0]
        out = []
        for t in mine:
            padded = torch.cat([t, t.new_zeros(widest - rows, *t.shape[1:])])
            parts = [torch.empty_like(padded) for _ in range(n)]
            dist.all_gather(parts, padded)
            sizes = [((j + 1) * len(images) // n - j * len(images) // n) * rpi for j in range(n)]
            out.append(torch.cat([p[:size] for p, size in zip(parts, sizes)]))
        return out[0], out[1]

    def prefetch(self, images) -> None:
        """Start preparing this rank's share of the next load."""
        if hasattr(self.source, "prefetch") and len(list(images)) >= dist.get_world_size():
            self.source.prefetch(self._share(images))

    def __getattr__(self, name):
        # Anything else a source offers (the unreadable-image record, the cache's settings) is the wrapped source's.
        return getattr(self.source, name)


def split_harvest(source, grid: Grid, device: torch.device):
    """``source`` with its loads split over the ranks (itself in one process)."""
    return source if grid.size == 1 else SplitHarvest(source, device)


def finish() -> None:
    """Leave the process group (after the last checkpoint)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class DistributedTrainer(Trainer):
    """`Trainer` over `ShardedTranscoder`s: each rank steps its replica's rows of the global batch."""

    def __init__(self, cfg: TrainConfig, models: dict[str, ShardedTranscoder], device: torch.device, grid: Grid):
        super().__init__(cfg, models, device)  # type: ignore[arg-type]
        self.grid = grid
        self.rows = grid.batch_slice(cfg.optim.batch_size)
        self.since_fired = {name: torch.zeros(m.n_layers, m.local_features, dtype=torch.long, device=device)
                            for name, m in models.items()}

    def _forward(self, model, batch: Batch, dead_LF: Tensor | None):
        return model(batch.x_NLD[self.rows], batch.y_NLD[self.rows], dead_mask_LF=dead_LF)

    def _backward(self, model, out) -> None:
        out.objective.backward()
        model.sync_gradients()

    def _fired(self, model, out) -> Tensor:
        return model.fired_LF(out.codes)

    def _counter_max(self, since_LF: Tensor) -> int:
        # Every shard must agree on whether AuxK runs (it is a collective), so the bound is over all features.
        return _max(since_LF, self.grid)

    def _dead_L(self, model, since_LF: Tensor) -> list[float]:
        dead_L = self.grid.sum_features((since_LF >= model.cfg.dead_tokens).sum(1).float())
        return (dead_L / model.n_features).cpu().tolist()

    def state_tensors(self) -> dict[str, Tensor]:
        """The one-process state on rank 0, which writes it (every rank calls it; the others get a part or nothing).

        The replicas of rank 0's feature group hold the same state, so only that group gathers, and only to rank 0.
        """
        if self.grid.replica != 0:
            return {}
        out: dict[str, Tensor] = {}
        for key, t in super().state_tensors().items():
            axis = self._axes[key]
            out[key] = t if axis is None else self.grid.gather_features_to_lead(t, axis)
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor], step: int) -> None:
        """Restore this rank's slice of a one-process state, whatever grid wrote it."""
        local: dict[str, Tensor] = {}
        for name, model in self.models.items():
            part = self.grid.feature_slice(model.n_features)
            for key, t in tensors.items():
                if key.startswith(f"{name}."):
                    axis = self._axes.get(key)
                    local[key] = t if axis is None else t.narrow(axis, part.start, part.stop - part.start).contiguous()
        super().load_state_tensors(local, step)

    @property
    def _axes(self) -> dict[str, int | None]:
        """Training-state key → the axis along which it holds features (None: replicated)."""
        axes: dict[str, int | None] = {}
        for name, model in self.models.items():
            for key in model.state_dict():
                axes[f"{name}.model.{key}"] = feature_axis(key)
            axes[f"{name}.since_fired_LF"] = 1
            # JumpReLU's L0 controller acts on the global L0, so every rank holds the same λ per layer.
            axes.update({f"{name}.sparsity.{key}": None for key in self.sparsity[name].state_tensors()} if name in self.sparsity
                        else {})
            for i, (param, _) in enumerate(model.local.named_parameters()):
                for moment in ("step", "exp_avg", "exp_avg_sq"):
                    axes[f"{name}.optim.{i}.{moment}"] = None if moment == "step" else feature_axis(param)
        return axes

    def full_models(self) -> dict[str, Transcoder]:
        """The one-process models on rank 0 (every rank calls it; the others get None or nothing)."""
        if self.grid.replica != 0:
            return {}
        return {name: m.to_transcoder(lead_only=True) for name, m in self.models.items()}


def _max(t: Tensor, grid: Grid) -> int:
    """The largest entry of ``t`` over every feature shard."""
    m = t.max().reshape(1).clone()
    if grid.feature_group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=grid.feature_group)
    return int(m)
