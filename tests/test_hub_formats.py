"""Other formats: circuit-tracer's files read back, per-feature JumpReLU calibration of TopK exports, ViT-Prisma transcoders."""

import dataclasses
import json
import shutil
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitclt.errors import ConfigError
from vitclt.nn import CheckpointError, Transcoder, TranscoderConfig
from vitclt.nn.calibrate import calibrate_jumprelu
from vitclt.nn.foreign import load_circuit_tracer, load_prisma_transcoders
from vitclt.nn.formats import CALIBRATION_NAME, CIRCUIT_TRACER_CONFIG

L, D = 3, 8


def _model(topology="clt", sparsifier="jumprelu", F=24, k=3, seed=0):
    torch.manual_seed(seed)
    cfg = TranscoderConfig(n_layers=L, d_model=D, n_features=F, k=k, topology=topology, sparsifier=sparsifier,
                           jumprelu_init_threshold=0.5, backbone="tiny", backbone_fingerprint="abc123")
    return Transcoder(cfg)


def _data(n=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, D, generator=gen) * 2 + 1, torch.randn(n, L, D, generator=gen) - 3


def _outputs(model, x):
    with torch.no_grad():
        return model.decode(model.encode(x))


@pytest.mark.parametrize("topology", ["clt", "plt"])
@pytest.mark.parametrize("with_config", [True, False])
def test_circuit_tracer_export_loads_back_to_the_same_jumprelu(tmp_path, topology, with_config):
    model = _model(topology)
    x, y = _data()
    model.set_normalization(*Transcoder.normalization_stats(x), *Transcoder.normalization_stats(y))
    with torch.no_grad():  # thresholds per feature, so that the test sees each one
        model.sparsifier.log_threshold_LF.uniform_(-2, 0.5)
    model.fold_normalization()  # the export is folded; compare like with like, bit for bit
    model.eval().export_circuit_tracer(tmp_path / "ct")
    if not with_config:
        (tmp_path / "ct" / CIRCUIT_TRACER_CONFIG).unlink()
    loaded = load_circuit_tracer(tmp_path / "ct")
    assert loaded.cfg.topology == topology and loaded.cfg.sparsifier == "jumprelu"
    assert (loaded.cfg.backbone_fingerprint == "abc123") == with_config
    codes, codes_back = model.encode(x), loaded.encode(x)
    assert torch.equal(codes.to_dense(24), codes_back.to_dense(24))
    assert torch.equal(_outputs(model, x), _outputs(loaded, x))


def test_reading_circuit_tracer_files_refuses_missing_or_misshapen_ones(tmp_path):
    with pytest.raises(CheckpointError, match="no W_enc_0"):
        load_circuit_tracer(tmp_path)
    _model("clt").eval().export_circuit_tracer(tmp_path / "ct")
    (tmp_path / "ct" / "W_dec_1.safetensors").unlink()
    with pytest.raises(CheckpointError, match="W_dec_1.safetensors is missing"):
        load_circuit_tracer(tmp_path / "ct")


def _trained_topk(sparsifier="relu-topk", topology="clt", steps=60, F=64, k=4):
    """A TopK transcoder trained a few steps on activations with sparse structure, and its sample."""
    def data(n, seed):
        gen = torch.Generator().manual_seed(seed)
        atoms = torch.randn(48, L, D, generator=torch.Generator().manual_seed(123))
        z = (torch.rand(n, 48, generator=gen) < 0.1).float() * torch.rand(n, 48, generator=gen) * 3
        x = torch.einsum("nf,fld->nld", z, atoms) + 0.1 * torch.randn(n, L, D, generator=gen)
        mix = torch.randn(L, D, D, generator=torch.Generator().manual_seed(7)) / D ** 0.5
        return x, torch.einsum("nld,lde->nle", x.relu(), mix)

    torch.manual_seed(0)
    model = Transcoder(TranscoderConfig(n_layers=L, d_model=D, n_features=F, k=k, topology=topology, sparsifier=sparsifier))
    x, y = data(2048, 0)
    model.set_normalization(*Transcoder.normalization_stats(x), *Transcoder.normalization_stats(y))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        model(*data(256, step + 1)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), data(2048, 999)


@pytest.mark.parametrize("sparsifier", ["relu-topk", "batch-topk"])
def test_calibrated_thresholds_keep_about_k_features_and_the_reconstruction(sparsifier):
    model, (x, y) = _trained_topk(sparsifier)
    cal = calibrate_jumprelu(model, x, y)
    k = model.cfg.k
    # Frequency matching: on the sample, the JumpReLU fires as often as the TopK selects (k per row), ties aside.
    for layer in range(L):
        assert cal.l0_exported_L[layer] == pytest.approx(k, rel=0.1)
    # Stated margin: at most 0.2 more of the target variance unexplained, per layer, than the TopK model.
    for before, after in zip(cal.fvu_original_L, cal.fvu_exported_L):
        assert after <= before + 0.2
    # The one per-layer running threshold (the previous export) is no better at keeping k.
    from vitclt.nn.calibrate import jumprelu_copy

    ema = jumprelu_copy(model, model.sparsifier.thresholds())
    ema_l0 = (ema.encode(x).values_NLK != 0).sum(-1).float().mean(0)
    assert (ema_l0 - k).abs().max() >= max(abs(v - k) for v in cal.l0_exported_L)


@pytest.mark.parametrize("sparsifier", ["relu-topk", "batch-topk"])
def test_calibrated_thresholds_pass_each_feature_in_exactly_the_rows_the_topk_selects_it_in(sparsifier):
    """Frequency matching per feature: of the model's own pre-activations on the sample, exactly c_f exceed θ_f,
    c_f the rows in which the TopK selects f (the calibrated copy, whose folded encoder rounds differently, is
    checked by the next test)."""
    model, (x, _) = _trained_topk(sparsifier)
    cal = calibrate_jumprelu(model, x)
    codes = model.encode(x)  # a per-row TopK; BatchTopK's selection is batch-wide, over the whole sample
    xn_NLD = (x - model.x_mean_LD) / model.x_scale_L[:, None]
    for layer in range(L):
        pre_NF = (xn_NLD[:, layer] @ model.W_enc[layer].T + model.b_enc[layer]).detach()
        if sparsifier == "relu-topk":
            selected_F = codes.layer(layer).to_dense(model.n_features).gt(0).sum(0)
        else:
            top = pre_NF.relu().flatten().topk(model.cfg.k * pre_NF.shape[0])
            selected_F = torch.bincount(top.indices[top.values > 0] % model.n_features, minlength=model.n_features)
        passed_F = (pre_NF > cal.threshold_LF[layer]).sum(0)
        assert torch.equal(passed_F, selected_F), layer


@pytest.mark.parametrize("sparsifier", ["relu-topk", "batch-topk"])
def test_the_calibrated_copy_fires_each_feature_on_exactly_the_rows_where_it_is_strongest(sparsifier):
    """What the export writes and circuit-tracer loads: the JumpReLU copy, through its folded encoder (which rounds
    differently from the model's), fires feature f on exactly the c_f rows of the sample where the model's own
    pre-activation of f is largest, c_f the rows in which the TopK selects f. For BatchTopK (a batch-wide top k·N)
    those are the very rows it selected; a per-row TopK selects the same number of rows, not the same ones."""
    from vitclt.nn.calibrate import jumprelu_copy

    model, (x, _) = _trained_topk(sparsifier)
    cal = calibrate_jumprelu(model, x)
    fired_NLF = jumprelu_copy(model, cal.threshold_LF).encode(x).to_dense(model.n_features) != 0
    xn_NLD = (x - model.x_mean_LD) / model.x_scale_L[:, None]
    for layer in range(L):
        pre_NF = (xn_NLD[:, layer] @ model.W_enc[layer].T + model.b_enc[layer]).detach()
        if sparsifier == "relu-topk":
            selected_NF = model.encode(x).layer(layer).to_dense(model.n_features) > 0
        else:
            top = pre_NF.relu().flatten().topk(model.cfg.k * pre_NF.shape[0])
            selected_NF = torch.zeros(pre_NF.numel(), dtype=torch.bool)
            selected_NF[top.indices[top.values > 0]] = True
            selected_NF = selected_NF.view_as(pre_NF)
        count_F = selected_NF.sum(0)
        rank_NF = pre_NF.argsort(0, descending=True).argsort(0)  # 0 for the row where the feature is largest
        strongest_NF = rank_NF < count_F
        assert torch.equal(fired_NLF[:, layer], strongest_NF), (layer, (fired_NLF[:, layer] != strongest_NF).sum(0).nonzero())
        if sparsifier == "batch-topk":
            assert torch.equal(strongest_NF, selected_NF), layer


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(-3, 3), min_size=4, max_size=4), min_size=1, max_size=6), st.data())
def test_a_frequency_matched_threshold_fires_the_top_rows_and_ties_and_sits_on_no_sample_value(rows, data):
    """Small integers force ties and zeros: θ_f passes exactly the rows at or above the c_f-th largest value (ties with
    it included), never equals a sample value (but an all-zero feature's 0), and a feature selected nowhere passes none."""
    from vitclt.nn.calibrate import _frequency_matched

    pre_NF = torch.tensor(rows, dtype=torch.float32)
    positive_F = (pre_NF > 0).sum(0)
    count_F = torch.tensor([data.draw(st.integers(0, int(p))) for p in positive_F])
    threshold_F = _frequency_matched(pre_NF, count_F)
    sorted_NF = pre_NF.relu().sort(0, descending=True).values
    for f, c in enumerate(count_F.tolist()):
        passed_N = pre_NF[:, f] > threshold_F[f]
        expected_N = pre_NF[:, f] >= sorted_NF[c - 1, f] if c else torch.zeros_like(passed_N)
        assert torch.equal(passed_N, expected_N), f
        on_a_value = (pre_NF[:, f] == threshold_F[f]).any()
        assert not on_a_value or not pre_NF[:, f].any(), f  # an all-zero feature gets θ = 0, which the export stores as 1e-12


def test_a_calibrated_export_writes_its_thresholds_and_report_and_loads_back(tmp_path, capsys):
    from vitclt.nn.formats import export_circuit_tracer

    model, (x, y) = _trained_topk()

    export_circuit_tracer(model, tmp_path / "ct", calibration_x_NLD=x, calibration_y_NLD=y)
    report = json.loads((tmp_path / "ct" / CALIBRATION_NAME).read_text())
    assert "calibrated JumpReLU thresholds on 2048 rows: L0" in capsys.readouterr().out
    loaded = load_circuit_tracer(tmp_path / "ct")
    l0_L = (loaded.encode(x).values_NLK != 0).sum(-1).float().mean(0)
    torch.testing.assert_close(l0_L, torch.tensor(report["l0_exported_L"]))
    recon = _outputs(loaded, x)
    fvu_L = (recon - y).pow(2).sum((0, 2)) / (y - y.mean(0)).pow(2).sum((0, 2))
    torch.testing.assert_close(fvu_L, torch.tensor(report["fvu_exported_L"]), rtol=1e-4, atol=1e-6)
    assert report["l0_original"] == pytest.approx(model.cfg.k)


def test_calibration_refuses_what_a_jumprelu_cannot_express():
    model = _model("clt", "abs-topk")
    x, _ = _data()
    with pytest.raises(ConfigError, match="train with relu-topk or batch-topk"):
        calibrate_jumprelu(model, x)
    with pytest.raises(ConfigError, match="without a calibration sample"):
        calibrate_jumprelu(_model("clt", "jumprelu"), x)
    with pytest.raises(ConfigError, match="shape"):
        calibrate_jumprelu(_model("clt", "relu-topk"), x[:, :2])


# ViT-Prisma ------------------------------------------------------------------------------------


@dataclasses.dataclass
class PrismaRunnerConfig:
    """The fields of ViT-Prisma's VisionModelSAERunnerConfig that its transcoder files carry (a subset)."""

    hook_point_layer: int = 0
    out_hook_point_layer: int = 0
    layer_subtype: str = "ln2.hook_normalized"
    layer_out_subtype: str = "hook_mlp_out"
    is_transcoder: bool = True
    transcoder_with_skip_connection: bool = False
    d_in: int = D
    d_out: int = D
    expansion_factor: int = 4
    activation_fn_str: str = "topk"
    activation_fn_kwargs: dict = dataclasses.field(default_factory=lambda: {"k": 3})
    normalize_activations: str = "none"
    model_name: str = "openai/clip-vit-base-patch32"
    cls_token_only: bool = False
    use_patches_only: bool = False


@pytest.fixture
def prisma_module(monkeypatch):
    """Make PrismaRunnerConfig pickle under Prisma's own class path (vit_prisma.sae.config.VisionModelSAERunnerConfig)."""
    for name in ("vit_prisma", "vit_prisma.sae", "vit_prisma.sae.config"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    cls = type("VisionModelSAERunnerConfig", (PrismaRunnerConfig,),
               {"__module__": "vit_prisma.sae.config", "__qualname__": "VisionModelSAERunnerConfig"})
    sys.modules["vit_prisma.sae.config"].VisionModelSAERunnerConfig = cls
    return cls


def _write_prisma(cls, directory, layer, seed, **cfg_kw):
    """One layer's transcoder as ViT-Prisma saves it: config.json and weights.pt = {"cfg": config, "state_dict": ...}."""
    cfg = cls(hook_point_layer=layer, out_hook_point_layer=layer, **cfg_kw)
    gen = torch.Generator().manual_seed(seed)
    F = D * cfg.expansion_factor
    state = {"W_enc": torch.randn(D, F, generator=gen), "b_enc": torch.randn(F, generator=gen) * 0.1,
             "W_dec": torch.randn(F, D, generator=gen) / F ** 0.5, "b_dec": torch.randn(D, generator=gen),
             "b_dec_out": torch.randn(D, generator=gen)}
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    torch.save({"cfg": cfg, "state_dict": state}, directory / "weights.pt")
    return state


def _prisma_forward(state, k, x_ND):
    """ViT-Prisma's Transcoder.forward (no run-time normalisation, no skip): TopK with ReLU after."""
    pre = (x_ND - state["b_dec"]) @ state["W_enc"] + state["b_enc"]
    top = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return z @ state["W_dec"] + state["b_dec_out"]


def test_prisma_transcoders_load_as_a_plt_that_computes_what_prisma_computes(tmp_path, prisma_module):
    ks = [3, 5, 2]
    states = [_write_prisma(prisma_module, tmp_path / f"layer{i}", i, seed=i, activation_fn_kwargs={"k": ks[i]})
              for i in range(L)]
    model = load_prisma_transcoders([tmp_path / f"layer{i}" for i in range(L)])
    assert (model.cfg.topology, model.cfg.sparsifier, model.cfg.k_layers) == ("plt", "relu-topk", ks)
    assert model.cfg.backbone == "openai/clip-vit-base-patch32" and model.n_features == 4 * D
    x, _ = _data(32)
    expected = torch.stack([_prisma_forward(states[i], ks[i], x[:, i]) for i in range(L)], 1)
    torch.testing.assert_close(_outputs(model, x), expected, rtol=1e-5, atol=1e-5)
    # Missing layers are filled with zeros (they predict 0); the note says so.
    partial = load_prisma_transcoders([tmp_path / "layer1"], n_layers=L)
    out = _outputs(partial, x)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    torch.testing.assert_close(out[:, 1], expected[:, 1], rtol=1e-5, atol=1e-5)


def test_prisma_transcoders_resolve_by_hub_id_and_without_config_json(tmp_path, prisma_module, monkeypatch):
    state = _write_prisma(prisma_module, tmp_path / "src", 0, seed=4)
    cache = tmp_path / "cache"
    snapshot = cache / "models--Prisma-Multimodal--CLIP-transcoder-topk-3-x4-all_patches_0-mlp-90" / "snapshots" / ("c" * 40)
    shutil.copytree(tmp_path / "src", snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    x, _ = _data(16)
    model = load_prisma_transcoders(["Prisma-Multimodal/CLIP-transcoder-topk-3-x4-all_patches_0-mlp-90"])
    torch.testing.assert_close(_outputs(model, x[:, :1]), _prisma_forward(state, 3, x[:, 0])[:, None], rtol=1e-5, atol=1e-5)
    (tmp_path / "src" / "config.json").unlink()  # the config pickled beside the weights is read instead, inertly
    model = load_prisma_transcoders(tmp_path / "src")
    assert model.cfg.k_layers == [3]


def test_prisma_files_are_never_unpickled_beyond_tensors(tmp_path, prisma_module):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    _write_prisma(prisma_module, tmp_path / "evil", 0, seed=0)
    state = torch.load(tmp_path / "evil" / "weights.pt", weights_only=False)["state_dict"]
    torch.save({"cfg": Payload(), "state_dict": state}, tmp_path / "evil" / "weights.pt")
    with pytest.raises(CheckpointError, match="restricted unpickler"):
        load_prisma_transcoders([tmp_path / "evil"])
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("setting, match", [
    ({"normalize_activations": "layer_norm"}, "normalize_activations=layer_norm"),
    ({"layer_out_subtype": "hook_resid_post"}, "hook_resid_post"),
    ({"activation_fn_str": "tanh-relu"}, "tanh-relu"),
])
def test_prisma_transcoders_that_vitclt_cannot_reproduce_are_refused(tmp_path, prisma_module, setting, match):
    _write_prisma(prisma_module, tmp_path / "t", 0, seed=0, **setting)
    with pytest.raises(CheckpointError, match=match):
        load_prisma_transcoders([tmp_path / "t"])


def test_a_prisma_skip_connection_is_refused(tmp_path, prisma_module):
    state = _write_prisma(prisma_module, tmp_path / "t", 0, seed=0, transcoder_with_skip_connection=True)
    torch.save({"state_dict": {**state, "W_skip": torch.eye(D)}}, tmp_path / "t" / "weights.pt")
    with pytest.raises(CheckpointError, match="W_skip"):
        load_prisma_transcoders([tmp_path / "t"])
