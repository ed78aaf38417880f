"""Image datasets behind one interface, chosen by a short spec string.

Every dataset is a sized, indexable object yielding ``(PIL.Image in RGB, int
label)`` (see :class:`ImageDataset`). :func:`load_dataset` builds one from a
spec ``KIND:ARGUMENT``:

=====================  ======================================================
``cifar100:PATH``      official CIFAR-100 archive, python or binary version
``imagenet100:PATH``   ImageNet train/val tree restricted to the CMC 100 classes
``coco:PATH``          COCO 2017 as a single-label task (largest-area category)
``folder:PATH``        any ImageFolder tree (class = sub-directory name)
``hf:NAME[:SPLIT]``    a HuggingFace ``datasets`` image dataset
=====================  ======================================================

Kinds live in the :data:`DATASET_KINDS` dict, so a new one is one line::

    DATASET_KINDS["demo"] = load_demo_world   # (argument, split, **options) -> ImageDataset

Splits: ``split="test"`` (the default) means each dataset's held-out labelled
split: CIFAR-100 ``test``, ImageNet ``val``, COCO ``val2017`` (their test
labels are not public). ``"val"`` and ``"test"`` are aliases everywhere;
``"train"`` is the training split.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from vitclt.data.images import DatasetError, open_image
from vitclt.data.prompts import load_classnames

__all__ = [
    "DATASET_KINDS",
    "DatasetError",
    "FileImageDataset",
    "ImageDataset",
    "LabelledImages",
    "Subset",
    "load_dataset",
    "parse_spec",
    "resolve_split",
    "subsample",
]

EXAMPLE_SPECS = ("cifar100:/data/cifar-100-python.tar.gz", "imagenet100:/data/imagenet", "folder:/data/my_images")


@runtime_checkable
class ImageDataset(Protocol):
    """What every dataset kind provides.

    ``ds[i]`` is ``(image, label)`` with ``image`` an RGB ``PIL.Image`` and
    ``label`` an index into ``classnames``; ``labels`` holds every label
    without decoding images; ``template_set`` names the prompt templates
    (see :mod:`vitclt.data.prompts`) used for zero-shot by default. A dataset
    with templates of its own may also carry them as a ``templates`` list,
    which then takes precedence. A dataset whose split was made by vitclt
    (a ``folder:`` tree without split directories) says how in a one-line
    ``split_note``; commands show it (read it with ``getattr(ds, "split_note", "")``).
    """

    name: str
    split: str
    classnames: list[str]
    template_set: str

    @property
    def labels(self) -> np.ndarray: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Image.Image, int]: ...


class LabelledImages:
    """Base class: the bookkeeping of :class:`ImageDataset`; subclasses decode image ``i``."""

    split_note: str = ""
    """One line saying how vitclt chose this split's images, when it chose them (else empty)."""

    def __init__(self, *, name: str, split: str, classnames: Sequence[str], labels: Sequence[int],
                 template_set: str) -> None:
        self.name = name
        self.split = split
        self.classnames = list(classnames)
        self.template_set = template_set
        self._labels = np.asarray(labels, dtype=np.int64)
        if len(self._labels) and (self._labels.min() < 0 or self._labels.max() >= len(self.classnames)):
            raise DatasetError(f"{name}: labels fall outside 0..{len(self.classnames) - 1}")

    @property
    def labels(self) -> np.ndarray:
        """Label of every image, in dataset order (int64, read-only view)."""
        view = self._labels.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} images")
        index %= n
        return self.load_image(index), int(self._labels[index])

    def load_image(self, index: int) -> Image.Image:
        """Decode image ``index`` (already range-checked) into RGB."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, images={len(self)}, "
                f"classes={len(self.classnames)})")


class FileImageDataset(LabelledImages):
    """Images stored as one file each (ImageFolder trees, ImageNet, COCO)."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], **kwargs: Any) -> None:
        super().__init__(labels=labels, **kwargs)
        self.paths = [Path(p) for p in paths]

    def load_image(self, index: int) -> Image.Image:
        """Decode the file behind image ``index``."""
        return open_image(self.paths[index])


class Subset(LabelledImages):
    """A fixed selection of another dataset's images, keeping its classes and templates."""

    def __init__(self, base: ImageDataset, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        super().__init__(name=base.name, split=base.split, classnames=base.classnames,
                         labels=np.asarray(base.labels)[self.indices], template_set=base.template_set)
        self.split_note = getattr(base, "split_note", "")

    def load_image(self, index: int) -> Image.Image:
        """Decode the base dataset's image behind ``index``."""
        return self.base[int(self.indices[index])][0]

    def __getattr__(self, name: str) -> Any:
        # Extras of the base dataset (e.g. its own ``templates`` list) stay reachable.
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


def subsample(dataset: ImageDataset, max_images: int, seed: int = 0) -> ImageDataset:
    """Pick ``max_images`` images spread evenly over the classes, deterministically.

    Classes are visited round-robin (in a seeded random order each round),
    each giving its next image from a seeded shuffle, so every class gets
    ``max_images // n_classes`` images or one more while it has images left.
    The selection keeps dataset order. Returns ``dataset`` itself if it is
    already small enough.
    """
    if max_images <= 0:
        raise DatasetError(f"max_images must be positive, got {max_images}")
    labels = np.asarray(dataset.labels)
    if len(labels) <= max_images:
        return dataset
    rng = np.random.default_rng(seed)
    queues = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in range(len(dataset.classnames))]
    chosen: list[int] = []
    while len(chosen) < max_images:
        for c in rng.permutation(len(queues)):
            if queues[c] and len(chosen) < max_images:
                chosen.append(queues[c].pop())
    return Subset(dataset, sorted(chosen))


def resolve_split(split: str, names: dict[str, str], kind: str) -> str:
    """Map a user's split name onto a dataset's own (``names``: accepted name -> real name)."""
    key = split.lower()
    if key not in names:
        raise DatasetError(f"{kind}: unknown split {split!r}; expected one of {sorted(names)}")
    return names[key]


def _lazy(module: str, function: str) -> Callable[..., ImageDataset]:
    # Kind modules are imported on first use: they import this module for the
    # base classes, and an optional dependency (``datasets``) must not break
    # the other kinds.
    def load(argument: str, split: str, **options: Any) -> ImageDataset:
        return getattr(importlib.import_module(module), function)(argument, split, **options)

    load.__doc__ = f"Load with {module}.{function}."
    return load


DATASET_KINDS: dict[str, Callable[..., ImageDataset]] = {
    "cifar100": _lazy("vitclt.data.cifar", "load_cifar100"),
    "imagenet100": _lazy("vitclt.data.imagenet", "load_imagenet100"),
    "coco": _lazy("vitclt.data.coco", "load_coco"),
    "folder": _lazy("vitclt.data.folder", "load_folder"),
    "hf": _lazy("vitclt.data.hf", "load_hf"),
    "demo": _lazy("vitclt.data.world", "load_demo_world"),
}
"""Dataset kinds by spec prefix; each maps ``(argument, split, **options)`` to an :class:`ImageDataset`."""

_PATH_KINDS = ("cifar100", "imagenet100", "coco", "folder")


def _spec_help() -> str:
    return f"expected KIND:ARGUMENT with KIND one of {sorted(DATASET_KINDS)}, e.g. {EXAMPLE_SPECS[0]!r}"


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``"kind:argument"`` into its two parts, checking the kind is known.

    A bare ``"kind"`` gives an empty argument (for kinds that need none).
    """
    kind, _, argument = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in DATASET_KINDS:
        raise DatasetError(f"unknown dataset spec {spec!r}: {_spec_help()}")
    if kind in _PATH_KINDS:
        if not argument:
            raise DatasetError(f"dataset spec {spec!r} has no path: expected {kind}:PATH, e.g. {kind}:/data/{kind}")
        path = Path(argument).expanduser()
        if not path.exists():
            raise DatasetError(
                f"dataset path does not exist: {path} (from spec {spec!r}); download the data and pass "
                f"its location as {kind}:PATH, see docs/datasets.md"
            )
        argument = str(path)
    return kind, argument


def load_dataset(spec: str, split: str = "test", *, max_images: int | None = None, seed: int = 0,
                 classnames: str | Path | None = None, **options: Any) -> ImageDataset:
    """Open the dataset named by ``spec`` (see the module docstring for the kinds).

    ``split`` picks the split (``"test"``/``"val"`` = held-out, ``"train"``).
    ``max_images`` keeps a class-stratified, ``seed``-deterministic subset for
    quick runs. ``classnames`` is a file (one name per line, label order)
    replacing the shipped class names. Other ``options`` go to the kind's
    loader (e.g. ``image_key``/``label_key`` for ``hf``).
    """
    kind, argument = parse_spec(spec)
    dataset = DATASET_KINDS[kind](argument, split, **options)
    if classnames is not None:
        dataset.classnames = load_classnames(classnames, n_expected=len(dataset.classnames))
    if max_images is not None:
        dataset = subsample(dataset, max_images, seed)
    return dataset
