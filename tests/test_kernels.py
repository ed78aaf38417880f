"""The fused Triton decode (and the encoder backward built on it) equals the torch path: values and every gradient.

The cases run where compiled or interpreted kernels can run: on CPU tensors under Triton's
interpreter, which must be switched on (TRITON_INTERPRET=1) before anything imports Triton, so
`test_kernel_cases_in_the_interpreter` runs this file again in a child process with it set; on
CUDA when VITCLT_KERNEL_DEVICE=cuda (bench/gpu_check.sh). Shapes stay tiny because the
interpreter runs every program instance in numpy.
"""

import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitclt.nn import Transcoder, TranscoderConfig, kernels
from vitclt.nn import sparse as sparse_module
from vitclt.nn import transcoder as transcoder_module
from vitclt.nn.sparse import Codes, dense_decode, gathered_linear, sparse_decode

FAST = settings(max_examples=8, deadline=None)
DEVICE = torch.device("cuda" if os.environ.get("VITCLT_KERNEL_DEVICE") == "cuda" else "cpu")
RUNS_KERNELS = os.environ.get("TRITON_INTERPRET") == "1" or DEVICE.type == "cuda"
kernel_case = pytest.mark.skipif(not RUNS_KERNELS, reason="runs in test_kernel_cases_in_the_interpreter's child")


@pytest.mark.skipif(RUNS_KERNELS, reason="this process already runs the kernel cases")
def test_kernel_cases_in_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("9 passed, 1 skipped"), summary  # every case ran; only this launcher skipped


def _pairs(topology: str, n_layers: int, drop: int) -> list[tuple[int, int]]:
    if topology == "clt":
        pairs = [(i, j) for i in range(n_layers) for j in range(i, n_layers)]
    else:
        pairs = [(i, i) for i in range(n_layers)]
    # AuxK decodes only the sources with dead features: drop a source's pairs (but keep one pair).
    kept = [p for p in pairs if p[0] != drop]
    return kept or pairs


def _codes(gen, n, n_layers, n_features, k, unused, zero_frac, dtype=torch.float32):
    """Random codes: distinct indices per row avoiding the last `unused` features; a share of values 0."""
    pool = n_features - unused
    indices = torch.stack([
        torch.stack([torch.randperm(pool, generator=gen)[:k] for _ in range(n_layers)]) for _ in range(n)
    ]).reshape(n, n_layers, k)
    values = torch.rand(n, n_layers, k, generator=gen) + 0.1
    values = values * (torch.rand(n, n_layers, k, generator=gen) >= zero_frac)
    if n > 1:
        values[0] = 0  # a row with no active feature at all: k exceeds its active count
    return Codes(values.to(dtype).to(DEVICE), indices.to(DEVICE))


def _run(backend, codes, weights, pairs, n_layers, zero_values_have_gradients=True):
    values = codes.values_NLK.clone().requires_grad_(True)
    weights = [w.clone().requires_grad_(True) for w in weights]
    out = sparse_decode(Codes(values, codes.indices_NLK), weights, pairs, n_layers, backend=backend,
                        zero_values_have_gradients=zero_values_have_gradients)
    # Exact in bf16 too, so runs in either dtype see the same output gradient.
    grad_out = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape).bfloat16().to(out.dtype)
    out.backward(grad_out)
    return out, values.grad, [w.grad for w in weights]


CODE_SHAPES = dict(
    n=st.integers(1, 24),
    n_features=st.integers(4, 12),
    d=st.integers(1, 40),
    k_frac=st.floats(0.1, 1.0),
    zero_frac=st.sampled_from([0.0, 0.3, 0.9]),
    seed=st.integers(0, 10_000),
)
"""Rows, features, width, code width (share of the features), share of value-0 slots, and seed of a random code."""


@kernel_case
@FAST
@given(
    **CODE_SHAPES,
    n_layers=st.integers(1, 3),
    topology=st.sampled_from(["clt", "plt"]),
    drop=st.integers(-1, 2),
    zero_grads=st.booleans(),
)
def test_fused_decode_equals_torch_path_fp32(n, n_layers, n_features, d, k_frac, topology, drop, zero_frac, zero_grads,
                                             seed):
    gen = torch.Generator().manual_seed(seed)
    unused = 2 if n_features > 5 else 0  # features no row selects: their gradient rows must be 0
    k = max(1, round(k_frac * (n_features - unused)))
    codes = _codes(gen, n, n_layers, n_features, k, unused, zero_frac)
    pairs = _pairs(topology, n_layers, drop)
    weights = [torch.randn(n_features, d, generator=gen).to(DEVICE) for _ in pairs]
    ref_out, ref_gv, ref_gw = _run("torch", codes, weights, pairs, n_layers)
    out, gv, gw = _run("triton", codes, weights, pairs, n_layers, zero_values_have_gradients=zero_grads)
    if not zero_grads:  # the kernels may skip value-0 slots: their gradient is 0, the others' unchanged
        ref_gv = ref_gv * (codes.values_NLK != 0)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, dense_decode(codes, weights, pairs, n_layers), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gv, ref_gv, rtol=1e-5, atol=1e-5)
    for p, (a, b) in enumerate(zip(gw, ref_gw)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"decoder {pairs[p]}")
        if unused:
            assert not a[-unused:].any(), "a feature no row selected got a gradient"


@kernel_case
@FAST
@given(**CODE_SHAPES)
def test_fused_encoder_backward_equals_torch_path(n, n_features, d, k_frac, zero_frac, seed):
    gen = torch.Generator().manual_seed(seed)
    unused = 2 if n_features > 5 else 0
    k = max(1, round(k_frac * (n_features - unused)))
    indices_NK = _codes(gen, n, 1, n_features, k, unused, 0.0).indices_NLK[:, 0]
    x_ND = torch.randn(n, d, generator=gen).to(DEVICE)
    W_FD = torch.randn(n_features, d, generator=gen).to(DEVICE)
    b_F = torch.randn(n_features, generator=gen).to(DEVICE)
    # Some entries get no gradient, as a ReLU or JumpReLU below its threshold gives them.
    grad_NK = (torch.randn(n, k, generator=gen) * (torch.rand(n, k, generator=gen) >= zero_frac)).to(DEVICE)
    grads = []
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_(True) for t in (x_ND, W_FD, b_F)]
        with torch.no_grad():
            pre_NF = torch.nn.functional.linear(*leaves)
        out_NK = gathered_linear(*leaves, indices_NK, pre_NF, backend=backend)
        torch.testing.assert_close(out_NK, pre_NF.gather(1, indices_NK))
        out_NK.backward(grad_NK)
        grads.append([t.grad for t in leaves])
    for name, ref, fused in zip(("x", "W", "b"), *grads):
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5, msg=name)
    if unused:
        assert not grads[1][1][-unused:].any(), "a feature no row selected got a gradient"


@kernel_case
def test_fused_decode_bf16_is_within_bf16_rounding_of_fp32():
    gen = torch.Generator().manual_seed(0)
    n, n_layers, n_features, d, k = 24, 3, 16, 20, 5
    codes = _codes(gen, n, n_layers, n_features, k, 2, 0.3, dtype=torch.bfloat16)
    pairs = _pairs("clt", n_layers, -1)
    weights = [torch.randn(n_features, d, generator=gen).bfloat16().to(DEVICE) for _ in pairs]
    out, gv, gw = _run("triton", codes, weights, pairs, n_layers)
    assert out.dtype == gv.dtype == gw[0].dtype == torch.bfloat16
    # Reference: the same bf16 inputs in float32. The kernels accumulate in float32, so the only
    # error is the final rounding to bf16 (2^-8 relative), stated as rtol 2^-7.
    codes32 = Codes(codes.values_NLK.float(), codes.indices_NLK)
    ref_out, ref_gv, ref_gw = _run("torch", codes32, [w.float() for w in weights], pairs, n_layers)
    tol = dict(rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    torch.testing.assert_close(gv.float(), ref_gv, **tol)
    for a, b in zip(gw, ref_gw):
        torch.testing.assert_close(a.float(), b, **tol)


@kernel_case
@pytest.mark.parametrize("sparsifier", ["relu-topk", "batch-topk", "jumprelu"])
def test_a_training_step_through_the_fused_decode_equals_the_torch_step(monkeypatch, sparsifier):
    """The whole CLT step (encoder, JumpReLU window entries, AuxK, losses) with either backend for every sparse op."""
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(24, 3, 8, generator=gen) * 2 + 1).to(DEVICE)
    y = (torch.randn(24, 3, 8, generator=gen) - 3).to(DEVICE)
    dead = (torch.rand(3, 16, generator=gen) < 0.5).to(DEVICE)
    results, calls = [], []

    def counted(*args, backend, **kwargs):
        calls.append(backend)
        return sparse_decode(*args, backend=backend, **kwargs)

    def encoder(*args, backend):
        calls.append(f"encoder {backend}")
        return gathered_linear(*args, backend=backend)

    # Sparse whatever the width: these codes are wide for 16 features.
    monkeypatch.setattr(transcoder_module, "prefer_dense_decode", lambda *args: False)
    for backend in ("torch", "triton"):
        monkeypatch.setattr(transcoder_module, "sparse_decode", functools.partial(counted, backend=backend))
        monkeypatch.setattr(transcoder_module, "gathered_linear", functools.partial(encoder, backend=backend))
        torch.manual_seed(0)
        model = Transcoder(TranscoderConfig(n_layers=3, d_model=8, n_features=16, k=2, sparsifier=sparsifier,
                                            jumprelu_bandwidth=0.5, auxk_k=2), device=DEVICE)
        model.set_normalization(*Transcoder.normalization_stats(x), *Transcoder.normalization_stats(y))
        model.init_thresholds(x, y)
        out = model(x, y, dead_mask_LF=dead)
        out.loss.backward()
        results.append((out, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (fused, fused_grads) = results
    assert calls.count("triton") == calls.count("torch") >= 1, "the step did not take the sparse decode"
    assert calls.count("encoder triton") == calls.count("encoder torch") >= 3, "the encoder's backward was not sparse"
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    if sparsifier == "jumprelu":
        assert ref_grads["sparsifier.log_threshold_LF"].any()


def test_auto_backend_keeps_cpu_tensors_on_the_torch_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Triton kernels ran on CPU tensors without being asked")

    monkeypatch.setattr(kernels, "decode_forward", refuse)
    gen = torch.Generator().manual_seed(1)
    codes = _codes(gen, 4, 2, 8, 3, 0, 0.0)
    pairs = _pairs("clt", 2, -1)
    weights = [torch.randn(8, 5, generator=gen) for _ in pairs]
    torch.testing.assert_close(sparse_decode(codes, weights, pairs, 2), dense_decode(codes, weights, pairs, 2))


@pytest.fixture
def kernels_on_cuda_that_fail(monkeypatch):
    """The CUDA choice ("auto" takes the kernels) on CPU tensors: a forward kernel that works (the dense decode
    standing in for it) and backward kernels that fail, as a Triton that cannot compile them would. Counts the calls."""
    calls = []

    def forward(values_NLK, indices_NLK, weights, pairs, n_targets):
        calls.append("forward")
        return dense_decode(Codes(values_NLK, indices_NLK), weights, pairs, n_targets)

    def backward(*args, **kwargs):
        calls.append("backward")
        raise RuntimeError("PassManager::run failed\nfull compiler log")

    real_mode = sparse_module._fused_mode
    monkeypatch.setattr(kernels, "_failure", [])
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(sparse_module, "_fused_mode", lambda backend, device: real_mode(backend, torch.device("cuda")))
    monkeypatch.setattr(kernels, "decode_forward", forward)
    monkeypatch.setattr(kernels, "decode_backward", backward)
    return calls


def _step(model, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x, y)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_kernels_that_fail_on_the_device_fall_back_to_the_torch_path_with_one_warning(kernels_on_cuda_that_fail):
    calls = kernels_on_cuda_that_fail
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(24, 3, 8, generator=gen), torch.randn(24, 3, 8, generator=gen)
    torch.manual_seed(0)
    model = Transcoder(TranscoderConfig(n_layers=3, d_model=8, n_features=64, k=2))
    model.set_normalization(*Transcoder.normalization_stats(x), *Transcoder.normalization_stats(y))
    with pytest.warns(RuntimeWarning, match=r"fused Triton kernels failed .*PassManager::run failed; triton"):
        loss, grads = _step(model, x, y)
    assert calls == ["forward", "backward"]  # the encoder's backward did not try again
    assert not kernels.usable(torch.device("cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process, not per step
        again = _step(model, x, y)
    assert calls == ["forward", "backward"]  # later steps take the torch path without trying
    torch.testing.assert_close(again[0], loss)
    for name, grad in grads.items():
        torch.testing.assert_close(again[1][name], grad, msg=name)


def test_kernels_asked_for_by_name_raise_their_failure(kernels_on_cuda_that_fail):
    gen = torch.Generator().manual_seed(6)
    codes = _codes(gen, 4, 2, 8, 3, 0, 0.0)
    pairs = _pairs("clt", 2, -1)
    weights = [torch.randn(8, 5, generator=gen, requires_grad=True) for _ in pairs]
    out = sparse_decode(codes, weights, pairs, 2, backend="triton")
    with pytest.raises(RuntimeError, match="PassManager"):
        out.sum().backward()
    assert not kernels.failed()
