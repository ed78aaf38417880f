"""How a command runs, shared by every command: `RuntimeConfig`, its `setup`, and output checks.

Nothing here imports torch at module level, so the command-line configs that nest `RuntimeConfig`
stay cheap to import (`vitclt --help`).
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vitclt.errors import ConfigError, OutputError

if TYPE_CHECKING:
    import torch


@dataclass
class RuntimeConfig:
    """Where and how a command runs: device, threads, image decoding, seed and progress bars."""

    device: str = "auto"
    """cpu, cuda, cuda:1, or auto (CUDA when available)."""
    threads: int = 0
    """Torch CPU threads (0: torch's default); on small shared CPUs one thread is often the fastest."""
    workers: int = 2
    """Image-decoding worker processes; they prepare the next batches, and in training the next block (0: main process)."""
    fast_decode: bool = False
    """Decode JPEGs at reduced size when the model's input is much smaller (PIL draft mode): faster, but approximate pixels."""
    images_per_forward: int = 64
    """Images per backbone forward pass."""
    seed: int = 0
    """Seed for every random choice of the run: image order and subsets, initial weights, controls."""
    progress: bool = True
    """Show progress bars (--no-progress silences every bar, the backbone's weight loading included)."""

    def validate(self) -> None:
        """Raise `ConfigError` naming the first setting out of range."""
        for name in ("threads", "workers", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} cannot be negative, got {getattr(self, name)}")
        if self.images_per_forward < 1:
            raise ConfigError(f"--images-per-forward must be at least 1, got {self.images_per_forward}")


def setup(runtime: RuntimeConfig) -> torch.device:
    """Apply `runtime` to this process: torch's threads, every RNG's seed, progress bars; return the device."""
    import numpy as np
    import torch

    runtime.validate()
    if runtime.threads > 0:
        torch.set_num_threads(runtime.threads)
    random.seed(runtime.seed)
    np.random.seed(runtime.seed)
    torch.manual_seed(runtime.seed)
    if not runtime.progress:
        # transformers draws its own bars ("Loading weights") and the hub its download bars.
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        disable_progress_bars()
    return resolve_device(runtime.device)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` → CUDA when available, else CPU; anything else is passed to `torch.device`."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available: use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None


def check_writable_dir(path: Path, flag: str = "--out") -> Path:
    """Make sure directory `path` exists and a file can be created in it, before any compute.

    Creates it (and its parents) if needed and writes, then removes, a probe file, so a read-only
    disk, a missing permission or a parent that is a file fails now, in one line naming `flag`.
    """
    path = Path(path)
    blocked = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise OutputError(f"cannot write to {path} ({blocked} is a file, not a directory): choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".vitclt-write-check-"):
            pass
    except OSError as err:
        raise OutputError(f"cannot write to {path} ({err.strerror or err}): choose another {flag}") from None
    return path


def check_writable_file(path: Path, flag: str = "--out") -> Path:
    """Make sure file `path` can be written (its directory is writable and it is not a directory)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory: give {flag} a file name, e.g. {path / 'result.json'}")
    check_writable_dir(path.parent if str(path.parent) else Path("."), flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"cannot overwrite {path} (permission denied): choose another {flag}")
    return path
