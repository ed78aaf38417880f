"""Reconstruction metrics accumulated over batches equal a direct computation on all tokens."""

import pytest
import torch
import torch.nn.functional as F

from vitclt.eval.reconstruction import METRICS, ReconstructionAccumulator
from vitclt.nn import LayerCodes

GROUPS = {"cls": slice(0, 1), "patches": slice(1, 5), "all": slice(None)}


def _batch(seed: int, B: int = 3, T: int = 5, L: int = 2, D: int = 4, F_: int = 6, K: int = 2):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, T, L, D, generator=g) * torch.tensor([1.0, 3.0]).view(1, 1, L, 1) + 0.5
    y_hat = y + 0.3 * torch.randn(B, T, L, D, generator=g)
    codes = []
    for _ in range(L):
        values = torch.rand(B * T, K, generator=g) * (torch.rand(B * T, K, generator=g) > 0.3)
        indices = torch.randint(0, F_ - 1, (B * T, K), generator=g)  # the last feature never fires
        codes.append(LayerCodes(values, indices))
    return y, y_hat, codes


def test_batched_metrics_equal_a_direct_computation():
    acc = ReconstructionAccumulator(2, 4, 6, GROUPS)
    batches = [_batch(s) for s in range(3)]
    for y, y_hat, codes in batches:
        acc.update(y, y_hat, codes)
    got = acc.result()
    y = torch.cat([b[0] for b in batches]).double()
    y_hat = torch.cat([b[1] for b in batches]).double()
    for g, idx in GROUPS.items():
        yy, hh = y[:, idx].flatten(0, 1), y_hat[:, idx].flatten(0, 1)
        for layer in range(2):
            a, b = yy[:, layer], hh[:, layer]
            sse = (b - a).square().sum()
            sst = (a - a.mean(0)).square().sum()
            assert got[g].per_layer["mse"][layer] == pytest.approx(float((b - a).square().mean()))
            assert got[g].per_layer["r2"][layer] == pytest.approx(float(1 - sse / sst))
            assert got[g].per_layer["fvu"][layer] == pytest.approx(float(sse / sst))
            assert got[g].per_layer["cosine"][layer] == pytest.approx(float(F.cosine_similarity(b, a, dim=-1).mean()), rel=1e-5)
            values = torch.cat([c[2][layer].values_NK.view(3, 5, -1)[:, idx].flatten(0, 1) for c in batches])
            indices = torch.cat([c[2][layer].indices_NK.view(3, 5, -1)[:, idx].flatten(0, 1) for c in batches])
            assert got[g].per_layer["l0"][layer] == pytest.approx(float((values != 0).sum(1).double().mean()))
            fired = set(indices[values != 0].tolist())
            assert got[g].per_layer["dead_pct"][layer] == pytest.approx(100 * (6 - len(fired)) / 6)
        for m in METRICS:
            assert got[g].mean[m] == pytest.approx(sum(got[g].per_layer[m]) / 2)
        assert got[g].n_tokens == 9 * (idx.stop - idx.start if idx.stop else 5)


def test_perfect_reconstruction_scores_perfectly():
    acc = ReconstructionAccumulator(2, 4, 6, GROUPS)
    y, _, codes = _batch(0)
    acc.update(y, y.clone(), codes)
    r = acc.result()["all"].mean
    assert r["mse"] == 0 and r["fvu"] == 0 and r["r2"] == 1
    assert r["cosine"] == pytest.approx(1.0)


def test_no_tokens_is_an_error():
    with pytest.raises(ValueError, match="no cls tokens"):
        ReconstructionAccumulator(2, 4, 6, {"cls": slice(0, 1)}).result()
