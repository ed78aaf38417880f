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

The workers persist until `ImageLoader.close` (or the loader's end): a training run's stream asks
for one block of images after another without starting processes each time. Whoever makes a
loader closes it on every exit path (``with ImageLoader(...)``, or `close` in a ``finally``); a
loader still open when the interpreter exits is closed by an exit hook, so that no prefetch thread
is still inside torch while Python shuts down (which aborts the process: "terminate called without
an active exception"). `ImageLoader.prefetch(chunks)` starts the
workers on the *next* request while the caller does something else (training on the current
block): a background thread takes each batch as a worker finishes it and keeps it, and a later
`batches(chunks)` with the same chunks serves the kept batches (any other request discards them
and is loaded as asked).

A decoding error is returned by the worker as the item, not raised (raised in a worker it would
reach the caller re-wrapped with the worker's traceback): `LoadedBatch.errors` lists them by
position and the caller decides (evaluation raises the one-line `DatasetError`, training skips
and records the image).
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
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


_DONE = object()
"""Put after a prefetched request's last batch."""


class _Failed(NamedTuple):
    """An exception met while prefetching, raised in the consumer's thread at the batch where it happened."""

    exc: Exception


class _Prefetch:
    """One request's batches, taken from the DataLoader's iterator by a background thread as the workers finish them.

    A DataLoader sends a worker a new batch only when the consumer takes one (at most
    ``PREFETCH_PER_WORKER`` per worker are in flight), and its prefetch depth is fixed for the
    loader's life: merely creating the iterator early would prepare 2 × workers batches of a block
    and then leave the workers idle while the caller trains. This thread is the consumer instead:
    it takes each batch as it arrives, so every worker stays busy until the whole request is
    prepared. It costs the calling thread little: it spends its time waiting on the workers'
    result queue (the GIL released), and a batch arrives as a handle to shared memory (pinning, on
    CUDA, is DataLoader's own thread). The batches are kept until consumed: a whole request's
    uint8 pixels (a training block at paper scale, 2,600 images of 3 × 224 × 224: ~390 MB).
    """

    def __init__(self, chunks: list[list[int]], iterator, closed: threading.Event):
        self.chunks = chunks
        self.served = False
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._closed = closed
        # A daemon: a run that stops mid-prefetch (finished, an error, Ctrl-C) must not wait for the block at exit.
        self._thread = threading.Thread(target=self._pump, args=(iterator,), name="vitclt-prefetch", daemon=True)
        self._thread.start()

    def _pump(self, iterator) -> None:
        try:
            for batch in iterator:
                if self._stop.is_set() or self._closed.is_set():
                    # The next pass over the loader resets its iterator, draining the batches in flight.
                    self._ready.put(_Failed(RuntimeError("this prefetch was discarded by a later request")))
                    return
                self._ready.put(batch)
        except Exception as exc:  # handed to the consumer, which raises it in its own thread
            self._ready.put(_Failed(exc))
        self._ready.put(_DONE)

    def batches(self) -> Iterator[LoadedBatch]:
        """The request's batches in order, waiting for those not prepared yet."""
        self.served = True
        while (item := self._ready.get()) is not _DONE:
            if isinstance(item, _Failed):
                raise item.exc
            yield item

    def cancel(self) -> None:
        """Stop taking batches and wait for the thread (at most the one batch it is waiting for)."""
        self._stop.set()
        self._thread.join()


_OPEN: weakref.WeakSet[ImageLoader] = weakref.WeakSet()
"""Loaders not yet closed; the exit hook closes them."""


@atexit.register
def _close_open_loaders() -> None:
    """At interpreter exit, stop every prefetch thread and worker still running.

    A daemon thread still inside torch when Python finalises is killed mid-call and aborts the
    whole process after its work is done. Registered after torch's DataLoader exit hook, so it runs
    first (exit hooks run last-registered first), while the workers can still be shut down.
    """
    for loader in list(_OPEN):
        loader.close()


class ImageLoader:
    """Decode and prepare images of `dataset` in `workers` processes (0: in this process), batch by batch, in order.

    `prep` is a backbone's `image_prep` (None: yield the decoded PIL images); `fast_decode` decodes
    JPEGs at a reduced size (approximate, see `vitclt.data.images.reduced_decoding`); `pin_memory`
    puts prepared batches in page-locked memory for asynchronous copies to a GPU.
    """

    def __init__(self, dataset, prep: ImagePrep | None = None, workers: int = 0, fast_decode: bool = False,
                 pin_memory: bool = False):
        self.data = PreparedImages(dataset, prep, fast_decode)
        self.workers = workers
        self._requests = _Requests()
        self._prefetch: _Prefetch | None = None
        # A loader dropped mid-prefetch (a run that ended) stops its thread after the batch it is waiting for.
        self._closed = threading.Event()
        weakref.finalize(self, self._closed.set)
        _OPEN.add(self)
        extra = {"prefetch_factor": PREFETCH_PER_WORKER, "persistent_workers": True} if workers > 0 else {}
        # Its own generator: a DataLoader seeds each pass from the global RNG otherwise, which would make the
        # run's random state depend on how many passes it made, and break exact resume.
        self._loader = DataLoader(self.data, batch_sampler=self._requests, num_workers=workers, collate_fn=_collate,
                                  pin_memory=pin_memory and prep is not None, generator=torch.Generator(), **extra)

    def close(self) -> None:
        """Stop the prefetch thread and the worker processes, and wait for them; safe to call twice.

        The loader stays usable: a later request starts the workers again.
        """
        self._cancel_prefetch()
        iterator = getattr(self._loader, "_iterator", None)  # the persistent workers' iterator (DataLoader keeps it)
        if iterator is not None:
            iterator._shutdown_workers()  # joins each worker (killing one that does not stop)
            self._loader._iterator = None
        _OPEN.discard(self)

    def __enter__(self) -> ImageLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _cancel_prefetch(self) -> None:
        """Discard a prefetch (its thread stopped and joined), so that the DataLoader's iterator can be reset."""
        if self._prefetch is not None:
            self._prefetch.cancel()
            self._prefetch = None

    def prefetch(self, chunks: Sequence[Sequence[int]]) -> None:
        """Start preparing `chunks` in the workers now, in the background; a later `batches(chunks)` serves them.

        For a caller that will ask for `chunks` next and has other work first. The prepared batches
        are held until asked for (see `_Prefetch` for the memory). A different request discards
        them. With 0 workers this does nothing: decoding in a thread would hold the GIL against the
        caller's own work.
        """
        if self.workers == 0:
            return
        self._cancel_prefetch()
        _OPEN.add(self)
        self._requests.chunks = [[int(i) for i in chunk] for chunk in chunks]
        # The iterator (and, on the first pass, the worker processes) is made here, in the calling thread.
        self._prefetch = _Prefetch(self._requests.chunks, iter(self._loader), self._closed)

    def batches(self, chunks: Sequence[Sequence[int]]) -> Iterator[LoadedBatch]:
        """One `LoadedBatch` per chunk of dataset indices, in order; workers prepare ahead.

        Served from the last `prefetch` if it asked for exactly these chunks; otherwise that
        prefetch is discarded and these chunks are loaded.
        """
        chunks = [[int(i) for i in chunk] for chunk in chunks]
        pending = self._prefetch
        if pending is not None and not pending.served and pending.chunks == chunks:
            yield from pending.batches()
            return
        self._cancel_prefetch()
        _OPEN.add(self)
        self._requests.chunks = chunks
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
    with ImageLoader(dataset, None, workers) as loader:
        for batch in loader.batches(chunked(range(len(dataset)), batch_size)):
            _raise_first(batch)
            yield batch.items, batch.labels_B


def pixel_batches(backbone, dataset, batch_size: int, workers: int = 0, fast_decode: bool = False
                  ) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield `(pixels_B3HW, labels_B)` over `dataset`, in order, ready for `backbone` (on its device, in its dtype).

    Equal to ``backbone.preprocess(images)`` of the decoded images unless `fast_decode`: decoding,
    resize and crop run in `workers` processes, the rescale and normalisation on the device. An
    undecodable image raises its `DatasetError`.
    """
    with ImageLoader(dataset, backbone.image_prep, workers, fast_decode, pin_memory=backbone.device.type == "cuda") as loader:
        for batch in loader.batches(chunked(range(len(dataset)), batch_size)):
            _raise_first(batch)
            yield backbone.normalize(batch.items), batch.labels_B
