"""What an attribution graph explains: a fixed linear combination of the image's class cosines.

Every target is s = Σ_C w_C cos(e, c_C) = d · e / |e| with d = Σ_C w_C c_C. The graph explains
d · e / |e₀| (the norm |e₀| of the clean embedding frozen), which equals s at the image and is
linear in e. Its gradient misses the renormalisation −(d · ê₀) ê₀ / |e₀|, which is small when d · ê₀,
the target's own value, is small next to |d|:

- **logit-diff** (default): cos(e, c_target) − cos(e, c_versus), versus the runner-up class (the best
  other class of the clean image) or a chosen one. Both cosines share the norm, so a write along e
  moves them together and the difference barely; the value is a small difference of cosines.
- **logit-mean**: cos(e, c_target) − the mean cosine over all classes.
- **cosine**: cos(e, c_target) alone, the score the graph explained first; at a typical cosine of 0.8
  the renormalisation undoes most of a feature's write along the embedding, which the graph misses.

The weights w_C are fixed at the clean image (the runner-up does not change with an intervention), so
measured changes of s are w · Δcos.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vitclt.circuits.errors import CircuitError

SCORES = ("logit-diff", "logit-mean", "cosine")
"""Target kinds, the default first."""
DEFAULT_SCORE = SCORES[0]


@dataclass
class TargetScore:
    """A target class and the class weights w_C whose combination of cosines the graph explains."""

    kind: str
    """One of SCORES."""
    target: int
    """Index of the target class."""
    versus: int | None
    """For logit-diff, the class subtracted; None otherwise."""
    weights_C: Tensor
    """w_C: the target is Σ_C w_C cos(e, c_C)."""

    def direction(self, classifier_CP: Tensor) -> Tensor:
        """d_P = Σ_C w_C c_C: the target is d · e / |e|."""
        return self.weights_C.to(classifier_CP) @ classifier_CP

    def of(self, cos_C: Tensor) -> float:
        """The target's value at class cosines `cos_C`."""
        return float(self.weights_C.to(cos_C) @ cos_C)

    def describe(self, classnames) -> str:
        """A short formula, e.g. "cos(red star) − cos(green star)"."""
        name = classnames[self.target]
        if self.kind == "logit-diff":
            return f"cos({name}) − cos({classnames[self.versus]})"
        if self.kind == "logit-mean":
            return f"cos({name}) − mean cos"
        return f"cos({name})"


def target_score(kind: str, cos_C: Tensor, target: int, versus: int | None = None) -> TargetScore:
    """The target of `kind` for class `target` on an image whose clean class cosines are `cos_C`.

    `versus` (logit-diff only) is the class subtracted; default the runner-up, the highest other cosine.
    """
    C = int(cos_C.numel())
    if kind not in SCORES:
        raise CircuitError(f"unknown target score {kind!r}: use one of {', '.join(SCORES)}")
    if kind != "logit-diff" and versus is not None:
        raise CircuitError(f"--versus compares two classes, which only --score logit-diff does (got --score {kind})")
    w = torch.zeros(C, dtype=torch.float64)
    w[target] = 1.0
    if kind == "logit-diff":
        if C < 2:
            raise CircuitError("logit-diff needs at least two classes: pass --score cosine")
        if versus is None:
            others = cos_C.detach().double().cpu().clone()
            others[target] = -float("inf")
            versus = int(others.argmax())
        if versus == target:
            raise CircuitError("--versus names the target class itself: pick another class")
        w[versus] -= 1.0
    elif kind == "logit-mean":
        w -= 1.0 / C
    return TargetScore(kind, int(target), versus, w)
