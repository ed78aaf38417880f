"""`vitclt reproduce`: the paper's study in one command, from training to the combined report.

Trains the paper's three sparsifiers as CLTs (JumpReLU, ReLU-TopK, Abs-TopK) and, as baselines,
a per-layer transcoder (PLT) and an SAE with ReLU-TopK (the paper's replacement sparsifier; more
with --baseline-sparsifiers), all at the same k (so matched L0 for the TopK family), in ONE training
run on a single activation stream, so the backbone runs once per training image for every model.
Then `vitclt eval` runs on all of them and writes the combined report.

    OUT/train/clt-{jumprelu,relu-topk,abs-topk}/, OUT/train/{plt,sae}-relu-topk/   config.json + model.safetensors (+ training.json)
    OUT/eval/metrics.json, OUT/eval/figures/*.png, OUT/eval/report.html
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vitclt.eval.suite import EvalConfig
from vitclt.eval.suite import run as run_eval
from vitclt.runtime import setup

SPARSIFIERS = ("jumprelu", "relu-topk", "abs-topk")
"""The paper's three sparsifiers."""


@dataclass
class ReproduceConfig:
    """`vitclt reproduce`: train JumpReLU / ReLU-TopK / Abs-TopK CLTs plus PLT and SAE baselines, evaluate all, report."""

    backbone: str = "demo"
    """Backbone: a hub id (openai/clip-vit-base-patch32), a local CLIPModel directory, or `demo`."""
    dataset: str = "demo"
    """Dataset spec for training and evaluation, e.g. cifar100:/data/cifar-100-python."""
    train_split: str = "train"
    """Split the transcoders are trained on."""
    eval_split: str = "test"
    """Held-out split they are evaluated on."""
    out: Path = Path("runs/reproduce")
    """Output directory (OUT/train, OUT/eval)."""
    max_images: int | None = None
    """Train on a class-stratified subset of this many images (quick runs)."""
    eval_images: int | None = None
    """Evaluate on a class-stratified subset of this many images (quick runs)."""
    steps: int = 10_000
    """Optimiser steps per transcoder."""
    batch_size: int = 4096
    """Tokens per training step."""
    warmup_steps: int | None = None
    """Learning-rate warmup steps (default: 1000, or a tenth of --steps if that is less)."""
    k: int = 32
    """Active features per token and layer for every TopK model (CLTs, PLT, SAE alike)."""
    expansion: int = 8
    """Features per layer as a multiple of the backbone width."""
    sparsity_coefficient: float = 1e-3
    """JumpReLU's L0 penalty λ."""
    tokens: Literal["cls", "patches", "all"] = "all"
    """Tokens the transcoders are trained on."""
    baselines: bool = True
    """Also train the PLT and SAE baselines on the same stream."""
    baseline_sparsifiers: tuple[Literal["jumprelu", "relu-topk", "abs-topk", "batch-topk"], ...] = ("relu-topk",)
    """Sparsifiers of the PLT and SAE baselines (one PLT and one SAE each)."""
    cache_dir: Path | None = None
    """Keep the training activations in this disk cache (built on first use, reused by later runs)."""
    eval_batch_size: int = 64
    """Images per backbone forward during evaluation."""
    seeds: int = 5
    """Seeds for the faithfulness random controls."""
    resume: bool = False
    """Resume unfinished training runs in OUT/train."""
    overwrite: bool = False
    """Delete earlier training runs in OUT/train and start over."""
    device: str = "auto"
    """cpu, cuda, cuda:1, or auto (CUDA when available)."""
    threads: int = 0
    """Torch CPU threads (0: torch's default)."""
    workers: int = 2
    """Threads decoding images for training."""
    seed: int = 0
    """Seed for data order, initial weights, subsets and controls."""
    progress: bool = True
    """Show progress bars."""


def models(cfg: ReproduceConfig) -> tuple[str, ...]:
    """TOPOLOGY:SPARSIFIER for every model the study trains."""
    baselines = [f"{t}:{s}" for t in ("plt", "sae") for s in cfg.baseline_sparsifiers] if cfg.baselines else []
    return tuple([f"clt:{s}" for s in SPARSIFIERS] + baselines)


def train_config(cfg: ReproduceConfig):
    """The one training run: the three CLTs and the baselines, on one activation stream."""
    from vitclt.training import TrainConfig

    return TrainConfig(
        backbone=cfg.backbone, dataset=cfg.dataset, split=cfg.train_split, max_images=cfg.max_images, tokens=cfg.tokens,
        models=models(cfg), k=(cfg.k,),
        expansion=cfg.expansion, sparsity_coefficient=cfg.sparsity_coefficient, steps=cfg.steps, batch_size=cfg.batch_size,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, cfg.steps // 10),
        cache_dir=cfg.cache_dir, seed=cfg.seed, threads=cfg.threads, device=cfg.device, workers=cfg.workers,
        resume=cfg.resume, overwrite=cfg.overwrite, progress=cfg.progress, out=cfg.out / "train",
    )


def run(cfg: ReproduceConfig) -> Path:
    """Run `vitclt reproduce`: train, evaluate, write the combined report; return its path."""
    from vitclt.training import train

    setup(cfg.threads, cfg.seed, cfg.device)
    tcfg = train_config(cfg)
    print(f"training {len(tcfg.models)} models ({', '.join(tcfg.models)}; k={cfg.k}, {cfg.steps} steps) on one activation stream")
    train(tcfg)
    eval_cfg = EvalConfig(
        run_dir=tcfg.out, dataset=cfg.dataset, split=cfg.eval_split, backbone=cfg.backbone,
        eval_images=cfg.eval_images, batch_size=cfg.eval_batch_size, seeds=cfg.seeds, out=cfg.out / "eval",
        device=cfg.device, threads=cfg.threads, seed=cfg.seed, progress=cfg.progress,
    )
    context = {"reproduce": dataclasses.asdict(cfg), "train": tcfg.to_json()}
    return run_eval(eval_cfg, context=context)
