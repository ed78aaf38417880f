"""The Triton kernels of `vitclt.nn.kernels` (imported only when a kernel first runs; see that module)."""

import triton
import triton.language as tl


@triton.jit
def decode_fwd(values, indices, w_ptrs, pair_src, by_tgt_ptr, by_tgt_pair, out,
               N, L, K, D, J,
               W_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    j = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < D
    code_row = rows.to(tl.int64) * L * K
    acc = tl.full((BLOCK_N, BLOCK_D), 0.0, tl.float32)
    for q in range(tl.load(by_tgt_ptr + j), tl.load(by_tgt_ptr + j + 1)):
        p = tl.load(by_tgt_pair + q)
        i = tl.load(pair_src + p)
        w = tl.load(w_ptrs + p).to(tl.pointer_type(W_DTYPE))
        for k in range(K):
            v = tl.load(values + code_row + i * K + k, mask=row_ok, other=0.0).to(tl.float32)
            f = tl.load(indices + code_row + i * K + k, mask=row_ok, other=0)
            live = row_ok & (v != 0.0)
            wv = tl.load(w + f[:, None] * D + cols[None, :], mask=live[:, None] & col_ok[None, :], other=0.0)
            acc += v[:, None] * wv.to(tl.float32)
    dst = out + rows.to(tl.int64)[:, None] * J * D + j * D + cols[None, :]
    tl.store(dst, acc.to(out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

@triton.jit
def decode_grad_values(values, indices, grad_out, w_ptrs, pair_tgt, by_src_ptr, by_src_pair, grad_values,
                       N, L, K, D, J,
                       W_DTYPE: tl.constexpr, SKIP_ZERO: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.program_id(1)
    e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < N * K
    n = (e // K).to(tl.int64)
    slot = n * L * K + i * K + e % K
    f = tl.load(indices + slot, mask=e_ok, other=0)
    if SKIP_ZERO:  # value-0 slots read nothing and get gradient 0
        e_ok = e_ok & (tl.load(values + slot, mask=e_ok, other=0.0) != 0.0)
    acc = tl.full((BLOCK_E,), 0.0, tl.float32)
    for q in range(tl.load(by_src_ptr + i), tl.load(by_src_ptr + i + 1)):
        p = tl.load(by_src_pair + q)
        j = tl.load(pair_tgt + p)
        w = tl.load(w_ptrs + p).to(tl.pointer_type(W_DTYPE))
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = e_ok[:, None] & (cols < D)[None, :]
            wv = tl.load(w + f[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
            g = tl.load(grad_out + n[:, None] * J * D + j * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(wv * g, axis=1)
    tl.store(grad_values + slot, acc, mask=e_ok)

@triton.jit
def decode_grad_weights(values, order, crow, grad_out, pair_tgt, by_src_ptr, by_src_pair, grad_w,
                        L, K, F, D, J,
                        BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    f = tl.program_id(0)
    i = tl.program_id(1)
    start = tl.load(crow + i * F + f)
    stop = tl.load(crow + i * F + f + 1)
    for q in range(tl.load(by_src_ptr + i), tl.load(by_src_ptr + i + 1)):
        p = tl.load(by_src_pair + q)
        j = tl.load(pair_tgt + p)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            acc = tl.full((BLOCK_D,), 0.0, tl.float32)
            for s0 in range(start, stop, BLOCK_E):
                s = s0 + tl.arange(0, BLOCK_E)
                s_ok = s < stop
                e = tl.load(order + s, mask=s_ok, other=0)
                v = tl.load(values + e, mask=s_ok, other=0.0).to(tl.float32)
                n = e // (L * K)
                live = s_ok & (v != 0.0)
                g = tl.load(grad_out + n[:, None] * J * D + j * D + cols[None, :],
                            mask=live[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(v[:, None] * g, axis=0)
            dst = grad_w + p.to(tl.int64) * F * D + f * D + cols
            tl.store(dst, acc.to(grad_w.dtype.element_ty), mask=col_ok)
