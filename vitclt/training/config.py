"""`TrainConfig`: every setting of a training run, which is also the `vitclt train` CLI and its saved record."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vitclt.nn import TranscoderConfig
from vitclt.errors import VitcltError

SparsifierName = Literal["jumprelu", "relu-topk", "abs-topk", "batch-topk"]


class TrainingError(VitcltError, RuntimeError):
    """Training cannot start or go on; the message says why and what to do."""


@dataclass
class TrainConfig:
    """`vitclt train`: train transcoders on a backbone's MLPs from streamed activations."""

    backbone: str = "demo"
    """Backbone: a hub id (openai/clip-vit-base-patch32), a local CLIPModel directory, or `demo`."""
    dataset: str = "demo"
    """Dataset spec, e.g. cifar100:/data/cifar-100-python, imagenet100:/data/imagenet, coco:/data/coco, folder:DIR."""
    split: str = "train"
    """Dataset split to train on: train, or test (= val)."""
    max_images: int | None = None
    """Train on a class-stratified subset of this many images (quick runs)."""
    tokens: Literal["cls", "patches", "all"] = "all"
    """Tokens whose activations are rows: cls, patches or all."""

    topology: tuple[Literal["clt", "plt", "sae"], ...] = ("clt",)
    """One or more of clt (layer i writes to every layer j ≥ i), plt (only to i), sae (rebuilds each MLP output from itself); all share the stream."""
    sparsifier: tuple[SparsifierName, ...] = ("relu-topk",)
    """One or more sparsifiers; each gets its own transcoder, all trained on the same stream."""
    models: tuple[str, ...] = ()
    """Explicit TOPOLOGY:SPARSIFIER pairs (e.g. clt:jumprelu plt:relu-topk) instead of every --topology × --sparsifier."""
    k: tuple[int, ...] = (32,)
    """Active features per row and layer for the TopK sparsifiers; several values train one transcoder each."""
    expansion: int = 8
    """Features per layer as a multiple of the backbone width (unless --n-features is set)."""
    n_features: int = 0
    """Features per layer (0: expansion × width)."""
    sparsity_coefficient: float = 1e-3
    """JumpReLU L0 penalty λ reached at the end of the ramp (see --sparsity-ramp)."""
    jumprelu_bandwidth: float = 0.1
    """JumpReLU straight-through kernel width ε, in normalised units."""
    auxk_k: int = 0
    """Dead features per row and layer used by AuxK (0: width // 2)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss on dead features (TopK sparsifiers)."""
    dead_tokens: int = 10_000_000
    """A feature that has not fired for this many training tokens counts as dead."""

    steps: int = 10_000
    """Optimiser steps."""
    batch_size: int = 4096
    """Tokens (rows) per step."""
    lr: float | None = None
    """Adam learning rate (default: 2e-4 / sqrt(features / 2^14))."""
    warmup_steps: int = 1000
    """Steps of linear learning-rate warmup from 0."""
    decay_fraction: float = 0.2
    """Final fraction of the steps over which the learning rate decays linearly to 0."""
    sparsity_ramp: float = 1.0
    """Fraction of the steps over which JumpReLU's λ ramps linearly from 0 to --sparsity-coefficient."""

    images_per_forward: int = 64
    """Images per backbone forward pass."""
    buffer_size: int = 2**17
    """Tokens held in the shuffle buffer on the training device; batches mix the images it holds."""
    norm_tokens: int = 2**16
    """Tokens sampled to estimate the normalisation statistics."""
    workers: int = 2
    """Threads decoding and preprocessing images ahead of the backbone."""
    cache_dir: Path | None = None
    """Read activations from this disk cache, building it first if it does not exist."""
    cache_dtype: Literal["float16", "float32"] = "float16"
    """Storage type of a new disk cache."""

    seed: int = 0
    """Seed for the image order, the shuffle, the normalisation sample and the initial weights."""
    threads: int = 0
    """Torch CPU threads (0: torch's default)."""
    device: str = "auto"
    """cpu, cuda, cuda:1, or auto (CUDA when available)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Backbone, buffer and autocast type (auto: bfloat16 on CUDA, float32 on CPU); weights stay float32."""

    out: Path = Path("runs/train")
    """Run directory; each transcoder is written to a subdirectory named after it."""
    checkpoint_every: int = 1000
    """Write a checkpoint every this many steps (and at the end)."""
    log_every: int = 25
    """Update the progress bar (and TensorBoard) every this many steps."""
    resume: bool = False
    """Continue the run in --out from its last checkpoint (starts afresh if it has none)."""
    overwrite: bool = False
    """Delete the run in --out (its own files only) and start over."""
    tensorboard: bool = False
    """Log to OUT/tb (needs the tensorboard package)."""
    progress: bool = True
    """Show progress bars."""

    def validate(self) -> None:
        """Raise `TrainingError` naming the first bad setting."""
        positive = ("steps", "batch_size", "images_per_forward", "buffer_size", "norm_tokens", "checkpoint_every",
                    "log_every", "expansion", "dead_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.sparsifier:
            raise TrainingError("--sparsifier needs at least one of jumprelu, relu-topk, abs-topk, batch-topk")
        if not self.k or any(k < 1 for k in self.k):
            raise TrainingError(f"--k needs positive values, got {list(self.k)}")
        if isinstance(self.topology, str):
            self.topology = (self.topology,)
        for model in self.models:
            topology, _, sparsifier = model.partition(":")
            if topology not in ("clt", "plt", "sae") or sparsifier not in ("jumprelu", "relu-topk", "abs-topk", "batch-topk"):
                raise TrainingError(f"--models entry {model!r} is not TOPOLOGY:SPARSIFIER, e.g. clt:relu-topk or sae:jumprelu")
        if not self.topology:
            raise TrainingError("--topology needs at least one of clt, plt, sae")
        for name in ("topology", "sparsifier", "k", "models"):
            values = list(getattr(self, name))
            if len(set(values)) != len(values):
                raise TrainingError(f"--{name} lists a value twice: {values}")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.sparsity_ramp <= 1:
            raise TrainingError("--decay-fraction and --sparsity-ramp are fractions of the run: use values in [0, 1]")
        if self.warmup_steps < 0 or self.seed < 0 or self.n_features < 0 or self.threads < 0:
            raise TrainingError("--warmup-steps, --seed, --n-features and --threads cannot be negative")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"--lr must be a positive number, got {self.lr}")
        if self.resume and self.overwrite:
            raise TrainingError("--resume and --overwrite contradict each other: pick one")

    def to_json(self) -> dict:
        """A JSON-ready dict of the settings."""
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, raw: dict) -> TrainConfig:
        """Inverse of `to_json`."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        for name in ("topology", "sparsifier", "k", "models"):
            if isinstance(values.get(name), str):
                values[name] = [values[name]]
            if name in values:
                values[name] = tuple(values[name])
        for name in ("out", "cache_dir"):
            if values.get(name) is not None:
                values[name] = Path(values[name])
        return cls(**values)


RESUMABLE = frozenset({"steps", "threads", "device", "workers", "cache_dir", "cache_dtype", "out", "checkpoint_every",
                       "log_every", "resume", "overwrite", "tensorboard", "progress"})
"""Settings a resumed run may change; any other difference is refused. A new --steps recomputes the
schedule for the new total, so only an unchanged one reproduces the uninterrupted run."""


def transcoder_configs(cfg: TrainConfig, n_layers: int, d_model: int, backbone: str | None = None) -> dict[str, TranscoderConfig]:
    """The transcoders a run trains, by subdirectory name.

    One per (topology, sparsifier, k), from `--models` or else every `--topology` × `--sparsifier`;
    JumpReLU ignores k, so it gets one. Names are the sparsifier, with `-k{k}` appended when several
    values of k are swept, prefixed by `{topology}-` when several topologies are.
    """
    if cfg.models:
        pairs = [tuple(m.split(":", 1)) for m in cfg.models]
    else:
        topologies = (cfg.topology,) if isinstance(cfg.topology, str) else tuple(cfg.topology)
        pairs = [(t, s) for t in topologies for s in cfg.sparsifier]
    topologies = sorted({t for t, _ in pairs})
    out: dict[str, TranscoderConfig] = {}
    for topology, sparsifier in pairs:
        for k in cfg.k[:1] if sparsifier == "jumprelu" else cfg.k:
            name = sparsifier if len(cfg.k) == 1 or sparsifier == "jumprelu" else f"{sparsifier}-k{k}"
            name = f"{topology}-{name}" if len(topologies) > 1 else name
            features = cfg.n_features or cfg.expansion * d_model
            if sparsifier != "jumprelu" and k > features:
                raise TrainingError(f"--k {k} exceeds the {features} features per layer: lower --k or raise --expansion")
            out[name] = TranscoderConfig(
                n_layers=n_layers, d_model=d_model, n_features=cfg.n_features, expansion=cfg.expansion,
                topology=topology, sparsifier=sparsifier, k=k, jumprelu_bandwidth=cfg.jumprelu_bandwidth,
                sparsity_coefficient=cfg.sparsity_coefficient, auxk_k=cfg.auxk_k, auxk_alpha=cfg.auxk_alpha,
                dead_tokens=cfg.dead_tokens, backbone=cfg.backbone if backbone is None else backbone, tokens=cfg.tokens,
            )
    return out


def default_lr(n_features: int) -> float:
    """Adam learning rate scaled down for wide dictionaries (the 1/√width rule sparsify uses)."""
    return 2e-4 / math.sqrt(n_features / 2**14)
