"""A run meets a corrupt image: it trains through it, records the skip, and resumes bit-identically."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import random_images
from vitclt.backbones import load_backbone
from vitclt.data.datasets import load_dataset
from vitclt.data.stream import BackboneSource
from vitclt.training import TrainConfig, train
from vitclt.training.checkpoint import STATE_FILE, read_state_meta

N_GOOD = 24


class Interrupted(Exception):
    """Stands in for a crash between two checkpoints."""


class InterruptedSource(BackboneSource):
    """Rows from the backbone, until the first checkpoint exists: then the next load fails."""

    def __init__(self, out: Path, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.out = out

    def load(self, images):
        if (self.out / STATE_FILE).exists():
            raise Interrupted
        return super().load(images)


def config(backbone, folder: Path, out: Path, **overrides) -> TrainConfig:
    """25 images (one corrupt) of 17 tokens in 4-image blocks, forwards of 3, checkpoints every 10 steps."""
    base = dict(backbone=str(backbone), dataset=f"folder:{folder}", tokens="all", sparsifier=("relu-topk",), k=(8,),
                expansion=4, steps=20, batch_size=128, warmup_steps=5, buffer_size=68, norm_tokens=400,
                images_per_forward=3, workers=1, checkpoint_every=10, log_every=10, threads=1, device="cpu", out=out,
                progress=False)
    return TrainConfig.from_json({**base, **overrides})


@pytest.mark.slow
def test_run_trains_through_a_corrupt_image_and_resumes_exactly_after_the_file_is_repaired(tiny_clip_dir, tmp_path):
    folder = tmp_path / "images"
    for i, im in enumerate(random_images(N_GOOD, seed=7)):
        (folder / "train" / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
        im.save(folder / "train" / f"class_{i % 2}" / f"{i:03d}.png")
    bad = folder / "train" / "class_1" / "bad.png"
    shutil.copy(folder / "train" / "class_1" / "001.png", tmp_path / "good.png")
    bad.write_bytes((tmp_path / "good.png").read_bytes()[:80])  # a download cut short
    cfg = config(tiny_clip_dir, folder, tmp_path / "whole")

    with pytest.warns(UserWarning, match=r"skipping unreadable image \d+ .*bad\.png: cannot decode image"):
        train(cfg)
    meta = read_state_meta(cfg.out)
    assert meta["finished"]
    [[index, error]] = meta["stream"]["unreadable"]
    assert str(bad) in error
    assert load_dataset(cfg.dataset, "train").paths[index] == bad

    killed = dataclasses.replace(cfg, out=tmp_path / "killed")
    backbone = load_backbone(tiny_clip_dir)
    source = InterruptedSource(killed.out, backbone, load_dataset(cfg.dataset, "train"), "all", 3, workers=1)
    with pytest.warns(UserWarning, match="bad.png"), pytest.raises(Interrupted):
        train(killed, source=source)
    assert read_state_meta(killed.out)["stream"]["unreadable"] == [[index, error]]
    shutil.copy(tmp_path / "good.png", bad)  # repaired before the resume: the run keeps skipping it
    train(dataclasses.replace(killed, resume=True))

    for name in ("relu-topk/model.safetensors", STATE_FILE):
        a, b = load_file(cfg.out / name), load_file(killed.out / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resume"
    assert read_state_meta(killed.out)["stream"]["unreadable"] == [[index, error]]
