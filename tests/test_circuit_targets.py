"""Circuit targets (logit-diff, logit-mean, cosine) and the fidelity measurement behind their choice.

Random tiny CLIPs and untrained transcoders, as in tests/test_circuits.py: exactness holds for any weights.
"""

import json
import typing

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import random_images
from tests.test_browser import make_run
from tests.test_circuits import SETTINGS, random_transcoder
from vitclt.circuits import CircuitError, Intervention, LocalReplacement, attribute, intervene
from vitclt.circuits.fidelity import LINEARISED, VARIANTS, LiveModel, agreement, image_cases, summarise
from vitclt.circuits.graph import FEATURE
from vitclt.circuits.intervene import clean_pass
from vitclt.circuits.targets import DEFAULT_SCORE, SCORES, target_score
from vitclt.commands.explain import ScoreConfig


def classifier(backbone, n=5, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, backbone.model.config.projection_dim, generator=g), dim=-1)


def test_the_config_offers_exactly_the_library_scores():
    hints = typing.get_type_hints(ScoreConfig)
    assert typing.get_args(hints["score"]) == SCORES
    assert ScoreConfig().score == DEFAULT_SCORE


def test_target_weights():
    cos_C = torch.tensor([0.2, 0.9, 0.5, 0.7])
    diff = target_score("logit-diff", cos_C, 2)
    assert diff.versus == 1 and diff.weights_C.tolist() == [0, -1, 1, 0]  # the runner-up is the best other class
    assert abs(diff.of(cos_C) - (0.5 - 0.9)) < 1e-7
    assert target_score("logit-diff", cos_C, 1).versus == 3
    assert target_score("logit-diff", cos_C, 1, versus=0).weights_C.tolist() == [-1, 1, 0, 0]
    mean = target_score("logit-mean", cos_C, 1)
    assert abs(mean.of(cos_C) - (0.9 - float(cos_C.mean()))) < 1e-7 and abs(float(mean.weights_C.sum())) < 1e-12
    assert target_score("cosine", cos_C, 3).of(cos_C) == pytest.approx(0.7)
    for args, kw, msg in ((("softmax", cos_C, 1), {}, "unknown target score"), (("cosine", cos_C, 1), {"versus": 2}, "--versus"),
                          (("logit-diff", cos_C, 1), {"versus": 1}, "target class itself"),
                          (("logit-diff", cos_C[:1], 0), {}, "two classes")):
        with pytest.raises(CircuitError, match=msg):
            target_score(*args, **kw)


@pytest.mark.parametrize("topology,sparsifier", SETTINGS)
@pytest.mark.parametrize("kind", SCORES)
def test_every_target_keeps_completeness_in_float64(tiny_backbone, topology, sparsifier, kind):
    tc = random_transcoder(tiny_backbone, topology, sparsifier, seed=2)
    pixels = tiny_backbone.preprocess(random_images(1, seed=21))
    cls_CP = classifier(tiny_backbone).double()
    model0 = LocalReplacement(tiny_backbone, tc, pixels[0], cls_CP[0], dtype=torch.float64)
    cos_C = F.normalize(model0.state.embed_P, dim=0) @ cls_CP.T
    score = target_score(kind, cos_C, 0)
    model = LocalReplacement(tiny_backbone, tc, pixels[0], score.direction(cls_CP), dtype=torch.float64)
    g = attribute(model, batch_size=16)
    scale = float(g.adjacency.abs().max())
    assert abs(g.score - score.of(cos_C)) < 1e-12  # the frozen-norm target equals the score at the image
    assert abs(float(g.adjacency[g.target].sum()) - g.score) < 1e-12 * scale
    feats = g.kind_N == FEATURE
    torch.testing.assert_close(g.adjacency[feats].sum(1), g.value_N[feats], atol=1e-12 * scale, rtol=0)


@pytest.fixture(scope="module")
def diff_setup(tiny_backbone):
    tc = random_transcoder(tiny_backbone, seed=3)
    pixels = tiny_backbone.preprocess(random_images(1, seed=31))
    cls_CP = classifier(tiny_backbone, seed=1)
    cos_C = tiny_backbone.image_embeds(pixels)[0] @ cls_CP.T
    score = target_score("logit-diff", cos_C, int(cos_C.argmax()))
    model = LocalReplacement(tiny_backbone, tc, pixels[0], score.direction(cls_CP).double(), dtype=torch.float64)
    return tc, pixels, cls_CP, score, model, attribute(model, batch_size=32)


def test_intervene_reports_and_predicts_the_chosen_score(diff_setup, tiny_backbone):
    tc, pixels, cls_CP, score, model, g = diff_setup
    names = [f"c{i}" for i in range(len(cls_CP))]
    node = int(torch.nonzero(g.kind_N == FEATURE)[0])
    iv = Intervention(int(g.layer_N[node]), int(g.feature_N[node]), [int(g.token_N[node])], scale=1.001)
    rep = intervene(tiny_backbone, tc, pixels, [iv], cls_CP, names, score.target, graph=g, score=score)
    cos_C = F.normalize(tiny_backbone.image_embeds(pixels)[0].float(), dim=-1) @ cls_CP.T
    assert rep.clean.score == pytest.approx(float(cos_C[score.target] - cos_C[score.versus]), abs=1e-6)
    assert rep.clean.score == pytest.approx(g.score, abs=1e-5)
    # In the score's units; Δa comes from the float32 codes, the graph's values are float64.
    assert rep.predicted == pytest.approx(0.001 * float(g.value_N[node]) * float(g.total_effect()[node]), rel=1e-3)


def test_live_model_frozen_is_the_graph_and_all_live_is_the_clt_replacement(diff_setup, tiny_backbone):
    tc, pixels, cls_CP, score, model, g = diff_setup
    live = LiveModel(model)
    clean_score = live.score()
    for name, parts in VARIANTS.items():  # with nothing changed, every variant reproduces the clean score
        assert abs(live.score(parts) - clean_score) < 1e-5, name
    total = g.total_effect()
    clean = clean_pass(tiny_backbone, tc, pixels)
    names = [f"c{i}" for i in range(len(cls_CP))]
    feats = torch.nonzero(g.kind_N == FEATURE).flatten()[:6].tolist()
    for node in feats:
        layer, tok, f = int(g.layer_N[node]), int(g.token_N[node]), int(g.feature_N[node])
        frozen = live.score((), (layer, tok, f)) - clean_score
        assert abs(frozen + float(g.value_N[node]) * float(total[node])) < 1e-10  # the graph's prediction, exactly
        rep = intervene(tiny_backbone, tc, pixels, [Intervention(layer, f, [tok], value=0.0)], cls_CP, names, score.target,
                        clean=clean, score=score)
        assert abs(live.score(VARIANTS["all live"], (layer, tok, f)) - live.score(VARIANTS["all live"])
                   - (rep.replacement.score - rep.clean.score)) < 2e-5


def test_the_gradient_with_nothing_linearised_is_the_graphs_total_effect(diff_setup):
    tc, pixels, cls_CP, score, model, g = diff_setup
    live = LiveModel(model)
    feats = torch.nonzero(g.kind_N == FEATURE).flatten()
    idx = (g.layer_N[feats], g.token_N[feats], g.feature_N[feats])
    torch.testing.assert_close(live.gradient(())[idx], g.total_effect()[feats], atol=1e-10, rtol=0)
    linearised = live.gradient()[idx]  # attention, LayerNorm scales and the norm now respond: a different slope
    assert float((linearised - g.total_effect()[feats]).abs().max()) > 1e-4
    node = int(feats[0])  # which is the live model's slope: a small change, measured by finite differences
    layer, tok, f = int(g.layer_N[node]), int(g.token_N[node]), int(g.feature_N[node])
    delta = torch.zeros(model.L, model.T, tc.n_features, dtype=torch.float64)
    delta[layer, tok, f] = 1e-6
    with torch.no_grad():
        fd = (float(live.forward(LINEARISED, delta_LTF=delta)) - float(live.forward(LINEARISED, delta_LTF=-delta))) / 2e-6
    assert abs(fd - float(linearised[0])) < 1e-6


def test_agreement_statistics():
    s = agreement([1.0, 1.0, -2.0, 1.0, 0.0], [0.5, 3.0, -2.0, -1.0, 5.0])  # ratios 0.5, 3, 1, -1; the 0 prediction skipped
    assert s["n"] == 4 and s["sign"] == 0.75 and s["median"] == 0.75 and s["within2"] == 0.5
    assert s["q25"] == pytest.approx(0.125) and s["q75"] == pytest.approx(1.5)
    assert agreement([0.0], [1.0]) == {"n": 0}


def test_image_cases_split_cls_and_patches(diff_setup, tiny_backbone):
    tc, pixels, cls_CP, score, model, g = diff_setup
    res = image_cases(tiny_backbone, tc, pixels, cls_CP, [f"c{i}" for i in range(len(cls_CP))], score, top=6)
    cos_C = tiny_backbone.image_embeds(pixels)[0] @ cls_CP.T
    assert 0 < len(res.cases) <= 6 and res.score == pytest.approx(score.of(cos_C), abs=1e-5)
    s = summarise([res])
    assert s["cls"]["original"].get("n", 0) + s["patch"]["original"].get("n", 0) == s["all"]["original"]["n"]
    assert s["all"]["frozen"]["sign"] == 1.0 and s["all"]["frozen"]["median"] == pytest.approx(1.0, abs=1e-4)
    for where in ("cls", "patch"):  # the per-layer split covers every case of its token kind once
        assert sum(a.get("n", 0) for a in s["by_layer"][where].values()) == s[where]["original"].get("n", 0)


def test_commands_take_the_score_and_versus(tiny_backbone, tmp_path, capsys):
    from vitclt.cli import main

    run, spec = make_run(tmp_path, tiny_backbone)
    image = tmp_path / "photo.png"
    random_images(1, seed=5)[0].save(image)
    out = tmp_path / "viewer"
    main(["explain", str(run), "--image", str(image), "--classes", spec, "--target", "red car", "--versus", "green apple",
          "--out", str(out), "--effects-top", "0", "--precision", "float64"])
    data = json.loads((out / "graph.json").read_text())
    assert data["meta"]["target_formula"] == "cos(red car) − cos(green apple)"
    assert "cos(red car) − cos(green apple) =" in capsys.readouterr().out
    main(["intervene", str(run), "--image", str(image), "--classes", spec, "--target", "red car", "--score", "logit-mean",
          "--set", "0:0*0", "--out", str(tmp_path / "iv.json")])
    assert "cos(red car) − mean cos" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["intervene", str(run), "--image", str(image), "--classes", spec, "--score", "cosine", "--versus", "red car",
              "--set", "0:0*0"])
    assert "--versus" in capsys.readouterr().err
