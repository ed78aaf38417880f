"""`load_backbone(spec)`: a backbone from a hub id, a directory, a `family:` prefix or an alias."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from .base import Backbone, BackboneError
from .hf_clip import HFClipBackbone

LOADERS: dict[str, Callable[..., Backbone]] = {"hf": HFClipBackbone.from_pretrained}
"""Backbone families by spec prefix (`hf:openai/clip-vit-base-patch32`); `hf` is the default."""


def _demo_dir() -> Path:
    path = Path(str(resources.files("vitclt.assets").joinpath("demo_clip")))
    if not (path / "model.safetensors").is_file():
        raise BackboneError(f"the embedded demo model is missing from {path}: reinstall vitclt, "
                            "or rebuild it with `python tools/train_demo_clip.py` in a source checkout")
    return path


ALIASES: dict[str, Callable[[], str | Path]] = {"demo": _demo_dir}
"""Short names that resolve to a directory: `demo` is the small CLIP shipped inside vitclt."""


def load_backbone(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Backbone:
    """Load a backbone from a spec: `[family:]hub-id-or-directory`, or an alias such as `demo`."""
    spec = str(spec)
    if spec in ALIASES:
        backbone = HFClipBackbone.from_pretrained(ALIASES[spec](), device=device, dtype=dtype)
        backbone.name = spec
        return backbone
    family, sep, rest = spec.partition(":")
    if sep and family in LOADERS:
        return LOADERS[family](rest, device=device, dtype=dtype)
    if sep and not Path(spec).exists() and "/" not in family:
        known = ", ".join(sorted(LOADERS))
        raise BackboneError(f"unknown backbone family {family!r} in {spec!r}: known families are {known} "
                            "(or pass a hub id / directory)")
    return HFClipBackbone.from_pretrained(spec, device=device, dtype=dtype)
