"""Fused Triton kernels for the sparse decode of a transcoder step (CUDA; CPU under TRITON_INTERPRET=1).

``sparse.sparse_decode`` uses them on CUDA when Triton imports, and so does the encoder's sparse
backward (``sparse.gathered_linear``: a decode with one decoder); their torch path (embedding
bags) stays the reference and the CPU path. Three kernels, each one launch for every decoder at once:

* forward: ``out[n, j] = Σ_{pairs (i→j)} Σ_k v[n, i, k]·W^{i→j}[idx[n, i, k]]``. A program owns a
  block of rows × a slice of D for one target j and loops over j's sources and the slots, so each
  output element is written once (no atomics, deterministic). Slots with value 0 (padding, and
  JumpReLU's window entries) are masked out of the gather, so they cost no memory traffic.
* grad of the values: ``g_v[n, i, k] = Σ_{j} ⟨G[n, j], W^{i→j}[idx[n, i, k]]⟩``, a block of code
  entries per program, every slot included (a value-0 JumpReLU window entry needs its gradient),
  unless the sparsifier's value-0 slots pass no gradient on (ReLU-TopK, BatchTopK: relu, padding):
  then they read nothing, which spares BatchTopK's padding (a code as wide as its busiest row).
* grad of the decoders: ``g_W^{i→j}[f] = Σ_{(n, k): idx[n,i,k]=f} v[n, i, k]·G[n, j]``, one program
  per (feature, source) that reads only that feature's entries, through a CSR of the code sorted
  by (source, feature), and writes row f of every decoder of the source once: deterministic, no
  atomics, zeros for a feature no row selected.

The decoders stay the model's separate (F, D) parameters (one per pair, see `nn.transcoder`): the
kernels read them through a table of data pointers, as Triton's grouped-GEMM tutorial does, so
no step copies them into a stacked tensor. Accumulation is in float32 whatever the weights'
dtype; outputs are in the weights' dtype. Triton is imported only when a kernel is first used.
A launch that fails (a Triton or driver that rejects the kernels) is reported to `disable`, after
which `usable` is False for the process and the sparse ops take their torch path.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import NamedTuple, Sequence

import torch
from torch import Tensor


@functools.cache
def available() -> bool:
    """Whether Triton imports (the CUDA path of ``sparse_decode`` needs it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_failure: list[str] = []
"""Why the kernels failed in this process, once they have (then `usable` is False from there on)."""


def usable(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of ``device``: CUDA with Triton, or CPU under TRITON_INTERPRET=1.

    False for the rest of the process once a launch has failed (`disable`).
    """
    if not available() or failed():
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def failed() -> bool:
    """Whether a launch of the kernels has failed in this process (see `disable`)."""
    return bool(_failure)


def disable(exc: Exception) -> None:
    """Stop choosing the kernels in this process after ``exc``, a failed compile or launch, with one warning."""
    triton_version = getattr(sys.modules.get("triton"), "__version__", "not imported")
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    _failure.append(f"{type(exc).__name__}: {reason}")
    warnings.warn(
        f"vitclt: the fused Triton kernels failed on this device ({_failure[-1]}; triton {triton_version}, "
        f"torch {torch.__version__}); this process falls back to the torch path, which gives the same results "
        "more slowly. Please report it with these versions.", RuntimeWarning, stacklevel=3)


def csr_offsets(keys: Tensor, n_keys: int) -> Tensor:
    """(n_keys + 1,) start of each key's run in ``keys`` sorted: a CSR row pointer, without a device sync.

    ``torch.bincount`` would size its output from the largest key, which reads it back to the host
    (a sync on CUDA); counting into a fixed-size buffer never does, and gives the same integers.
    """
    crow = torch.zeros(n_keys + 1, dtype=torch.long, device=keys.device)
    crow[1:].index_add_(0, keys, torch.ones_like(keys))
    return crow.cumsum_(0)


class _PairTable(NamedTuple):
    """The decoder pairs as device tensors the kernels index."""

    w_ptrs: Tensor
    """Data pointer of each pair's (F, D) decoder (int64)."""
    pair_src: Tensor
    """Source layer of each pair (int32)."""
    pair_tgt: Tensor
    """Target layer of each pair (int32)."""
    by_tgt_ptr: Tensor
    """(n_targets + 1,) CSR over targets into ``by_tgt_pair``."""
    by_tgt_pair: Tensor
    """Pair ids sorted by target."""
    by_src_ptr: Tensor
    """(n_sources + 1,) CSR over source layers into ``by_src_pair``."""
    by_src_pair: Tensor
    """Pair ids sorted by source."""


def _csr(keys: Sequence[int], n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    order = sorted(range(len(keys)), key=lambda p: (keys[p], p))
    counts = [0] * (n + 1)
    for key in keys:
        counts[key + 1] += 1
    for i in range(n):
        counts[i + 1] += counts[i]
    as_tensor = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    return as_tensor(counts), as_tensor(order)


def _pair_table(weights: Sequence[Tensor], pairs: Sequence[tuple[int, int]], n_sources: int, n_targets: int) -> _PairTable:
    """The table for these decoders, built once per set of data pointers and reused by every later step.

    Building it copies Python lists to the device, which on CUDA waits for the device to drain; a
    model's parameters keep their storage for its life, so after the first step every call hits.
    """
    key = (tuple(w.data_ptr() for w in weights), tuple(pairs), n_sources, n_targets, weights[0].device)
    return _cached_pair_table(key)


@functools.lru_cache(maxsize=64)
def _cached_pair_table(key) -> _PairTable:
    w_ptrs, pairs, n_sources, n_targets, device = key
    src = [i for i, _ in pairs]
    tgt = [j for _, j in pairs]
    return _PairTable(
        torch.tensor(w_ptrs, dtype=torch.int64, device=device),
        torch.tensor(src, dtype=torch.int32, device=device),
        torch.tensor(tgt, dtype=torch.int32, device=device),
        *_csr(tgt, n_targets, device),
        *_csr(src, n_sources, device),
    )


def _check(weights: Sequence[Tensor]) -> None:
    first = weights[0]
    for w in weights:
        if w.shape != first.shape or w.dtype != first.dtype or w.device != first.device or not w.is_contiguous():
            raise ValueError("the Triton decode needs contiguous decoders of one shape, dtype and device")


def _block(n: int, cap: int) -> int:
    """A power of two ≥ 16 covering n, at most cap (Triton's tiles are powers of two)."""
    return max(16, min(cap, 1 << max(0, (n - 1).bit_length())))


@functools.cache
def _kernels():
    """The compiled kernels, imported on first use (triton.jit reads TRITON_INTERPRET when it decorates)."""
    from vitclt.nn import triton_decode

    return triton_decode.decode_fwd, triton_decode.decode_grad_values, triton_decode.decode_grad_weights


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def decode_forward(
    values_NLK: Tensor, indices_NLK: Tensor, weights: Sequence[Tensor], pairs: Sequence[tuple[int, int]], n_targets: int
) -> Tensor:
    """out_NJD = Σ over pairs (i → j) and slots k of v[n, i, k]·W^{i→j}[idx[n, i, k]], in the weights' dtype.

    ``values_NLK`` must already be in the weights' dtype (as ``sparse_decode`` passes them).
    """
    _check(weights)
    n, n_layers, k = values_NLK.shape
    d = weights[0].shape[1]
    table = _pair_table(weights, pairs, n_layers, n_targets)
    out_NJD = torch.empty(n, n_targets, d, dtype=weights[0].dtype, device=values_NLK.device)
    if n == 0 or n_targets == 0:
        return out_NJD.zero_()
    fwd, _, _ = _kernels()
    block_n, block_d = 32, _block(d, 128)
    grid = (-(-n // block_n), -(-d // block_d), n_targets)
    fwd[grid](values_NLK.contiguous(), indices_NLK.contiguous(), table.w_ptrs, table.pair_src,
              table.by_tgt_ptr, table.by_tgt_pair, out_NJD, n, n_layers, k, d, n_targets,
              W_DTYPE=_tl_dtype(weights[0].dtype), BLOCK_N=block_n, BLOCK_D=block_d)
    return out_NJD


def decode_backward(
    grad_NJD: Tensor,
    values_NLK: Tensor,
    indices_NLK: Tensor,
    weights: Sequence[Tensor],
    pairs: Sequence[tuple[int, int]],
    need_values: bool = True,
    need_weights: bool = True,
    zero_values_have_gradients: bool = True,
) -> tuple[Tensor | None, list[Tensor] | None]:
    """Gradients of ``decode_forward``: (grad of values_NLK in float32, grad of each decoder in its dtype).

    The decoder gradients are views of one (pairs, F, D) buffer, one per pair. With
    ``zero_values_have_gradients=False`` the slots of value 0 get gradient 0 without reading
    anything (for sparsifiers whose zero slots pass no gradient on: padding, relu at 0).
    """
    _check(weights)
    n, n_layers, k = values_NLK.shape
    n_features, d = weights[0].shape
    n_targets = grad_NJD.shape[1]
    device = values_NLK.device
    table = _pair_table(weights, pairs, n_layers, n_targets)
    grad_NJD = grad_NJD.to(weights[0].dtype).contiguous()
    values_NLK = values_NLK.contiguous()
    indices_NLK = indices_NLK.contiguous()
    _, grad_values_kernel, grad_weights_kernel = _kernels()
    block_d = _block(d, 128)
    grad_values = grad_weights = None
    if need_values:
        grad_values = torch.zeros(n, n_layers, k, dtype=torch.float32, device=device)
        block_e = 32
        if n * k:
            grid = (-(-(n * k) // block_e), n_layers)
            grad_values_kernel[grid](values_NLK, indices_NLK, grad_NJD, table.w_ptrs, table.pair_tgt,
                                     table.by_src_ptr, table.by_src_pair, grad_values, n, n_layers, k, d, n_targets,
                                     W_DTYPE=_tl_dtype(weights[0].dtype), SKIP_ZERO=not zero_values_have_gradients,
                                     BLOCK_E=block_e, BLOCK_D=block_d)
    if need_weights:
        # Entries sorted by (source layer, feature): feature f of source i owns order[crow[i·F + f] : crow[i·F + f + 1]].
        key_NLK = indices_NLK
        if n_layers > 1:
            key_NLK = indices_NLK + torch.arange(n_layers, device=device).view(1, -1, 1) * n_features
        flat = key_NLK.reshape(-1)
        order = flat.argsort()
        crow = csr_offsets(flat, n_layers * n_features)
        grad_buffer = torch.empty(len(pairs), n_features, d, dtype=weights[0].dtype, device=device)
        grad_weights_kernel[(n_features, n_layers)](
            values_NLK, order, crow, grad_NJD, table.pair_tgt, table.by_src_ptr, table.by_src_pair, grad_buffer,
            n_layers, k, n_features, d, n_targets, BLOCK_E=32, BLOCK_D=block_d)
        grad_weights = list(grad_buffer.unbind(0))
    return grad_values, grad_weights
