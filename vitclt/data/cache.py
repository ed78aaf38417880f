"""Activations cached on disk, so a sweep reads them back instead of re-running the backbone.

A cache directory holds::

    metadata.json   the `CacheKey` (backbone, dataset, tokens, dtype, shapes), its hash, the shards
    x_00000.npy     LN2 outputs of shard 0: (rows, L, D), float16 or float32, memory-mapped on read
    y_00000.npy     MLP outputs of shard 0, same shape
    ...

Shard s holds images [s * shard_images, (s+1) * shard_images) in dataset order, each image's
`rows_per_image` token rows contiguous, so reading an image is one sequential slice. A cache is
built in a temporary sibling directory and renamed into place when complete, so a killed build
never leaves a cache that looks finished. `CacheSource` is a `RowSource`: wrap it in an
`ActivationStream` for shuffled batches, exactly as the live backbone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from vitclt.data.stream import BackboneSource
from vitclt.data.unreadable import UnreadableImages
from vitclt.errors import VitcltError
from vitclt.io import write_json

CACHE_VERSION = 1
"""Bumped whenever the on-disk layout changes; older caches are refused, not misread."""

FP16_MAX = 65504.0


class CacheError(VitcltError, ValueError):
    """A cache is missing, incomplete or was made with other settings; the message says what to do."""


@dataclass(frozen=True)
class CacheKey:
    """Everything a cache's activations depend on; a cache is reused only when all fields match."""

    backbone: str
    """The backbone spec the activations came from."""
    backbone_fingerprint: str
    """`Backbone.fingerprint` of the weights, so a changed checkpoint at the same path is noticed."""
    dataset: str
    """The dataset spec, split and subset."""
    n_images: int
    """Number of images."""
    tokens: str
    """Token selection: cls, patches or all."""
    n_layers: int
    """Backbone layers."""
    d_model: int
    """Backbone width."""
    rows_per_image: int
    """Token rows stored per image."""
    dtype: str
    """Storage dtype: float16 or float32."""

    def digest(self) -> str:
        """A content hash of the settings (sha256 of their canonical JSON)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def cache_key(source: BackboneSource, backbone_spec: str, dataset_spec: str, dtype: str = "float16") -> CacheKey:
    """The `CacheKey` of the activations `source` produces."""
    if dtype not in ("float16", "float32"):
        raise CacheError(f"cache dtype must be float16 or float32, got {dtype!r}")
    return CacheKey(
        backbone=str(backbone_spec), backbone_fingerprint=source.backbone_fingerprint,
        dataset=str(dataset_spec), n_images=source.n_images, tokens=str(source.tokens),
        n_layers=source.n_layers, d_model=source.d_model, rows_per_image=source.rows_per_image, dtype=dtype,
    )


class CacheSource:
    """Rows read back from a cache directory: a `RowSource` backed by memory-mapped shards."""

    def __init__(self, path: str | Path, metadata: dict):
        self.path = Path(path)
        self.metadata = metadata
        key = metadata["key"]
        self.key = CacheKey(**key)
        self.n_images = key["n_images"]
        self.rows_per_image = key["rows_per_image"]
        self.n_layers = key["n_layers"]
        self.d_model = key["d_model"]
        self.shard_images = metadata["shard_images"]
        self.token_positions = torch.as_tensor(metadata["token_positions"], dtype=torch.long)
        self.backbone_fingerprint = self.key.backbone_fingerprint
        """`Backbone.fingerprint` of the weights the cached rows came from."""
        self.unreadable = UnreadableImages(self.n_images)
        """Images skipped as unreadable when the cache was built (their rows are a substitute's)."""
        self.unreadable.restore(metadata.get("unreadable"))
        self._x = [np.load(self.path / f"x_{s:05d}.npy", mmap_mode="r") for s in range(metadata["n_shards"])]
        self._y = [np.load(self.path / f"y_{s:05d}.npy", mmap_mode="r") for s in range(metadata["n_shards"])]

    def load(self, images: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Rows of `images`, image-major then token: x_NLD, y_NLD in the stored dtype."""
        images = np.asarray(images, dtype=np.int64)
        if images.size and (images.min() < 0 or images.max() >= self.n_images):
            raise CacheError(f"image index out of range for a cache of {self.n_images} images")
        rpi = self.rows_per_image
        shard = images // self.shard_images
        local_NT = (images % self.shard_images)[:, None] * rpi + np.arange(rpi)
        shape = (len(images) * rpi, self.n_layers, self.d_model)
        x = np.empty(shape, dtype=self._x[0].dtype)
        y = np.empty(shape, dtype=self._y[0].dtype)
        out_NT = np.arange(len(images) * rpi).reshape(len(images), rpi)
        for s in np.unique(shard):
            sel = shard == s
            # Reading shard rows in ascending order keeps the memory-mapped access mostly sequential.
            src = local_NT[sel].ravel()
            order = np.argsort(src, kind="stable")
            dst = out_NT[sel].ravel()[order]
            x[dst] = self._x[s][src[order]]
            y[dst] = self._y[s][src[order]]
        return torch.from_numpy(x), torch.from_numpy(y)


def open_cache(path: str | Path, expect: CacheKey | None = None) -> CacheSource:
    """Open a finished cache; with `expect`, refuse one made with different settings."""
    path = Path(path)
    meta_path = path / "metadata.json"
    if not meta_path.is_file():
        raise CacheError(f"no activation cache at {path} (metadata.json missing): build one with build_cache, "
                         "or pass the cache directory a run wrote")
    metadata = json.loads(meta_path.read_text())
    if metadata.get("version") != CACHE_VERSION:
        raise CacheError(f"the cache at {path} has format version {metadata.get('version')}, "
                         f"this vitclt reads {CACHE_VERSION}: delete it and rebuild")
    if expect is not None:
        saved = metadata["key"]
        diff = [f"{f.name}: cache has {saved.get(f.name)!r}, requested {getattr(expect, f.name)!r}"
                for f in fields(expect) if saved.get(f.name) != getattr(expect, f.name)]
        if diff:
            raise CacheError(f"the activation cache at {path} was made with other settings ("
                             + "; ".join(diff) + "): pass a different cache directory, or delete this one to rebuild it")
    return CacheSource(path, metadata)


def build_cache(source: BackboneSource, key: CacheKey, path: str | Path, shard_images: int | None = None,
                progress: bool = True) -> CacheSource:
    """Run the backbone once over every image of `source` and write the rows to a cache at `path`."""
    path = Path(path)
    if (path / "metadata.json").exists():
        raise CacheError(f"a cache already exists at {path}: open it with open_cache, or delete it to rebuild")
    if path.exists() and any(path.iterdir()):
        raise CacheError(f"{path} exists and is not an activation cache: choose an empty or new directory")
    dtype = np.dtype(key.dtype)
    rpi, L, D = source.rows_per_image, source.n_layers, source.d_model
    if shard_images is None:
        shard_images = max(1, 2**30 // (2 * rpi * L * D * dtype.itemsize))
    n_shards = -(-source.n_images // shard_images)
    tmp = path.with_name(f".{path.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bar = tqdm(total=source.n_images, desc="caching activations", unit="img", disable=not progress)
    for s in range(n_shards):
        images = list(range(s * shard_images, min(source.n_images, (s + 1) * shard_images)))
        shape = (len(images) * rpi, L, D)
        x_mm = np.lib.format.open_memmap(tmp / f"x_{s:05d}.npy", mode="w+", dtype=dtype, shape=shape)
        y_mm = np.lib.format.open_memmap(tmp / f"y_{s:05d}.npy", mode="w+", dtype=dtype, shape=shape)
        row = 0
        for x_NLD, y_NLD in source.iter_load(images):
            for name, t in (("LN2 outputs", x_NLD), ("MLP outputs", y_NLD)):
                _check_storable(t, dtype, name, images[row // rpi])
            n = x_NLD.shape[0]
            x_mm[row : row + n] = x_NLD.float().cpu().numpy()
            y_mm[row : row + n] = y_NLD.float().cpu().numpy()
            row += n
            bar.update(n // rpi)
        x_mm.flush()
        y_mm.flush()
        del x_mm, y_mm
    bar.close()
    metadata = {
        "version": CACHE_VERSION, "key": asdict(key), "key_hash": key.digest(),
        "shard_images": shard_images, "n_shards": n_shards, "n_rows": source.n_images * rpi,
        "row_shape": [L, D], "token_positions": source.token_positions.tolist(),
        "unreadable": source.unreadable.state(),
    }
    write_json(tmp / "metadata.json", metadata)
    if path.exists():
        path.rmdir()
    tmp.rename(path)
    return CacheSource(path, metadata)


def _check_storable(t: Tensor, dtype: np.dtype, name: str, first_image: int) -> None:
    if not torch.isfinite(t).all():
        raise CacheError(f"non-finite {name} in the forward batch starting at image {first_image}: "
                         "check the backbone and its dtype")
    if dtype == np.float16 and t.abs().max() > FP16_MAX:
        raise CacheError(f"{name} exceed float16's range in the batch starting at image {first_image}: "
                         "build the cache with dtype float32")


def open_or_build_cache(source: BackboneSource, key: CacheKey, path: str | Path, progress: bool = True) -> CacheSource:
    """Open the cache at `path` if it matches `key`, else build it there (when the directory is free)."""
    if (Path(path) / "metadata.json").exists():
        return open_cache(path, expect=key)
    return build_cache(source, key, path, progress=progress)
