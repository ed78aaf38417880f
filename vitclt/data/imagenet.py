"""ImageNet-100: the 100-class ImageNet subset of CMC, read from an ImageNet tree.

ImageNet-100 is the subset used by "Contrastive Multiview Coding" (Tian et al.
2019; class list ``imagenet100.txt`` in the CMC repository) and most papers
since. It is not distributed on its own: get ILSVRC-2012 from
https://image-net.org (or the Kaggle "ImageNet Object Localization
Challenge"), with the validation images moved into one folder per class (the
usual ``valprep.sh`` layout)::

    PATH/train/n01558993/*.JPEG
    PATH/val/n01558993/*.JPEG
    ...

``imagenet100:PATH`` reads the 100 class folders of the requested split and
ignores all others, so a full ImageNet-1k tree works as is. ``PATH`` may also
point straight at a split directory. Labels index the 100 classes in sorted
WordNet-id order; class names are OpenAI CLIP's cleaned ImageNet names (see
``vitclt/assets/classnames/imagenet100.tsv``). If only some of the 100 folders
exist, their images are used and a warning says how many are missing; the
classifier still has all 100 classes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from vitclt.data.datasets import FileImageDataset, resolve_split
from vitclt.data.folder import list_images
from vitclt.data.images import DatasetError
from vitclt.data.prompts import imagenet100_classes

_SPLITS = {"train": "train", "val": "val", "test": "val", "eval": "val", "validation": "val"}


def load_imagenet100(path: str, split: str = "test") -> FileImageDataset:
    """Open the ImageNet-100 images of ``split`` (``"train"`` or ``"val"``; ``"test"`` means val)."""
    split = resolve_split(split, _SPLITS, "imagenet100")
    root = Path(path)
    split_dir = root / split if (root / split).is_dir() else root
    classes = imagenet100_classes()
    present = [wnid for wnid, _ in classes if (split_dir / wnid).is_dir()]
    if not present:
        others = sorted(p.name for p in split_dir.iterdir() if p.is_dir())[:5]
        raise DatasetError(
            f"imagenet100: found 0 of the 100 ImageNet-100 class folders in {split_dir} (sub-directories there: "
            f"{others or 'none'}). Expected an ImageNet tree with one folder per WordNet id, e.g. "
            f"{root}/{split}/{classes[0][0]}/*.JPEG (validation images sorted into class folders too)"
        )
    if len(present) < len(classes):
        missing = sorted({w for w, _ in classes} - set(present))
        warnings.warn(f"imagenet100: only {len(present)} of 100 class folders in {split_dir}; "
                      f"missing e.g. {missing[:3]}", stacklevel=2)
    paths, labels = [], []
    for label, (wnid, _) in enumerate(classes):
        if (split_dir / wnid).is_dir():
            images = list_images(split_dir / wnid)
            paths += images
            labels += [label] * len(images)
    if not paths:
        raise DatasetError(f"imagenet100: the class folders in {split_dir} hold no images")
    return FileImageDataset(paths, labels, name="imagenet100", split=split,
                            classnames=[name for _, name in classes], template_set="imagenet")
