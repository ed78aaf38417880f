"""`vitclt demo`: the main job, end to end on the embedded default, with no network and no GPU.

It loads the small CLIP shipped in `vitclt/demo/weights`, streams its activations over the
generated world, trains the paper's three CLTs (JumpReLU, ReLU-TopK, Abs-TopK) and the PLT and SAE
baselines on one stream, runs the whole evaluation, and writes the report. It is `vitclt reproduce`
with sizes chosen to finish in a few minutes on 2 CPU cores; `--quick` is a smaller setting for CI.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from vitclt.eval.reproduce import ReproduceConfig
from vitclt.eval.reproduce import run as run_reproduce


@dataclass
class DemoConfig:
    """`vitclt demo`: train and evaluate CLTs on the embedded CLIP and its world, then write the report."""

    out: Path = Path("runs/demo")
    """Output directory (OUT/train holds the transcoders, OUT/eval the report)."""
    quick: bool = False
    """A much smaller run (fewer images and steps) for CI and smoke tests."""
    backbone: str = "demo"
    """Backbone to use instead of the embedded one (any `--backbone` spec)."""
    dataset: str = "demo"
    """Dataset spec to use instead of the generated world."""
    train_images: int | None = None
    """Training images (default: 2000, quick: 400)."""
    steps: int | None = None
    """Optimiser steps per transcoder (default: 400, quick: 100)."""
    eval_images: int | None = None
    """Evaluation images (default: 800, quick: 160)."""
    k: int = 16
    """Active features per token and layer for the TopK models."""
    expansion: int = 8
    """Features per layer as a multiple of the backbone width."""
    batch_size: int = 1024
    """Tokens per training step."""
    seeds: int | None = None
    """Seeds for the faithfulness random controls (default: 5, quick: 2)."""
    threads: int = 1
    """Torch CPU threads: on small shared CPUs one thread is often the fastest."""
    device: str = "auto"
    """cpu, cuda, or auto (CUDA when available)."""
    seed: int = 0
    """Seed for data order, initial weights, subsets and controls."""
    overwrite: bool = True
    """Replace an earlier demo run in --out."""
    progress: bool = True
    """Show progress bars."""


def reproduce_config(cfg: DemoConfig) -> ReproduceConfig:
    """The `vitclt reproduce` settings the demo runs."""

    def pick(value, full, quick):
        return value if value is not None else (quick if cfg.quick else full)

    return ReproduceConfig(
        backbone=cfg.backbone, dataset=cfg.dataset, out=cfg.out,
        max_images=pick(cfg.train_images, 2000, 400), steps=pick(cfg.steps, 400, 100),
        eval_images=pick(cfg.eval_images, 800, 160), seeds=pick(cfg.seeds, 5, 2),
        batch_size=cfg.batch_size, k=cfg.k, expansion=cfg.expansion, threads=cfg.threads, workers=1,
        device=cfg.device, seed=cfg.seed, overwrite=cfg.overwrite, progress=cfg.progress,
    )


def run(cfg: DemoConfig) -> Path:
    """Run the demo and return the report's path."""
    start = time.perf_counter()
    report = run_reproduce(reproduce_config(cfg))
    print(f"demo finished in {time.perf_counter() - start:.0f} s; open the report: {report}")
    return report
