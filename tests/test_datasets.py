"""Dataset kinds on tiny archives written here in the real formats."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vitclt.data.batches import image_batches
from vitclt.data.coco import single_labels
from vitclt.data.datasets import DATASET_KINDS, DatasetError, ImageDataset, LabelledImages, load_dataset, subsample
from vitclt.data.folder import HOLDOUT_FRACTION, held_out
from vitclt.data.images import open_image
from vitclt.data.prompts import builtin_classnames, imagenet100_classes

CIFAR_NAMES = [n.replace(" ", "_") for n in builtin_classnames("cifar100")]


# ---- a Python-2 style pickler: the real CIFAR files hold py2 `str`s (SHORT_BINSTRING/BINSTRING
# opcodes) and numpy arrays reduced through numpy.core.multiarray._reconstruct, which Python 3's
# own pickler cannot produce.

def _py2_str(value: str | bytes) -> bytes:
    raw = value.encode("latin1") if isinstance(value, str) else value
    return b"U" + bytes([len(raw)]) + raw if len(raw) < 256 else b"T" + struct.pack("<i", len(raw)) + raw


def _py2(obj: object) -> bytes:
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, list):
        return b"](" + b"".join(_py2(x) for x in obj) + b"e"
    if isinstance(obj, tuple):
        return b"(" + b"".join(_py2(x) for x in obj) + b"t"
    if obj is None:
        return b"N"
    if isinstance(obj, int):
        return b"J" + struct.pack("<i", obj)
    if isinstance(obj, (str, bytes)):
        return _py2_str(obj)
    assert isinstance(obj, np.ndarray) and obj.dtype == np.uint8
    dtype = b"cnumpy\ndtype\n" + _py2(("u1", 0, 1)) + b"R" + _py2((3, "|", None, None, None, -1, -1, 0)) + b"b"
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _py2((0,)) + _py2_str("b")
            + b"\x87R(" + _py2(1) + _py2(obj.shape) + dtype + b"\x89" + _py2_str(obj.tobytes()) + b"tb")


def py2_pickle(obj: object) -> bytes:
    return b"\x80\x02" + _py2(obj) + b"."


def cifar_arrays(n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, n)


def planes(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_cifar_python(root: Path, images: np.ndarray, labels: np.ndarray, py2: bool = True) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    batch = {"batch_label": "testing batch 1 of 1", "fine_labels": [int(x) for x in labels],
             "coarse_labels": [0] * len(labels), "filenames": [f"img_{i}.png" for i in range(len(labels))],
             "data": planes(images)}
    meta = {"fine_label_names": CIFAR_NAMES, "coarse_label_names": ["c"] * 20}
    dump = py2_pickle if py2 else (lambda o: pickle.dumps(o, protocol=4))
    (folder / "test").write_bytes(dump(batch))
    (folder / "meta").write_bytes(dump(meta))
    return folder


def write_cifar_binary(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    records = np.concatenate([np.zeros((len(labels), 1), np.uint8), labels[:, None].astype(np.uint8),
                              planes(images)], axis=1)
    (folder / "test.bin").write_bytes(records.tobytes())
    (folder / "fine_label_names.txt").write_text("\n".join(CIFAR_NAMES) + "\n")
    return folder


def tar_gz(folder: Path) -> Path:
    target = folder.parent / f"{folder.name}.tar.gz"
    with tarfile.open(target, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return target


def check_cifar(ds: ImageDataset, images: np.ndarray, labels: np.ndarray) -> None:
    assert len(ds) == len(labels) and ds.name == "cifar100" and ds.template_set == "cifar100"
    assert ds.classnames == builtin_classnames("cifar100")
    np.testing.assert_array_equal(ds.labels, labels)
    for i in range(len(labels)):
        image, label = ds[i]
        assert image.mode == "RGB" and image.size == (32, 32) and label == labels[i]
        np.testing.assert_array_equal(np.asarray(image), images[i])


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("writer", ["python2", "python3", "binary"])
def test_cifar100_formats(tmp_path: Path, writer: str, packed: bool) -> None:
    images, labels = cifar_arrays()
    if writer == "binary":
        folder = write_cifar_binary(tmp_path, images, labels)
    else:
        folder = write_cifar_python(tmp_path, images, labels, py2=writer == "python2")
    path = tar_gz(folder) if packed else folder
    check_cifar(load_dataset(f"cifar100:{path}"), images, labels)
    if not packed:
        check_cifar(load_dataset(f"cifar100:{tmp_path}", split="val"), images, labels)


def test_cifar100_refuses_malicious_pickle(tmp_path: Path) -> None:
    folder = write_cifar_python(tmp_path, *cifar_arrays())
    marker = tmp_path / "pwned"
    (folder / "test").write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(DatasetError, match=r"refusing to load os\.system .*not a genuine CIFAR-100"):
        load_dataset(f"cifar100:{folder}")
    assert not marker.exists()
    (folder / "test").write_bytes(b"\x80\x02cbuiltins\neval\n(U\x041+1tR.")
    with pytest.raises(DatasetError, match=r"builtins\.eval"):
        load_dataset(f"cifar100:{folder}")


def test_cifar100_bad_archives(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no CIFAR-100 data found.*cifar-100-python"):
        load_dataset(f"cifar100:{tmp_path}")
    folder = write_cifar_binary(tmp_path, *cifar_arrays())
    (folder / "test.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetError, match="not a multiple of 3074"):
        load_dataset(f"cifar100:{folder}")
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        load_dataset(f"cifar100:{folder}", split="dev")


@pytest.mark.parametrize("writer", [write_cifar_python, write_cifar_binary])
@pytest.mark.parametrize("keep", [10, 0.3, 0.97])
def test_cifar100_truncated_archive_names_the_file_and_the_fix(tmp_path: Path, writer, keep: float) -> None:
    archive = tar_gz(writer(tmp_path, *cifar_arrays(60)))
    data = archive.read_bytes()
    archive.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(DatasetError, match=rf"^{archive}: the archive is truncated or corrupt .*download it again from http"):
        load_dataset(f"cifar100:{archive}")


def test_cifar100_corrupt_archive_names_the_file_and_the_fix(tmp_path: Path) -> None:
    archive = tar_gz(write_cifar_python(tmp_path, *cifar_arrays(60)))
    data = bytearray(archive.read_bytes())
    data[10:74] = bytes(range(255, 191, -1))  # the first deflate block's header and data, just after the gzip header
    archive.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"^{archive}: the archive is truncated or corrupt .*download it again"):
        load_dataset(f"cifar100:{archive}")


@pytest.mark.parametrize("writer,name", [(write_cifar_python, "test"), (write_cifar_python, "meta"),
                                         (write_cifar_binary, "test.bin")])
def test_cifar100_truncated_extracted_file_names_the_file_and_the_fix(tmp_path: Path, writer, name: str) -> None:
    folder = writer(tmp_path, *cifar_arrays(20))
    raw = (folder / name).read_bytes()
    (folder / name).write_bytes(raw[: len(raw) // 2 + 1])
    with pytest.raises(DatasetError, match=rf"^{folder}:{name}: .*truncated or corrupt.*: extract it again"):
        load_dataset(f"cifar100:{folder}")


def save_image(path: Path, mode: str = "RGB", color: object = (10, 20, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 6), color).save(path, format=fmt)
    return path


def test_imagenet100_labels_and_layouts(tmp_path: Path) -> None:
    wnids = [w for w, _ in imagenet100_classes()]
    robin, tench = "n01558993", "n01440764"  # tench is ImageNet-1k but not ImageNet-100
    for split in ("train", "val"):
        save_image(tmp_path / split / robin / "a.JPEG")
        save_image(tmp_path / split / "n02869837" / "b.jpeg")
        save_image(tmp_path / split / "n02869837" / "c.JPEG")
        save_image(tmp_path / split / tench / "d.JPEG")
    with pytest.warns(UserWarning, match="only 2 of 100"):
        ds = load_dataset(f"imagenet100:{tmp_path}")
    assert ds.split == "val" and ds.template_set == "imagenet" and len(ds.classnames) == 100
    assert list(ds.labels) == [wnids.index(robin), wnids.index("n02869837"), wnids.index("n02869837")]
    assert ds.classnames[ds[0][1]] == "American robin" and ds.classnames[ds[1][1]] == "poke bonnet"
    with pytest.warns(UserWarning):
        assert len(load_dataset(f"imagenet100:{tmp_path / 'train'}", split="train")) == 3


def test_imagenet100_missing_classes(tmp_path: Path) -> None:
    save_image(tmp_path / "val" / "n01440764" / "a.JPEG")
    with pytest.raises(DatasetError, match=r"found 0 of the 100 .*n01440764.*val/n01558993/\*\.JPEG"):
        load_dataset(f"imagenet100:{tmp_path}")


COCO = {
    "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 17, "name": "cat"}],
    "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (5, 4, 3, 2, 1)],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 17, "area": 100.0, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 17, "area": 50.0, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 18, "area": 120.0, "iscrowd": 0},  # cat 150 > dog 120
        {"id": 4, "image_id": 2, "category_id": 1, "area": 9000.0, "iscrowd": 1},  # crowd: ignored
        {"id": 5, "image_id": 2, "category_id": 18, "area": 10.0, "iscrowd": 0},
        {"id": 6, "image_id": 3, "category_id": 1, "area": 500.0, "iscrowd": 1},  # only crowd: dropped
        {"id": 7, "image_id": 5, "category_id": 18, "area": 40.0, "iscrowd": 0},  # tie: lower id (cat) wins
        {"id": 8, "image_id": 5, "category_id": 17, "area": 40.0, "iscrowd": 0},
    ],
}


def test_coco_largest_area_rule() -> None:
    images, labels, classnames = single_labels(COCO)
    assert classnames == ["person", "cat", "dog"]
    assert [im["id"] for im in images] == [1, 2, 5]  # 3 (crowd only) and 4 (no annotation) dropped
    assert labels == [1, 2, 1]


def test_coco_from_files(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(COCO))
    for image in COCO["images"]:
        save_image(tmp_path / "val2017" / image["file_name"])
    ds = load_dataset(f"coco:{tmp_path}")
    assert (ds.name, ds.split, ds.template_set, len(ds)) == ("coco", "val", "coco", 3)
    assert list(ds.labels) == [1, 2, 1] and ds[1][0].mode == "RGB"
    with pytest.raises(DatasetError, match=r"instances_train2017\.json"):
        load_dataset(f"coco:{tmp_path}", split="train")


def test_coco_ships_80_names() -> None:
    names = builtin_classnames("coco")
    assert len(names) == 80 and names[0] == "person" and names[-1] == "toothbrush"


def test_folder_labels_and_rgb_conversion(tmp_path: Path) -> None:
    save_image(tmp_path / "zebra" / "gray.png", "L", 128)
    save_image(tmp_path / "zebra" / "deep.png", "I;16", 65535)
    palette = Image.new("P", (8, 6), 0)
    palette.putpalette([200, 10, 10] + [0] * 765)
    palette.save(tmp_path / "zebra" / "palette.GIF")
    save_image(tmp_path / "apple" / "clear.png", "RGBA", (0, 0, 255, 0))
    save_image(tmp_path / "apple" / "half.PNG", "RGBA", (0, 0, 255, 128))
    save_image(tmp_path / "apple" / "print.jpg", "CMYK", (0, 0, 0, 0), fmt="JPEG")
    save_image(tmp_path / "apple" / ".hidden.png")
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    save_image(tmp_path / "golden_retriever" / "sub" / "x.webp", fmt="WEBP")
    ds = load_dataset(f"folder:{tmp_path}", split="all")
    assert ds.classnames == ["apple", "golden retriever", "zebra"] and ds.name == f"folder:{tmp_path.name}"
    assert list(ds.labels) == [0, 0, 0, 1, 2, 2, 2]
    pixels = [ds[i][0].getpixel((0, 0)) for i in range(len(ds))]
    assert all(ds[i][0].mode == "RGB" for i in range(len(ds)))
    assert pixels[0] == (255, 255, 255)  # fully transparent -> white background
    assert pixels[1][2] == 255 and 120 <= pixels[1][0] <= 135  # half blue over white
    assert pixels[2] == (255, 255, 255)  # CMYK all-zero ink is white
    assert pixels[4] == (255, 255, 255) and pixels[5] == (128, 128, 128) and pixels[6] == (200, 10, 10)


def test_folder_corrupt_and_empty(tmp_path: Path) -> None:
    bad = tmp_path / "cats" / "broken.jpg"
    save_image(tmp_path / "cats" / "good.jpg")
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    ds = load_dataset(f"folder:{tmp_path}", split="all")
    with pytest.raises(DatasetError, match=r"broken\.jpg: cannot decode image"):
        ds[0]
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    truncated = tmp_path / "cats" / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[:60])
    with pytest.raises(DatasetError, match=r"truncated\.png"):
        open_image(truncated)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no class sub-directories"):
        load_dataset(f"folder:{empty}")
    (empty / "a").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(f"folder:{empty}")


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_in_batches_is_one_line_naming_the_file(tmp_path: Path, workers: int) -> None:
    save_image(tmp_path / "cats" / "a.png")
    (tmp_path / "cats" / "b.png").write_bytes(b"not a png")
    batches = image_batches(load_dataset(f"folder:{tmp_path}", "all"), batch_size=2, workers=workers)
    expected = r"^\S*b\.png: cannot decode image, the file is corrupt or not an image \(.*\)$"
    with pytest.raises(DatasetError, match=expected) as err:
        next(batches)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_folder_split_directories(tmp_path: Path) -> None:
    save_image(tmp_path / "train" / "a" / "1.png")
    save_image(tmp_path / "val" / "a" / "1.png")
    save_image(tmp_path / "val" / "b" / "1.png")
    assert len(load_dataset(f"folder:{tmp_path}")) == 2
    assert len(load_dataset(f"folder:{tmp_path}", split="train")) == 1


def _names(ds) -> list[str]:
    return [p.relative_to(p.parents[1]).as_posix() for p in ds.paths]


def test_folder_without_split_directories_holds_out_a_fixed_part_of_each_class(tmp_path: Path) -> None:
    per_class = {"cat": 10, "dog": 5, "emu": 2, "fox": 1}
    for name, n in per_class.items():
        for i in range(n):
            save_image(tmp_path / "data" / name / f"{i:02d}.png")
    train = load_dataset(f"folder:{tmp_path / 'data'}", split="train")
    test = load_dataset(f"folder:{tmp_path / 'data'}")
    everything = load_dataset(f"folder:{tmp_path / 'data'}", split="all")
    assert not set(train.paths) & set(test.paths)
    assert sorted(train.paths + test.paths) == everything.paths and len(everything) == sum(per_class.values())
    assert train.classnames == test.classnames == everything.classnames == sorted(per_class)
    counts = {name: int((test.labels == c).sum()) for c, name in enumerate(test.classnames)}
    assert counts == {name: min(max(round(n * HOLDOUT_FRACTION), 1), n - 1) for name, n in per_class.items()}
    assert f"holds out {len(test)} of its 18 images" in test.split_note and "evaluating on" in test.split_note
    assert "training on" in train.split_note and "every one of its 18" in everything.split_note
    assert "\n" not in test.split_note and load_dataset(f"folder:{tmp_path / 'data'}", max_images=2).split_note == test.split_note

    # Stable: the same names wherever the folder lives, and unmoved by images added to another class.
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tmp_path / "data", moved)
    for i in range(7):
        save_image(moved / "dog" / f"new{i}.png")
    again = load_dataset(f"folder:{moved}")
    assert [n for n in _names(again) if not n.startswith("dog/")] == [n for n in _names(test) if not n.startswith("dog/")]
    with pytest.raises(DatasetError, match="unknown split 'dev'.*train, test"):
        load_dataset(f"folder:{tmp_path / 'data'}", split="dev")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.from_regex(r"[a-z]{1,6}/?[a-z0-9]{1,6}\.png", fullmatch=True), unique=True, max_size=30))
def test_held_out_choice_depends_only_on_names(names: list[str]) -> None:
    class_dir = Path("/c")
    paths = [class_dir / n for n in names]
    chosen = held_out(paths, class_dir)
    assert chosen == held_out(list(reversed(paths)), class_dir) and chosen <= set(paths)
    if len(paths) >= 2:
        assert 1 <= len(chosen) <= len(paths) - 1 and abs(len(chosen) - len(paths) * HOLDOUT_FRACTION) <= 1
    else:
        assert not chosen


def test_folder_with_split_directories_needs_the_requested_one(tmp_path: Path) -> None:
    save_image(tmp_path / "train" / "a" / "1.png")
    ds = load_dataset(f"folder:{tmp_path}", split="train")
    assert len(ds) == 1 and ds.split_note == ""
    expected = rf"has split directories \['train'\] but none for split 'test'.*folder:{tmp_path}/train"
    with pytest.raises(DatasetError, match=expected):
        load_dataset(f"folder:{tmp_path}")


def test_spec_errors(tmp_path: Path) -> None:
    expected = r"unknown dataset spec 'imagenet1k:/x'.*'cifar100'.*'folder'.*e\.g\. 'cifar100:"
    with pytest.raises(DatasetError, match=expected):
        load_dataset("imagenet1k:/x")
    with pytest.raises(DatasetError, match=r"dataset path does not exist: .*nowhere.*cifar100:PATH"):
        load_dataset(f"cifar100:{tmp_path / 'nowhere'}")
    with pytest.raises(DatasetError, match=r"has no path: expected coco:PATH"):
        load_dataset("coco")
    with pytest.raises(ValueError):  # DatasetError is a ValueError
        load_dataset("")


def test_registry_accepts_a_new_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tiny(LabelledImages):
        def load_image(self, index: int) -> Image.Image:
            return Image.new("RGB", (2, 2))

    def load_demo(argument: str, split: str, **options: object) -> Tiny:
        tiny = Tiny(name="demo", split=split, classnames=["a", "b"], labels=[0, 1, 1], template_set="demo")
        tiny.templates = ["a {} shape."]
        return tiny

    monkeypatch.setitem(DATASET_KINDS, "demo", load_demo)
    ds = load_dataset("demo")
    assert isinstance(ds, ImageDataset) and len(ds) == 3 and ds[-1][1] == 1
    with pytest.raises(IndexError):
        ds[3]
    small = load_dataset("demo", max_images=2)
    assert len(small) == 2 and small.templates == ["a {} shape."]  # a subset keeps the dataset's extras


def test_subsample_is_stratified_and_deterministic(tmp_path: Path) -> None:
    images, _ = cifar_arrays(60)
    labels = np.repeat([0, 1, 2], 20)
    ds = load_dataset(f"cifar100:{tar_gz(write_cifar_binary(tmp_path, images, labels))}", max_images=10, seed=3)
    assert len(ds) == 10 and sorted(np.bincount(ds.labels, minlength=3)) == [3, 3, 4]
    again = load_dataset(f"cifar100:{tmp_path / 'cifar-100-binary.tar.gz'}", max_images=10, seed=3)
    np.testing.assert_array_equal(ds.indices, again.indices)
    np.testing.assert_array_equal(np.asarray(ds[0][0]), images[ds.indices[0]])
    assert ds.classnames == builtin_classnames("cifar100")
    assert subsample(again, 100) is again


def test_hf_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    from vitclt.data.hf import HFImageDataset

    features = datasets.Features({"img": datasets.Image(),
                                  "fine_label": datasets.ClassLabel(names=["sweet_pepper", "b"]),
                                  "coarse_label": datasets.ClassLabel(names=["x"])})
    rows = {"img": [Image.new("L", (4, 4), 40 * i) for i in range(3)], "fine_label": [1, 0, 1],
            "coarse_label": [0] * 3}
    table = datasets.Dataset.from_dict(rows, features=features)
    ds = HFImageDataset(table, name="hf:toy", split="test")
    assert ds.classnames == ["sweet pepper", "b"] and list(ds.labels) == [1, 0, 1]
    assert ds[2][0].mode == "RGB" and ds[2][0].getpixel((0, 0)) == (80, 80, 80)
    assert list(HFImageDataset(table, "hf:toy", "test", label_key="coarse_label").labels) == [0, 0, 0]
    with pytest.raises(DatasetError, match="no column 'nope'"):
        HFImageDataset(table, "hf:toy", "test", image_key="nope")

    def fake_load(name: str, split: str, **options: object) -> object:
        assert (name, split) == ("someone/toy", "validation")
        return table

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = load_dataset("hf:someone/toy:validation", max_images=2)
    assert ds.name == "hf:someone/toy" and len(ds) == 2


def test_hf_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(DatasetError, match=r"pip install vitclt\[hf\]"):
        load_dataset("hf:uoft-cs/cifar100")


def test_decode_warnings_do_not_leak(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_image(save_image(tmp_path / "a.png")).mode == "RGB"
