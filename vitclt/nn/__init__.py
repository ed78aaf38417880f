"""Transcoders (CLT, PLT, SAE), their sparsifiers, sparse kernels and file formats.

Names are imported on first use (PEP 562), so that ``import vitclt.nn.config`` (which every
command's config needs) does not import torch.
"""

from __future__ import annotations

from vitclt.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
