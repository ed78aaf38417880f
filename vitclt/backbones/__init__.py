"""Backbones: frozen vision transformers whose MLPs can be captured and replaced.

`load_backbone(spec)` is the one entry point: a hub id or a local directory of a `transformers`
CLIPModel (`openai/clip-vit-base-patch32`, `./my-clip`), or `demo`, the small CLIP that ships with
vitclt. Other families (open_clip, timm, SigLIP, DINOv2) will register here behind the same interface.

Names are imported on first use (PEP 562): importing this package does not import torch or
transformers until one of them is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["Backbone", "BackboneError", "Capture", "Replacement", "ReplaceFn", "TokenSel", "token_index"], "base"),
    **dict.fromkeys(["HFClipBackbone"], "hf_clip"),
    **dict.fromkeys(["ALIASES", "LOADERS", "load_backbone"], "loading"),
}
"""Public name → the submodule of vitclt.backbones that defines it."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

