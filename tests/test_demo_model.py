"""The shipped demo CLIP: it loads through the ordinary loader and reaches its documented accuracy."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
import torch

from tools.train_demo_clip import positives, scene_codes, zero_shot_top1
from vitclt.backbones import load_backbone
from vitclt.data.world import IMAGE_SIZE, UNSEEN_LABELS, DemoWorld

N_IMAGES = 200
MARGIN = 0.10  # a 200-image sample of a ~2000-image figure: a few points of sampling noise, plus slack


@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(1)
    return load_backbone("demo")


@pytest.fixture(scope="module")
def documented() -> dict[str, float]:
    record = resources.files("vitclt.assets").joinpath("demo_clip", "training.json").read_text()
    return json.loads(record)["metrics"]


def test_demo_model_shape(demo):
    assert demo.n_layers >= 6
    assert demo.image_size == IMAGE_SIZE and demo.n_tokens == 1 + (IMAGE_SIZE // demo.patch_size) ** 2
    assert demo.model.dtype == torch.float32  # stored in float16, loaded in float32


def test_preprocess_is_clip_normalisation(demo):
    image, _ = DemoWorld("test")[0]
    pixels = demo.preprocess([image])[0]
    mean = torch.tensor(demo.processor.image_mean)[:, None, None]
    std = torch.tensor(demo.processor.image_std)[:, None, None]
    raw = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255
    torch.testing.assert_close(pixels, (raw - mean) / std, atol=1e-5, rtol=0)


def test_heldout_accuracy_matches_documented(demo, documented):
    acc = zero_shot_top1(demo, DemoWorld("test", size=N_IMAGES), N_IMAGES)
    assert acc >= documented["test_top1_48way"] - MARGIN


def test_unseen_combinations_well_above_chance(demo, documented):
    unseen = DemoWorld("unseen", size=N_IMAGES)
    acc_48 = zero_shot_top1(demo, unseen, N_IMAGES)
    acc_8 = zero_shot_top1(demo, unseen, N_IMAGES, classes=UNSEEN_LABELS)
    assert acc_48 >= documented["unseen_top1_48way"] - MARGIN
    assert acc_8 >= documented["unseen_top1_among_unseen_8way"] - MARGIN
    assert acc_48 > 5 / 48 and acc_8 > 3 / 8  # chance is 1/48 and 1/8


def test_multi_positive_target_counts_every_true_caption():
    world = DemoWorld("train", size=200)
    scenes = [world.scene(i) for i in range(200)]
    rng = np.random.default_rng(0)
    mentioned = torch.from_numpy(rng.random((200, 3)) < 0.5)
    pos = positives(scene_codes(scenes), mentioned)
    assert pos.diagonal().all()
    for i, j in zip(*np.nonzero(rng.random((200, 200)) < 0.05), strict=True):
        caption = scenes[j].caption(*map(bool, mentioned[j].tolist()))
        # A caption is true of an image when every attribute it names is the image's.
        s = scenes[i]
        true = (f"{s.colour} {s.shape}" in caption
                and (not mentioned[j, 0] or s.size == scenes[j].size)
                and (not mentioned[j, 1] or s.position == scenes[j].position)
                and (not mentioned[j, 2] or s.background == scenes[j].background))
        assert bool(pos[i, j]) == true
