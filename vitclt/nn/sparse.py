"""Sparse codes and the two sparse kernels of a transcoder step.

* ``gathered_linear``: the encoder's pre-activations x·Wᵀ + b read at the selected features,
  whose backward touches only those features' rows of W (embedding bags both ways on CPU), in
  the spirit of EleutherAI sparsify's fused encoder.
* ``sparse_decode``: Σ_k v_k·W[idx_k] for every (source → target) decoder, reading only the
  active features' rows; its backward computes the decoder gradient per feature with an
  embedding bag over the rows that used it, and the code gradient as sampled dot products.

Both keep to dense torch ops of moderate size, so they run on CPU and GPU alike; the dense
reference paths (``dense_decode``, a plain ``F.linear`` + ``gather``) must agree with them. On
CUDA, when Triton imports, both run the fused kernels of `vitclt.nn.kernels` instead of the
embedding bags (the same result; tests/test_kernels.py): the encoder's backward is a decode with
one decoder. ``prefer_dense_decode`` says when a code is so wide that the dense decode is the
cheaper of the two.
"""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vitclt.nn import kernels


class LayerCodes(NamedTuple):
    """The sparse code of one layer: K (feature index, value) pairs per row.

    Within a row the indices of nonzero entries are distinct; padding entries have value 0 and
    any index, so a slot with value 0 means nothing (a kept feature may also be exactly 0).
    Sums over slots (decoding, densifying) are therefore exact without masking.
    """

    values_NK: Tensor
    """Activation values (0 on padding)."""
    indices_NK: Tensor
    """Feature indices (long)."""

    def to_dense(self, n_features: int) -> Tensor:
        """z_NF: the dense activation of every feature (zeros where inactive), in the values' dtype."""
        z_NF = self.values_NK.new_zeros(self.values_NK.shape[0], n_features)
        return z_NF.scatter_add_(1, self.indices_NK, self.values_NK)


class Codes(NamedTuple):
    """The sparse codes of all layers, padded to a common K; padding has value 0 (any index).

    What ``Transcoder.encode`` returns; ``layer(i)`` is layer i's `LayerCodes`.
    """

    values_NLK: Tensor
    """Activation values per row, layer and slot."""
    indices_NLK: Tensor
    """Feature indices (long) per row, layer and slot."""

    def layer(self, layer: int) -> LayerCodes:
        """The codes of one layer."""
        return LayerCodes(self.values_NLK[:, layer], self.indices_NLK[:, layer])

    def layers(self) -> list[LayerCodes]:
        """The codes of every layer, in order (what ``decode_layer`` takes)."""
        return [self.layer(i) for i in range(self.values_NLK.shape[1])]

    def to_dense(self, n_features: int) -> Tensor:
        """z_NLF: the dense activation of every feature per row and layer (zeros where inactive)."""
        n, n_layers, _ = self.values_NLK.shape
        z_NLF = self.values_NLK.new_zeros(n, n_layers, n_features)
        return z_NLF.scatter_add_(2, self.indices_NLK, self.values_NLK)


def stack_codes(per_layer: Sequence[LayerCodes]) -> Codes:
    """Stack per-layer codes into ``Codes``, padding each layer to the widest K with zeros."""
    width = max(c.values_NK.shape[1] for c in per_layer)

    def padded(t_NK: Tensor) -> Tensor:
        # A layer already at the width is stacked as is: padding by 0 would still copy it (TopK: every layer).
        return t_NK if t_NK.shape[1] == width else F.pad(t_NK, (0, width - t_NK.shape[1]))

    return Codes(torch.stack([padded(c.values_NK) for c in per_layer], 1),
                 torch.stack([padded(c.indices_NK) for c in per_layer], 1))


def bag(values_NK: Tensor, indices_NK: Tensor, W_FD: Tensor) -> Tensor:
    """Σ_k values[n, k]·W[indices[n, k]] for every row n, reading only the indexed rows of W."""
    if not torch.is_grad_enabled():
        # embedding_bag takes a 3x slower CPU path whenever the weight requires grad.
        W_FD = W_FD.detach()
    return F.embedding_bag(
        indices_NK, W_FD, per_sample_weights=values_NK.to(W_FD.dtype), mode="sum"
    )


class _ByFeature(NamedTuple):
    """A code's (feature → rows) view: its entries sorted by feature index."""

    order: Tensor
    """Position of each sorted entry in the flattened (N·K) code."""
    rows: Tensor
    """Row of each sorted entry."""
    crow: Tensor
    """(F + 1,) start of each feature's run (a CSR row pointer over features)."""


def _by_feature(indices_NK: Tensor, n_features: int) -> _ByFeature:
    flat = indices_NK.reshape(-1)
    order = flat.argsort()
    return _ByFeature(order, order.div(indices_NK.shape[1], rounding_mode="floor"), kernels.csr_offsets(flat, n_features))


def scatter_rows(
    values_NK: Tensor,
    indices_NK: Tensor,
    table_ND: Tensor,
    n_features: int,
    by_feature: _ByFeature | None = None,
) -> Tensor:
    """out[f] = Σ_{(n,k): indices[n,k]=f} values[n,k]·table[n], an (F, D) tensor.

    This is the weight gradient of ``bag`` (and of the encoder), computed as an embedding bag
    over the table's rows grouped by feature: no (N·K, D) intermediate and no dense matmul.
    """
    by = by_feature or _by_feature(indices_NK, n_features)
    weights = values_NK.reshape(-1)[by.order].to(table_ND.dtype)
    return F.embedding_bag(by.rows, table_ND, by.crow[:-1], per_sample_weights=weights, mode="sum")


def gathered_dots(
    indices_NK: Tensor,
    terms: Sequence[tuple[Tensor, Tensor]],
    by_feature: _ByFeature | None = None,
) -> Tensor:
    """Σ over (G_ND, W_FD) in terms of ⟨G[n], W[indices[n, k]]⟩, an (N, K) tensor.

    The code gradient of ``bag``. On CPU a sampled dense-dense product (SDDMM) walked feature
    by feature, so each decoder row is read once (twice as fast as walking rows); elsewhere a
    chunked gather and batched matmul.
    """
    n, k = indices_NK.shape
    n_features, d = terms[0][1].shape
    dtype = terms[0][1].dtype
    device = indices_NK.device
    if device.type == "cpu":
        by = by_feature or _by_feature(indices_NK, n_features)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            pattern = torch.sparse_csr_tensor(
                by.crow, by.rows, torch.ones(n * k, dtype=dtype, device=device),
                size=(n_features, n), check_invariants=False,
            )
        sorted_dots = torch.zeros(n * k, dtype=dtype, device=device)
        for G_ND, W_FD in terms:
            sorted_dots += torch.sparse.sampled_addmm(
                pattern, W_FD.detach(), G_ND.to(dtype).t(), beta=0
            ).values()
        out = torch.empty_like(sorted_dots)
        out[by.order] = sorted_dots
        return out.view(n, k)
    out_NK = torch.zeros(n, k, dtype=dtype, device=device)
    chunk = max(1, (1 << 24) // max(1, k * d))
    for start in range(0, n, chunk):
        idx = indices_NK[start : start + chunk]
        for G_ND, W_FD in terms:
            g = G_ND[start : start + chunk].to(dtype)
            out_NK[start : start + chunk] += torch.bmm(W_FD.detach()[idx], g[:, :, None])[..., 0]
    return out_NK


Fused = Literal["auto", "forced"] | None
"""How a sparse op runs: None the torch path; "forced" the fused kernels (a failure raises); "auto" the
fused kernels, and a failure switches them off for the process and falls back to the torch path."""


def _fused_mode(backend: Literal["auto", "torch", "triton"], device: torch.device) -> Fused:
    """The `Fused` mode of a sparse op: "auto" takes the kernels on CUDA when Triton imports and has not failed."""
    if backend == "auto":
        return "auto" if device.type == "cuda" and kernels.usable(device) else None
    return "forced" if backend == "triton" else None


def _try_fused(mode: Fused, call):
    """``call()`` through the fused kernels; on "auto", None after a failure (the caller then takes the torch path).

    The kernels have been proven equal to the torch path, but a Triton or driver version they were
    never compiled with may reject them: a run should slow down with a warning, not stop. Running
    out of device memory is not such a failure, and is raised.
    """
    if mode == "forced":
        return call()
    if kernels.failed():  # an earlier op of this step failed: its backward takes the torch path too
        return None
    try:
        return call()
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any compile or launch failure: warned about by `kernels.disable`
        kernels.disable(exc)
        return None


class _GatheredLinear(torch.autograd.Function):
    """(x·Wᵀ + b)[n, indices[n, k]] with a backward that touches only the indexed features."""

    @staticmethod
    def forward(ctx, fused, x_ND, W_FD, b_F, indices_NK, pre_NF):
        ctx.fused = fused
        ctx.save_for_backward(x_ND, W_FD, indices_NK)
        return pre_NF.gather(1, indices_NK)

    @staticmethod
    def backward(ctx, grad_NK):
        x_ND, W_FD, indices_NK = ctx.saved_tensors
        grad_NK = grad_NK.to(W_FD.dtype)
        need_x, need_weight, need_b = ctx.needs_input_grad[1:4]
        table_ND = x_ND.to(W_FD.dtype) if need_weight else None
        grads = None
        if ctx.fused:
            # The encoder's sparse backward is the decode's with one decoder (W) and the rows' gradient as
            # the code, so on CUDA it runs the same fused kernels (one launch each, no embedding bags).
            one_NLK = (grad_NK[:, None], indices_NK[:, None])
            W = [W_FD.detach()]
            grads = _try_fused(ctx.fused, lambda: (
                kernels.decode_forward(*one_NLK, W, [(0, 0)], 1)[:, 0] if need_x else None,
                kernels.decode_backward(table_ND[:, None], *one_NLK, W, [(0, 0)], need_values=False)[1][0]
                if need_weight else None))
        if grads is None:
            # Grad w.r.t. the input: each row sums its selected encoder rows. Grad w.r.t. the weight: each
            # selected feature sums the input rows that selected it.
            grads = (bag(grad_NK, indices_NK, W_FD.detach()) if need_x else None,
                     scatter_rows(grad_NK, indices_NK, table_ND, W_FD.shape[0]) if need_weight else None)
        grad_x, grad_weight = grads
        if grad_x is not None:
            grad_x = grad_x.to(x_ND.dtype)
        # Grad w.r.t. the bias: a histogram of the selected features weighted by the gradient.
        grad_b = None
        if need_b:
            grad_b = torch.zeros(W_FD.shape[0], dtype=W_FD.dtype, device=W_FD.device)
            grad_b.index_add_(0, indices_NK.reshape(-1), grad_NK.reshape(-1))
        return None, grad_x, grad_weight, grad_b, None, None


def gathered_linear(
    x_ND: Tensor, W_FD: Tensor, b_F: Tensor, indices_NK: Tensor, pre_NF: Tensor,
    backend: Literal["auto", "torch", "triton"] = "auto",
) -> Tensor:
    """Pre-activations at the selected features, differentiable with a sparse backward.

    ``pre_NF`` must be ``F.linear(x_ND, W_FD, b_F)`` computed without grad (the caller needs
    it anyway to choose ``indices_NK``); the backward never forms a dense (N, F) gradient.
    ``backend`` as for ``sparse_decode``: the backward's gathers are embedding bags ("torch") or
    the fused decode kernels ("triton"; "auto" on CUDA).
    """
    return _GatheredLinear.apply(_fused_mode(backend, W_FD.device), x_ND, W_FD, b_F, indices_NK, pre_NF.detach())


class _SparseDecode(torch.autograd.Function):
    """recon[:, j] = Σ over decoders (i → j) of bag(codes of source layer i, W^{i→j}), j a target layer."""

    @staticmethod
    def forward(ctx, pairs, n_targets, fused, zero_values_have_gradients, values_NLK, indices_NLK, *W_FD):
        dtype = W_FD[0].dtype
        ctx.values_dtype = values_NLK.dtype
        values_NLK = values_NLK.to(dtype)
        ctx.pairs, ctx.zero_values_have_gradients = pairs, zero_values_have_gradients
        ctx.save_for_backward(values_NLK, indices_NLK, *W_FD)
        if fused:
            out_NJD = _try_fused(fused, lambda: kernels.decode_forward(values_NLK, indices_NLK, W_FD, pairs, n_targets))
            if out_NJD is not None:
                ctx.fused = fused
                return out_NJD
        ctx.fused = None
        n = values_NLK.shape[0]
        out_NJD = values_NLK.new_zeros(n, n_targets, W_FD[0].shape[1])
        sources = sorted({i for i, _ in pairs})
        codes = {i: (values_NLK[:, i].contiguous(), indices_NLK[:, i].contiguous()) for i in sources}
        for (i, j), W in zip(pairs, W_FD):
            out_NJD[:, j] += bag(*codes[i], W)
        return out_NJD

    @staticmethod
    def backward(ctx, grad_NJD):
        values_NLK, indices_NLK, *W_FD = ctx.saved_tensors
        pairs = ctx.pairs
        grads = None
        if ctx.fused:
            grads = _try_fused(ctx.fused, lambda: kernels.decode_backward(
                grad_NJD, values_NLK, indices_NLK, W_FD, pairs,
                need_values=ctx.needs_input_grad[4], need_weights=any(ctx.needs_input_grad[6:]),
                zero_values_have_gradients=ctx.zero_values_have_gradients,
            ))
        if grads is not None:
            grad_values, grad_weights = grads
            if grad_values is not None:
                grad_values = grad_values.to(ctx.values_dtype)
            grad_weights = grad_weights or [None] * len(W_FD)
            return (None, None, None, None, grad_values, None, *grad_weights)
        # Target-major and contiguous: every (N, D) slice below is then a dense table.
        grad_JND = grad_NJD.to(W_FD[0].dtype).transpose(0, 1).contiguous()
        need_values = ctx.needs_input_grad[4]
        grad_values = torch.zeros_like(values_NLK) if need_values else None
        grad_weights = [None] * len(W_FD)
        for i in sorted({i for i, _ in pairs}):
            mine = [p for p, (src, _) in enumerate(pairs) if src == i]
            values_NK = values_NLK[:, i].contiguous()
            indices_NK = indices_NLK[:, i].contiguous()
            by = _by_feature(indices_NK, W_FD[mine[0]].shape[0])
            # Grad w.r.t. each decoder: every feature sums the target gradients of its rows.
            for p in mine:
                if ctx.needs_input_grad[6 + p]:
                    grad_weights[p] = scatter_rows(
                        values_NK, indices_NK, grad_JND[pairs[p][1]], W_FD[p].shape[0], by
                    )
            # Grad w.r.t. the code values: dot of each target gradient with the feature's row.
            if need_values:
                terms = [(grad_JND[pairs[p][1]], W_FD[p]) for p in mine]
                grad_values[:, i] = gathered_dots(indices_NK, terms, by)
        if grad_values is not None:
            grad_values = grad_values.to(ctx.values_dtype)
        return (None, None, None, None, grad_values, None, *grad_weights)


def sparse_decode(
    codes: Codes,
    weights: Sequence[Tensor],
    pairs: Sequence[tuple[int, int]],
    n_targets: int,
    backend: Literal["auto", "torch", "triton"] = "auto",
    zero_values_have_gradients: bool = True,
) -> Tensor:
    """Σ_i bag(codes_i, W^{i→j}) into every target j (no bias), reading only active rows.

    ``weights[p]`` is the (F, D) decoder from source ``pairs[p][0]`` to target ``pairs[p][1]``.
    Returns (N, n_targets, D) in the decoder's dtype. ``backend``: "torch" is the embedding-bag
    path (the reference, and CPU's); "triton" the fused kernels of `vitclt.nn.kernels` (CUDA, or
    CPU under TRITON_INTERPRET=1 for tests); "auto" takes Triton on CUDA when it imports.
    ``zero_values_have_gradients=False`` lets the backward skip (give 0 to) the gradient of every
    slot of value 0, which the caller promises is multiplied by 0 before it reaches a parameter
    (`Sparsifier.zero_values_have_gradients`); the fused kernels use it, the torch path computes all.
    """
    return _SparseDecode.apply(
        tuple(pairs), n_targets, _fused_mode(backend, weights[0].device), zero_values_have_gradients,
        codes.values_NLK, codes.indices_NLK, *weights
    )


DENSE_DECODE_FRACTION = {"cpu": 1 / 4, "cuda": 1 / 16}
"""Code width (slots per row and layer) as a fraction of F above which the dense decode is faster.

CPU: measured at F = 6144, D = 768, one thread (sparse forward + backward 0.53 s vs dense 1.16 s at
1/12, 0.95 vs 1.35 at 1/6; docs/performance.md). CUDA: an estimate from the issue's H200 timings
(dense fp32 decode ≈ 136 ms per step at paper shapes whatever the width, the fused sparse decode
grows with the width); bench/gpu_check.sh measures it.
"""


def prefer_dense_decode(width: int, n_features: int, device: torch.device) -> bool:
    """Whether codes ``width`` slots wide decode faster densely than sparsely on ``device``.

    Both paths give the same result (sparse equals dense), so this only picks the cheaper one: a
    JumpReLU whose L0 grows, or AuxK's wide codes, never make a step explode.
    """
    return width > DENSE_DECODE_FRACTION.get(device.type, 1 / 16) * n_features


def dense_decode(
    codes: Codes, weights: Sequence[Tensor], pairs: Sequence[tuple[int, int]], n_targets: int
) -> Tensor:
    """Reference for ``sparse_decode``: scatter the codes to dense (N, L, F) and multiply."""
    n = codes.values_NLK.shape[0]
    n_features, d_model = weights[0].shape
    dtype = weights[0].dtype
    z_NLF = Codes(codes.values_NLK.to(dtype), codes.indices_NLK).to_dense(n_features)
    out = [codes.values_NLK.new_zeros(n, d_model, dtype=dtype) for _ in range(n_targets)]
    for (i, j), W in zip(pairs, weights):
        out[j] = out[j] + z_NLF[:, i] @ W
    return torch.stack(out, 1)
