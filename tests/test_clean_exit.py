"""A run stops and joins its background work (prefetch thread, image workers) on every exit path, and exits 0."""

import multiprocessing
import os
import subprocess
import sys
import threading

import pytest

from tests.conftest import write_image_folder
from tests.test_train import config
from vitclt.backbones import load_backbone
from vitclt.data.batches import ImageLoader
from vitclt.data.datasets import load_dataset
from vitclt.data.stream import BackboneSource
from vitclt.training import train
from vitclt.training.trainer import Trainer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """24 random PNGs in two classes under train/: 6 blocks of 4 images with the buffer below, so the stream prefetches."""
    root = tmp_path_factory.mktemp("exit_images")
    write_image_folder(root / "train", ["a", "b"], per_class=12, seed=3)
    return root


def background_work() -> list[str]:
    """The prefetch threads and worker processes still running in this process."""
    threads = [t.name for t in threading.enumerate() if t.name == "vitclt-prefetch" and t.is_alive()]
    return threads + [f"worker pid {p.pid}" for p in multiprocessing.active_children()]


def small_run(backbone, folder, out):
    """A 6-step run whose stream prefetches its next 4-image block in 2 worker processes after each block."""
    cfg = config(backbone, folder, out, steps=6, batch_size=64, warmup_steps=0, buffer_size=68, images_per_forward=2,
                 workers=2, checkpoint_every=6)
    # The caller's own source: it outlives the run, so whatever the run leaves running stays visible here.
    source = BackboneSource(load_backbone(backbone), load_dataset(cfg.dataset, "train"), "all", 2, workers=2)
    return cfg, source


def test_a_finished_run_leaves_no_thread_or_worker_running(tiny_clip_dir, folder, tmp_path):
    cfg, source = small_run(tiny_clip_dir, folder, tmp_path / "run")
    train(cfg, source)
    assert background_work() == []
    assert source.load([0, 1])[0].shape[0] == 2 * source.rows_per_image  # a closed source still loads (workers restart)
    source.close()
    assert background_work() == []


def test_an_interrupted_run_leaves_no_thread_or_worker_running(tiny_clip_dir, folder, tmp_path, monkeypatch):
    step = Trainer.train_step

    def interrupted(self, batch):
        if self.step == 3:  # mid-run, after the stream has started prefetching its next block
            raise KeyboardInterrupt
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    cfg, source = small_run(tiny_clip_dir, folder, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, source)
    assert background_work() == []


def test_closing_a_loader_mid_prefetch_joins_its_thread_and_workers(folder):
    loader = ImageLoader(load_dataset(f"folder:{folder}", "train"), workers=2)
    loader.prefetch([[i] for i in range(24)])
    loader.close()
    assert background_work() == []
    assert [len(b.items) for b in loader.batches([[0, 1], [2]])] == [2, 1]  # usable again after close
    loader.close()
    loader.close()  # twice is harmless
    assert background_work() == []


@pytest.mark.slow
def test_train_command_exits_0_every_time(tiny_clip_dir, folder, tmp_path):
    # The abort at exit ("terminate called without an active exception", exit 134) came from a prefetch
    # thread still inside torch while Python shut down; it struck about one run in five.
    argv = [sys.executable, "-m", "vitclt.cli", "train", "--backbone", str(tiny_clip_dir), "--dataset", f"folder:{folder}",
            "--k", "8", "--expansion", "4", "--steps", "6", "--batch-size", "64", "--warmup-steps", "0",
            "--buffer-size", "68", "--norm-tokens", "400", "--images-per-forward", "2", "--workers", "2",
            "--threads", "1", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for run in range(5):
        proc = subprocess.run([*argv, "--out", str(tmp_path / f"run{run}")], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"run {run} exited {proc.returncode}: {proc.stderr[-2000:]}"
        assert "mean" in proc.stdout  # it finished and printed its table
