"""The training step: several transcoders stepped on the same batch, each by its own Adam.

The models compute their own losses (`Transcoder.forward` returns FVU + sparsity + AuxK); the
trainer only schedules the learning rate and JumpReLU's λ (`vitclt.training.sparsity`), tracks which features have not fired
(the dead mask AuxK needs), averages metrics for logging, and watches for non-finite values.
It never waits on the device inside a step: the finiteness flags and metric sums stay on the
device until `check_finite` / `window` read them at logging and checkpoint time, and the dead
mask is handed to the models only once a feature can have gone dead (a host-side bound on the
counters says when), since AuxK then reads how many are dead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from vitclt.data.stream import Batch
from vitclt.nn import Codes, Transcoder
from vitclt.training.checkpoint import load_optimizer, optimizer_tensors
from vitclt.training.config import TrainConfig, TrainingError, default_lr
from vitclt.training.sparsity import sparsity_schedule


def lr_factor(step: int, steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Learning-rate multiplier for update `step` (0-based): linear warmup, constant, linear decay to 0."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    decay_steps = round(decay_fraction * steps)
    decay_start = steps - decay_steps
    decay = (steps - step) / decay_steps if decay_steps and step >= decay_start else 1.0
    return warm * decay


def fired_counts(codes: Codes, n_layers: int, n_features: int) -> Tensor:
    """counts_LF: rows in which each feature was nonzero (a scatter-add: no device sync)."""
    values_NLK, indices_NLK = codes.values_NLK, codes.indices_NLK
    offset_1L1 = (torch.arange(n_layers, device=indices_NLK.device) * n_features).view(1, -1, 1)
    counts = torch.zeros(n_layers * n_features, dtype=torch.long, device=indices_NLK.device)
    counts.index_add_(0, (indices_NLK + offset_1L1).flatten(), (values_NLK != 0).flatten().long())
    return counts.view(n_layers, n_features)


@dataclass
class StepMetrics:
    """Per-layer training metrics averaged over the steps since the last log."""

    steps: int
    loss: float
    fvu_L: list[float]
    l0_L: list[float]
    dead_L: list[float]

    @property
    def fvu(self) -> float:
        """FVU averaged over layers."""
        return sum(self.fvu_L) / len(self.fvu_L)

    @property
    def l0(self) -> float:
        """L0 averaged over layers."""
        return sum(self.l0_L) / len(self.l0_L)

    @property
    def dead(self) -> float:
        """Dead fraction averaged over layers."""
        return sum(self.dead_L) / len(self.dead_L)


class Trainer:
    """Steps every transcoder in `models` on each batch; see the module docstring."""

    def __init__(self, cfg: TrainConfig, models: dict[str, Transcoder], device: torch.device):
        self.cfg = cfg
        self.models = models
        self.device = device
        self.step = 0
        self.autocast = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
        self.base_lr = {name: cfg.optim.lr or default_lr(m.n_features) for name, m in models.items()}
        opt = cfg.optim
        schedules = {name: sparsity_schedule(m, opt.sparsity_control, opt.steps, opt.sparsity_ramp, opt.sparsity_control_rate)
                     for name, m in models.items()}
        self.sparsity = {name: s for name, s in schedules.items() if s is not None}
        self.optimizers = {
            name: torch.optim.Adam(m.parameters(), lr=self.base_lr[name], fused=True)
            for name, m in models.items()
        }
        self.since_fired = {name: torch.zeros(m.n_layers, m.n_features, dtype=torch.long, device=device)
                            for name, m in models.items()}
        # An upper bound on since_fired, kept on the host (refreshed whenever the counters are read anyway):
        # while it is below dead_tokens no feature can be dead, and the step needs no dead mask at all.
        self._since_bound = {name: 0 for name in models}
        self._flags: list[Tensor] = []
        self._flag_steps: list[int] = []
        self._sums: dict[str, Tensor] = {}
        self._window_steps = 0
        # Time each model's share of a step: on CPU directly, on CUDA by events read only at `window` (no sync in a step).
        self.model_s = {name: 0.0 for name in models}
        self._events: dict[str, list] = {name: [] for name in models}
        for m in models.values():
            m.train()

    def train_step(self, batch: Batch) -> None:
        """One update of every transcoder on `batch`."""
        opt_cfg, s = self.cfg.optim, self.step
        x_NLD, y_NLD = batch.x_NLD, batch.y_NLD
        n = x_NLD.shape[0]
        flags = [~torch.isfinite(x_NLD).all(dim=0).all(dim=-1), ~torch.isfinite(y_NLD).all(dim=0).all(dim=-1)]
        factor = lr_factor(s, opt_cfg.steps, opt_cfg.warmup, opt_cfg.decay_fraction)
        for name, model in self.models.items():
            start = self._clock()
            opt = self.optimizers[name]
            for group in opt.param_groups:
                group["lr"] = self.base_lr[name] * factor
            if name in self.sparsity:
                self.sparsity[name].before_step(s)
            can_be_dead = self._since_bound[name] >= model.cfg.dead_tokens
            dead_LF = self.since_fired[name] >= model.cfg.dead_tokens if can_be_dead else None
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out = self._forward(model, batch, dead_LF)
            self._backward(model, out)
            if name in self.sparsity:
                self.sparsity[name].after_step(out.l0_L)
            opt.step()
            opt.zero_grad(set_to_none=True)
            fired = self._fired(model, out)
            self.since_fired[name] = torch.where(fired, 0, self.since_fired[name] + n)
            self._since_bound[name] += n
            flags += [~torch.isfinite(out.fvu_L), (~torch.isfinite(out.loss)).expand_as(out.fvu_L)]
            terms = torch.stack([out.loss.detach().expand_as(out.fvu_L), out.fvu_L.detach(), out.l0_L.detach()])
            self._sums[name] = terms if name not in self._sums else self._sums[name] + terms
            self._lap(name, start)
        self._flags.append(torch.stack(flags))
        self._flag_steps.append(s)
        self._window_steps += 1
        self.step += 1

    def _clock(self):
        """A start mark: a recorded CUDA event, or the CPU clock."""
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _lap(self, name: str, start) -> None:
        """Add the time since `start` to model `name`'s share (on CUDA: once its events are read)."""
        if self.device.type != "cuda":
            self.model_s[name] += time.perf_counter() - start
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._events[name].append((start, end))

    def _read_events(self) -> None:
        for name, pairs in self._events.items():
            if pairs:
                torch.cuda.synchronize(self.device)
                self.model_s[name] += sum(a.elapsed_time(b) for a, b in pairs) / 1000
                pairs.clear()

    def state_bytes(self, name: str) -> int:
        """Bytes model `name` keeps for training: weights, their gradients and Adam's two moments (4 × the weights)."""
        return 4 * sum(p.numel() * p.element_size() for p in self.models[name].parameters())

    # What a sharded trainer (`vitclt.training.distributed`) changes: which rows a model reads, what it
    # backpropagates, and over which features the dead counters are counted.

    def _forward(self, model: Transcoder, batch: Batch, dead_LF: Tensor | None):
        return model(batch.x_NLD, batch.y_NLD, dead_mask_LF=dead_LF)

    def _backward(self, model: Transcoder, out) -> None:
        out.loss.backward()

    def _fired(self, model: Transcoder, out) -> Tensor:
        return fired_counts(out.codes, model.n_layers, model.n_features) > 0

    def _counter_max(self, since_LF: Tensor) -> int:
        return int(since_LF.max())

    def _dead_L(self, model: Transcoder, since_LF: Tensor) -> list[float]:
        return (since_LF >= model.cfg.dead_tokens).float().mean(1).cpu().tolist()

    def full_models(self) -> dict[str, Transcoder]:
        """The models as one process holds them (what a checkpoint saves)."""
        return self.models

    def check_finite(self) -> None:
        """Raise `TrainingError` naming the first step, layer and transcoder that saw NaN/inf since the last check."""
        if not self._flags:
            return
        # (checked step, flag row, layer): rows 0-1 the batch's x and y, then FVU and loss of each transcoder.
        flags = torch.stack(self._flags).cpu()
        steps = self._flag_steps
        self._flags, self._flag_steps = [], []
        if not flags.any():
            return
        i, row, layer = (int(v) for v in torch.nonzero(flags)[0])
        if row < 2:
            what = f"the input batch has NaN/inf {'LN2 outputs' if row == 0 else 'MLP outputs'} at layer {layer}"
            hint = "check the backbone and --dtype (float16 activations can overflow)"
        else:
            name = list(self.models)[(row - 2) // 2]
            kind = "FVU" if row % 2 == 0 else "loss"
            what = f"transcoder {name!r} produced a non-finite {kind} at layer {layer}"
            hint = "lower --lr, or use --dtype float32"
        raise TrainingError(f"step {steps[i] + 1}: {what}; training stopped, the last checkpoint is untouched ({hint})")

    def window(self) -> dict[str, StepMetrics]:
        """Metrics per transcoder averaged since the last call (resets the averages)."""
        self._read_events()
        out = {}
        for name, model in self.models.items():
            dead_L = self._dead_L(model, self.since_fired[name])
            self._since_bound[name] = self._counter_max(self.since_fired[name])
            if name not in self._sums or not self._window_steps:
                out[name] = StepMetrics(0, float("nan"), [float("nan")] * model.n_layers, [float("nan")] * model.n_layers, dead_L)
                continue
            means = (self._sums[name] / self._window_steps).cpu()
            out[name] = StepMetrics(self._window_steps, float(means[0, 0]), means[1].tolist(), means[2].tolist(), dead_L)
        self._sums = {}
        self._window_steps = 0
        return out

    def lr(self, name: str) -> float:
        """The learning rate of the last update of transcoder `name`."""
        return self.optimizers[name].param_groups[0]["lr"]

    def state_tensors(self) -> dict[str, Tensor]:
        """Unfolded weights, optimiser state and steps-since-fired counters of every transcoder."""
        out: dict[str, Tensor] = {}
        for name, model in self.models.items():
            out.update({f"{name}.model.{k}": v for k, v in model.state_dict().items()})
            out.update(optimizer_tensors(self.optimizers[name], f"{name}.optim"))
            out[f"{name}.since_fired_LF"] = self.since_fired[name]
            if name in self.sparsity:
                out.update({f"{name}.sparsity.{k}": v for k, v in self.sparsity[name].state_tensors().items()})
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor], step: int) -> None:
        """Restore what `state_tensors` saved, continuing after update `step`."""
        for name, model in self.models.items():
            prefix = f"{name}.model."
            missing = [k for k in model.state_dict() if prefix + k not in tensors]
            if missing:
                raise TrainingError(f"the training state has no weights for transcoder {name!r} ({missing[:3]}): "
                                    "it was written by another run; pass --overwrite or another --out")
            model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            load_optimizer(self.optimizers[name], tensors, f"{name}.optim")
            self.since_fired[name] = tensors[f"{name}.since_fired_LF"].to(self.device)
            self._since_bound[name] = self._counter_max(self.since_fired[name])
            if name in self.sparsity:
                prefix = f"{name}.sparsity."
                saved = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if saved.keys() != self.sparsity[name].state_tensors().keys():
                    raise TrainingError(f"the training state has no L0-controller state for {name!r}: it was trained with a "
                                        "fixed sparsity coefficient (an older vitclt); resume it with --sparsity-control fixed")
                self.sparsity[name].load_state_tensors(saved)
        self.step = step
