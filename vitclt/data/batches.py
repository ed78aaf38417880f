"""Batches of images from any dataset, decoded and prepared in worker processes: the one image pipeline.

`ImageLoader` is what every command reads images through (training's `BackboneSource`,
evaluation, zero-shot and the browser through `pixel_batches`, anything needing PIL images
through `image_batches`). With ``workers = N > 0`` it runs N worker processes (decoding and PIL's
resize hold the GIL, so threads would run one at a time); with 0 it decodes in the calling
process. A worker decodes an image and runs the backbone's host preparation
(`Backbone.prepare`: resize and crop to uint8), so only small uint8 arrays cross to the main
process, through shared memory. Batches come back in request order; up to ``2 × workers``
batches are prepared ahead of the one being used; on CUDA they arrive in pinned memory, so
``Backbone.normalize`` copies them to the device asynchronously and rescales there.

The workers persist for the loader's life: a training run's stream asks for one block of images
after another without starting processes each time.

A decoding error is returned by the worker as the item, not raised (raised in a worker it would
reach the caller re-wrapped with the worker's traceback): `LoadedBatch.errors` lists them by
position and the caller decides (evaluation raises the one-line `DatasetError`, training skips
and records the image).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vitclt.backbones.transforms import ImagePrep
from vitclt.data.images import DatasetError, reduced_decoding

PREFETCH_PER_WORKER = 2
"""Batches each worker prepares ahead: the pipeline holds 2 × workers batches in flight."""


class LoadedBatch(NamedTuple):
    """One requested batch: prepared pixels (or PIL images), labels, and the images that failed to decode."""

    items: Tensor | list[Image.Image] | None
    """uint8_B3HW from a preparation (a failed image's row is zero; None if every image failed), else PIL images."""
    labels_B: Tensor
    """Each image's label (-1 where it failed)."""
    errors: dict[int, DatasetError]
    """Position in the batch → the error of an image that could not be decoded."""


class PreparedImages(Dataset):
    """`dataset`'s images, decoded (optionally at reduced size) and prepared by `prep`; errors returned as items."""

    def __init__(self, dataset, prep: ImagePrep | None = None, fast_decode: bool = False):
        self.dataset = dataset
        self.prep = prep
        self.draft_side = prep.decode_side if (fast_decode and prep is not None) else None

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> tuple[Tensor | Image.Image, int]:
        """Image `index` prepared (uint8 (3, H, W)) or as decoded, and its label; raises `DatasetError`."""
        with reduced_decoding(self.draft_side):
            image, label = self.dataset[index]
        if self.prep is None:
            return image, label
        return torch.from_numpy(np.ascontiguousarray(self.prep.prepare(image))), label

    def __getitem__(self, index: int):
        try:
            return self.load(index)
        except DatasetError as exc:
            return exc


def _collate(items: list) -> LoadedBatch:
    errors = {pos: item for pos, item in enumerate(items) if isinstance(item, DatasetError)}
    good = [item for item in items if not isinstance(item, DatasetError)]
    labels_B = torch.as_tensor([-1 if pos in errors else int(item[1]) for pos, item in enumerate(items)], dtype=torch.long)
    if not good or not isinstance(good[0][0], Tensor):
        return LoadedBatch([None if pos in errors else item[0] for pos, item in enumerate(items)] if good else None,
                           labels_B, errors)
    u8_B3HW = torch.zeros((len(items), *good[0][0].shape), dtype=torch.uint8)
    for pos, item in enumerate(items):
        if pos not in errors:
            u8_B3HW[pos] = item[0]
    return LoadedBatch(u8_B3HW, labels_B, errors)


class _Requests:
    """A batch sampler whose batches the owner sets before each pass (so persistent workers serve many requests)."""

    def __init__(self):
        self.chunks: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


class ImageLoader:
    """Decode and prepare images of `dataset` in `workers` processes (0: in this process), batch by batch, in order.

    `prep` is a backbone's `image_prep` (None: yield the decoded PIL images); `fast_decode` decodes
    JPEGs at a reduced size (approximate, see `vitclt.data.images.reduced_decoding`); `pin_memory`
    puts prepared batches in page-locked memory for asynchronous copies to a GPU.
    """

    def __init__(self, dataset, prep: ImagePrep | None = None, workers: int = 0, fast_decode: bool = False,
                 pin_memory: bool = False):
        self.data = PreparedImages(dataset, prep, fast_decode)
        self._requests = _Requests()
        extra = {"prefetch_factor": PREFETCH_PER_WORKER, "persistent_workers": True} if workers > 0 else {}
        # Its own generator: a DataLoader seeds each pass from the global RNG otherwise, which would make the
        # run's random state depend on how many passes it made, and break exact resume.
        self._loader = DataLoader(self.data, batch_sampler=self._requests, num_workers=workers, collate_fn=_collate,
                                  pin_memory=pin_memory and prep is not None, generator=torch.Generator(), **extra)

    def batches(self, chunks: Sequence[Sequence[int]]) -> Iterator[LoadedBatch]:
        """One `LoadedBatch` per chunk of dataset indices, in order; workers prepare ahead."""
        self._requests.chunks = [[int(i) for i in chunk] for chunk in chunks]
        yield from self._loader


def chunked(indices: Sequence[int], size: int) -> list[Sequence[int]]:
    """`indices` cut into consecutive chunks of `size` (the last may be shorter)."""
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _raise_first(batch: LoadedBatch) -> None:
    if batch.errors:
        raise batch.errors[min(batch.errors)]


def image_batches(dataset, batch_size: int, workers: int = 0) -> Iterator[tuple[list[Image.Image], Tensor]]:
    """Yield `(images, labels_B)` over `dataset`, in order, decoded in `workers` processes; an undecodable image
    raises its `DatasetError`."""
    for batch in ImageLoader(dataset, None, workers).batches(chunked(range(len(dataset)), batch_size)):
        _raise_first(batch)
        yield batch.items, batch.labels_B


def pixel_batches(backbone, dataset, batch_size: int, workers: int = 0, fast_decode: bool = False
                  ) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield `(pixels_B3HW, labels_B)` over `dataset`, in order, ready for `backbone` (on its device, in its dtype).

    Equal to ``backbone.preprocess(images)`` of the decoded images unless `fast_decode`: decoding,
    resize and crop run in `workers` processes, the rescale and normalisation on the device. An
    undecodable image raises its `DatasetError`.
    """
    loader = ImageLoader(dataset, backbone.image_prep, workers, fast_decode, pin_memory=backbone.device.type == "cuda")
    for batch in loader.batches(chunked(range(len(dataset)), batch_size)):
        _raise_first(batch)
        yield backbone.normalize(batch.items), batch.labels_B
