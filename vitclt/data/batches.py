"""Batches of decoded images from any dataset, decoded in worker processes when asked."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader


def _collate(items: list[tuple[Image.Image, int]]) -> tuple[list[Image.Image], torch.Tensor]:
    images, labels = zip(*items)
    return list(images), torch.as_tensor(labels, dtype=torch.long)


def image_batches(dataset, batch_size: int, workers: int = 0) -> Iterator[tuple[list[Image.Image], torch.Tensor]]:
    """Yield `(images, labels_B)` over `dataset`, in order."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate)
    yield from loader
