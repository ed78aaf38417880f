"""Any HuggingFace ``datasets`` image-classification dataset.

``hf:NAME[:SPLIT]`` calls ``datasets.load_dataset(NAME, split=SPLIT)`` (needs
``pip install vitclt[hf]`` and the hub or a local cache), e.g.
``hf:uoft-cs/cifar100:test``. Without ``:SPLIT`` the ``split`` argument is
used, with ``test`` falling back to ``validation`` for datasets that have no
test split.

The image column is the one whose feature is ``datasets.Image`` and the label
column the ``datasets.ClassLabel`` one (``label`` or ``fine_label`` wins if
there are several); pass ``image_key=``/``label_key=`` to choose. Class names
are the ``ClassLabel`` names with ``_`` read as a space. Images are decoded by
vitclt (not by ``datasets``), so they get the same RGB conversion and errors
as the file-based kinds. Other keyword options go to ``datasets.load_dataset``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from PIL import Image

from vitclt.data.datasets import LabelledImages
from vitclt.data.images import DatasetError, open_image

_PREFERRED_LABELS = ("label", "labels", "fine_label")
_SPLIT_FALLBACKS = {"test": ("test", "validation", "val"), "val": ("validation", "val", "test"),
                    "validation": ("validation", "val", "test"), "eval": ("test", "validation", "val")}


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DatasetError("hf: datasets need the HuggingFace `datasets` package: pip install vitclt[hf]") from None
    return datasets


def _pick(columns: list[str], kind: str, preferred: tuple[str, ...], available: list[str]) -> str:
    if not columns:
        raise DatasetError(f"hf: no {kind} column among {available}; pass {kind}_key=COLUMN")
    for name in preferred:
        if name in columns:
            return name
    if len(columns) > 1:
        raise DatasetError(f"hf: several {kind} columns {columns}; pass {kind}_key=COLUMN to choose")
    return columns[0]


class HFImageDataset(LabelledImages):
    """Wraps an in-memory or cached ``datasets.Dataset`` as an :class:`~vitclt.data.datasets.ImageDataset`."""

    def __init__(self, dataset: Any, name: str, split: str, image_key: str | None = None,
                 label_key: str | None = None) -> None:
        datasets = _import_datasets()
        features = dataset.features
        columns = list(features)
        for key in (image_key, label_key):
            if key is not None and key not in features:
                raise DatasetError(f"hf: {name} has no column {key!r}; columns: {columns}")
        image_key = image_key or _pick([c for c in columns if isinstance(features[c], datasets.Image)],
                                       "image", ("image", "img"), columns)
        label_key = label_key or _pick([c for c in columns if isinstance(features[c], datasets.ClassLabel)],
                                       "label", _PREFERRED_LABELS, columns)
        if not isinstance(features[image_key], datasets.Image):
            raise DatasetError(f"hf: column {image_key!r} of {name} is not a datasets.Image feature")
        labels = np.asarray(dataset.with_format("numpy")[label_key], dtype=np.int64)
        label_feature = features[label_key]
        if isinstance(label_feature, datasets.ClassLabel):
            classnames = [n.replace("_", " ") for n in label_feature.names]
        else:
            classnames = [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
            warnings.warn(f"hf: {label_key!r} is not a ClassLabel, so class names are the numbers 0..; "
                          "pass classnames=FILE to load_dataset for real names", stacklevel=2)
        super().__init__(name=name, split=split, classnames=classnames, labels=labels, template_set="imagenet")
        # Undecoded images (bytes or path) so vitclt's own decoder handles them.
        self.dataset = dataset.cast_column(image_key, datasets.Image(decode=False))
        self.image_key = image_key

    def load_image(self, index: int) -> Image.Image:
        """Decode row ``index``'s image."""
        cell = self.dataset[index][self.image_key]
        source = cell.get("bytes") or cell.get("path")
        if source is None:
            raise DatasetError(f"{self.name}[{index}]: row has no image")
        return open_image(source, name=f"{self.name}[{index}]")


def _choose_split(datasets: Any, name: str, split: str, options: dict[str, Any]) -> str:
    candidates = _SPLIT_FALLBACKS.get(split.lower())
    if candidates is None:
        return split
    try:
        available = datasets.get_dataset_split_names(name, **{k: v for k, v in options.items() if k != "split"})
    except Exception:  # offline or a script dataset: let load_dataset report it
        return split
    return next((s for s in candidates if s in available), split)


def load_hf(argument: str, split: str = "test", *, image_key: str | None = None, label_key: str | None = None,
            **options: Any) -> HFImageDataset:
    """Load ``NAME[:SPLIT]`` with ``datasets.load_dataset`` and wrap it (see the module docstring)."""
    datasets = _import_datasets()
    name, _, spec_split = argument.partition(":")
    if not name:
        raise DatasetError("hf: expected hf:NAME[:SPLIT], e.g. hf:uoft-cs/cifar100:test")
    split = spec_split or _choose_split(datasets, name, split, options)
    try:
        dataset = datasets.load_dataset(name, split=split, **options)
    except Exception as exc:  # hub, network and config errors all surface here
        raise DatasetError(f"hf: cannot load {name!r} split {split!r}: {type(exc).__name__}: {exc}") from exc
    return HFImageDataset(dataset, name=f"hf:{name}", split=split, image_key=image_key, label_key=label_key)
