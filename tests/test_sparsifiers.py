"""Sparsifiers: what each keeps at train and eval time, and that JumpReLU's threshold learns."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitclt.nn import AbsTopK, BatchTopK, JumpReLU, ReLUTopK, Transcoder, TranscoderConfig

FAST = settings(max_examples=15, deadline=None)


def _dense(values_NK, indices_NK, n_features):
    return torch.zeros(values_NK.shape[0], n_features).scatter_add(1, indices_NK, values_NK)


def _codes(sparsifier, pre_NF, layer=0, update_stats=False):
    selection = sparsifier.select(pre_NF, layer, update_stats)
    values = sparsifier.activate(pre_NF.gather(1, selection.indices_NK), selection, layer)
    return values, selection.indices_NK


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(1, 16), f=st.integers(4, 64), k=st.integers(1, 4))
def test_relu_topk_keeps_the_k_largest(seed, n, f, k):
    pre_NF = torch.randn(n, f, generator=torch.Generator().manual_seed(seed))
    values, indices = _codes(ReLUTopK(1, f, k), pre_NF)
    nonzero_N = (values != 0).sum(1)
    assert torch.equal(nonzero_N, (pre_NF > 0).sum(1).clamp(max=k))
    assert (values >= 0).all()
    kth_N = pre_NF.topk(k, dim=1).values[:, -1:]
    assert (pre_NF.gather(1, indices) >= kth_N).all()


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(1, 16), f=st.integers(4, 64), k=st.integers(1, 4))
def test_abs_topk_keeps_k_by_magnitude_with_sign(seed, n, f, k):
    pre_NF = torch.randn(n, f, generator=torch.Generator().manual_seed(seed))
    values, indices = _codes(AbsTopK(1, f, k), pre_NF)
    assert ((values != 0).sum(1) == k).all()
    assert torch.equal(values, pre_NF.gather(1, indices))
    kth_N = pre_NF.abs().topk(k, dim=1).values[:, -1:]
    assert (values.abs() >= kth_N).all()


def test_abs_topk_keeps_negative_values():
    pre_NF = torch.tensor([[-5.0, 0.1, 3.0, -0.2]])
    values, indices = _codes(AbsTopK(1, 4, 2), pre_NF)
    dense = _dense(values, indices, 4)
    assert torch.equal(dense, torch.tensor([[-5.0, 0.0, 3.0, 0.0]]))


def test_jumprelu_thresholds_on_the_threshold():
    jump = JumpReLU(1, 4, bandwidth=0.1, init_threshold=1.0).eval()
    pre_NF = torch.tensor([[0.5, 0.99, 1.01, 3.0]])
    values, indices = _codes(jump, pre_NF)
    assert torch.equal(_dense(values, indices, 4), torch.tensor([[0.0, 0.0, 1.01, 3.0]]))


def test_jumprelu_gradient_reaches_the_threshold():
    torch.manual_seed(0)
    cfg = TranscoderConfig(
        n_layers=2, d_model=8, n_features=32, sparsifier="jumprelu",
        jumprelu_init_threshold=0.5, jumprelu_bandwidth=0.5, sparsity_coefficient=0.0,
    )
    model = Transcoder(cfg)
    out = model(torch.randn(64, 2, 8), torch.randn(64, 2, 8))
    out.fvu.backward()
    grad = model.sparsifier.log_threshold_LF.grad
    assert grad is not None and grad.abs().sum() > 0  # through the reconstruction alone

    model.zero_grad()
    model.sparsity_coefficient = 1.0
    out = model(torch.randn(64, 2, 8), torch.randn(64, 2, 8))
    out.sparsity_loss.backward()
    grad = model.sparsifier.log_threshold_LF.grad
    assert out.sparsity_loss > 0
    assert (grad <= 0).all() and grad.sum() < 0  # the L0 penalty raises thresholds


def test_jumprelu_threshold_stays_float32():
    model = Transcoder(TranscoderConfig(n_layers=2, d_model=8, n_features=16, sparsifier="jumprelu"))
    model.to(torch.bfloat16)
    assert model.sparsifier.log_threshold_LF.dtype == torch.float32
    assert model.W_enc[0].dtype == torch.bfloat16


def test_batch_topk_keeps_k_per_row_on_average():
    gen = torch.Generator().manual_seed(0)
    pre_NF = torch.randn(32, 64, generator=gen) * torch.rand(32, 1, generator=gen) * 3
    batch = BatchTopK(1, 64, 4).train()
    values, _ = _codes(batch, pre_NF)
    counts_N = (values != 0).sum(1)
    assert int(counts_N.sum()) == 4 * 32
    assert counts_N.max() > 4 and counts_N.min() < 4  # busy rows take more


def test_batch_topk_eval_threshold_reproduces_train_l0():
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(256, 128, generator=gen) for _ in range(4)]
    batch = BatchTopK(1, 128, 8, threshold_ema=0.9).train()
    for _ in range(30):
        for pre_NF in batches:
            train_values, _ = _codes(batch, pre_NF, update_stats=True)
    train_l0 = (train_values != 0).sum(1).float().mean()
    batch.eval()
    eval_l0 = torch.stack(
        [(_codes(batch, pre_NF)[0] != 0).sum(1).float().mean() for pre_NF in batches]
    ).mean()
    assert train_l0 == 8
    assert abs(float(eval_l0) - 8) < 0.4


def test_topk_converts_to_jumprelu_with_its_running_threshold():
    gen = torch.Generator().manual_seed(2)
    relu = ReLUTopK(2, 64, 4).train()
    with pytest.raises(ValueError, match="no threshold statistics"):
        relu.to_jumprelu()
    for layer in range(2):
        relu.select(torch.randn(128, 64, generator=gen), layer, update_stats=True)
    jump = relu.to_jumprelu()
    assert torch.allclose(jump.thresholds(), relu.threshold_L[:, None].expand(2, 64), rtol=1e-5)
    pre_NF = torch.randn(512, 64, generator=gen)
    values, _ = _codes(jump.eval(), pre_NF, layer=0)
    assert abs(float((values != 0).sum(1).float().mean()) - 4) < 1.0
    with pytest.raises(ValueError, match="negative"):
        AbsTopK(1, 8, 2).to_jumprelu()


@pytest.mark.parametrize("cls", [ReLUTopK, AbsTopK, BatchTopK])
def test_running_threshold_moves_only_when_asked(cls):
    gen = torch.Generator().manual_seed(3)
    sparsifier = cls(1, 64, 4).train()
    sparsifier.select(torch.randn(128, 64, generator=gen), 0, update_stats=True)
    before = sparsifier.threshold_L.clone()
    for mode in (True, False):
        sparsifier.train(mode)
        _codes(sparsifier, 5 * torch.randn(128, 64, generator=gen))
    assert torch.equal(sparsifier.threshold_L, before)
    sparsifier.train().select(5 * torch.randn(128, 64, generator=gen), 0, update_stats=True)
    assert not torch.equal(sparsifier.threshold_L, before)


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(2, 300), f=st.integers(2, 200), target=st.floats(0.5, 40))
def test_jumprelu_fitted_thresholds_give_the_target_l0_on_their_sample(seed, n, f, target):
    gen = torch.Generator().manual_seed(seed)
    # Positive features (no floor) of different offsets and scales: one global threshold could not hit the target.
    pre_NF = torch.rand(n, f, generator=gen) * torch.rand(f, generator=gen) * 3 + torch.rand(f, generator=gen) * 5 + 0.01
    jump = JumpReLU(1, f).eval()
    jump.fit_threshold(0, pre_NF, target)
    l0 = float((_codes(jump, pre_NF)[0] != 0).sum(1).float().mean())
    k = min(target, f)
    # Each feature fires on ⌈(1 − q)(n − 1)⌉ or so of the n rows, q = 1 − k/F: the bound is exact.
    assert abs(l0 - k) <= (k + f) / n + 1e-4, (l0, k)


def test_jumprelu_fitted_threshold_floors_at_a_positive_value():
    jump = JumpReLU(1, 3)
    jump.fit_threshold(0, -torch.rand(50, 3) - 1, target_l0=1)
    torch.testing.assert_close(jump.thresholds(), torch.full((1, 3), 1e-3))
    assert torch.isfinite(jump.log_threshold_LF).all()


def test_running_threshold_starts_at_the_first_value_then_averages():
    gen = torch.Generator().manual_seed(4)
    sparsifier = ReLUTopK(2, 64, 4, threshold_ema=0.75).train()
    expected = None
    for _ in range(3):
        pre_NF = torch.randn(128, 64, generator=gen)
        smallest = pre_NF.topk(4, dim=1).values.min(1).values.relu().mean()
        expected = smallest if expected is None else 0.75 * expected + (1 - 0.75) * smallest
        sparsifier.select(pre_NF, 1, update_stats=True)
        assert torch.equal(sparsifier.threshold_L[1], expected)
        assert sparsifier.threshold_L[0] == 0  # another layer's threshold stays
    assert sparsifier.threshold_seen_L.tolist() == [False, True]
