"""Any image classification tree in the ImageFolder layout.

``folder:PATH`` reads ``PATH/<class>/<image>``: one sub-directory per class,
classes in sorted order of their directory names (label 0 = first), images
found recursively inside each class directory, in sorted path order. Image
files are those ending in .jpg, .jpeg, .png, .bmp, .webp or .gif (any case);
hidden files and directories are skipped. Class names for prompts are the
directory names with ``_`` read as a space (``golden_retriever`` →
``golden retriever``).

If ``PATH`` holds a directory named after the requested split (``train``;
``test`` or ``val`` for the held-out split), that directory is the tree;
otherwise ``PATH`` itself is, whatever the split.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from vitclt.data.datasets import FileImageDataset
from vitclt.data.images import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test"), "eval": ("test", "val")}


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


def load_folder(path: str, split: str = "test") -> FileImageDataset:
    """Open an ImageFolder tree (see the module docstring for the layout)."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"folder: {root} is not a directory; expected PATH/<class>/<image files>")
    for name in _SPLIT_DIRS.get(split.lower(), (split,)):
        if (root / name).is_dir():
            root = root / name
            break
    classes = class_directories(root)
    if not classes:
        raise DatasetError(f"folder: no class sub-directories in {root}; expected {root}/<class name>/<image files>")
    paths, labels, empty = [], [], []
    for label, directory in enumerate(classes):
        images = list_images(directory)
        paths += images
        labels += [label] * len(images)
        if not images:
            empty.append(directory.name)
    if not paths:
        raise DatasetError(f"folder: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root}")
    if empty:
        warnings.warn(f"folder: {len(empty)} class folder(s) in {root} hold no images: {empty[:5]}", stacklevel=2)
    return FileImageDataset(paths, labels, name=f"folder:{Path(path).name}", split=split,
                            classnames=[d.name.replace("_", " ") for d in classes], template_set="imagenet")
