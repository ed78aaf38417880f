"""The demo world: deterministic, captions that say what the label says, unseen classes held out."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vitclt.data.world import (
    CLASSNAMES,
    SEEN_LABELS,
    UNSEEN,
    UNSEEN_LABELS,
    DemoWorld,
    WorldError,
    load_demo_world,
)


def _bytes(world: DemoWorld, i: int) -> bytes:
    return world[i][0].tobytes()


def test_items_are_rgb_images_with_int_labels():
    world = DemoWorld("test", size=10)
    image, label = world[3]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert isinstance(label, int) and 0 <= label < len(world.classnames)
    assert len(world) == 10 and world.classnames == CLASSNAMES and len(CLASSNAMES) == 48
    assert all("{}" in t for t in world.templates)
    assert list(world.labels) == [world[i][1] for i in range(10)]


def test_same_seed_split_index_gives_same_bytes():
    for split in ("train", "test", "unseen"):
        a, b = DemoWorld(split, seed=3), DemoWorld(split, seed=3)
        for i in (0, 1, 17, 799):
            assert _bytes(a, i) == _bytes(b, i)
            assert a.caption(i) == b.caption(i)


def test_different_seeds_splits_and_indices_differ():
    assert _bytes(DemoWorld("train", seed=0), 5) != _bytes(DemoWorld("train", seed=1), 5)
    assert _bytes(DemoWorld("train", seed=0), 5) != _bytes(DemoWorld("test", seed=0), 5)
    world = DemoWorld("train")
    assert len({_bytes(world, i) for i in range(50)}) == 50


def test_captions_name_the_label_colour_and_shape():
    for split in ("train", "test", "unseen"):
        world = DemoWorld(split, size=200)
        for i in range(0, 200, 7):
            colour, shape = world.classnames[world.label(i)].split()
            words = world.caption(i).rstrip(".").split()
            assert f"{colour} {shape}" in " ".join(words)
            # Exactly one colour word and one shape word, so the caption cannot name another class.
            assert sum(w in {c for c, _ in (n.split() for n in CLASSNAMES)} for w in words) == 1
            assert sum(w in {s for _, s in (n.split() for n in CLASSNAMES)} for w in words) == 1


def test_unseen_classes_never_appear_in_training():
    assert len(UNSEEN) == 8 and len(UNSEEN_LABELS) == 8 and len(SEEN_LABELS) == 40
    assert {s for _, s in UNSEEN} == {n.split()[1] for n in CLASSNAMES}  # every shape is held out somewhere
    world = DemoWorld("train")
    for i in range(3000):
        scene = world.scene(i)
        assert (scene.colour, scene.shape) not in UNSEEN
        assert all((c, s) not in UNSEEN for c, s, *_ in scene.distractors)
        assert not any(f"{c} {s}" in scene.caption() for c, s in UNSEEN)
    assert set(np.unique(DemoWorld("test", size=400).labels)) == set(SEEN_LABELS)
    assert set(np.unique(DemoWorld("unseen", size=400).labels)) == set(UNSEEN_LABELS)


def test_registry_entry_and_errors():
    assert load_demo_world("unseen", "test", size=5).split == "unseen"
    assert load_demo_world("", "val").split == "test"
    with pytest.raises(WorldError, match="unknown demo split"):
        DemoWorld("validation-ish")
    with pytest.raises(IndexError):
        DemoWorld("test", size=3)[3]
