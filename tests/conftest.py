"""Shared fixtures: tiny CLIP models of the real class, saved and loaded like real checkpoints."""

import os

# No network in tests: fail fast instead of retrying the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A 3-layer, width-32, 32-px, patch-8 CLIPModel (17 tokens) saved with processor and tokenizer."""
    from vitclt.backbones.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_clip_dir):
    """The tiny CLIP loaded through the ordinary backbone path."""
    from vitclt.backbones import load_backbone

    return load_backbone(tiny_clip_dir)


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (40, 36)) -> list[Image.Image]:
    """`n` random RGB images (not square, so the processor's resize and crop are exercised)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def write_image_folder(root, classnames, per_class: int, seed: int = 0):
    """An ImageFolder at `root`: one subdirectory of `per_class` random PNGs per class name."""
    for c, name in enumerate(classnames):
        (root / name).mkdir(parents=True)
        for i, im in enumerate(random_images(per_class, seed=seed + c)):
            im.save(root / name / f"{i}.png")
    return root


@pytest.fixture
def images():
    """Six random RGB images."""
    return random_images(6)
