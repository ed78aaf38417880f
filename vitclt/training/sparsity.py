"""The sparsity coefficient's schedule: how a penalty-based sparsifier (JumpReLU) is steered to its L0.

TopK sparsifiers hold L0 = k by construction; a penalty-based one ends at whatever L0 its coefficient
λ buys. `TargetL0` makes `--k` mean the same for both: a PI controller on λ, one per
layer, drives each layer's training L0 to k (a layer above k gets a larger λ, one below a smaller
one, negative if need be). The error is the relative L0 error clipped to ±1, so one batch moves λ by at most
a fixed step; the update runs on the device, on the L0 the step already computed, so it adds no
device sync. `FixedRamp` is the old behaviour: λ ramps linearly to --sparsity-coefficient over
--sparsity-ramp of the run, and L0 ends wherever it ends.

The controller state (λ per layer) is part of the training state, so resume stays bit-identical.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitclt.nn import Transcoder


def ramp_factor(step: int, steps: int, ramp: float) -> float:
    """Multiplier of JumpReLU's λ at update `step`: linear from 0 over the first `ramp` of the run, then 1."""
    ramp_steps = ramp * steps
    return min(1.0, (step + 1) / ramp_steps) if ramp_steps > 0 else 1.0


class FixedRamp:
    """λ = --sparsity-coefficient × the ramp: the coefficient is a setting, the L0 an outcome."""

    def __init__(self, model: Transcoder, steps: int, ramp: float):
        self.model, self.steps, self.ramp = model, steps, ramp
        self.target = model.sparsity_coefficient

    def before_step(self, step: int) -> None:
        """Set the model's λ for update `step`."""
        self.model.sparsity_coefficient = self.target * ramp_factor(step, self.steps, self.ramp)

    def after_step(self, l0_L: Tensor) -> None:
        """Nothing to learn from the step's L0."""

    def state_tensors(self) -> dict[str, Tensor]:
        """No state: λ is a function of the step."""
        return {}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """No state to restore."""


class TargetL0:
    """λ per layer, steered so that each layer's L0 approaches k (see the module docstring)."""

    def __init__(self, model: Transcoder, rate: float):
        self.model = model
        device = next(model.parameters()).device  # a Transcoder, or a rank's ShardedTranscoder (vitclt.nn.sharded)
        self.k_L = torch.tensor(model.cfg.k_layers, dtype=torch.float32, device=device)
        # Steps of rate × --sparsity-coefficient: the coefficient sets the scale of λ, the controller its value.
        self.step_size = rate * model.sparsity_coefficient
        self.lambda_L = torch.full((model.n_layers,), float(model.sparsity_coefficient), device=device)
        self.error_L = torch.zeros(model.n_layers, device=device)

    def before_step(self, step: int) -> None:
        """Hand the model this step's λ per layer: the integral plus the proportional term."""
        self.model.sparsity_coefficient = self.lambda_L + PROPORTIONAL_STEPS * self.step_size * self.error_L

    @torch.no_grad()
    def after_step(self, l0_L: Tensor) -> None:
        """Fold the step's relative L0 error (clipped to ±1) into the smoothed error, and integrate it into λ."""
        error_L = (l0_L.detach().float() / self.k_L - 1).clamp(-1, 1)
        self.error_L.mul_(ERROR_DECAY).add_((1 - ERROR_DECAY) * error_L)
        self.lambda_L += self.step_size * self.error_L

    def state_tensors(self) -> dict[str, Tensor]:
        """λ's integral and the smoothed error, per layer."""
        return {"lambda_L": self.lambda_L, "error_L": self.error_L}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore what `state_tensors` saved."""
        self.lambda_L = tensors["lambda_L"].to(self.lambda_L.device).clone()
        self.error_L = tensors["error_L"].to(self.error_L.device).clone()


PROPORTIONAL_STEPS = 20
"""The proportional term weighs the current error as much as this many steps of the integral: L0 follows λ only
after the thresholds have moved (Adam's momentum and learning rate set the lag), and a pure integral overshoots."""

ERROR_DECAY = 0.9
"""EMA decay of the L0 error the controller acts on (one batch's L0 is noisy)."""


def sparsity_schedule(model: Transcoder, control: str, steps: int, ramp: float, rate: float) -> FixedRamp | TargetL0 | None:
    """The schedule of `model`'s λ: None for a sparsifier without a penalty (TopK), else per `control`."""
    if model.cfg.sparsifier != "jumprelu":
        return None
    return TargetL0(model, rate) if control == "target-l0" else FixedRamp(model, steps, ramp)
