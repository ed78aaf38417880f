"""`torchrun -m vitclt train` on CPU/gloo: runs equal one process, checkpoints move between grid shapes, a killed rank
stops every rank, and the run resumes."""

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.test_train import changed, config, image_folder  # noqa: F401  (image_folder: the session fixture of 24 images)
from vitclt.nn import Transcoder
from vitclt.training import train
from vitclt.training.checkpoint import read_state_meta
from vitclt.training.distributed import SplitHarvest

MODELS = ("clt:relu-topk", "plt:batch-topk", "sae:abs-topk", "clt:jumprelu")
STEPS = 60


def _config(backbone, folder, out, **overrides):
    # No decay, no λ ramp and no end-of-run L0 match (--sparsity-control fixed): the schedule then does not depend on
    # --steps, so a run stopped at step s and resumed with a larger --steps follows the uninterrupted run exactly.
    settings = dict(models=MODELS, steps=STEPS, batch_size=64, warmup_steps=4, decay_fraction=0.0, sparsity_ramp=0.0,
                    sparsity_control="fixed", checkpoint_every=5, log_every=5)
    return config(backbone, folder, out, **{**settings, **overrides})


def _argv(cfg, nproc: int, shards: int) -> list[str]:
    flags = ["--backbone", cfg.backbone, "--dataset", cfg.dataset, "--tokens", "all", "--models", *cfg.sweep.models, "--k", "8",
             "--sparsity-control", cfg.optim.sparsity_control,
             "--expansion", "4", "--steps", str(cfg.optim.steps), "--batch-size", "64", "--warmup-steps", "4",
             "--decay-fraction", "0", "--sparsity-ramp", "0", "--buffer-size", str(cfg.stream.buffer_size),
             "--norm-tokens", "400", "--images-per-forward", "24", "--workers", "1", "--checkpoint-every", "5",
             "--log-every", "5", "--threads", "1", "--device", "cpu", "--out", str(cfg.out), "--no-progress",
             "--feature-shards", str(shards)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "vitclt", "train", *flags, *(["--resume"] if cfg.resume else [])]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _torchrun(cfg, nproc: int, shards: int) -> str:
    proc = subprocess.run(_argv(cfg, nproc, shards), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _assert_same_run(a: Path, b: Path) -> None:
    for name in [f"{m.replace(':', '-')}/model.safetensors" for m in MODELS] + ["training_state.safetensors"]:
        got, want = load_file(a / name), load_file(b / name)
        assert got.keys() == want.keys(), name
        for key in want:
            if key.startswith("rng."):
                continue
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


def _workers(parent: int) -> dict[int, int]:
    """rank → pid of torchrun's worker processes (children of its agent, which is `parent`)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        ranks = [e[len(b"RANK="):] for e in env if e.startswith(b"RANK=")]
        if ppid == parent and ranks:
            out[int(ranks[0])] = int(entry.name)
    return out


@pytest.mark.slow
def test_torchrun_runs_equal_one_process_and_resume_at_another_grid_shape(tiny_clip_dir, image_folder, tmp_path):  # noqa: F811
    whole = _config(tiny_clip_dir, image_folder, tmp_path / "whole")
    train(whole)
    # 2 → 1: two feature shards for the first half, then one process.
    shards = _config(tiny_clip_dir, image_folder, tmp_path / "shards", steps=STEPS // 2)
    out = _torchrun(shards, 2, 2)
    assert out.count("layer      FVU") == len(MODELS), "the summary is printed once, by rank 0"
    assert read_state_meta(shards.out)["step"] == STEPS // 2
    train(changed(shards, steps=STEPS, resume=True))
    _assert_same_run(shards.out, whole.out)
    # 1 → 2: one process for the first half, then two data replicas of half the batch each.
    replicas = _config(tiny_clip_dir, image_folder, tmp_path / "replicas", steps=STEPS // 2)
    train(replicas)
    _torchrun(changed(replicas, steps=STEPS, resume=True), 2, 1)
    _assert_same_run(replicas.out, whole.out)
    # The sharded run's output is the ordinary transcoder directory.
    Transcoder.from_pretrained(shards.out / "clt-relu-topk")


def test_a_sharded_jumprelu_steered_to_its_l0_ends_as_one_process_does(tiny_clip_dir, image_folder, tmp_path):  # noqa: F811
    """The L0 controller reads the global L0 and the end-of-run L0 match takes its factors from the gathered model, so
    two feature shards end on the one-process weights, thresholds included."""
    settings = dict(models=("clt:jumprelu",), steps=20, sparsity_control="target-l0")
    whole = _config(tiny_clip_dir, image_folder, tmp_path / "whole", **settings)
    train(whole)
    shards = _config(tiny_clip_dir, image_folder, tmp_path / "shards", **settings)
    _torchrun(shards, 2, 2)
    for name in ("jumprelu/model.safetensors", "training_state.safetensors"):
        got, want = load_file(shards.out / name), load_file(whole.out / name)
        assert got.keys() == want.keys()
        for key in want:
            if not key.startswith("rng."):
                torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


@pytest.mark.slow
def test_sigkilled_rank_stops_every_rank_and_the_run_resumes(tiny_clip_dir, image_folder, tmp_path):  # noqa: F811
    killed = _config(tiny_clip_dir, image_folder, tmp_path / "killed", steps=100)
    proc = subprocess.Popen(_argv(killed, 2, 2), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (killed.out / "training_state.safetensors").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    workers = _workers(proc.pid)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGKILL)
    start = time.monotonic()
    output, _ = proc.communicate(timeout=30)
    assert time.monotonic() - start < 30
    assert proc.returncode != 0
    assert "rank      : 1" in output or "rank: 1" in output, output[-2000:]
    assert not _workers(proc.pid), "a rank outlived the run"
    meta = read_state_meta(killed.out)
    assert not meta["finished"] and 0 < meta["step"] < 100
    train(changed(killed, resume=True))
    assert not list(killed.out.rglob("*.tmp"))
    whole = _config(tiny_clip_dir, image_folder, tmp_path / "whole", steps=100)
    train(whole)
    _assert_same_run(killed.out, whole.out)


@pytest.mark.slow
def test_a_refusal_on_rank_0_stops_every_rank_with_its_message(tiny_clip_dir, image_folder, tmp_path):  # noqa: F811
    done = _config(tiny_clip_dir, image_folder, tmp_path / "done", steps=5)
    train(done)
    proc = subprocess.run(_argv(done, 2, 2), env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "already holds a finished run" in proc.stderr  # rank 0's own message
    assert "rank 0 stopped" in proc.stderr  # the other rank's, naming it


class _Rows:
    """A row source whose rows name their image (x = index, y = -index), recording what it loaded."""

    n_images, rows_per_image, n_layers, d_model, backbone_fingerprint = 10, 2, 1, 3, ""
    token_positions = torch.arange(2)

    def __init__(self):
        self.loaded = []

    def load(self, images):
        self.loaded += list(images)
        v_N = torch.tensor(list(images), dtype=torch.float32).repeat_interleave(2)
        return v_N[:, None, None].expand(-1, 1, 3).clone(), -v_N[:, None, None].expand(-1, 1, 3).clone()


def _harvest_worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    source = _Rows()
    x, y = SplitHarvest(source, torch.device("cpu")).load(range(7))
    want_x, want_y = _Rows().load(range(7))
    with open(f"{tmp}/rank{rank}.json", "w") as f:
        json.dump({"loaded": source.loaded, "equal": torch.equal(x, want_x) and torch.equal(y, want_y)}, f)
    dist.destroy_process_group()


def test_split_harvest_loads_each_share_once_and_gives_every_rank_the_whole_block(tmp_path):
    mp.spawn(_harvest_worker, args=(2, str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["loaded"] for g in got] == [[0, 1, 2], [3, 4, 5, 6]]
    assert all(g["equal"] for g in got)
