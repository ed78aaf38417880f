"""Any image classification tree in the ImageFolder layout.

``folder:PATH`` reads ``PATH/<class>/<image>``: one sub-directory per class,
classes in sorted order of their directory names (label 0 = first), images
found recursively inside each class directory, in sorted path order. Image
files are those ending in .jpg, .jpeg, .png, .bmp, .webp or .gif (any case);
hidden files and directories are skipped. Class names for prompts are the
directory names with ``_`` read as a space (``golden_retriever`` →
``golden retriever``).

Splits. If ``PATH`` holds split directories (``train``; ``test`` or ``val``),
the requested split's directory is the tree. If it holds none, vitclt holds
out a fixed, documented part of every class so that training and evaluation
never share an image:

- in each class with n ≥ 2 images, the ``round(n * HOLDOUT_FRACTION)``
  images (at least 1, at most n - 1) whose relative paths have the smallest
  SHA-256 digest of ``"vitclt-holdout:<path relative to the class folder>"``
  are the held-out ``test`` split; the rest are ``train``. A class with one
  image keeps it in ``train``;
- the choice depends only on the file names, not on the run's seed, the
  order of the listing or the folder's location, so every command and every
  run sees the same split;
- ``split="all"`` gives the whole folder (e.g. to evaluate a backbone on
  images no transcoder was trained on).

Every dataset this returns says what was done in one line,
``dataset.split_note`` (empty when the folder has split directories).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

from vitclt.data.datasets import FileImageDataset
from vitclt.data.images import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
HOLDOUT_FRACTION = 0.2
"""Share of each class that a folder without split directories holds out as its ``test`` split."""
HOLDOUT_SALT = "vitclt-holdout:"
"""Prefix of the hashed names that choose the held-out images (fixed, so the split never moves)."""

_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test"), "eval": ("test", "val"),
               "validation": ("val", "test")}
_HELD_OUT = {"test", "val", "eval", "validation"}


def list_images(directory: Path) -> list[Path]:
    """All image files under ``directory`` (recursively, hidden entries skipped), sorted."""
    return sorted(
        p for p in directory.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def class_directories(root: Path) -> list[Path]:
    """The visible sub-directories of ``root``, sorted by name."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def held_out(images: list[Path], class_dir: Path) -> set[Path]:
    """The images of one class that a folder without split directories holds out (see the module docstring)."""
    n = len(images)
    if n < 2:
        return set()
    n_test = min(max(round(n * HOLDOUT_FRACTION), 1), n - 1)

    def digest(path: Path) -> str:
        return hashlib.sha256((HOLDOUT_SALT + path.relative_to(class_dir).as_posix()).encode()).hexdigest()

    return set(sorted(images, key=digest)[:n_test])


def _split_root(root: Path, split: str) -> Path | None:
    """The split directory to read, or None if ``root`` has no split directories at all."""
    for name in _SPLIT_DIRS.get(split.lower(), (split,)):
        if (root / name).is_dir():
            return root / name
    present = [name for name in ("train", "test", "val") if (root / name).is_dir()]
    if not present:
        return None
    raise DatasetError(
        f"folder: {root} has split directories {present} but none for split {split!r}; add "
        f"{root}/{_SPLIT_DIRS.get(split.lower(), (split,))[0]}/<class>/<images>, or pass folder:{root}/{present[0]} "
        "to hold out part of it instead (see docs/datasets.md)")


def load_folder(path: str, split: str = "test") -> FileImageDataset:
    """Open an ImageFolder tree (see the module docstring for the layout and the held-out split)."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"folder: {root} is not a directory; expected PATH/<class>/<image files>")
    key = split.lower()
    tree = _split_root(root, split)
    if tree is None and key not in _HELD_OUT | {"train", "all"}:
        raise DatasetError(f"folder: unknown split {split!r} for {root}, which has no split directories; "
                           "expected train, test (or val) or all")
    classes = class_directories(tree or root)
    if not classes:
        where = tree or root
        raise DatasetError(f"folder: no class sub-directories in {where}; expected {where}/<class name>/<image files>")
    paths, labels, empty = [], [], []
    n_total = n_held = 0
    for label, directory in enumerate(classes):
        images = list_images(directory)
        if not images:
            empty.append(directory.name)
        n_total += len(images)
        if tree is None and key != "all":
            test = held_out(images, directory)
            n_held += len(test)
            images = [p for p in images if (p in test) == (key in _HELD_OUT)]
        paths += images
        labels += [label] * len(images)
    if not n_total:
        raise DatasetError(f"folder: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {tree or root}")
    if empty:
        warnings.warn(f"folder: {len(empty)} class folder(s) in {tree or root} hold no images: {empty[:5]}", stacklevel=2)
    name = f"folder:{root.name}"
    note = ""
    if tree is None and key == "all":
        note = f"{name} has no train/ or test/ folders; split 'all': every one of its {n_total} images"
    elif tree is None:
        part = "evaluating on those" if key in _HELD_OUT else "training on the other"
        note = (f"{name} has no train/ or test/ folders, so vitclt holds out {n_held} of its {n_total} images "
                f"({HOLDOUT_FRACTION:.0%} of each class, fixed by file name) for evaluation: {part} {len(paths)} "
                "(see docs/datasets.md)")
    if not paths:
        raise DatasetError(f"folder: {root} has no images for split {split!r}: {note}; add images or use split 'all'")
    dataset = FileImageDataset(paths, labels, name=name, split=split,
                               classnames=[d.name.replace("_", " ") for d in classes], template_set="imagenet")
    dataset.split_note = note
    return dataset
