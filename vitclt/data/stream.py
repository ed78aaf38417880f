"""Streams of token activations from a frozen backbone, shuffled across many images.

A *row* is one token of one image: its LN2 output x (L, D) and its MLP output y (L, D) at every
layer. A `RowSource` turns image indices into rows (`BackboneSource` runs the backbone, one
forward per image batch capturing all layers; `vitclt.data.cache.CacheSource` reads a disk cache).
`ActivationStream` turns a source into endless shuffled batches.

Shuffling. Tokens of one image are strongly correlated, so a batch must mix many images. The
stream visits images in a seeded permutation per epoch (epochs wrap) and cuts each epoch's
sequence into *blocks* of at most `buffer_size // rows_per_image` images (of near-equal sizes, so
no block is a thin remainder). A block's
rows are loaded into a buffer on the training device, permuted with a generator seeded by (seed,
epoch, block), and emitted in that order; batches run on across block and epoch boundaries. Every
row of an epoch is emitted exactly once before the next epoch starts, and the stream's whole state
is the number of rows consumed (plus the record of images skipped as unreadable, see
`vitclt.data.unreadable`): resuming re-loads the current block (re-running the backbone on its
images, in the same forward batches, so on CPU the rows are bit-identical).
Once a block is loaded the stream tells a source that can prepare ahead (`BackboneSource` with
workers) which images the next block needs, so their decoding overlaps training on this block;
that changes no row, and a resumed stream simply loads its current block.
A "keep a random half, refill" buffer mixes over about two buffers' worth of images instead of
one, but its content after step s depends on every earlier refill and could only be restored by
saving the buffer (gigabytes) or replaying dozens of refills; blocks trade that for an exact,
cheap resume. Use a larger `buffer_size` for wider mixing.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from vitclt.backbones import Backbone, TokenSel
from vitclt.data.batches import ImageLoader, LoadedBatch, chunked
from vitclt.data.unreadable import MAX_UNREADABLE_FRACTION, UnreadableImages
from vitclt.errors import VitcltError

STREAM_SALT = 0x5EED
"""Separates the stream's random numbers from other users of the same seed."""


class StreamError(VitcltError, ValueError):
    """An activation stream was misconfigured or fed bad data; the message says how to fix it."""


class Batch(NamedTuple):
    """A batch of N token rows and where each row came from."""

    x_NLD: Tensor
    """LN2 outputs (the MLP inputs) at every layer."""
    y_NLD: Tensor
    """MLP outputs at every layer."""
    image_N: Tensor
    """Dataset index of the image each row belongs to."""
    token_N: Tensor
    """Position of each row's token in the image's sequence (0 is CLIP's CLS)."""


class RowSource(Protocol):
    """Anything that turns image indices into token rows: the backbone itself, or a disk cache.

    A source may also have ``prefetch(images)``: a hint that its next `load` will ask for `images`,
    so that it can start preparing them in the background (`BackboneSource.prefetch`). The stream
    calls it, when present, after loading each block, with the next block's images. A source with
    background work also has ``close()``, which stops and joins it (`train` calls it as the run ends).
    """

    n_images: int
    rows_per_image: int
    n_layers: int
    d_model: int
    token_positions: Tensor
    """Sequence positions of one image's rows, in row order (rows_per_image,)."""
    backbone_fingerprint: str
    """`Backbone.fingerprint` of the weights the rows come from ("" when unknown)."""

    def load(self, images: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Rows of `images`, image-major then token: x_NLD, y_NLD with N = len(images) * rows_per_image."""
        ...


ORDER, SHUFFLE, NORM = 0, 1, 2
"""Purposes a stream draws random numbers for; each gets its own independent seed."""


def _seed(purpose: int, seed: int, *parts: int) -> int:
    """A 63-bit seed for `purpose` derived from non-negative integers, stable across platforms."""
    if seed < 0:
        raise StreamError(f"seeds must be non-negative, got {seed}")
    state = np.random.SeedSequence([STREAM_SALT, purpose, seed, *parts]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def image_order(n_images: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of image indices visited in `epoch`."""
    return np.random.default_rng(_seed(ORDER, seed, epoch)).permutation(n_images)


class BackboneSource:
    """Rows captured from a backbone: one forward pass per `images_per_forward` images, all layers.

    Images are decoded and prepared (resized and cropped to uint8) by `vitclt.data.batches.ImageLoader`
    in `workers` processes while the backbone runs (0: in this process), and rescaled on the
    backbone's device (`Backbone.normalize`); `fast_decode` decodes JPEGs at reduced size
    (approximate, opt-in). Forward batches are cut from the requested image list in order, so the
    same request always runs the same forwards (which is what makes a resumed stream bit-identical
    on CPU). `prefetch(images)` starts the workers on a later `load(images)` while the caller
    trains. An image that cannot be decoded is skipped and recorded in `unreadable` (its rows are
    the next readable image's); more than `max_unreadable` of the dataset stops the run (see
    `vitclt.data.unreadable`).
    """

    def __init__(self, backbone: Backbone, dataset, tokens: TokenSel = "all", images_per_forward: int = 64,
                 workers: int = 0, max_unreadable: float = MAX_UNREADABLE_FRACTION, fast_decode: bool = False):
        if len(dataset) == 0:
            raise StreamError("the dataset has no images: check the dataset spec and split")
        if images_per_forward < 1:
            raise StreamError(f"images_per_forward must be at least 1, got {images_per_forward}")
        self.backbone = backbone
        self.dataset = dataset
        self.tokens = tokens
        self.images_per_forward = images_per_forward
        self.workers = workers
        self.n_images = len(dataset)
        self.n_layers = backbone.n_layers
        self.d_model = backbone.d_model
        self._index = backbone.token_index(tokens)
        self.token_positions = torch.arange(backbone.n_tokens)[self._index].reshape(-1)
        self.rows_per_image = int(self.token_positions.numel())
        self.unreadable = UnreadableImages(self.n_images, max_unreadable)
        self._loader = ImageLoader(dataset, backbone.image_prep, workers, fast_decode,
                                   pin_memory=backbone.device.type == "cuda")

    def _prepared(self, index: int) -> Tensor:
        return self._loader.data.load(index)[0]

    def _uint8(self, chunk: Sequence[int], batch: LoadedBatch) -> Tensor:
        """The batch's uint8 pixels, with each unreadable (or already skipped) image replaced as `unreadable` says.

        Replacements are resolved here, in position order, as a decode in this process would: the
        record, its warnings and its limit behave the same with or without workers.
        """
        redo = [pos for pos, index in enumerate(chunk) if pos in batch.errors or int(index) in self.unreadable]
        if not redo:
            return batch.items
        rows = {}
        for pos in redo:
            if pos in batch.errors:
                self.unreadable.record(int(chunk[pos]), batch.errors[pos])
            rows[pos] = self.unreadable.decode(self._prepared, int(chunk[pos]))
        return torch.stack([rows[pos] if pos in rows else batch.items[pos] for pos in range(len(chunk))])

    def _forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        with self.backbone.capture() as cap:
            self.backbone.image_embeds(pixels)
        return cap.x_BTLD()[:, self._index].flatten(0, 1), cap.y_BTLD()[:, self._index].flatten(0, 1)

    def iter_load(self, images: Sequence[int]) -> Iterator[tuple[Tensor, Tensor]]:
        """Rows of `images` one forward batch at a time (x_NLD, y_NLD), the workers preparing ahead."""
        chunks = chunked(images, self.images_per_forward)
        for chunk, batch in zip(chunks, self._loader.batches(chunks)):
            yield self._forward(self.backbone.normalize(self._uint8(chunk, batch)))

    def prefetch(self, images: Sequence[int]) -> None:
        """Start decoding and preparing `images` in the workers now, in the forward batches `load(images)` will run.

        A later `load(images)` then finds their uint8 batches (mostly) ready and only normalises and
        forwards them; any other load discards them. The prepared pixels are held in host memory
        until that load (~390 MB for a paper-scale block of 2,600 images at 224 px). Errors are
        recorded and replaced when the batches are consumed, as without prefetch. Nothing happens
        with 0 workers (see `ImageLoader.prefetch`).
        """
        self._loader.prefetch(chunked(images, self.images_per_forward))

    def close(self) -> None:
        """Stop the image workers and any prefetch, and wait for them (a later load starts the workers again)."""
        self._loader.close()

    @property
    def backbone_fingerprint(self) -> str:
        """The backbone's `fingerprint`: which weights these rows come from."""
        return self.backbone.fingerprint

    def load(self, images: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Rows of `images`, image-major then token: x_NLD, y_NLD.

        The rows are copied into ordinary tensors: the captured ones are inference tensors, which
        autograd refuses to save for the transcoder's backward.
        """
        n = len(images) * self.rows_per_image
        x_NLD = y_NLD = None
        start = 0
        for x_nLD, y_nLD in self.iter_load(list(images)):
            if x_NLD is None:
                x_NLD = torch.empty((n, *x_nLD.shape[1:]), dtype=x_nLD.dtype, device=x_nLD.device)
                y_NLD = torch.empty((n, *y_nLD.shape[1:]), dtype=y_nLD.dtype, device=y_nLD.device)
            x_NLD[start : start + len(x_nLD)] = x_nLD
            y_NLD[start : start + len(y_nLD)] = y_nLD
            start += len(x_nLD)
        return x_NLD, y_NLD


@dataclass
class NormStats:
    """Per-layer normalisation: x_norm = (x - x_mean_LD) / x_scale_L, and likewise for y.

    The scale is the root mean square over dimensions of the per-dimension standard deviation,
    so a normalised layer has unit variance per dimension on average and ‖x_norm‖² ≈ D.
    """

    x_mean_LD: Tensor
    x_scale_L: Tensor
    y_mean_LD: Tensor
    y_scale_L: Tensor

    def tensors(self) -> dict[str, Tensor]:
        """The statistics by name, for saving."""
        return {"x_mean_LD": self.x_mean_LD, "x_scale_L": self.x_scale_L,
                "y_mean_LD": self.y_mean_LD, "y_scale_L": self.y_scale_L}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> NormStats:
        """Rebuild from `tensors()`'s output."""
        return cls(**{k: tensors[k] for k in ("x_mean_LD", "x_scale_L", "y_mean_LD", "y_scale_L")})


def _moments(shift_LD: Tensor, sum_LD: Tensor, sumsq_LD: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Mean and scale from sums of (a - shift) and (a - shift)²."""
    offset_LD = sum_LD / n
    var_LD = (sumsq_LD / n - offset_LD**2).clamp_min(0)
    scale_L = var_LD.mean(dim=-1).sqrt()
    # A constant layer has no scale to learn; 1 keeps its normalisation finite.
    scale_L = torch.where(scale_L > 0, scale_L, torch.ones_like(scale_L))
    return (shift_LD.double() + offset_LD).float().cpu(), scale_L.float().cpu()


def estimate_normalization(source: RowSource, n_tokens: int = 2**16, seed: int = 0, images_per_load: int = 64,
                           progress: bool = True) -> NormStats:
    """Estimate `NormStats` from about `n_tokens` rows of a seeded random sample of images.

    Sums run on the rows' device in float64 over values shifted by the first load's mean, so
    dimensions with a large mean lose no precision and the result matches a direct computation.
    """
    if n_tokens < 1:
        raise StreamError(f"n_tokens for normalisation must be positive, got {n_tokens}")
    n_img = min(source.n_images, math.ceil(n_tokens / source.rows_per_image))
    images = np.random.default_rng(_seed(NORM, seed)).permutation(source.n_images)[:n_img]
    shift = acc = None
    n = 0
    bar = tqdm(total=n_img, desc="normalisation stats", unit="img", disable=not progress, leave=False)
    for start in range(0, n_img, images_per_load):
        x_NLD, y_NLD = source.load(images[start : start + images_per_load])
        if shift is None:
            shift = [x_NLD.float().mean(0), y_NLD.float().mean(0)]
            acc = torch.zeros(4, *shift[0].shape, dtype=torch.float64, device=x_NLD.device)
        for i, (a_NLD, shift_LD) in enumerate(zip((x_NLD, y_NLD), shift)):
            d_NLD = a_NLD.float() - shift_LD
            acc[2 * i] += d_NLD.sum(0, dtype=torch.float64)
            acc[2 * i + 1] += (d_NLD * d_NLD).sum(0, dtype=torch.float64)
        n += x_NLD.shape[0]
        bar.update(x_NLD.shape[0] // source.rows_per_image)
    bar.close()
    if not torch.isfinite(acc).all():
        bad = sorted({int(layer) for layer in torch.nonzero(~torch.isfinite(acc))[:, 1]})
        raise StreamError(f"non-finite activations while estimating normalisation at layers {bad}: "
                          "check the backbone and dtype (float16 overflows)")
    x_mean, x_scale = _moments(shift[0], acc[0], acc[1], n)
    y_mean, y_scale = _moments(shift[1], acc[2], acc[3], n)
    return NormStats(x_mean, x_scale, y_mean, y_scale)


class ActivationStream:
    """Endless shuffled batches of `batch_size` token rows from a `RowSource`.

    See the module docstring for the block shuffle. `rows_consumed` is the whole position:
    `state_dict()` / `load_state_dict()` save and restore it (with the source's record of skipped
    unreadable images, if it keeps one), and the next batch after a restore equals the next batch
    of the uninterrupted stream.
    """

    def __init__(self, source: RowSource, batch_size: int, buffer_size: int = 2**17, seed: int = 0,
                 device: str | torch.device = "cpu"):
        if batch_size < 1:
            raise StreamError(f"batch_size must be at least 1 token, got {batch_size}")
        if buffer_size < 1:
            raise StreamError(f"buffer_size must be at least 1 token, got {buffer_size}")
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.block_images = max(1, min(source.n_images, buffer_size // source.rows_per_image))
        n_blocks = -(-source.n_images // self.block_images)
        # Near-equal blocks: a thin remainder block would give the epoch's last batches few images.
        self._bounds = [j * source.n_images // n_blocks for j in range(n_blocks + 1)]
        self.rows_per_epoch = source.n_images * source.rows_per_image
        self.rows_consumed = 0
        self._block: _Block | None = None

    @property
    def epoch(self) -> float:
        """Passes over the dataset so far (fractional)."""
        return self.rows_consumed / self.rows_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands, the images skipped as unreadable, and the settings that must match on restore."""
        state: dict[str, Any] = {
            "rows_consumed": self.rows_consumed, "seed": self.seed, "batch_size": self.batch_size,
            "block_images": self.block_images, "rows_per_image": self.source.rows_per_image,
            "n_images": self.source.n_images}
        unreadable = getattr(self.source, "unreadable", None)
        if unreadable is not None:
            state["unreadable"] = unreadable.state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved `state_dict()`; refuses one saved with different settings."""
        mine = self.state_dict()
        diff = [f"{k}: saved {state.get(k)}, now {mine[k]}" for k in mine
                if k not in _POSITION and state.get(k) != mine[k]]
        if diff:
            hint = ("; an image count that changed means files were added or removed: put them back (an unreadable "
                    "image is skipped, not fatal)" if "n_images" in "".join(diff) else "")
            raise StreamError("cannot resume the activation stream with different settings (" + "; ".join(diff)
                              + "): resume with the run's original dataset, tokens, batch and buffer size" + hint)
        self.rows_consumed = int(state["rows_consumed"])
        unreadable = getattr(self.source, "unreadable", None)
        if unreadable is not None:
            unreadable.restore(state.get("unreadable"))

    def block_image_indices(self, epoch: int, block: int) -> np.ndarray:
        """Dataset indices of the images in block `block` of `epoch`, in load order."""
        order = image_order(self.source.n_images, self.seed, epoch)
        return order[self._bounds[block] : self._bounds[block + 1]]

    def _next_block(self, epoch: int, block: int) -> tuple[int, int]:
        """The (epoch, block) after `block` of `epoch`."""
        return (epoch, block + 1) if block + 2 < len(self._bounds) else (epoch + 1, 0)

    def _load_block(self, epoch: int, block: int) -> _Block:
        images = self.block_image_indices(epoch, block)
        x_NLD, y_NLD = self.source.load(images)
        n_rows = len(images) * self.source.rows_per_image
        if x_NLD.shape[0] != n_rows or y_NLD.shape[0] != n_rows:
            raise StreamError(f"source returned {x_NLD.shape[0]} rows for {len(images)} images, expected {n_rows}")
        prefetch = getattr(self.source, "prefetch", None)
        if prefetch is not None:  # the next block's images get ready while this one trains
            prefetch(self.block_image_indices(*self._next_block(epoch, block)))
        gen = torch.Generator().manual_seed(_seed(SHUFFLE, self.seed, epoch, block))
        dev = self.device
        # Rows stay in load order and each batch gathers through the permutation: permuting the
        # buffer up front would need a second buffer-sized copy.
        return _Block(
            epoch=epoch, block=block, perm_N=torch.randperm(n_rows, generator=gen).to(dev),
            x_NLD=x_NLD.to(dev), y_NLD=y_NLD.to(dev),
            image_N=torch.as_tensor(images).repeat_interleave(self.source.rows_per_image).to(dev),
            token_N=self.source.token_positions.repeat(len(images)).to(dev),
        )

    def next_batch(self) -> Batch:
        """The next `batch_size` rows; loads a new block whenever the current one runs out."""
        pieces = []
        need = self.batch_size
        rpi = self.source.rows_per_image
        while need:
            epoch, in_epoch = divmod(self.rows_consumed, self.rows_per_epoch)
            block = bisect.bisect_right(self._bounds, in_epoch // rpi) - 1
            offset = in_epoch - self._bounds[block] * rpi
            if self._block is None or (self._block.epoch, self._block.block) != (epoch, block):
                self._block = None  # free the old buffer before filling the new one
                self._block = self._load_block(epoch, block)
            b = self._block
            take = min(need, len(b.perm_N) - offset)
            rows = b.perm_N[offset : offset + take]
            pieces.append((b.x_NLD[rows], b.y_NLD[rows], b.image_N[rows], b.token_N[rows]))
            self.rows_consumed += take
            need -= take
        if len(pieces) == 1:
            return Batch(*pieces[0])
        return Batch(*(torch.cat(parts) for parts in zip(*pieces)))

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()


_POSITION = ("rows_consumed", "unreadable")
"""State entries that record progress rather than settings."""


@dataclass
class _Block:
    """One buffer's worth of rows on the training device, in load order, and its shuffle."""

    epoch: int
    block: int
    perm_N: Tensor
    x_NLD: Tensor
    y_NLD: Tensor
    image_N: Tensor
    token_N: Tensor
