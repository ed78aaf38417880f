"""`vitclt train`: train transcoders on a backbone's MLPs (the config is `vitclt.training.TrainConfig`)."""

from __future__ import annotations

from pathlib import Path

from vitclt.training.config import TrainConfig

__all__ = ["TrainConfig", "run"]


def run(cfg: TrainConfig) -> list[Path]:
    """Run `vitclt train`: train, print per-layer FVU, L0 and dead %, and say where the checkpoints are."""
    from vitclt.training.runner import train

    return train(cfg, command="train")
