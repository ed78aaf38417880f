"""Atomic file writes: a crash mid-write leaves the previous file intact, never half a file.

Each write goes to a temporary file next to its target, named ``.NAME.vitclt-PID-XXXXXXXX.tmp``
(PID: the writing process), which is then renamed over ``NAME``. A process killed mid-write
(SIGKILL, power loss) leaves that temporary behind; :func:`remove_stale_temporaries` finds and
removes exactly those: files of vitclt's own pattern whose writer is no longer running. A file
of any other name (a user's ``notes.tmp``) is never touched.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

TEMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.vitclt-(?P<pid>\d+)-[a-z0-9_]{8}\.tmp$")
"""Names of vitclt's temporaries: ``.NAME.vitclt-PID-XXXXXXXX.tmp`` (XXXXXXXX from ``mkstemp``)."""

_in_flight: set[Path] = set()
_in_flight_lock = threading.Lock()
_completed: list[Path] = []


def _temporary_for(path: Path) -> Path:
    """A new empty temporary next to `path`, named by :data:`TEMP_PATTERN`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.vitclt-{os.getpid()}-", suffix=".tmp")
    os.close(fd)
    return Path(os.path.abspath(tmp))


def _atomic(path: Path, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_for(path)
    with _in_flight_lock:
        _in_flight.add(tmp)
    try:
        write(str(tmp))
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        record_written(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        with _in_flight_lock:
            _in_flight.discard(tmp)
    return path


def record_written(path: str | Path) -> None:
    """Note that `path` (a file, or a directory renamed into place whole) was written completely by this process."""
    with _in_flight_lock:
        _completed.append(Path(path))


def written() -> list[Path]:
    """What this process has written completely so far, in order (an interrupted command says whether it kept any)."""
    with _in_flight_lock:
        return list(_completed)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON to `path` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")

    return _atomic(Path(path), write)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return _atomic(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Save `tensors` (made contiguous, on CPU) to a safetensors file atomically."""
    from safetensors.torch import save_file  # imported here: the configs import this module and stay torch-free

    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return _atomic(Path(path), lambda tmp: save_file(flat, tmp, metadata=metadata))


def _running(pid: int) -> bool:
    """Whether a process with id `pid` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale(path: Path) -> bool:
    match = TEMP_PATTERN.match(path.name)
    if match is None or not path.is_file() or path.is_symlink():
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        # Ours: stale unless a write of this process is using it right now (a same-numbered
        # process that died before this one started left it otherwise).
        with _in_flight_lock:
            return Path(os.path.abspath(path)) not in _in_flight
    return not _running(pid)


def remove_stale_temporaries(directory: str | Path, quiet: bool = False) -> list[Path]:
    """Remove the temporaries that interrupted vitclt writes left under `directory` (recursively).

    Only files named by :data:`TEMP_PATTERN` whose writing process has ended are removed (a write
    in progress in another process keeps its file); each removal is printed unless `quiet`.
    Returns the removed paths, sorted. A missing `directory` holds nothing to remove.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.rglob(".*.tmp")):
        if _stale(path):
            path.unlink(missing_ok=True)
            removed.append(path)
            if not quiet:
                print(f"removed {path}: a temporary file left by an interrupted write")
    return removed


def read_json_object(path: str | Path, error: type[Exception], fix: str, kind: str = "config") -> dict:
    """The JSON object in `path`; `error` naming the file and `fix` when it is not valid JSON or not an object."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is not valid JSON ({err}): {fix}") from None
    if not isinstance(raw, dict):
        raise error(f"{path} holds a JSON {type(raw).__name__}, not a {kind} object: {fix}")
    return raw


def jsonable(obj: Any) -> Any:
    """`obj` (e.g. `dataclasses.asdict` of a config) with tuples as lists and paths as strings, ready for JSON."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj
