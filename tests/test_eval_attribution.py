"""Contribution scores C_proj: a hand computation, column sums, and the real transcoder's terms."""

import pytest
import torch

from vitclt.eval.attribution import ContributionAccumulator, bias_share_sum, projection_sums, rank_sources
from vitclt.eval.replacement import encode_rows

from .conftest import random_images
from .test_eval_replacement import make_transcoder


def test_projection_scores_match_a_hand_computation():
    # One token, three sources into target 2, D = 2: ŷ = (1, 0) + (1, 1) + (0, -1) = (2, 0), ‖ŷ‖² = 4.
    c_NID = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]]])
    sums, n = projection_sums(c_NID)
    assert n == 1
    torch.testing.assert_close(sums, torch.tensor([2 / 4, 2 / 4, 0 / 4], dtype=torch.float64))
    # A second token with a destructive source: ŷ = (0, 3) + (0, -1) = (0, 2); scores 6/4, −2/4.
    c2 = torch.tensor([[[0.0, 0.0], [0.0, 3.0], [0.0, -1.0]]])
    sums2, _ = projection_sums(torch.cat([c_NID, c2]))
    torch.testing.assert_close(sums2 / 2, torch.tensor([0.25, 1.0, -0.25], dtype=torch.float64))
    assert float((sums2 / 2).sum()) == pytest.approx(1.0, abs=1e-15)


def test_tokens_with_zero_reconstruction_are_skipped():
    c_NID = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [-1.0, -1.0]]])
    sums, n = projection_sums(c_NID)
    assert n == 1
    torch.testing.assert_close(sums, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_bias_share_is_the_bias_projection_on_the_full_reconstruction():
    y_hat = torch.tensor([[2.0, 0.0]])
    b = torch.tensor([0.0, 2.0])
    assert bias_share_sum(y_hat, b) == pytest.approx(4 / 8)


def test_accumulator_equals_scores_from_the_full_contribution_tensor(tiny_backbone):
    bb, tc = tiny_backbone, make_transcoder()
    L, T = bb.n_layers, bb.n_tokens
    groups = {g: bb.token_index(g) for g in ("cls", "patches", "all")}
    acc = ContributionAccumulator(L, T, groups)
    caps = []
    for seed in (0, 1):
        with bb.capture() as cap:
            bb.image_embeds(bb.preprocess(random_images(3, seed=seed)))
        caps.append(cap.x_BTLD())
        acc.update(tc, [encode_rows(tc, layer, cap.inputs[layer], cap.outputs[layer]) for layer in range(L)])
    got = acc.result()
    x_BTLD = torch.cat(caps)
    c_BTIJD = tc.contributions(tc.encode(x_BTLD.flatten(0, 1))).unflatten(0, (6, T))
    for g, idx in groups.items():
        c = c_BTIJD[:, idx].flatten(0, 1).double()
        m = torch.tensor(got[g].matrix, dtype=torch.float64)
        for j in range(L):
            y_hat = c[:, :, j].sum(1)
            want = ((c[:, :, j] * y_hat[:, None]).sum(-1) / y_hat.square().sum(-1)[:, None]).mean(0)
            torch.testing.assert_close(m[:, j], want, rtol=1e-5, atol=1e-6)
            assert float(m[:, j].sum()) == pytest.approx(1.0, abs=1e-12)
        assert got[g].n_tokens == 6 * (1 if g == "cls" else T - 1 if g == "patches" else T)
        assert got[g].skipped == [0, 0, 0]
        assert len(got[g].bias_share) == L


def test_rank_sources_orders_the_last_column():
    m = [[1.0, 0.2, 0.1], [0.0, 0.8, 0.6], [0.0, 0.0, 0.3]]
    assert rank_sources(m) == [1, 2, 0]
    assert rank_sources(m, target=1) == [1, 0]
