"""Training transcoders from streamed backbone activations: `train(TrainConfig(...))` or `vitclt train`.

See docs/training.md for the stream, normalisation, schedule, checkpoint layout and resume. The
configs import without torch; the loop (`train`, `Trainer`) loads torch on first use.
"""

from __future__ import annotations

from vitclt.lazy import lazy_exports

_EXPORTS = {
    "OptimConfig": "config", "StreamConfig": "config", "SweepConfig": "config", "TrainConfig": "config",
    "TrainingError": "config", "transcoder_configs": "config",
    "build_source": "runner", "train": "runner",
    "StepMetrics": "trainer", "Trainer": "trainer",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
