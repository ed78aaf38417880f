"""The evaluation transform of torchvision-based models (open_clip, timm), rebuilt with PIL and NumPy.

open_clip and timm preprocess with torchvision's ``Resize(short side) → CenterCrop → ToTensor →
Normalize``; torchvision cannot be imported here, and transformers' image processors crop with
``(size - crop) // 2`` where torchvision uses ``round((size - crop) / 2)``, a one-pixel shift for
some image sizes. This is torchvision's arithmetic on PIL images, step for step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
"""Interpolation names (open_clip's and timm's) → PIL resampling filters."""


@dataclass(frozen=True)
class EvalTransform:
    """Resize the short side to `resize` (or both sides, with `squash`), centre-crop `crop`, scale to [0, 1], normalise."""

    resize: int
    """Target of the short side (torchvision Resize with an int); with `squash`, both sides."""
    crop: int
    """Side of the square centre crop."""
    mean: tuple[float, float, float]
    """Per-channel mean subtracted after scaling to [0, 1]."""
    std: tuple[float, float, float]
    """Per-channel standard deviation divided by."""
    resample: int = Image.BICUBIC
    """PIL resampling filter."""
    squash: bool = False
    """Resize to resize × resize, ignoring the aspect ratio (open_clip's resize_mode "squash")."""

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize, as torchvision computes it."""
        if self.squash:
            return self.resize, self.resize
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize, int(self.resize * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def __call__(self, images: Sequence[Image.Image]) -> Tensor:
        """RGB PIL images → pixels_B3HW (float32)."""
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        out = []
        for im in images:
            im = im if im.mode == "RGB" else im.convert("RGB")
            size = self.resized_size(*im.size)
            if size != im.size:
                im = im.resize(size, self.resample)
            w, h = im.size
            top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
            im = im.crop((left, top, left + self.crop, top + self.crop))
            x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
            out.append(torch.from_numpy((x - mean) / std))
        return torch.stack(out)
