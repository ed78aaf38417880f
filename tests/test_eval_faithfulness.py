"""Necessity / sufficiency edits change exactly the intended source terms."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitclt.backbones.heads import ZeroShotHead
from vitclt.eval.faithfulness import EDITS, default_top_k, edit_name, faithfulness_settings, plan_edits, summarize
from vitclt.eval.replacement import CascadedReplacement, GridBatch, ReplacementGrid, encode_rows

from .conftest import random_images
from .test_eval_replacement import Recorder, make_transcoder


def test_default_k_is_the_papers_4_of_12_and_scales_down():
    assert default_top_k(12) == 4
    assert default_top_k(3) == 1
    assert default_top_k(1) == 1


def test_plans_keep_and_drop_the_right_sources():
    ranking = [4, 0, 11, 1, 2, 3, 5, 6, 7, 8, 9, 10]
    edits = {(e.kind, e.seed): e.sources for e in plan_edits(ranking, 4, seeds=[0, 1, 2])}
    assert edits[("full", None)] == list(range(12))
    assert edits[("drop_top1", None)] == [s for s in range(12) if s != 4]
    assert edits[("keep_topk", None)] == [0, 1, 4, 11]
    assert edits[("keep_bottomk", None)] == [7, 8, 9, 10]
    for seed in (0, 1, 2):
        assert len(edits[("drop_random", seed)]) == 11
        assert len(set(edits[("keep_random", seed)])) == 4
    again = {(e.kind, e.seed): e.sources for e in plan_edits(ranking, 4, seeds=[0, 1, 2])}
    assert again == edits
    with pytest.raises(ValueError, match="between 1 and"):
        plan_edits(ranking, 13, seeds=[])


@settings(max_examples=40, deadline=None)
@given(ranking=st.integers(2, 12).flatmap(lambda n: st.permutations(range(n))), data=st.data())
def test_random_controls_never_drop_the_top_source_and_keep_distinct_sources(ranking, data):
    n = len(ranking)
    k = data.draw(st.integers(1, n), label="k")
    seeds = range(50)
    for edit in plan_edits(ranking, k, seeds):
        if edit.kind == "drop_random":
            dropped = set(range(n)) - set(edit.sources)
            assert len(dropped) == 1 and ranking[0] not in dropped and len(edit.sources) == n - 1, edit
        elif edit.kind == "keep_random":
            assert len(edit.sources) == len(set(edit.sources)) == k and set(edit.sources) <= set(range(n)), edit
    assert plan_edits(ranking, k, seeds) == plan_edits(ranking, k, seeds)


def test_edited_decodes_remove_exactly_the_dropped_terms():
    torch.manual_seed(0)
    tc = make_transcoder()
    x_ND = torch.randn(5, 32)
    codes = [tc.encode_layer(layer, x_ND) for layer in range(3)]
    full = tc.decode_layer(2, codes)
    c_NID = tc.contributions_layer(2, codes)
    torch.testing.assert_close(tc.decode_layer(2, codes, sources=[0, 1, 2]), full, rtol=0, atol=0)
    torch.testing.assert_close(c_NID.sum(1) + tc.b_dec_LD[2], full, rtol=1e-5, atol=1e-5)
    for s in range(3):
        kept = [i for i in range(3) if i != s]
        torch.testing.assert_close(tc.decode_layer(2, codes, sources=kept), full - c_NID[:, s], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tc.decode_layer(2, codes, sources=[s]), c_NID[:, s] + tc.b_dec_LD[2], rtol=1e-5, atol=1e-5)


def test_the_replacement_applies_the_edit_at_the_last_layer_only(tiny_backbone):
    bb, tc = tiny_backbone, make_transcoder()
    pixels = bb.preprocess(random_images(4, seed=5))
    with bb.capture() as clean:
        bb.image_embeds(pixels)
    clean_codes = [encode_rows(tc, layer, clean.inputs[layer], clean.outputs[layer]) for layer in range(3)]
    B, T, D = clean.inputs[0].shape
    c_NID = tc.contributions_layer(2, clean_codes)
    for kept in ([0, 1, 2], [0, 2], [1]):
        rec = Recorder(CascadedReplacement(tc, [2], bb.token_index("all"), T, clean_codes, {2: kept}))
        with bb.replace(rec, [2], "all"):
            bb.image_embeds(pixels)
        want = c_NID[:, kept].sum(1) + tc.b_dec_LD[2]
        torch.testing.assert_close(rec.out[2], want.view(B, T, D), rtol=1e-5, atol=1e-5)
        assert list(rec.out) == [2]


def test_settings_and_summary_fit_together(tiny_backbone):
    bb, tc = tiny_backbone, make_transcoder()
    rankings = {"all": [2, 0, 1], "cls": [1, 2, 0]}
    settings, plans = faithfulness_settings("m", tc, bb, rankings, k=1, seeds=[0, 1])
    assert len(settings) == 2 * (4 + 2 * 2)
    head = ZeroShotHead(torch.nn.functional.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), dim=-1))
    grid = ReplacementGrid(bb, head, settings)
    pixels = bb.preprocess(random_images(4, seed=6))
    grid.update(GridBatch(pixels, torch.tensor([0, 1, 2, 0]), {}))
    out = summarize("m", grid.top1(), plans, 50.0, rankings, {t: [0.2, 0.3, 0.5] for t in rankings}, 1)
    for tokens in rankings:
        assert set(EDITS) <= set(out[tokens])
        assert out[tokens]["full"]["delta_full"] == 0
        drops = [e for e in plans[tokens] if e.kind == "drop_random"]
        assert out[tokens]["drop_random"]["runs"] == [grid.top1()[edit_name("m", tokens, e)] for e in drops]
        assert out[tokens]["keep_topk"]["sources"] == [[rankings[tokens][0]]]
