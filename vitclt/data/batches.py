"""Batches of decoded images from any dataset, decoded in worker processes when asked."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vitclt.data.images import DatasetError


class _Decoded(Dataset):
    """`dataset`'s items, with a decoding error returned as the item instead of raised.

    Raised in a worker process, the error would reach the caller re-wrapped with the worker's
    traceback in its message; returned, it is raised again in the caller's process, as it was.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except DatasetError as exc:
            return exc


def _collate(items: list) -> tuple[list[Image.Image], torch.Tensor] | DatasetError:
    errors = [item for item in items if isinstance(item, DatasetError)]
    if errors:
        return errors[0]
    images, labels = zip(*items)
    return list(images), torch.as_tensor(labels, dtype=torch.long)


def image_batches(dataset, batch_size: int, workers: int = 0) -> Iterator[tuple[list[Image.Image], torch.Tensor]]:
    """Yield `(images, labels_B)` over `dataset`, in order; an undecodable image raises its `DatasetError`."""
    loader = DataLoader(_Decoded(dataset), batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate)
    for batch in loader:
        if isinstance(batch, DatasetError):
            raise batch
        yield batch
