"""Transcoders (CLT, PLT, SAE), their sparsifiers, sparse kernels and file formats.

Names are imported on first use (PEP 562), so that ``import vitclt.nn.config`` (which every
command's config needs) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["Codes", "LayerCodes", "dense_decode", "gathered_linear", "sparse_decode", "stack_codes"], "sparse"),
    **dict.fromkeys(
        ["SPARSIFIERS", "AbsTopK", "BatchTopK", "JumpReLU", "ReLUTopK", "Selection", "Sparsifier", "TopKSparsifier"],
        "sparsifiers",
    ),
    **dict.fromkeys(
        ["SPARSIFIER_NAMES", "TOPOLOGIES", "SparsifierName", "TokenSet", "Topology", "TranscoderConfig"], "config"
    ),
    **dict.fromkeys(["CheckpointError"], "formats"),
    **dict.fromkeys(["ForwardOutput", "Transcoder"], "transcoder"),
}
"""Public name → the submodule of vitclt.nn that defines it."""

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

