"""CIFAR-100 from its official archives, python or binary version.

Get the data from https://www.cs.toronto.edu/~kriz/cifar.html:
``cifar-100-python.tar.gz`` or ``cifar-100-binary.tar.gz``. ``cifar100:PATH``
accepts the tarball itself, its extracted folder (``cifar-100-python/`` or
``cifar-100-binary/``), or a directory holding either. Nothing is extracted to
disk; the test split (10,000 images) takes 30 MB of memory, train 150 MB.

Formats:

- **python version**: ``train``, ``test`` and ``meta`` are pickles written by
  Python 2 (protocol 2): dicts with keys ``data`` (a uint8 numpy array,
  N×3072, each row 1024 red, 1024 green then 1024 blue values of a 32×32
  image in row-major order), ``fine_labels``, ``coarse_labels``,
  ``filenames``; ``meta`` holds ``fine_label_names``. They are read with a
  restricted unpickler that can build nothing but dicts, lists, strings,
  numbers and numpy uint8 arrays (see :class:`RestrictedUnpickler`): a
  tampered archive cannot run code.
- **binary version**: ``train.bin``/``test.bin`` are 3074-byte records: coarse
  label, fine label, then the 3072 pixel bytes as above;
  ``fine_label_names.txt`` has one class name per line.

Class names are the archive's fine label names with ``_`` read as a space,
which is exactly the list OpenAI CLIP uses for CIFAR-100.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitclt.data.datasets import LabelledImages, resolve_split
from vitclt.data.images import DatasetError
from vitclt.data.prompts import builtin_classnames

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

IMAGE_BYTES = 3 * 32 * 32
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_SPLITS = {"train": "train", "test": "test", "val": "test", "eval": "test"}
_LAYOUT = (
    "expected the official CIFAR-100 archive: cifar-100-python.tar.gz or cifar-100-binary.tar.gz, "
    "or their extracted folder cifar-100-python/{train,test,meta} or "
    "cifar-100-binary/{train.bin,test.bin,fine_label_names.txt} (" + URL + ")"
)
_DAMAGED = (EOFError, tarfile.TarError, zlib.error, OSError)
"""What reading a cut-short or corrupted gzip/tar stream raises (``BadGzipFile`` is an ``OSError``)."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR pickles that refuses every global but numpy's array rebuilders.

    The real files reference exactly ``numpy.core.multiarray._reconstruct``,
    ``numpy.ndarray`` and ``numpy.dtype`` (``numpy._core`` since numpy 2);
    anything else (``os.system``, ``builtins.eval``, ...) raises
    :class:`DatasetError`.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        """Return one of the allowed numpy callables, or refuse."""
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise DatasetError(
                f"refusing to load {module}.{name} from a CIFAR pickle: the official files contain only "
                "plain data and numpy arrays, so this file is not a genuine CIFAR-100 archive"
            ) from None


def restricted_loads(data: bytes, source: str, fix: str = "") -> dict[str, Any]:
    """Unpickle a CIFAR dict with :class:`RestrictedUnpickler`; keys come back as ``str``.

    ``fix`` (e.g. "extract it again") ends the message of a file that does not unpickle.
    """
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DatasetError as exc:
        raise DatasetError(f"{source}: {exc}") from None
    except Exception as exc:  # the pickle machinery raises many types on garbage input
        raise DatasetError(f"{source}: not a readable CIFAR pickle, the file is truncated or corrupt "
                           f"({type(exc).__name__}: {exc}){fix}") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{source}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _locate(path: Path) -> Path:
    """The tarball or the folder that directly holds the CIFAR-100 files."""
    if path.is_file():
        return path
    for sub in ("cifar-100-python", "cifar-100-binary"):
        if (path / sub).is_dir():
            return path / sub
        if (path / f"{sub}.tar.gz").is_file():
            return path / f"{sub}.tar.gz"
    if any((path / name).is_file() for name in ("meta", "test.bin", "train.bin")):
        return path
    raise DatasetError(f"no CIFAR-100 data found in {path}: {_LAYOUT}")


class _Archive:
    """Reads named files of a CIFAR folder or tarball without extracting it."""

    def __init__(self, path: Path) -> None:
        self.path = _locate(path)
        self.tar: tarfile.TarFile | None = None
        if self.path.is_dir():
            names = [p.name for p in self.path.iterdir()]
        else:
            names = self._open_tar()
        self.format = "binary" if {"test.bin", "train.bin"} & set(names) else "python"

    def _open_tar(self) -> list[str]:
        """Open the tarball and list its files; a damaged one is a :class:`DatasetError`."""
        try:
            if not tarfile.is_tarfile(self.path):
                with open(self.path, "rb") as f:
                    gzipped = f.read(2) == b"\x1f\x8b"
                if not gzipped:
                    raise DatasetError(f"{self.path} is not a tar archive: {_LAYOUT}")
                raise EOFError("no tar header in the gzip stream")
            self.tar = tarfile.open(self.path, "r:*")
            self.members = {Path(m.name).name: m for m in self.tar.getmembers() if m.isfile()}
        except _DAMAGED as exc:
            if self.tar is not None:
                self.tar.close()
            raise self._damaged(exc) from exc
        return list(self.members)

    def _damaged(self, exc: BaseException) -> DatasetError:
        return DatasetError(f"{self.path}: the archive is truncated or corrupt ({str(exc) or type(exc).__name__}): "
                            f"download it again from {URL} (an interrupted download or copy leaves a partial file)")

    @property
    def fix(self) -> str:
        """How to replace a damaged file read from this archive or folder."""
        if self.tar is not None:
            return f": download the archive again from {URL}"
        return f": extract it again from the official archive, or download that again from {URL}"

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tar is not None:
            self.tar.close()

    def read(self, name: str) -> bytes:
        """Return the bytes of file ``name`` (a bare file name inside the archive)."""
        if self.tar is not None:
            member = self.members.get(name)
            handle = self.tar.extractfile(member) if member is not None else None
            if handle is None:
                raise DatasetError(f"{self.path} has no member {name!r}: {_LAYOUT}")
            try:
                return handle.read()
            except _DAMAGED as exc:
                raise self._damaged(exc) from exc
        if not (self.path / name).is_file():
            raise DatasetError(f"missing file {self.path / name}: {_LAYOUT}")
        return (self.path / name).read_bytes()


class CifarImages(LabelledImages):
    """CIFAR images held in memory as an (N, 32, 32, 3) uint8 array."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, classnames: list[str], split: str) -> None:
        super().__init__(name="cifar100", split=split, classnames=classnames, labels=labels, template_set="cifar100")
        self.pixels = pixels

    def load_image(self, index: int) -> Image.Image:
        """The 32×32 RGB image ``index``."""
        return Image.fromarray(self.pixels[index], mode="RGB")


def _planes_to_hwc(rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _read_python(archive: _Archive, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    batch = restricted_loads(archive.read(split), f"{archive.path}:{split}", archive.fix)
    meta = restricted_loads(archive.read("meta"), f"{archive.path}:meta", archive.fix)
    data, labels = batch.get("data"), batch.get("fine_labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        raise DatasetError(f"{archive.path}:{split}: 'data' must be a uint8 array of shape (N, {IMAGE_BYTES})")
    if labels is None or len(labels) != len(data):
        raise DatasetError(f"{archive.path}:{split}: 'fine_labels' missing or not one per image")
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta.get("fine_label_names", [])]
    return _planes_to_hwc(data), np.asarray(labels, dtype=np.int64), names


def _read_binary(archive: _Archive, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    raw = np.frombuffer(archive.read(f"{split}.bin"), dtype=np.uint8)
    record = IMAGE_BYTES + 2
    if raw.size == 0 or raw.size % record:
        raise DatasetError(f"{archive.path}:{split}.bin: size {raw.size} is not a multiple of {record}-byte records, "
                           f"the file is truncated or corrupt{archive.fix}")
    records = raw.reshape(-1, record)
    names = [n.strip() for n in archive.read("fine_label_names.txt").decode("utf-8").splitlines() if n.strip()]
    return _planes_to_hwc(records[:, 2:]), records[:, 1].astype(np.int64), names


def load_cifar100(path: str, split: str = "test") -> CifarImages:
    """Open CIFAR-100 (``split`` ``"train"`` or ``"test"``; ``"val"`` means test) from ``path``."""
    split = resolve_split(split, _SPLITS, "cifar100")
    with _Archive(Path(path)) as archive:
        reader = _read_python if archive.format == "python" else _read_binary
        pixels, labels, names = reader(archive, split)
    classnames = [n.replace("_", " ") for n in names] or builtin_classnames("cifar100")
    if len(classnames) != 100:
        raise DatasetError(f"{archive.path}: found {len(classnames)} fine label names, CIFAR-100 has 100")
    if len(labels) and labels.max() >= 100:
        raise DatasetError(f"{archive.path}:{split}: fine labels must lie in 0..99, found {labels.max()}")
    return CifarImages(pixels, labels, classnames, split)
