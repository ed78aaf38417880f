"""COCO 2017 as a single-label classification task.

Get ``val2017.zip``, ``train2017.zip`` and ``annotations_trainval2017.zip``
from https://cocodataset.org/#download and unzip them side by side::

    PATH/annotations/instances_val2017.json
    PATH/val2017/000000000139.jpg
    ...

COCO images hold several objects, so a single label needs a rule. vitclt's:

- **label = the category with the largest total annotated area in the
  image**: the sum of ``area`` (the segmentation area, in pixels) over the
  image's annotations of that category;
- crowd annotations (``iscrowd: 1``) are ignored;
- ties go to the lower category id;
- images with no non-crowd annotation are dropped (about 1% of COCO: the
  same filter Detectron2 applies, which keeps 117,266 of the 118,287
  train2017 images);
- labels 0..79 number the categories in increasing COCO category id
  (1..90 with gaps), and the class names are the official category names.

The rule favours the object that dominates the picture, which is what a
global image embedding mostly encodes. ``split="test"`` means ``val2017``
(COCO's test labels are not public).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from vitclt.data.datasets import FileImageDataset, resolve_split
from vitclt.data.images import DatasetError

_SPLITS = {"train": "train", "val": "val", "test": "val", "eval": "val", "validation": "val"}


def single_labels(instances: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int], list[str]]:
    """Apply the largest-area rule to a parsed ``instances_*.json``.

    Returns the kept image records (sorted by image id), their labels, and
    the class names (labels index categories in increasing id order).
    """
    categories = sorted(instances.get("categories", []), key=lambda c: c["id"])
    if not categories:
        raise DatasetError("COCO annotations list no categories")
    label_of = {c["id"]: label for label, c in enumerate(categories)}
    areas: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for ann in instances.get("annotations", []):
        if ann.get("iscrowd", 0):
            continue
        if ann["category_id"] not in label_of:
            raise DatasetError(f"COCO annotation {ann.get('id')} has unknown category_id {ann['category_id']}")
        areas[ann["image_id"]][ann["category_id"]] += float(ann.get("area", 0.0))
    kept, labels = [], []
    for image in sorted(instances.get("images", []), key=lambda im: im["id"]):
        per_category = areas.get(image["id"])
        if per_category:
            best = min(per_category, key=lambda cat: (-per_category[cat], cat))
            kept.append(image)
            labels.append(label_of[best])
    return kept, labels, [c["name"] for c in categories]


def load_coco(path: str, split: str = "test") -> FileImageDataset:
    """Open COCO 2017 ``split`` (``"train"`` or ``"val"``; ``"test"`` means val) as single-label images."""
    split = resolve_split(split, _SPLITS, "coco")
    root = Path(path)
    annotation_file = root / "annotations" / f"instances_{split}2017.json"
    image_dir = root / f"{split}2017"
    layout = (f"expected PATH/annotations/instances_{split}2017.json and PATH/{split}2017/*.jpg, "
              "as unzipped from https://cocodataset.org/#download")
    if not annotation_file.is_file():
        raise DatasetError(f"coco: annotation file not found: {annotation_file}; {layout}")
    if not image_dir.is_dir():
        raise DatasetError(f"coco: image folder not found: {image_dir}; {layout}")
    try:
        instances = json.loads(annotation_file.read_text(encoding="utf-8"))
        images, labels, classnames = single_labels(instances)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DatasetError(f"coco: {annotation_file} is not a valid COCO instances file ({exc!r})") from exc
    except DatasetError as exc:
        raise DatasetError(f"coco: {annotation_file}: {exc}") from None
    if not images:
        raise DatasetError(f"coco: no image in {annotation_file} has a non-crowd annotation")
    return FileImageDataset([image_dir / im["file_name"] for im in images], labels, name="coco", split=split,
                            classnames=classnames, template_set="coco")
