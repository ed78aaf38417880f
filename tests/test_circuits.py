"""Attribution graphs of the local replacement model: exactness, interventions, pruning, aggregation, bad input.

Random tiny CLIPs (tests/conftest.py) and random, untrained transcoders: exactness holds for any weights.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import random_images
from tests.test_browser import make_run
from vitclt.circuits import CircuitError, Intervention, LocalReplacement, aggregate, attribute, intervene, prune
from vitclt.circuits.graph import ERROR, FEATURE
from vitclt.circuits.inputs import check_transcoder, class_index, read_image
from vitclt.circuits.intervene import check_interventions, clean_pass, parse_intervention
from vitclt.circuits.tower import clean_forward, vision_weights
from vitclt.nn.config import TranscoderConfig
from vitclt.nn.sparse import LayerCodes
from vitclt.nn.transcoder import Transcoder

SETTINGS = [("clt", "relu-topk"), ("clt", "abs-topk"), ("clt", "jumprelu"), ("plt", "relu-topk")]


def random_transcoder(backbone, topology="clt", sparsifier="relu-topk", seed=0, n_features=24, k=4) -> Transcoder:
    """An untrained transcoder of `backbone`, normalised on random images (so that features fire)."""
    torch.manual_seed(seed)
    cfg = TranscoderConfig(n_layers=backbone.n_layers, d_model=backbone.d_model, n_features=n_features, k=k,
                           topology=topology, sparsifier=sparsifier, jumprelu_init_threshold=0.5, backbone=backbone.name)
    tc = Transcoder(cfg)
    with backbone.capture() as cap:
        backbone.image_embeds(backbone.preprocess(random_images(4, seed=seed + 50)))
    tc.set_normalization(*Transcoder.normalization_stats(cap.x_BTLD().flatten(0, 1)),
                         *Transcoder.normalization_stats(cap.y_BTLD().flatten(0, 1)))
    with torch.no_grad():
        tc.b_dec.normal_(0, 0.1)  # a nonzero decoder bias must be attributed too
        tc.b_enc.normal_(0, 0.1)
    return tc.eval()


def class_vector(backbone, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(backbone.model.config.projection_dim, generator=g), dim=0)


@pytest.fixture(scope="module")
def setup64(tiny_backbone):
    """(transcoder, pixels, class vector, local model, graph) in float64."""
    tc = random_transcoder(tiny_backbone)
    pixels = tiny_backbone.preprocess(random_images(1, seed=3))
    c = class_vector(tiny_backbone)
    model = LocalReplacement(tiny_backbone, tc, pixels[0], c, dtype=torch.float64)
    return tc, pixels, c, model, attribute(model, batch_size=32)


def test_clean_forward_reproduces_the_backbone(tiny_backbone):
    pixels = tiny_backbone.preprocess(random_images(1, seed=1))
    state = clean_forward(vision_weights(tiny_backbone), pixels[0])
    with tiny_backbone.capture() as cap:
        emb = tiny_backbone.image_embeds(pixels)[0]
    torch.testing.assert_close(F.normalize(state.embed_P, dim=0), emb, atol=1e-6, rtol=0)
    torch.testing.assert_close(state.x_LTD, cap.x_BTLD()[0].transpose(0, 1), atol=2e-6, rtol=0)
    torch.testing.assert_close(state.y_LTD, cap.y_BTLD()[0].transpose(0, 1), atol=2e-6, rtol=0)


@pytest.mark.parametrize("topology,sparsifier", SETTINGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_completeness_direct_effects_sum_to_the_target(tiny_backbone, topology, sparsifier, seed):
    tc = random_transcoder(tiny_backbone, topology, sparsifier, seed=seed)
    pixels = tiny_backbone.preprocess(random_images(1, seed=10 + seed))
    c = class_vector(tiny_backbone, seed)
    model = LocalReplacement(tiny_backbone, tc, pixels[0], c, dtype=torch.float64)
    g = attribute(model, batch_size=16)
    cos = float(F.normalize(model.state.embed_P, dim=0) @ model.class_P)
    assert (g.kind_N == FEATURE).sum() > 0
    # Float64 throughout: the sums agree to rounding (1e-12 relative to the largest edge).
    scale = float(g.adjacency.abs().max())
    assert abs(g.score - cos) < 1e-12
    assert abs(float(g.adjacency[g.target].sum()) - g.score) < 1e-12 * scale
    feats = g.kind_N == FEATURE
    torch.testing.assert_close(g.adjacency[feats].sum(1), g.value_N[feats], atol=1e-12 * scale, rtol=0)


def test_completeness_in_float32_within_1e_5(tiny_backbone):
    tc = random_transcoder(tiny_backbone)
    pixels = tiny_backbone.preprocess(random_images(1, seed=4))
    model = LocalReplacement(tiny_backbone, tc, pixels[0], class_vector(tiny_backbone), dtype=torch.float32)
    g = attribute(model)
    assert abs(float(g.adjacency[g.target].sum()) - g.score) < 1e-5
    cos = float(tiny_backbone.image_embeds(pixels)[0] @ model.class_P)
    assert abs(g.score - cos) < 1e-5


def test_local_replacement_reproduces_the_original_output(setup64, tiny_backbone):
    tc, pixels, c, model, g = setup64
    for features in ("frozen", "linear"):
        out = model.forward(errors=True, features=features)
        torch.testing.assert_close(out.embed_P, model.state.embed_P, atol=1e-12, rtol=0)
        torch.testing.assert_close(out.acts_LTK, model.acts_LTK, atol=1e-12, rtol=0)
    emb = tiny_backbone.image_embeds(pixels)[0].double()
    torch.testing.assert_close(F.normalize(out.embed_P, dim=0), emb, atol=1e-6, rtol=0)


def test_without_errors_the_difference_is_the_errors_effect(setup64):
    _, _, _, model, g = setup64
    errors = g.kind_N == ERROR
    full = float(model.forward(errors=True).score)
    # Features frozen: only the errors' direct effects on the target go.
    frozen = float(model.forward(errors=False, features="frozen").score)
    assert abs((full - frozen) - float(g.adjacency[g.target, errors].sum())) < 1e-12
    # Features linear: the errors' total effects through every path go.
    linear = float(model.forward(errors=False, features="linear").score)
    assert abs((full - linear) - float(g.total_effect()[errors].sum())) < 1e-12
    assert abs(frozen - linear) > 1e-6  # the two differ, so each check means something


def test_zero_size_interventions_change_nothing(setup64, tiny_backbone):
    tc, pixels, c, model, g = setup64
    classifier = torch.stack([c.float(), class_vector(tiny_backbone, 9)])
    node = int(torch.nonzero(g.kind_N == FEATURE)[0])
    layer, token, feature = int(g.layer_N[node]), int(g.token_N[node]), int(g.feature_N[node])
    clean = clean_pass(tiny_backbone, tc, pixels)
    own = float(clean.codes[layer].to_dense(tc.n_features)[token, feature])
    for iv in (Intervention(layer, feature, "all", scale=1.0), Intervention(layer, feature, [token], value=own)):
        rep = intervene(tiny_backbone, tc, pixels, [iv], classifier, ["a", "b"], 0, graph=g, clean=clean)
        assert rep.original.target == rep.clean.target  # y + 0 is y, bit for bit
        assert abs(rep.replacement.target - rep.clean.target) < 1e-6  # ŷ + (y − ŷ) is y up to rounding
        assert rep.predicted == 0.0
    override = torch.full_like(model.acts_LTK, float("nan"))
    override[layer, token] = model.acts_LTK[layer, token]
    assert float(model.forward(features="linear", override_LTK=override).score) == float(model.forward(features="linear").score)


def _top_feature_nodes(g, n):
    feats = torch.nonzero(g.kind_N == FEATURE).flatten()
    effect = (g.total_effect()[feats] * g.value_N[feats]).abs()
    return feats[effect.argsort(descending=True)[:n]].tolist()


@pytest.mark.parametrize("delta", [1e-3, 0.5, -2.0])
def test_the_graph_predicts_the_local_models_response_exactly(setup64, delta):
    """The local replacement model with linear features is what the graph describes: any change, same answer."""
    _, _, _, model, g = setup64
    total = g.total_effect()
    base = float(model.forward(features="linear").score)
    for node in _top_feature_nodes(g, 5):
        layer, token, feature = int(g.layer_N[node]), int(g.token_N[node]), int(g.feature_N[node])
        slot = (model.index_LTK[layer, token] == feature) & model.active_LTK[layer, token]
        override = torch.full_like(model.acts_LTK, float("nan"))
        override[layer, token, slot] = model.acts_LTK[layer, token, slot] + delta
        measured = float(model.forward(features="linear", override_LTK=override).score) - base
        assert abs(measured - delta * float(total[node])) < 1e-10 * max(1.0, abs(delta))


def test_small_intervention_on_the_real_model_matches_the_prediction(setup64, tiny_backbone):
    """Linear regime: measured change ∝ size, same sign as predicted, and within a factor 2 of it.

    The graph holds attention patterns, LayerNorm scales and the embedding norm fixed; the real model
    lets them move, which changes the first-order effect itself (on this random tiny CLIP the
    measured/predicted ratio of the top features is 0.6–1.5), so the tolerance is that factor.
    """
    tc, pixels, c, model, g = setup64
    classifier = c.float()[None]
    clean = clean_pass(tiny_backbone, tc, pixels)
    for node in _top_feature_nodes(g, 5):
        layer, token, feature = int(g.layer_N[node]), int(g.token_N[node]), int(g.feature_N[node])
        got = {}
        for eps in (1e-3, 1e-2):
            rep = intervene(tiny_backbone, tc, pixels, [Intervention(layer, feature, [token], scale=1 + eps)], classifier,
                            ["c"], 0, graph=g, clean=clean)
            got[eps] = (rep.predicted, rep.replacement.target - rep.clean.target, rep.original.target - rep.clean.target)
        for which in (1, 2):
            small, large = got[1e-3][which], got[1e-2][which]
            assert abs(large / small - 10) < 0.3  # linear in the size
            ratio = large / got[1e-2][0]
            assert 0.5 < ratio < 2, (node, which, ratio)


def _dense_codes(tc, x_TD):
    return [tc.encode_layer(i, x_TD[i]).to_dense(tc.n_features) for i in range(tc.n_layers)]


def _as_codes(z_TF):
    """Dense activations as LayerCodes with one slot per feature (no sparse bookkeeping to trust)."""
    return LayerCodes(z_TF, torch.arange(z_TF.shape[1]).expand_as(z_TF).contiguous())


def _clamped(iv, z_TF, clean_TF, backbone):
    """z with the intervention's feature set at its tokens (from the clean activations for a scale)."""
    z_TF = z_TF.clone()
    index = backbone.token_index(iv.tokens)
    z_TF[index, iv.feature] = iv.value if iv.value is not None else clean_TF[index, iv.feature] * iv.scale
    return z_TF


# Three interventions of every kind (value and scale; all, cls, patches and listed tokens), two at one layer.
SEVERAL = [Intervention(0, 3, "all", value=2.0), Intervention(1, 5, [0, 4, 9], scale=-3.0),
           Intervention(1, 11, "patches", value=1.5), Intervention(2, 7, "cls", value=-2.5)]


def _cosines(backbone, pixels, classifier, fn, layers):
    with backbone.replace(fn, layers=layers):
        return F.normalize(backbone.image_embeds(pixels)[0], dim=-1) @ classifier.T


@pytest.fixture(scope="module")
def several(setup64, tiny_backbone):
    """(transcoder, pixels, classifier, clean inputs x_LTD, clean outputs y_LTD, clean dense codes) of one image."""
    tc, pixels, c, _, _ = setup64
    classifier = F.normalize(torch.stack([c.float()] + [class_vector(tiny_backbone, s).float() for s in (7, 8, 9)]), dim=-1)
    with tiny_backbone.capture() as cap:
        tiny_backbone.image_embeds(pixels)
    x_LTD, y_LTD = cap.x_BTLD()[0].transpose(0, 1), cap.y_BTLD()[0].transpose(0, 1)
    return tc, pixels, classifier, x_LTD, y_LTD, _dense_codes(tc, x_LTD)


def _run(backbone, tc, pixels, classifier, interventions):
    rep = intervene(backbone, tc, pixels, interventions, classifier, ["a", "b", "c", "d"], 0, top=4)
    return rep, {name: cos for name, cos in rep.original.top}, {name: cos for name, cos in rep.replacement.top}


@pytest.mark.parametrize("n", [2, 3, 4])
def test_several_interventions_add_their_combined_decoder_write_to_the_original_model(several, tiny_backbone, n):
    """Original model: the MLP outputs plus Σ over interventions of (new − clean) × decoder, for every target layer.

    The expected write is decoded independently: the transcoder decodes the clamped dense codes minus the clean ones.
    """
    tc, pixels, classifier, _, y_LTD, z_clean = several
    z_new = list(z_clean)
    for iv in SEVERAL[:n]:
        z_new[iv.layer] = _clamped(iv, z_new[iv.layer], z_clean[iv.layer], tiny_backbone)
    new, old = [_as_codes(z) for z in z_new], [_as_codes(z) for z in z_clean]
    delta_LTD = torch.stack([tc.decode_layer(j, new) - tc.decode_layer(j, old) for j in range(tc.n_layers)])
    assert bool((delta_LTD.abs() > 1e-3).any(-1).any(-1).all())  # every layer gets a write
    expected = _cosines(tiny_backbone, pixels, classifier, lambda layer, x, y: y + delta_LTD[layer][None], range(tc.n_layers))
    rep, original, _ = _run(tiny_backbone, tc, pixels, classifier, SEVERAL[:n])
    torch.testing.assert_close(torch.tensor([original[k] for k in "abcd"]), expected, atol=2e-6, rtol=0)
    # Each intervention matters: leaving out any one of them moves the result.
    for drop in range(n):
        _, partial, _ = _run(tiny_backbone, tc, pixels, classifier, SEVERAL[:drop] + SEVERAL[drop + 1 : n])
        assert max(abs(partial[k] - original[k]) for k in "abcd") > 1e-4, drop
    assert len(rep.changes) == n


@pytest.mark.parametrize("n", [2, 3, 4])
def test_several_interventions_are_all_clamped_in_the_clt_replacement(several, tiny_backbone, n):
    """CLT replacement: every layer re-encodes its input, every intervention clamps its feature, frozen errors added.

    Re-implemented here on dense codes (one slot per feature) and compared with `intervene`.
    """
    tc, pixels, classifier, _, y_LTD, z_clean = several
    err_LTD = torch.stack([y_LTD[j] - tc.decode_layer(j, [_as_codes(z) for z in z_clean]) for j in range(tc.n_layers)])
    codes = []

    def replacement(layer, x_BTD, y_BTD):
        z = tc.encode_layer(layer, x_BTD[0]).to_dense(tc.n_features)
        for iv in SEVERAL[:n]:
            if iv.layer == layer:
                z = _clamped(iv, z, z_clean[layer], tiny_backbone)
        codes[layer:] = [_as_codes(z)]
        return (tc.decode_layer(layer, codes) + err_LTD[layer])[None]

    expected = _cosines(tiny_backbone, pixels, classifier, replacement, range(tc.n_layers))
    _, _, replaced = _run(tiny_backbone, tc, pixels, classifier, SEVERAL[:n])
    torch.testing.assert_close(torch.tensor([replaced[k] for k in "abcd"]), expected, atol=2e-6, rtol=0)
    for drop in range(n):
        _, _, partial = _run(tiny_backbone, tc, pixels, classifier, SEVERAL[:drop] + SEVERAL[drop + 1 : n])
        assert max(abs(partial[k] - replaced[k]) for k in "abcd") > 1e-4, drop


def test_interventions_in_the_last_layer_give_the_same_result_both_ways(several, tiny_backbone):
    """Nothing is re-encoded after the last layer, so the CLT replacement is the original model plus the same write."""
    tc, pixels, classifier, _, _, _ = several
    last = tc.n_layers - 1
    # Two of them set feature 2 at CLS: the later one holds, in both ways alike.
    ivs = [Intervention(last, 2, "all", value=1.0), Intervention(last, 9, [0, 3], value=-2.0),
           Intervention(last, 2, "cls", value=3.0)]
    rep, original, replaced = _run(tiny_backbone, tc, pixels, classifier, ivs)
    assert abs(rep.original.target - rep.clean.target) > 1e-3
    for k in "abcd":
        assert abs(original[k] - replaced[k]) < 2e-6


def test_a_later_intervention_on_the_same_feature_and_token_overrides_an_earlier_one(setup64, several, tiny_backbone):
    """Setting a feature twice at a token is setting it once to the later value: both ways and in the prediction."""
    tc, pixels, classifier, _, _, _ = several
    g = setup64[4]
    node = _top_feature_nodes(g, 1)[0]
    layer, token, feature = int(g.layer_N[node]), int(g.token_N[node]), int(g.feature_N[node])
    run = lambda ivs: intervene(tiny_backbone, tc, pixels, ivs, classifier, list("abcd"), 0, top=4, graph=g)  # noqa: E731
    twice = run([Intervention(layer, feature, [token], scale=2.0), Intervention(layer, feature, "all", scale=3.0)])
    once = run([Intervention(layer, feature, "all", scale=3.0)])
    assert twice.original == once.original and twice.replacement == once.replacement
    assert once.predicted is not None and abs(twice.predicted - once.predicted) < 1e-12


def _influence(A, target):
    """Σ_{k≥1} w Âᵏ by one solve, w (I − Â)⁻¹ − w (Â nilpotent: the graph is acyclic), not the power series prune sums."""
    absA = A.double().abs()
    rows = absA.sum(1, keepdim=True)
    An = torch.where(rows > 0, absA / torch.where(rows > 0, rows, 1), 0)
    w = torch.zeros(A.shape[0], dtype=torch.float64)
    w[target] = 1
    return torch.linalg.solve((torch.eye(A.shape[0], dtype=torch.float64) - An).T, w) - w, An


def _shortest_prefix(scores, fraction):
    """How many of the largest scores it takes to reach `fraction` of their sum."""
    cum = scores.sort(descending=True).values.cumsum(0)
    return int((cum < fraction * cum[-1]).sum()) + 1


@settings(max_examples=25, deadline=None)
@given(node_fraction=st.floats(0.05, 1.0), edge_fraction=st.floats(0.05, 1.0))
def test_pruning_keeps_the_fewest_nodes_and_edges_that_carry_the_fractions(setup64, node_fraction, edge_fraction):
    """Every figure recomputed from the adjacency, not read from what `prune` reports."""
    g = setup64[4]
    A, n = g.adjacency.double(), g.n
    p = prune(g.adjacency, g.target, node_fraction, edge_fraction)
    infl, _ = _influence(A, g.target)
    torch.testing.assert_close(p.influence[:-1], infl[:-1], atol=1e-12, rtol=1e-10)
    # Nodes: exactly the most influential ones, as many as it takes to reach the fraction, and the target.
    others = torch.arange(n) != g.target
    need = _shortest_prefix(infl[others], node_fraction)
    assert bool(p.node_mask[g.target]) and int(p.node_mask[others].sum()) == need
    if not bool(p.node_mask.all()):
        assert float(infl[p.node_mask & others].min()) >= float(infl[~p.node_mask].max())
    assert abs(p.node_fraction - float(infl[p.node_mask & others].sum() / infl[others].sum())) < 1e-12
    # Edges: scored on the pruned graph, kept ones join kept nodes; the strongest ones up to the fraction are
    # all kept, and every other kept edge is the strongest way out of its source.
    keep = p.node_mask[:, None] & p.node_mask[None, :]
    infl_p, An = _influence(A * keep, g.target)
    infl_p[g.target] += 1
    score = An * infl_p[:, None]
    assert not bool((p.edge_mask & ~keep).any())
    need = _shortest_prefix(score.flatten(), edge_fraction)
    strongest = torch.zeros(n * n, dtype=torch.bool)
    strongest[score.flatten().argsort(descending=True)[:need]] = True
    assert bool(p.edge_mask.flatten()[strongest].all())
    best_out = score.argmax(0)
    for i, j in zip(*torch.nonzero(p.edge_mask & ~strongest.view(n, n), as_tuple=True)):
        assert int(best_out[j]) == int(i)
    assert abs(p.edge_fraction - float(score[p.edge_mask].sum() / score.sum())) < 1e-12
    # The documented promise: every kept node with a way to the target in the pruned graph keeps one along kept edges.
    reaches = torch.zeros(n, dtype=torch.bool)
    reaches[g.target] = True
    for _ in range(n):
        reaches = reaches | (p.edge_mask & reaches[:, None]).any(0)
    assert bool(reaches[p.node_mask & (infl_p > 0)].all())
    assert bool((p.node_mask & (infl_p > 0)).sum() > 1)


def test_class_aggregate_is_complete_and_averages(tiny_backbone):
    tc = random_transcoder(tiny_backbone)
    c = class_vector(tiny_backbone)
    graphs = [attribute(LocalReplacement(tiny_backbone, tc, tiny_backbone.preprocess([im])[0], c, dtype=torch.float64))
              for im in random_images(3, seed=20)]
    agg = aggregate(graphs)
    mean_score = sum(g.score for g in graphs) / 3
    assert abs(agg.score - mean_score) < 1e-12
    assert abs(float(agg.adjacency[agg.target].sum()) - mean_score) < 1e-12
    feats = agg.kind_N == FEATURE
    torch.testing.assert_close(agg.adjacency[feats].sum(1), agg.value_N[feats], atol=1e-12, rtol=0)
    # Far fewer nodes: tokens are grouped into CLS and patches.
    assert agg.n < graphs[0].n
    assert set(agg.token_N[feats].tolist()) <= {0, -2}
    p = prune(agg.adjacency, agg.target, 0.8, 0.98)
    assert p.node_fraction >= 0.8


def test_parse_intervention_reads_every_form():
    assert parse_intervention("3:120=0") == Intervention(3, 120, "all", value=0.0)
    assert parse_intervention("5:7@cls*2") == Intervention(5, 7, "cls", scale=2.0)
    assert parse_intervention(" 2:44 @ 0,9,10 = -1.5 ") == Intervention(2, 44, [0, 9, 10], value=-1.5)
    for bad in ("3=1", "a:b=1", "3:1@x=1", "3:1"):
        with pytest.raises(CircuitError, match="LAYER:FEATURE|tokens"):
            parse_intervention(bad)


def test_bad_input_is_one_line_naming_the_fix(tiny_backbone, tmp_path):
    tc = random_transcoder(tiny_backbone)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    errors = []
    with pytest.raises(CircuitError, match="readable image") as e:
        read_image(bad)
    errors.append(e)
    with pytest.raises(CircuitError, match="did you mean 'red apple'") as e:
        class_index("red aple", ["red apple", "green apple", "red car"])
    errors.append(e)
    tc.cfg.backbone_fingerprint = "0" * 16
    with pytest.raises(CircuitError, match="another backbone.*--backbone") as e:
        check_transcoder(tc, tiny_backbone)
    errors.append(e)
    tc.cfg.backbone_fingerprint = tiny_backbone.fingerprint
    check_transcoder(tc, tiny_backbone)
    for iv, what in ((Intervention(0, 24, value=1.0), "feature 24"), (Intervention(7, 0, value=1.0), "layer 7"),
                     (Intervention(0, 0, [99], value=1.0), "token")):
        with pytest.raises(CircuitError, match=what) as e:
            check_interventions([iv], tc, tiny_backbone)
        errors.append(e)
    assert all("\n" not in str(e.value) for e in errors)


def test_explain_and_intervene_commands_end_to_end(tiny_backbone, tmp_path, capsys):
    from vitclt.cli import main

    run, spec = make_run(tmp_path, tiny_backbone)
    image = tmp_path / "photo.png"
    random_images(1, seed=5)[0].save(image)
    out = tmp_path / "viewer"
    main(["explain", str(run), "--image", str(image), "--classes", spec, "--target", "red car", "--out", str(out),
          "--effects-top", "3", "--precision", "float64"])
    data = json.loads((out / "graph.json").read_text())
    assert data["meta"]["target_name"] == "red car"
    assert abs(data["meta"]["completeness"]["sum"] - data["meta"]["completeness"]["score"]) < 1e-8
    assert (out / "index.html").is_file() and (out / "data" / "graph.js").is_file() and data["meta"]["image"]
    kept_features = [n["id"] for n in data["nodes"] if n["kind"] == "feature"]
    assert len(data["effects"]) == min(3, len(kept_features)) >= 1 and set(data["effects"]) <= set(kept_features)
    assert data["edges"]
    printed = capsys.readouterr().out
    assert "open the viewer" in printed
    feature = next(n for n in data["nodes"] if n["kind"] == "feature")
    main(["intervene", str(run), "--image", str(image), "--classes", spec, "--target", "red car",
          "--set", f"{feature['layer']}:{feature['feature']}@{feature['token']}*0", "--out", str(tmp_path / "iv.json")])
    printed = capsys.readouterr().out
    assert "CLT replacement" in printed and "original + decoder change" in printed
    report = json.loads((tmp_path / "iv.json").read_text())
    assert len(report["clean"]["top"]) == 3 and report["predicted"] is not None
    # Running again replaces the viewer; a directory it did not write is refused.
    main(["explain", str(run), "--image", str(image), "--classes", spec, "--out", str(out), "--effects-top", "0"])
    with pytest.raises(SystemExit):
        main(["explain", str(run), "--image", str(image), "--classes", spec, "--out", str(tmp_path / "images")])
    assert "was not written by vitclt explain" in capsys.readouterr().err


def test_explain_class_images_aggregates(tiny_backbone, tmp_path):
    from vitclt.cli import main

    run, spec = make_run(tmp_path, tiny_backbone)
    out = tmp_path / "class"
    main(["explain", str(run), "--class-images", "green apple", "--classes", spec, "--max-images", "3", "--out", str(out)])
    data = json.loads((out / "graph.json").read_text())
    assert data["meta"]["kind"] == "class" and data["meta"]["n_images"] == 3
    assert abs(data["meta"]["completeness"]["sum"] - data["meta"]["score"]) < 1e-5


def test_command_errors_are_one_line(tiny_backbone, tmp_path, capsys):
    from vitclt.cli import main

    run, spec = make_run(tmp_path, tiny_backbone)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    for args, expected in (
        (["explain", str(run), "--image", str(bad), "--classes", spec], "readable image"),
        (["explain", str(run), "--image", str(bad), "--classes", spec, "--target", "blue car"], "not among"),
        (["explain", str(run), "--classes", spec], "exactly one of --image"),
    ):
        with pytest.raises(SystemExit):
            main(args)
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1
