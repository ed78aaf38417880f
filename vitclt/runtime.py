"""Process-level settings every command shares: threads, seeds, device, layer windows."""

from __future__ import annotations

import random

import numpy as np
import torch


def setup(threads: int = 0, seed: int | None = None, device: str = "auto") -> torch.device:
    """Set torch's thread count (0 keeps torch's default), seed every RNG, and pick the device.

    On small shared CPUs one thread is often faster than two, so commands expose `--threads`.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    return resolve_device(device)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` → CUDA when available, else CPU; anything else is passed to `torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available: use --device cpu")
    return torch.device(device)


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """Layers from a spec: `"3-11"`, `"3→11"`, `"0,4,7"`, `"all"`, or `"-2"` (the last two layers)."""
    spec = spec.strip().replace("→", "-")
    if spec in ("all", "*"):
        return list(range(n_layers))
    if spec.startswith("-") and spec[1:].isdigit():
        return list(range(n_layers - int(spec[1:]), n_layers))
    layers: list[int] = []
    try:
        for part in spec.split(","):
            lo, sep, hi = part.partition("-")
            layers += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise ValueError(f"cannot read layers {spec!r}: use a window like '3-11', a list like '0,4,7', or 'all'") from None
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {spec!r} out of range: this backbone has layers 0-{n_layers - 1}")
    return sorted(set(layers))

