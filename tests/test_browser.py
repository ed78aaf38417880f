"""The feature browser's library: the streaming pass, write directions and labels, exports, and bad input."""

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import write_image_folder
from vitclt.browser import MARKER, BrowserError, build_browser
from vitclt.browser.collect import FeatureCollector
from vitclt.browser.export import cantor
from vitclt.browser.geometry import decoder_norms, later_fraction, residual_writes
from vitclt.browser.labels import Vocabulary, bpe_words, final_projection, label_check, label_features, write_directions
from vitclt.errors import OutputError
from vitclt.nn.config import TranscoderConfig
from vitclt.nn.sparse import Codes
from vitclt.nn.transcoder import Transcoder

CLASSES = ["red apple", "green apple", "red car"]
DEAD = (0, 5)
"""(layer, feature) that the test transcoder can never select."""


def make_transcoder(backbone, images, n_features: int = 24, k: int = 4, seed: int = 0) -> Transcoder:
    """A random ReLU-TopK CLT for `backbone`, normalised on `images`, with feature DEAD disabled."""
    torch.manual_seed(seed)
    cfg = TranscoderConfig(n_layers=backbone.n_layers, d_model=backbone.d_model, n_features=n_features,
                           sparsifier="relu-topk", k=k, backbone=backbone.name)
    tc = Transcoder(cfg)
    with backbone.capture() as cap:
        backbone.image_embeds(backbone.preprocess(images))
    x = cap.x_BTLD().flatten(0, 1)
    y = cap.y_BTLD().flatten(0, 1)
    tc.set_normalization(*Transcoder.normalization_stats(x), *Transcoder.normalization_stats(y))
    with torch.no_grad():
        tc.W_enc[DEAD[0]][DEAD[1]].zero_()
        tc.b_enc[DEAD[0], DEAD[1]] = -1e3
    return tc.eval()


def make_run(root: Path, backbone, trained_on: str = "folder:elsewhere") -> tuple[Path, str]:
    """A run directory with one transcoder ("clt") and an image folder dataset; returns (run dir, dataset spec)."""
    data = write_image_folder(root / "images" / "test", CLASSES, per_class=4)
    from vitclt.data.datasets import load_dataset

    ds = load_dataset(f"folder:{data.parent}")
    tc = make_transcoder(backbone, [ds[i][0] for i in range(len(ds))])
    run = root / "run"
    tc.save_pretrained(run / "clt")
    (run / "clt" / "training.json").write_text(json.dumps({"train_config": {"dataset": trained_on, "split": "train"}}))
    return run, f"folder:{data.parent}"


def read_data(path: Path):
    """The payload of a site data file `vitcltData(key, payload);`."""
    text = path.read_text()
    return json.loads(text[text.index(",") + 1 : text.rindex(")")])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("browse")
    run, spec = make_run(root, tiny_backbone)
    out = build_browser(run, spec, backbone=str(tiny_backbone.name), images_per_forward=5, top_k=4, samples=4,
                        vocab_size=50, progress=False)
    return run, spec, out


@torch.no_grad()
def dense_activations(tc: Transcoder, x_BTLD: torch.Tensor) -> torch.Tensor:
    """act_BLTF from the transcoder's own encode, the reference the streaming pass must match."""
    B, T, L, _ = x_BTLD.shape
    out = torch.zeros(B, L, T, tc.n_features)
    for layer in range(L):
        c = tc.encode_layer(layer, x_BTLD[:, :, layer].reshape(B * T, -1))
        out[:, layer] = torch.zeros(B * T, tc.n_features).scatter_add_(1, c.indices_NK, c.values_NK).view(B, T, -1)
    return out


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_streaming_top_k_equals_the_dense_reference_for_any_batching(tiny_backbone, batch):
    from tests.conftest import random_images

    images = random_images(7, seed=3)
    tc = make_transcoder(tiny_backbone, images)
    with torch.no_grad(), tiny_backbone.capture() as cap:
        tiny_backbone.image_embeds(tiny_backbone.preprocess(images))
    x = cap.x_BTLD()
    act = dense_activations(tc, x)  # (B, L, T, F)
    col = FeatureCollector(tc, tiny_backbone.n_tokens, top_k=3, n_samples=2)
    for s in range(0, len(images), batch):
        col.update(x[s : s + batch], s)
    st = col.result()
    max_LFB = act.amax(2).permute(1, 2, 0)
    ref_v, ref_i = max_LFB.topk(3, dim=-1)
    valid = torch.isfinite(st.top_max.score_LFK)
    assert torch.equal(valid, ref_v > 0)
    assert torch.allclose(st.top_max.value_LFK[valid], ref_v[valid], atol=1e-5)
    assert torch.allclose(st.top_max.value_LFK[valid], max_LFB.gather(2, st.top_max.image_LFK.clamp_min(0))[valid], atol=1e-5)
    # Token rows are the winning images' own activations.
    tok_ref = act.permute(1, 3, 0, 2)[torch.arange(3)[:, None, None], torch.arange(tc.n_features)[None, :, None],
                                     st.top_max.image_LFK.clamp_min(0)]
    assert torch.allclose(st.top_max.tokens_LFKT[valid], tok_ref[valid], atol=1e-5)
    cls_ref = act[:, :, 0].permute(1, 2, 0).topk(3, dim=-1).values
    cls_valid = torch.isfinite(st.top_cls.score_LFK)
    assert torch.allclose(st.top_cls.value_LFK[cls_valid], cls_ref[cls_valid], atol=1e-5)
    assert torch.equal(st.fire_LF, (act != 0).sum((0, 2)))
    assert torch.equal(st.image_fire_LF, (act != 0).any(2).sum(0))
    assert bool(st.dead_LF[DEAD]) and not bool(st.dead_LF.all())
    # The uniform sample holds only images where the feature fires.
    s_valid = torch.isfinite(st.sample.score_LFK)
    fires_LFB = (act != 0).any(2).permute(1, 2, 0)
    assert fires_LFB.gather(2, st.sample.image_LFK.clamp_min(0))[s_valid].all()
    assert torch.allclose(st.hist_LFG.sum(-1).float(), st.fire_LF.float())


def decoded_writes_per_layer(tc) -> torch.Tensor:
    """writes_LFJD by the transcoder's reference decode: one unit of each feature alone, minus the empty code."""
    L, F_ = tc.n_layers, tc.n_features
    rows = torch.arange(L * F_)
    values_NLK = torch.zeros(L * F_, L, 1)
    values_NLK[rows, rows // F_, 0] = 1
    indices_NLK = (rows % F_)[:, None, None].expand(-1, L, 1).contiguous()
    with torch.no_grad():
        one_hot_NLD = tc.decode(Codes(values_NLK, indices_NLK), dense=True)
        empty_NLD = tc.decode(Codes(torch.zeros_like(values_NLK), indices_NLK), dense=True)
    return (one_hot_NLD - empty_NLD).view(L, F_, L, tc.d_model)


def decoded_writes(tc) -> torch.Tensor:
    """u_LFD: the decoded writes summed over target layers."""
    return decoded_writes_per_layer(tc).sum(2)


@pytest.mark.parametrize("topology", ["clt", "plt", "sae"])
def test_residual_writes_are_one_unit_of_the_feature_decoded_and_summed_over_target_layers(topology):
    torch.manual_seed(0)
    L, D = 3, 16
    tc = Transcoder(TranscoderConfig(n_layers=L, d_model=D, n_features=8, sparsifier="relu-topk", k=2, topology=topology))
    # Unequal scales and means per layer, so a write in the wrong units or to the wrong layer shows.
    tc.set_normalization(torch.randn(L, D), 0.5 + torch.rand(L), torch.randn(L, D), torch.tensor([0.3, 1.0, 3.0]))
    writes_LFJD = decoded_writes_per_layer(tc)
    u_LFD = writes_LFJD.sum(2)
    assert float(u_LFD.norm(dim=-1).min()) > 0
    torch.testing.assert_close(residual_writes(tc), u_LFD, atol=1e-5, rtol=1e-5)
    # The per-target-layer norms the feature pages show, and the share written after the feature's own layer.
    norms_LFJ = writes_LFJD.norm(dim=-1)
    torch.testing.assert_close(decoder_norms(tc), norms_LFJ, atol=1e-5, rtol=1e-5)
    later_LJ = torch.arange(L)[None, :] > torch.arange(L)[:, None]
    expected = (norms_LFJ * later_LJ[:, None]).sum(-1) / norms_LFJ.sum(-1)
    torch.testing.assert_close(later_fraction(decoder_norms(tc)), expected, atol=1e-6, rtol=1e-5)
    assert bool((expected > 0).any()) == (topology == "clt")


def test_write_direction_is_the_embedding_change_per_unit_activation(tiny_backbone, images):
    """For a residual change that leaves σ(h) unchanged, P·LN is exactly linear: w must match it."""
    tc = make_transcoder(tiny_backbone, images)
    ln, proj = final_projection(tiny_backbone)
    h = torch.randn(tiny_backbone.d_model)
    sigma = float((h.var(unbiased=False) + ln.eps).sqrt())
    w_LFP = write_directions(tc, ln, proj, sigma)
    u = decoded_writes(tc)[1, 2].double()
    ln64, proj64, h = copy.deepcopy(ln).double(), proj.double(), h.double()
    hc = h - h.mean()
    u_perp = u - u.mean() - (u - u.mean()) @ hc / (hc @ hc) * hc  # no first-order change of mean(h) or σ(h)
    eps = 1e-4
    with torch.no_grad():
        delta = (proj64 @ ln64(h + eps * u_perp) - proj64 @ ln64(h)) / eps
        expected = proj64 @ (ln64.weight * (u_perp - u_perp.mean()) / sigma)
        assert torch.allclose(delta, expected, rtol=0, atol=1e-3 * float(expected.norm()))
        # w is that same linear map applied to the feature's whole write u.
        assert torch.allclose(w_LFP[1, 2].double(), proj64 @ (ln64.weight * (u - u.mean()) / sigma), atol=1e-5)


def test_labels_rank_vocabulary_by_cosine_with_the_write_direction():
    w_LFP = torch.randn(2, 3, 8)
    target = F.normalize(w_LFP[1, 2], dim=0)
    words = ["noise", "target", "other"]
    word_VP = F.normalize(torch.stack([torch.randn(8), target, -target]), dim=-1)
    vocab = Vocabulary(["a", "b"], F.normalize(torch.randn(2, 8), dim=-1), words, word_VP)
    labels = label_features(w_LFP, vocab, k=2)
    assert labels.word_LFK[1, 2, 0] == 1 and abs(float(labels.word_score_LFK[1, 2, 0]) - 1) < 1e-5
    assert labels.word_bottom_LFK[1, 2, 0] == 2
    assert labels.class_LFK.shape == (2, 3, 2)


def test_bpe_vocabulary_is_whole_words_in_merge_order():
    words = bpe_words(500)
    assert len(words) == 500 and len(set(words)) == 500
    assert all(w.isalpha() and len(w) >= 3 for w in words)
    assert {"photo", "red"} <= set(bpe_words(3000))


def test_label_check_scores_agreement_against_shuffled_labels():
    rng = np.random.default_rng(0)
    majority = rng.integers(0, 3, 60)
    perfect = label_check(majority.copy(), majority, CLASSES)
    assert perfect.agreement == 1.0 and perfect.shuffled < 0.6
    assert perfect.word_agreement == 1.0
    # "red apple" and "red car" share a word, "green apple" and "red car" none.
    check = label_check(np.array([2]), np.array([0]), CLASSES)
    assert check.agreement == 0.0 and check.word_agreement == 1.0


def test_site_lists_every_feature_and_marks_the_dead_one(tiny_run, tiny_backbone):
    run, spec, out = tiny_run
    assert out == run / "browser" and (out / MARKER).is_file() and (out / "index.html").is_file()
    site = read_data(out / "data" / "site.js")
    (tc,) = site["transcoders"]
    assert (tc["n_layers"], tc["n_features"]) == (tiny_backbone.n_layers, 24)
    assert tc["differs"] and "folder:elsewhere" in tc["trained_on"]
    for layer in range(tc["n_layers"]):
        index = read_data(out / "data" / tc["id"] / f"index-L{layer}.js")
        assert len(index["freq"]) == 24 and len(index["norms"]) == 24 * tc["n_layers"]
        assert index["dead"][DEAD[1]] == (layer == DEAD[0])
    shard = read_data(out / "data" / tc["id"] / f"L{DEAD[0]}" / "s0.js")
    assert shard["features"][DEAD[1]] is None
    live = next(f for f in shard["features"] if f is not None)
    assert live["top"] and all(str(i) in site["images"]["files"] for i, _ in live["top"])
    assert len(live["labels"]["classes"]) == len(CLASSES) and len(live["labels"]["words"]) == 5
    assert all((out / p).is_file() for p in site["images"]["files"].values())
    assert not list(out.parent.glob(f".{out.name}.*"))


@pytest.mark.parametrize("max_images", [None, 7])
def test_browse_json_records_the_subset_and_each_shown_image_maps_to_its_dataset_index(tmp_path, tiny_run, tiny_backbone,
                                                                                    max_images):
    from PIL import Image

    from vitclt.browser.site import thumbnail
    from vitclt.data.datasets import load_dataset

    run, spec, _ = tiny_run
    out = build_browser(run, spec, backbone=str(tiny_backbone.name), out=tmp_path / "site", images_per_forward=5, top_k=4,
                        samples=4, vocab_size=0, exports=False, progress=False, max_images=max_images, seed=1)
    subset = json.loads((out / "browse.json").read_text())["subset"]
    whole = load_dataset(spec, "test")
    assert (subset["spec"], subset["split"], subset["seed"], subset["max_images"]) == (spec, whole.split, 1, max_images)
    browsed = load_dataset(spec, "test", max_images=max_images, seed=1)
    expected = None if max_images is None else browsed.indices.tolist()
    assert subset["indices"] == expected and subset["n_images"] == len(browsed)
    site = read_data(out / "data" / "site.js")
    assert site["subset"]["subsampled"] == (max_images is not None)
    for image_id, index in site["images"]["index"].items():
        shown = Image.open(out / site["images"]["files"][image_id])
        assert shown.tobytes() == Image.open(io.BytesIO(thumbnail(whole[index][0], 128)[0])).tobytes()
        assert index == (int(image_id) if expected is None else expected[int(image_id)])


def test_exports_have_the_layouts_circuit_tracer_and_neuronpedia_read(tiny_run):
    run, spec, out = tiny_run
    site = read_data(out / "data" / "site.js")
    tc = site["transcoders"][0]
    scan = out / "circuit-tracer" / "features" / tc["id"]
    names = {p.name for p in scan.iterdir()}
    index0 = read_data(out / "data" / tc["id"] / "index-L0.js")
    live = [f for f in range(24) if not index0["dead"][f]]
    assert {f"{cantor(0, f)}.json" for f in live} <= names
    assert f"{cantor(*DEAD)}.json" not in names
    record = json.loads((scan / f"{cantor(0, live[0])}.json").read_text())
    # circuit_tracer/frontend/feature_models.py: Model, ExamplesQuantile, Example (pydantic ignores the extra label keys).
    assert set(record) == {"transcoder_id", "index", "examples_quantiles", "top_logits", "bottom_logits", "act_min",
                           "act_max", "quantile_values", "histogram", "activation_frequency", "sees_labels", "writes_labels"}
    for kind in ("sees_labels", "writes_labels"):
        assert record[kind] and all(len(r) == 4 and isinstance(r[0], str) and isinstance(r[3], bool) for r in record[kind])
    example = record["examples_quantiles"][0]["examples"][0]
    assert set(example) == {"tokens", "tokens_acts_list", "train_token_ind", "is_repeated_datapoint"}
    assert len(example["tokens"]) == len(example["tokens_acts_list"]) == site["n_tokens"]
    assert example["tokens_acts_list"][example["train_token_ind"]] == max(example["tokens_acts_list"])
    batches = sorted((out / "neuronpedia" / tc["id"]).glob("batch-*.json"))
    assert len(batches) == tc["n_layers"]
    batch = json.loads(batches[0].read_text())
    assert set(batch) == {"model_id", "layer", "sae_set", "features"}
    feature = batch["features"][live[0]]
    for key in ("feature_index", "pos_str", "pos_values", "neg_str", "neg_values", "frac_nonzero",
                "freq_hist_data_bar_values", "freq_hist_data_bar_heights", "n_prompts_total", "activations",
                "sees_str", "sees_values", "sees_baselines", "sees_shown", "writes_str", "writes_values"):
        assert key in feature
    assert feature["sees_str"] and len(feature["sees_str"]) == len(feature["sees_baselines"])
    assert set(feature["activations"][0]) == {"bin_min", "bin_max", "bin_contains", "tokens", "values"}


def test_run_dir_without_transcoders_is_refused_and_nothing_written(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BrowserError, match="no transcoder"):
        build_browser(tmp_path / "empty", "demo")
    assert list((tmp_path / "empty").iterdir()) == []


def test_unwritable_output_is_refused_before_any_compute(tmp_path, tiny_run, monkeypatch):
    run, spec, _ = tiny_run
    (tmp_path / "file").write_text("not a directory")
    import vitclt.data.datasets as datasets

    def no_compute(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the output was checked")

    monkeypatch.setattr(datasets, "load_dataset", no_compute)
    with pytest.raises(OutputError, match="cannot write"):
        build_browser(run, spec, out=tmp_path / "file" / "browser")


def test_foreign_output_directory_is_refused_and_kept(tmp_path, tiny_run):
    run, spec, _ = tiny_run
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not written by vitclt browse"):
        build_browser(run, spec, out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_failure_mid_build_leaves_nothing_and_keeps_the_earlier_browser(tmp_path, tiny_run, tiny_backbone, monkeypatch):
    run, spec, _ = tiny_run
    out = tmp_path / "site"
    build_browser(run, spec, out=out, backbone=tiny_backbone.name, exports=False, vocab_size=0, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    import vitclt.browser.build as build

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build, "copy_static", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build_browser(run, spec, out=out, backbone=tiny_backbone.name, exports=False, vocab_size=0, progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_unknown_transcoder_name_lists_the_available_ones(tiny_run):
    run, spec, _ = tiny_run
    with pytest.raises(BrowserError, match="found: clt"):
        build_browser(run, spec, transcoders=["nope"])


def test_browse_takes_templates_and_concepts_and_refuses_bad_ones_before_any_compute(tmp_path, tiny_run, monkeypatch):
    from vitclt.browser.concepts import VocabularyError
    from vitclt.cli import parse
    from vitclt.data.images import DatasetError

    cfg = parse(["browse", "RUN", "--templates", "imagenet7", "--concepts", "words.txt", "--no-writes"])[1]
    assert (cfg.templates, str(cfg.concepts), cfg.writes) == ("imagenet7", "words.txt", False)
    run, spec, _ = tiny_run
    monkeypatch.setattr("vitclt.backbones.load_backbone", lambda *a, **k: pytest.fail("loaded a backbone before checking"))
    (tmp_path / "bad.txt").write_text("a photo of a thing\n")
    with pytest.raises(DatasetError, match="exactly one"):
        build_browser(run, spec, out=tmp_path / "site", templates=tmp_path / "bad.txt", progress=False)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(VocabularyError, match="no words"):
        build_browser(run, spec, out=tmp_path / "site", concepts=tmp_path / "empty.txt", progress=False)
    assert not (tmp_path / "site").exists()


def test_label_sample_holds_only_images_where_the_feature_fires_and_no_heatmaps(tiny_backbone, images):
    tc = make_transcoder(tiny_backbone, images)
    with torch.no_grad(), tiny_backbone.capture() as cap:
        tiny_backbone.image_embeds(tiny_backbone.preprocess(images))
    act = dense_activations(tc, cap.x_BTLD())
    col = FeatureCollector(tc, tiny_backbone.n_tokens, top_k=2, n_samples=2, label_samples=4)
    col.update(cap.x_BTLD(), 0)
    st = col.result()
    lab = st.label_sample
    assert lab.tokens_LFKT.shape[-1] == 1
    valid = torch.isfinite(lab.score_LFK)
    fires_LFB = (act != 0).any(2).permute(1, 2, 0)
    assert fires_LFB.gather(2, lab.image_LFK.clamp_min(0))[valid].all()
    # Every feature that fires on at least 4 images fills all 4 slots, with distinct images.
    full = fires_LFB.sum(-1) >= 4
    assert valid[full].all() and bool(full.any())
    assert all(len(set(row.tolist())) == 4 for row in lab.image_LFK[full])
    assert FeatureCollector(tc, tiny_backbone.n_tokens).result().label_sample is None


def test_feature_labels_prefer_a_shown_sees_label_then_the_class_label_then_the_word(tmp_path):
    from vitclt.browser.site import feature_labels, write_data

    write_data(tmp_path / "data" / "site.js", "site", {"transcoders": [{"id": "tc", "n_layers": 2}]})
    write_data(tmp_path / "data" / "tc" / "index-L0.js", "tc/index-L0",
               {"label": ["red car", "", ""], "word": ["w0", "w1", ""], "sees": ["red", "", ""]})
    # A site built before sees labels existed has no "sees" column.
    write_data(tmp_path / "data" / "tc" / "index-L1.js", "tc/index-L1", {"label": ["blue car", ""], "word": ["w2", "w3"]})
    assert feature_labels(tmp_path, "tc") == [["red", "w1", ""], ["blue car", "w3"]]
    assert feature_labels(tmp_path, "other") == []
