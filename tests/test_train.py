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
from vitclt.nn import Transcoder
from vitclt.training import TrainConfig, TrainingError, train, transcoder_configs
from vitclt.training.checkpoint import read_state_meta
from vitclt.training.trainer import lr_factor, ramp_factor

N_IMAGES = 24


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """An ImageFolder tree of 24 random PNGs in two classes, all in its train/ split."""
    root = tmp_path_factory.mktemp("images")
    for i, im in enumerate(random_images(N_IMAGES, seed=5)):
        (root / "train" / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
        im.save(root / "train" / f"class_{i % 2}" / f"{i:03d}.png")
    return root


def config(backbone, folder, out, **overrides) -> TrainConfig:
    """A run small enough for a test: 24 images of 17 tokens, all in one buffer, 1 CPU thread."""
    base = dict(backbone=str(backbone), dataset=f"folder:{folder}", tokens="all", sparsifier=("relu-topk",), k=(8,),
                expansion=4, steps=200, batch_size=256, warmup_steps=20, buffer_size=N_IMAGES * 17, norm_tokens=400,
                images_per_forward=N_IMAGES, workers=1, checkpoint_every=100, log_every=50, threads=1, device="cpu",
                out=Path(out), progress=False)
    return TrainConfig(**{**base, **overrides})


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
                 k=(4, 8), steps=6, checkpoint_every=3, cache_dir=tmp_path / "cache")
    assert list(transcoder_configs(cfg, 3, 32)) == ["relu-topk-k4", "relu-topk-k8", "jumprelu", "abs-topk-k4", "abs-topk-k8"]
    paths = train(cfg)
    assert [p.name for p in paths] == ["relu-topk-k4", "relu-topk-k8", "jumprelu", "abs-topk-k4", "abs-topk-k8"]
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
            "--tokens", "all", "--sparsifier", "relu-topk", "--k", "8", "--expansion", "4", "--steps", str(steps),
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
                 checkpoint_every=10)
    with pytest.raises(TrainingError, match="unfinished run"):
        train(cfg)
    train(dataclasses.replace(cfg, resume=True))
    train(dataclasses.replace(cfg, out=whole))
    for name in ("relu-topk/model.safetensors", "training_state.safetensors"):
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
    cfg = config(backbone_dir, image_folder, tmp_path / "run", steps=4, checkpoint_every=2)
    train(cfg)
    with pytest.raises(TrainingError, match="already holds a finished run"):
        train(cfg)
    with pytest.raises(TrainingError, match=r"k: run has \[8\], now \[16\]"):
        train(dataclasses.replace(cfg, resume=True, steps=8, k=(16,)))
    build_tiny_clip(backbone_dir, seed=0, config=tiny_clip_config(n_layers=2))
    with pytest.raises(TrainingError, match="3 layers × width 32.*now has 2 layers × width 32"):
        train(dataclasses.replace(cfg, resume=True, steps=8))
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
        train(TrainConfig(batch_size=0, out=tmp_path))
    with pytest.raises(TrainingError, match="--sparsifier lists a value twice"):
        train(TrainConfig(sparsifier=("jumprelu", "jumprelu"), out=tmp_path))
    with pytest.raises(TrainingError, match="--k 300 exceeds the 256 features"):
        transcoder_configs(TrainConfig(k=(300,), expansion=8), 3, 32)


def test_missing_tensorboard_is_a_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    with pytest.raises(TrainingError, match="pip install tensorboard"):
        train(TrainConfig(tensorboard=True, out=tmp_path / "run"))
