"""Images that cannot be decoded: skipped and recorded during a run, or listed up front by a check.

A long run should not die at hour three on one corrupt JPEG, and it must still resume exactly. So
:class:`~vitclt.data.stream.BackboneSource` skips an image whose decoding raises
:class:`~vitclt.data.images.DatasetError` and records it here:

- the decision is deterministic: the file is still unreadable when the run resumes, and an image
  once recorded stays skipped for the rest of the run even if its file is repaired meanwhile
  (the record travels in the stream's state, which the checkpoint saves);
- the skipped image's rows are replaced by those of the next readable image in dataset order
  (wrapping around), so every count, block and epoch of the stream is unchanged;
- each skip is one warning naming the file;
- more than ``max(1, max_fraction × images)`` unreadable images (1% by default) stop the run with a
  :class:`DatasetError` listing the first few: so many broken files mean a broken copy of the data.

:func:`check_dataset` decodes every image of a dataset once and lists the unreadable ones, for a
check before a long run.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from tqdm.auto import tqdm

from vitclt.data.images import DatasetError

MAX_UNREADABLE_FRACTION = 0.01
"""Default share of a dataset's images that may be skipped before a run stops."""
SHOWN = 3
"""Unreadable images an error message lists before "and N more"."""


class UnreadableImages:
    """The unreadable images of one dataset met so far (index → the decoding error), and the limit."""

    def __init__(self, n_images: int, max_fraction: float = MAX_UNREADABLE_FRACTION):
        if not 0 <= max_fraction < 1:
            raise DatasetError(f"the share of unreadable images to skip must lie in [0, 1), got {max_fraction}")
        self.n_images = n_images
        self.max_fraction = max_fraction
        self.limit = min(max(1, math.floor(max_fraction * n_images)), n_images - 1) if max_fraction else 0
        """How many images may be skipped; one more stops the run."""
        self.errors: dict[int, str] = {}
        self._lock = threading.Lock()

    def __contains__(self, index: int) -> bool:
        return index in self.errors

    def __len__(self) -> int:
        return len(self.errors)

    def record(self, index: int, error: DatasetError) -> None:
        """Skip image `index` from now on, warn, and stop if that makes too many."""
        with self._lock:
            if index in self.errors:
                return
            self.errors[index] = str(error)
            count = len(self.errors)
            if count > self.limit:
                raise DatasetError(self._too_many())
        warnings.warn(f"skipping unreadable image {index} ({count} of at most {self.limit} skipped): {error}; "
                      "its rows are replaced by the next readable image's", stacklevel=2)

    def _too_many(self) -> str:
        listed = [self.errors[i] for i in sorted(self.errors)]
        more = f" and {len(listed) - SHOWN} more" if len(listed) > SHOWN else ""
        return (f"{len(listed)} of {self.n_images} images cannot be decoded, more than the {self.limit} "
                f"({self.max_fraction:.0%}) a run skips: {'; '.join(listed[:SHOWN])}{more}. Repair or replace "
                "these files (check_dataset lists them all), or remove them and start a new run")

    def state(self) -> list[list]:
        """The record as JSON-ready ``[index, error]`` pairs, sorted by index."""
        with self._lock:
            return [[i, self.errors[i]] for i in sorted(self.errors)]

    def restore(self, state: list[list] | None) -> None:
        """Add a saved :meth:`state` (from a checkpoint): those images stay skipped."""
        with self._lock:
            for index, error in state or []:
                self.errors.setdefault(int(index), str(error))

    def decode(self, load: Callable[[int], Image.Image], index: int) -> Image.Image:
        """Image `index` via `load`, or the next readable image's (in dataset order, wrapping) if it is unreadable."""
        for step in range(self.n_images):
            j = (index + step) % self.n_images
            if j in self:
                continue
            try:
                return load(j)
            except DatasetError as exc:
                self.record(j, exc)
        raise DatasetError(self._too_many())  # unreachable while limit < n_images; kept as a guard


def check_dataset(dataset, workers: int = 1, progress: bool = True) -> list[tuple[int, str]]:
    """Decode every image of `dataset` once; return ``(index, error)`` for each unreadable one.

    Decoding runs in `workers` threads; the result is sorted by index. Nothing is raised for an
    unreadable image: this is the check to run before a long training run.
    """
    def probe(index: int) -> str | None:
        try:
            dataset[index]
        except DatasetError as exc:
            return str(exc)
        return None

    bar = tqdm(total=len(dataset), desc="checking images", unit="img", disable=not progress, leave=False)
    found = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for index, error in enumerate(pool.map(probe, range(len(dataset)))):
            bar.update(1)
            if error is not None:
                found.append((index, error))
    bar.close()
    return found
