"""Image preprocessing split in two halves: uint8 preparation on the host, value scaling on the device.

Every family's preprocessing is ``resize → crop → rescale → normalise``. The first two steps are
the expensive ones (PIL's resampling) and produce 8-bit pixels; the last two are a fixed
per-channel function of each 8-bit value. So an `ImagePrep` splits the model's own processor:

- ``prep.prepare(image) -> uint8_3HW`` runs the processor's resize and crop (on the host, in a
  decoding worker process: an `ImagePrep` holds no model and pickles cheaply);
- ``prep.table() -> values_3V`` is the processor's own rescale-and-normalise applied to every
  8-bit value V = 0..255 of each channel, in the processor's dtypes and order of operations. On
  the device, ``values_3V[c, u8]`` (`pixels_from_uint8`) is then **bit-identical** to what the
  processor computes for the whole image, because that computation is elementwise.

`HFImagePrep` wraps a `transformers` image processor (CLIP, SigLIP, DINOv2's BiT processor);
`EvalTransform` is torchvision's eval transform of open_clip and timm, rebuilt with PIL and NumPy:
torchvision cannot be imported here, and transformers' processors crop with ``(size - crop) // 2``
where torchvision uses ``round((size - crop) / 2)``, a one-pixel shift for some image sizes.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from PIL import Image
from torch import Tensor

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
"""Interpolation names (open_clip's and timm's) → PIL resampling filters."""

_RAMP_1V3 = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
"""Every 8-bit value once per channel: a 1 × 256 RGB image whose column v holds (v, v, v)."""


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


class ImagePrep(abc.ABC):
    """A model's preprocessing as host preparation (`prepare`) plus a device lookup of `table`."""

    @abc.abstractmethod
    def prepare(self, image: Image.Image) -> np.ndarray:
        """A PIL image → the processor's resized and cropped 8-bit pixels, uint8 (3, H, W)."""

    @abc.abstractmethod
    def scale(self, ramp: Image.Image) -> np.ndarray:
        """The processor's rescale and normalise (no resize, no crop) of an RGB image: float32 (3, H, W)."""

    @property
    @abc.abstractmethod
    def decode_side(self) -> int | None:
        """The smallest image side the resize needs (what a reduced JPEG decode must keep); None: no resize."""

    @cached_property
    def values_3V(self) -> np.ndarray:
        """The processor's value for each channel and 8-bit value, float32 (3, 256)."""
        return np.ascontiguousarray(self.scale(Image.fromarray(_RAMP_1V3, mode="RGB"))[:, 0, :])

    def table(self, device: torch.device | str = "cpu") -> Tensor:
        """`values_3V` as a float32 tensor on `device` (kept for the next call)."""
        tables = self.__dict__.setdefault("_tables", {})
        device = torch.device(device)
        if device not in tables:
            tables[device] = torch.from_numpy(self.values_3V).to(device)
        return tables[device]

    def __getstate__(self) -> dict:
        # Workers only prepare; the tables are rebuilt where they are needed.
        return {k: v for k, v in self.__dict__.items() if k not in ("values_3V", "_tables")}


def pixels_from_uint8(u8_B3HW: Tensor, values_3V: Tensor) -> Tensor:
    """Pixels (float32, values_3V's device): ``values_3V[c, u8_B3HW[b, c, h, w]]`` by one gather."""
    offset_131 = torch.arange(0, 3 * 256, 256, dtype=torch.int32, device=values_3V.device).view(1, 3, 1, 1)
    return values_3V.reshape(-1)[u8_B3HW.to(values_3V.device, non_blocking=True).int() + offset_131]


class HFImagePrep(ImagePrep):
    """A `transformers` image processor, split: its resize and crop on the host, its rescale and normalise as a table."""

    def __init__(self, processor):
        self.processor = processor

    def prepare(self, image: Image.Image) -> np.ndarray:
        return self.processor(images=[_rgb(image)], do_rescale=False, do_normalize=False)["pixel_values"][0]

    def scale(self, ramp: Image.Image) -> np.ndarray:
        return self.processor(images=[ramp], do_resize=False, do_center_crop=False, return_tensors="np")["pixel_values"][0]

    @property
    def decode_side(self) -> int | None:
        size = self.processor.size
        if not self.processor.do_resize:
            return None
        if size.get("shortest_edge"):
            return int(size["shortest_edge"])
        return max(int(size["height"]), int(size["width"]))


@dataclass(frozen=True)
class EvalTransform(ImagePrep):
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

    def prepare(self, image: Image.Image) -> np.ndarray:
        im = _rgb(image)
        size = self.resized_size(*im.size)
        if size != im.size:
            im = im.resize(size, self.resample)
        w, h = im.size
        top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
        im = im.crop((left, top, left + self.crop, top + self.crop))
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))

    def scale(self, ramp: Image.Image) -> np.ndarray:
        # torchvision: ToTensor divides by 255 in float32, Normalize subtracts then divides, per channel.
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        x = np.asarray(ramp, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (x - mean) / std

    @property
    def decode_side(self) -> int | None:
        return self.resize
