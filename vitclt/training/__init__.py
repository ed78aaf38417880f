"""Training transcoders from streamed backbone activations: `train(TrainConfig(...))` or `vitclt train`.

See docs/training.md for the stream, normalisation, schedule, checkpoint layout and resume.
"""

from vitclt.training.config import TrainConfig, TrainingError, transcoder_configs
from vitclt.training.runner import build_source, run, train
from vitclt.training.trainer import Trainer, Window

__all__ = ["TrainConfig", "Trainer", "TrainingError", "Window", "build_source", "run", "train", "transcoder_configs"]
