"""Atomic writes: a killed write leaves a recognisable temporary that cleanup removes, and nothing else."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitclt import io
from vitclt.io import TEMP_PATTERN, remove_stale_temporaries, write_json, write_safetensors

# A writer that stops inside the atomic write (temporary created and half written), to be killed there.
_KILLED_WRITER = """
import sys, time
from vitclt import io
def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"x" * 4096)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
io._atomic(io.Path(sys.argv[1]), write)
"""


def _killed_write(target: Path) -> list[Path]:
    """Start a write of `target`, SIGKILL it mid-write, and return what it left next to `target`."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return sorted(p for p in target.parent.iterdir() if p.name != target.name)


def test_killed_write_leaves_a_temporary_that_cleanup_removes_and_nothing_else(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    target = tmp_path / "sub" / "state.safetensors"
    target.write_bytes(b"previous")
    [left] = _killed_write(target)
    assert TEMP_PATTERN.match(left.name) and left.stat().st_size == 4096
    assert target.read_bytes() == b"previous"  # the previous file is intact

    user_files = [tmp_path / "notes.tmp", tmp_path / ".notes.tmp", tmp_path / ".x.vitclt-1-abc.tmp",
                  tmp_path / "sub" / ".state.safetensors.tmp"]
    for f in user_files:
        f.write_text("mine")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        in_progress = tmp_path / f".run.json.vitclt-{live.pid}-abcd1234.tmp"
        in_progress.write_text("{")
        assert remove_stale_temporaries(tmp_path) == [left]
    finally:
        live.kill()
        live.wait()
    assert not left.exists() and all(f.read_text() == "mine" for f in user_files)
    assert in_progress.exists()  # its writer was still running
    assert f"removed {left}" in capsys.readouterr().out
    assert remove_stale_temporaries(tmp_path) == [in_progress]  # its writer has ended now
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_cleanup_spares_this_process_writes_in_flight(tmp_path):
    seen = []

    def write(tmp):
        Path(tmp).write_text("partial")
        seen.append(remove_stale_temporaries(tmp_path, quiet=True))
        Path(tmp).write_text("done")

    io._atomic(tmp_path / "a.txt", write)
    assert seen == [[]] and (tmp_path / "a.txt").read_text() == "done"
    # The same name and pid but no write in flight: left by an earlier process with this pid.
    orphan = tmp_path / f".a.txt.vitclt-{os.getpid()}-zzzz0000.tmp"
    orphan.write_text("old")
    assert remove_stale_temporaries(tmp_path, quiet=True) == [orphan]


def test_atomic_writes_leave_only_their_targets(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    write_safetensors(tmp_path / "w.safetensors", {"w": torch.ones(2)})
    io.write_text(tmp_path / "r.html", "<p>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "r.html", "w.safetensors"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert oct((tmp_path / "a.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failed_write_removes_its_temporary(tmp_path):
    def fail(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io._atomic(tmp_path / "a.json", fail)
    assert list(tmp_path.iterdir()) == []
