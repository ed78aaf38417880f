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
from vitclt.nn.config import SPARSIFIER_NAMES, TOPOLOGIES, SparsifierName, TokenSet, Topology, TranscoderConfig
from vitclt.nn.transcoder import ForwardOutput, Transcoder

__all__ = [
    "SPARSIFIERS",
    "SPARSIFIER_NAMES",
    "TOPOLOGIES",
    "SparsifierName",
    "TokenSet",
    "Topology",
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
