"""Transcoders (CLT, PLT, SAE), their sparsifiers and sparse kernels."""

from vitclt.nn.sparse import Codes, LayerCodes, dense_decode, gathered_linear, sparse_decode, stack_codes
from vitclt.nn.sparsifiers import (
    SPARSIFIERS,
    AbsTopK,
    BatchTopK,
    JumpReLU,
    ReLUTopK,
    Selection,
    Sparsifier,
    TopKSparsifier,
)
from vitclt.nn.transcoder import ForwardOutput, Transcoder, TranscoderConfig

__all__ = [
    "SPARSIFIERS",
    "AbsTopK",
    "BatchTopK",
    "Codes",
    "ForwardOutput",
    "JumpReLU",
    "LayerCodes",
    "ReLUTopK",
    "Selection",
    "Sparsifier",
    "TopKSparsifier",
    "Transcoder",
    "TranscoderConfig",
    "dense_decode",
    "gathered_linear",
    "sparse_decode",
    "stack_codes",
]
