"""Shipped prompt templates and class names, and the override loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from vitclt.data.datasets import DatasetError, load_dataset
from vitclt.data.prompts import (
    CLASSNAME_SETS,
    TEMPLATE_SETS,
    build_prompts,
    builtin_classnames,
    get_templates,
    imagenet100_classes,
    load_classnames,
    load_templates,
)


@pytest.mark.parametrize(("name", "count"), [("cifar100", 18), ("imagenet", 80), ("imagenet7", 7), ("coco", 18)])
def test_shipped_template_sets(name: str, count: int) -> None:
    templates = get_templates(name)
    assert len(templates) == count == len(set(templates))
    assert all(t.count("{}") == 1 and t.format("dog") != t for t in templates)


def test_template_set_contents() -> None:
    imagenet = get_templates("imagenet")
    assert imagenet[0] == "a bad photo of a {}." and imagenet[-1] == "a tattoo of the {}."
    assert set(get_templates("imagenet7")) <= set(imagenet)
    assert get_templates("cifar100")[0] == "a photo of a {}."
    assert set(TEMPLATE_SETS) == {"cifar100", "imagenet", "imagenet7", "coco"}


@pytest.mark.parametrize(("name", "count"), [("cifar100", 100), ("imagenet100", 100), ("coco", 80)])
def test_shipped_classnames(name: str, count: int) -> None:
    names = builtin_classnames(name)
    assert len(names) == count == len(set(names)) and name in CLASSNAME_SETS
    assert all(n == n.strip() and "_" not in n for n in names)


def test_known_class_entries() -> None:
    cifar = builtin_classnames("cifar100")
    assert (cifar[0], cifar[1], cifar[47], cifar[99]) == ("apple", "aquarium fish", "maple tree", "worm")
    wnids = [w for w, _ in imagenet100_classes()]
    assert wnids == sorted(wnids) and len(set(wnids)) == 100
    rows = dict(imagenet100_classes())
    assert rows["n01558993"] == "American robin" and rows["n02869837"] == "poke bonnet"
    assert rows["n04592741"] == "airplane wing" and rows["n13040303"] == "stinkhorn mushroom"


def test_template_file_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("# my templates\n\na photo of a {}.\n  itap of my {}.  \n")
    assert load_templates(good) == ["a photo of a {}.", "itap of my {}."]
    assert get_templates(good) == load_templates(good)
    for text, pattern in [("a photo of a {}.\na photo.\n", r"bad\.txt:2: template 'a photo\.' must contain exactly"),
                          ("a {} and a {}.\n", "exactly one"), ("a {0} photo\n", "no other braces"),
                          ("# nothing\n\n", "no templates found")]:
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(DatasetError, match=pattern):
            load_templates(bad)
    with pytest.raises(DatasetError, match=r"unknown template set 'imagenet81'.*'imagenet7'"):
        get_templates("imagenet81")
    with pytest.raises(DatasetError, match="template file not found"):
        load_templates(tmp_path / "missing.txt")


def test_classname_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    path.write_text("cat\n\ndog\n# a comment\nbird\n")
    assert load_classnames(path) == ["cat", "dog", "bird"]
    assert load_classnames(path, n_expected=3) == ["cat", "dog", "bird"]
    with pytest.raises(DatasetError, match="has 3 class names but the dataset has 4 classes"):
        load_classnames(path, n_expected=4)
    path.write_text("cat\ncat\n")
    with pytest.raises(DatasetError, match=r"duplicate class names \['cat'\]"):
        load_classnames(path)
    with pytest.raises(DatasetError, match="no shipped class names for 'imagenet1k'"):
        builtin_classnames("imagenet1k")


def test_classnames_override_through_load_dataset(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "data" / cls / "x.png")
    names = tmp_path / "names.txt"
    names.write_text("an apple\na banana\n")
    ds = load_dataset(f"folder:{tmp_path / 'data'}", "all", classnames=names)
    assert ds.classnames == ["an apple", "a banana"]
    names.write_text("only one\n")
    with pytest.raises(DatasetError, match="has 1 class names but the dataset has 2"):
        load_dataset(f"folder:{tmp_path / 'data'}", "all", classnames=names)


def test_build_prompts() -> None:
    prompts = build_prompts(["cat", "sweet pepper"], ["a photo of a {}.", "art of the {}."])
    assert prompts == [["a photo of a cat.", "art of the cat."],
                       ["a photo of a sweet pepper.", "art of the sweet pepper."]]
