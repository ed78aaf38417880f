"""Training: FVU drops, kill + resume is bit-identical, NaN stops cleanly, mismatches are refused."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import random_images
from vitclt.backbones import load_backbone
from vitclt.backbones.tiny import build_tiny_clip, tiny_clip_config
from vitclt.data.stream import BackboneSource
from vitclt.errors import OutputError
from vitclt.nn import Transcoder, TranscoderConfig
from vitclt.training import TrainConfig, TrainingError, train, transcoder_configs
from vitclt.training.checkpoint import read_state_meta
from vitclt.training.config import flat_settings
from vitclt.training.sparsity import ramp_factor
from vitclt.training.trainer import lr_factor

N_IMAGES = 24


def train_split_folder(root, n: int):
    """`root` as an ImageFolder tree of `n` random PNGs (seed 5) in two classes, all in its train/ split."""
    for i, im in enumerate(random_images(n, seed=5)):
        (root / "train" / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
        im.save(root / "train" / f"class_{i % 2}" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """An ImageFolder tree of 24 random PNGs in two classes, all in its train/ split."""
    return train_split_folder(tmp_path_factory.mktemp("images"), N_IMAGES)


def config(backbone, folder, out, **overrides) -> TrainConfig:
    """A run small enough for a test: 24 images of 17 tokens, all in one buffer, 1 CPU thread.

    Settings are given by flag name, whichever group owns them (`TrainConfig.from_json` reads flat dicts).
    """
    base = dict(backbone=str(backbone), dataset=f"folder:{folder}", tokens="all", sparsifier=("relu-topk",), k=(8,),
                expansion=4, steps=200, batch_size=256, warmup_steps=20, buffer_size=N_IMAGES * 17, norm_tokens=400,
                images_per_forward=N_IMAGES, workers=1, checkpoint_every=100, log_every=50, threads=1, device="cpu",
                out=Path(out), progress=False)
    return TrainConfig.from_json({**base, **overrides})


def changed(cfg: TrainConfig, **overrides) -> TrainConfig:
    """`cfg` with some settings changed, by flag name."""
    return TrainConfig.from_json({**flat_settings(cfg.to_json()), **overrides})


def fvu_L(model: Transcoder, backbone, folder) -> torch.Tensor:
    """FVU per layer of a saved (folded) transcoder on every token of the images in `folder`."""
    from vitclt.data.datasets import load_dataset

    x_NLD, y_NLD = BackboneSource(backbone, load_dataset(f"folder:{folder}", "train"), "all").load(range(N_IMAGES))
    with torch.no_grad():
        recon_NLD = model.eval().decode(model.encode(x_NLD))
    return (recon_NLD - y_NLD).pow(2).sum((0, 2)) / (y_NLD - y_NLD.mean(0)).pow(2).sum((0, 2))


def test_training_lowers_fvu_on_every_layer(tiny_clip_dir, tiny_backbone, image_folder, tmp_path):
    cfg = config(tiny_clip_dir, image_folder, tmp_path / "run", steps=100, lr=5e-3, dead_tokens=2000)
    [path] = train(cfg)
    model = Transcoder.from_pretrained(path)
    fvu = fvu_L(model, tiny_backbone, image_folder)
    # Measured 0.195, 0.094, 0.060 (layers 0-2) from the saved, folded weights; untrained ≈ 1.
    assert (fvu < 0.35).all(), fvu
    record = json.loads((path / "training.json").read_text())
    assert record["finished"] and record["step"] == 100
    assert TrainConfig.from_json(record["train_config"]) == cfg
    metrics = record["metrics"]
    assert len(metrics["fvu_L"]) == len(metrics["l0_L"]) == len(metrics["dead_frac_L"]) == 3
    assert all(0 <= d <= 1 for d in metrics["dead_frac_L"])
    assert metrics["l0_L"] == [8.0, 8.0, 8.0]


def test_sweep_trains_one_transcoder_per_setting_on_one_stream(tiny_clip_dir, image_folder, tmp_path, capsys):
    cfg = config(tiny_clip_dir, image_folder, tmp_path / "run", sparsifier=("relu-topk", "jumprelu", "abs-topk"),
                 k=(4, 8), steps=6, warmup_steps=2, checkpoint_every=3, cache_dir=tmp_path / "cache")
    names = ["relu-topk-k4", "relu-topk-k8", "jumprelu-k4", "jumprelu-k8", "abs-topk-k4", "abs-topk-k8"]
    assert list(transcoder_configs(cfg, 3, 32)) == names
    paths = train(cfg)
    assert [p.name for p in paths] == names
    for p in paths:
        model = Transcoder.from_pretrained(p)
        assert model.cfg.backbone == str(tiny_clip_dir) and model.cfg.tokens == "all"
    out = capsys.readouterr().out
    assert "layer      FVU       L0   dead %" in out and str(paths[-1]) in out
    meta = json.loads((tmp_path / "cache" / "metadata.json").read_text())
    assert meta["key"]["n_images"] == N_IMAGES and meta["n_rows"] == N_IMAGES * 17


@pytest.mark.slow
def test_killed_run_resumes_bit_identically(tiny_clip_dir, image_folder, tmp_path):
    steps = 60
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    argv = [sys.executable, "-m", "vitclt.cli", "train", "--backbone", str(tiny_clip_dir), "--dataset", f"folder:{image_folder}",
            "--tokens", "all", "--sparsifier", "relu-topk", "jumprelu", "--k", "8", "--expansion", "4", "--steps", str(steps),
            "--batch-size", "128", "--warmup-steps", "20", "--buffer-size", "68", "--norm-tokens", "400",
            "--images-per-forward", "3", "--workers", "1", "--checkpoint-every", "10", "--log-every", "50",
            "--threads", "1", "--device", "cpu", "--out", str(killed), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (killed / "training_state.safetensors").exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    meta = read_state_meta(killed)
    assert not meta["finished"] and 0 < meta["step"] < steps

    # 4-image blocks in forwards of 3 images: resume must re-run a block's forwards exactly as they ran.
    cfg = config(tiny_clip_dir, image_folder, killed, steps=steps, batch_size=128, buffer_size=68, images_per_forward=3,
                 checkpoint_every=10, sparsifier=("relu-topk", "jumprelu"))
    with pytest.raises(TrainingError, match="unfinished run"):
        train(cfg)
    train(changed(cfg, resume=True))
    train(changed(cfg, out=whole))
    # JumpReLU's L0 controller state resumes too (and the end-of-run calibration is deterministic).
    for name in ("relu-topk/model.safetensors", "jumprelu/model.safetensors", "training_state.safetensors"):
        a, b = load_file(killed / name), load_file(whole / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resume"


class PoisonedSource(BackboneSource):
    """Rows with NaN at layer 1 in every row of the `poison_call`-th load (the normalisation sample is load 0)."""

    poison_call = 3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def load(self, images):
        x_NLD, y_NLD = super().load(images)
        if self.calls == self.poison_call:
            x_NLD[:, 1] = float("nan")
        self.calls += 1
        return x_NLD, y_NLD


def test_nan_in_batch_stops_training_and_keeps_last_checkpoint(tiny_clip_dir, tiny_backbone, image_folder, tmp_path):
    from vitclt.data.datasets import load_dataset

    source = PoisonedSource(tiny_backbone, load_dataset(f"folder:{image_folder}", "train"), "all")
    # 4-image blocks of 68 rows, 34 rows a step: block b feeds steps 2b+1 and 2b+2, so load 3 (block 2) poisons step 5.
    cfg = config(tiny_clip_dir, image_folder, tmp_path / "run", batch_size=34, buffer_size=68, steps=20, checkpoint_every=2,
                 log_every=2)
    with pytest.raises(TrainingError, match=r"step 5: the input batch has NaN/inf LN2 outputs at layer 1"):
        train(cfg, source=source)
    meta = read_state_meta(tmp_path / "run")
    assert meta["step"] == 4 and not meta["finished"]
    model = Transcoder.from_pretrained(tmp_path / "run" / "relu-topk")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads((tmp_path / "run" / "relu-topk" / "training.json").read_text())["step"] == 4


def test_resume_into_another_backbone_or_settings_is_refused(image_folder, tmp_path):
    backbone_dir = build_tiny_clip(tmp_path / "clip", seed=0)
    cfg = config(backbone_dir, image_folder, tmp_path / "run", steps=4, warmup_steps=2, checkpoint_every=2)
    train(cfg)
    with pytest.raises(TrainingError, match="already holds a finished run"):
        train(cfg)
    with pytest.raises(TrainingError, match=r"k: run has \[8\], now \[16\]"):
        train(changed(cfg, resume=True, steps=8, k=(16,)))
    with pytest.raises(TrainingError, match=r"expansion: run has 4, now 2"):
        train(changed(cfg, resume=True, steps=8, expansion=2))
    # A kill while the state was written left a full-size temporary; resuming removes it (its writer is gone).
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    stale = tmp_path / "run" / f".training_state.safetensors.vitclt-{int(dead_pid)}-abcdefgh.tmp"
    stale.write_bytes((tmp_path / "run" / "training_state.safetensors").read_bytes())
    users = tmp_path / "run" / "notes.tmp"
    users.write_text("mine")
    train(changed(cfg, resume=True, steps=6))
    assert not stale.exists() and users.read_text() == "mine"
    fingerprint = load_backbone(backbone_dir).fingerprint
    assert Transcoder.from_pretrained(tmp_path / "run" / "relu-topk").cfg.backbone_fingerprint == fingerprint
    build_tiny_clip(backbone_dir, seed=1)  # same shape, other weights
    with pytest.raises(TrainingError, match=f"fingerprint {fingerprint}, but .* now has fingerprint [0-9a-f]+: resume with"):
        train(changed(cfg, resume=True, steps=8))
    build_tiny_clip(backbone_dir, seed=0, config=tiny_clip_config(n_layers=2))
    with pytest.raises(TrainingError, match="3 layers × width 32.*now has 2 layers × width 32"):
        train(changed(cfg, resume=True, steps=8, threads=1, workers=2))
    model = Transcoder.from_pretrained(tmp_path / "run" / "relu-topk")
    with pytest.raises(ValueError, match="3 layers"):
        model.check_compatible(load_backbone(backbone_dir).n_layers, 32)


def test_schedule():
    assert lr_factor(0, 100, 10, 0.2) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.2) == lr_factor(50, 100, 10, 0.2) == 1.0
    assert lr_factor(80, 100, 10, 0.2) == 1.0 and lr_factor(90, 100, 10, 0.2) == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, 0.2) == pytest.approx(0.05)
    assert ramp_factor(0, 100, 0.5) == pytest.approx(0.02) and ramp_factor(49, 100, 0.5) == ramp_factor(99, 100, 0.5) == 1.0
    assert ramp_factor(0, 100, 0.0) == 1.0


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(TrainingError, match="--batch-size must be at least 1"):
        train(TrainConfig.from_json({"batch_size": 0, "out": tmp_path}))
    with pytest.raises(TrainingError, match="--sparsifier lists a value twice"):
        train(TrainConfig.from_json({"sparsifier": ["jumprelu", "jumprelu"], "out": tmp_path}))
    with pytest.raises(TrainingError, match="k 300 must be between 1 and the 256 features per layer"):
        transcoder_configs(TrainConfig.from_json({"k": [300], "expansion": 8}), 3, 32)


def test_missing_tensorboard_is_a_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    with pytest.raises(TrainingError, match="pip install tensorboard"):
        train(TrainConfig(tensorboard=True, out=tmp_path / "run"))


def test_saved_config_round_trips_with_its_groups_and_reads_old_flat_configs():
    cfg = TrainConfig.from_json({"k": [4, 8], "expansion": 2, "lr": 1e-3, "buffer_size": 512, "device": "cpu",
                                 "cache_dir": "/tmp/c", "out": "runs/x"})
    assert cfg.sweep.k == (4, 8) and cfg.transcoder.expansion == 2 and cfg.optim.lr == 1e-3
    assert cfg.stream.buffer_size == 512 and cfg.stream.cache_dir == Path("/tmp/c") and cfg.runtime.device == "cpu"
    saved = json.loads(json.dumps(cfg.to_json()))
    assert saved["optim"]["lr"] == 1e-3 and saved["sweep"]["k"] == [4, 8]
    assert TrainConfig.from_json(saved) == cfg
    # vitclt 0.1 saved one flat dict; its topology/k/backbone/tokens are the run's, not the transcoder's.
    old = {"backbone": "demo", "topology": ["plt"], "sparsifier": ["jumprelu"], "k": [16], "tokens": "cls", "steps": 7,
           "expansion": 4, "seed": 3, "out": "runs/old"}
    cfg = TrainConfig.from_json(old)
    assert cfg.sweep.topology == ("plt",) and cfg.sweep.k == (16,) and cfg.tokens == "cls" and cfg.optim.steps == 7
    assert cfg.transcoder == dataclasses.replace(TranscoderConfig(), expansion=4) and cfg.runtime.seed == 3


def test_run_filled_transcoder_fields_cannot_be_set_in_the_training_config(tmp_path):
    cfg = TrainConfig(transcoder=TranscoderConfig(k=8), out=tmp_path)
    with pytest.raises(TrainingError, match="transcoder.k is filled in by the run"):
        cfg.validate()


def test_run_json_records_the_transcoder_settings_the_run_used_not_unused_defaults(tiny_clip_dir, image_folder, tmp_path):
    cfg = config(tiny_clip_dir, image_folder, tmp_path / "run", steps=2, warmup_steps=0, checkpoint_every=2, expansion=2)
    train(cfg)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    shared = run["train_config"]["transcoder"]
    assert not {"n_layers", "d_model", "k", "topology", "sparsifier", "backbone"} & set(shared), shared
    assert shared["expansion"] == 2
    used = run["transcoders"]["relu-topk"]
    assert (used["n_layers"], used["d_model"], used["k"], used["backbone"]) == (3, 32, 8, str(tiny_clip_dir))
    training = json.loads((tmp_path / "run" / "relu-topk" / "training.json").read_text())
    assert "n_layers" not in training["train_config"]["transcoder"]
    assert TrainConfig.from_json(run["train_config"]) == cfg  # nothing the run needs was dropped


def test_warmup_longer_than_the_run_is_refused_with_the_fix(tmp_path):
    with pytest.raises(TrainingError, match="--warmup-steps 1000 is more than --steps 300.*--warmup-steps 30"):
        TrainConfig.from_json({"steps": 300, "warmup_steps": 1000, "out": tmp_path}).validate()


@pytest.mark.parametrize("steps, warmup", [(300, 30), (10_000, 1000), (50_000, 1000), (5, 0)])
def test_default_warmup_is_1000_or_a_tenth_of_the_steps_as_the_help_says(steps, warmup, tmp_path):
    from vitclt.cli import parse

    _, cfg = parse(["train", "--steps", str(steps), "--out", str(tmp_path)])
    cfg.validate()  # --steps 300 alone used to be refused: the default was a literal 1000
    assert cfg.optim.warmup == warmup


def test_resume_with_more_steps_keeps_a_default_warmup_acceptable(tmp_path):
    from vitclt.training.checkpoint import config_differences

    saved = TrainConfig.from_json({"steps": 300, "out": tmp_path}).to_json()
    assert config_differences(saved, TrainConfig.from_json({"steps": 600, "out": tmp_path})) == []
    explicit = TrainConfig.from_json({"steps": 300, "warmup_steps": 20, "out": tmp_path}).to_json()
    assert config_differences(explicit, TrainConfig.from_json({"steps": 600, "warmup_steps": 30, "out": tmp_path})) != []


def test_batch_larger_than_one_pass_over_the_data_is_refused(tiny_clip_dir, image_folder, tmp_path):
    rows = N_IMAGES * 17
    cfg = config(tiny_clip_dir, image_folder, tmp_path / "run", batch_size=rows + 1, steps=2, warmup_steps=0)
    with pytest.raises(TrainingError, match=f"--batch-size {rows + 1} is more than the {rows} token rows.*to {rows} or fewer"):
        train(cfg)


def test_diverged_training_ends_with_a_warning_naming_the_learning_rate(tiny_clip_dir, image_folder, tmp_path, capsys):
    cfg = config(tiny_clip_dir, image_folder, tmp_path / "run", steps=10, warmup_steps=0, lr=10.0, log_every=5,
                 checkpoint_every=10)
    train(cfg)
    err = capsys.readouterr().err
    assert "warning: relu-topk ends training with FVU" in err and "training diverged" in err
    assert "learning rate (10) is too high" in err
    ok = config(tiny_clip_dir, image_folder, tmp_path / "ok", steps=10, warmup_steps=0, lr=5e-3, log_every=5,
                checkpoint_every=10)
    train(ok)
    assert "warning" not in capsys.readouterr().err


def test_overwrite_removes_only_a_run_of_the_same_command_and_says_what(tiny_clip_dir, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = config(tiny_clip_dir, image_folder, out, steps=2, warmup_steps=0, checkpoint_every=2)
    train(cfg)
    (out / "notes.txt").write_text("mine")
    assert json.loads((out / "run.json").read_text())["command"] == "train"
    with pytest.raises(TrainingError, match=r"made by `vitclt train`, which `vitclt demo` will neither overwrite nor resume"):
        train(changed(cfg, overwrite=True), command="demo")
    assert (out / "relu-topk" / "model.safetensors").is_file()
    capsys.readouterr()
    train(changed(cfg, overwrite=True))
    printed = capsys.readouterr().out
    assert f"removing {out / 'relu-topk'}" in printed and f"removing {out / 'training_state.safetensors'}" in printed
    assert (out / "notes.txt").read_text() == "mine"


def test_unwritable_output_fails_before_any_work(tmp_path, monkeypatch):
    import vitclt.training.runner as runner

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(runner, "build_source", lambda *a: pytest.fail("built the source before checking --out"))
    with pytest.raises(OutputError, match=f"cannot write to {tmp_path / 'file' / 'run'}.*choose another --out"):
        train(TrainConfig(out=tmp_path / "file" / "run"))
