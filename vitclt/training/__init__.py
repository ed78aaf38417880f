"""Training transcoders from streamed backbone activations: `train(TrainConfig(...))` or `vitclt train`.

See docs/training.md for the stream, normalisation, schedule, checkpoint layout and resume. The
configs import without torch; the loop (`train`, `Trainer`) loads torch on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "OptimConfig": "config", "StreamConfig": "config", "SweepConfig": "config", "TrainConfig": "config",
    "TrainingError": "config", "transcoder_configs": "config",
    "build_source": "runner", "train": "runner",
    "Trainer": "trainer", "Window": "trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
