"""`TrainConfig`: every setting of a training run, which is also the `vitclt train` CLI and its saved record.

It is composed of groups, each the one owner of its settings and their checks: the models to
train (`SweepConfig`), the transcoder's own settings (`vitclt.nn.TranscoderConfig`), the optimiser
(`OptimConfig`), the activation stream (`StreamConfig`) and how the process runs
(`vitclt.runtime.RuntimeConfig`). On the command line every group's flags are flat (`--k`,
`--expansion`, `--lr`, `--buffer-size`, `--device`); in the saved JSON each group is a nested
object. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from tyro.conf import OmitArgPrefixes, Suppress

from vitclt.errors import VitcltError
from vitclt.io import jsonable
from vitclt.nn.config import SPARSIFIER_NAMES, TOPOLOGIES, SparsifierName, TokenSet, Topology, TranscoderConfig
from vitclt.runtime import RuntimeConfig


class TrainingError(VitcltError, RuntimeError):
    """Training cannot start or go on; the message says why and what to do."""


@dataclass
class SweepConfig:
    """Which transcoders a run trains: every --topology × --sparsifier × --k, or the --models pairs × --k."""

    topology: tuple[Topology, ...] = ("clt",)
    """One or more of clt (layer i writes to every layer j ≥ i), plt (only to i), sae (rebuilds each MLP output from itself)."""
    sparsifier: tuple[SparsifierName, ...] = ("relu-topk",)
    """One or more sparsifiers; each gets its own transcoder, all trained on the same stream."""
    models: tuple[str, ...] = ()
    """Explicit TOPOLOGY:SPARSIFIER pairs (e.g. clt:jumprelu plt:relu-topk) instead of every --topology × --sparsifier."""
    k: tuple[int, ...] = (32,)
    """Active features per row and layer (L0) of every sparsifier (JumpReLU: the L0 its λ is steered to); one model per value."""

    def pairs(self) -> list[tuple[str, str]]:
        """(topology, sparsifier) of every model, in order."""
        if self.models:
            return [tuple(m.split(":", 1)) for m in self.models]  # type: ignore[misc]
        topologies = (self.topology,) if isinstance(self.topology, str) else tuple(self.topology)
        return [(t, s) for t in topologies for s in self.sparsifier]

    def validate(self) -> None:
        """Raise `TrainingError` naming the first bad setting (each transcoder's own checks follow in `transcoder_configs`)."""
        if isinstance(self.topology, str):
            self.topology = (self.topology,)
        if not self.topology:
            raise TrainingError(f"--topology needs at least one of {', '.join(TOPOLOGIES)}")
        if not self.sparsifier:
            raise TrainingError(f"--sparsifier needs at least one of {', '.join(SPARSIFIER_NAMES)}")
        if not self.k:
            raise TrainingError("--k needs at least one value")
        for model in self.models:
            topology, _, sparsifier = model.partition(":")
            if topology not in TOPOLOGIES or sparsifier not in SPARSIFIER_NAMES:
                raise TrainingError(f"--models entry {model!r} is not TOPOLOGY:SPARSIFIER, e.g. clt:relu-topk or sae:jumprelu")
        for name in ("topology", "sparsifier", "k", "models"):
            values = list(getattr(self, name))
            if len(set(values)) != len(values):
                raise TrainingError(f"--{name} lists a value twice: {values}")


def default_warmup(steps: int) -> int:
    """The warmup when --warmup-steps is not given: 1000 steps, or a tenth of the run if that is less."""
    return min(1000, steps // 10)


@dataclass
class OptimConfig:
    """The optimiser and its schedules."""

    steps: int = 10_000
    """Optimiser steps."""
    batch_size: int = 4096
    """Token rows per optimiser step."""
    lr: float | None = None
    """Adam learning rate (default: 2e-4 / sqrt(features / 2^14))."""
    warmup_steps: int | None = None
    """Steps of linear learning-rate warmup from 0, at most --steps (default: 1000, or a tenth of --steps if that is less)."""
    decay_fraction: float = 0.2
    """Final fraction of the steps over which the learning rate decays linearly to 0."""
    sparsity_ramp: float = 1.0
    """--sparsity-control fixed: fraction of the steps over which JumpReLU's λ ramps from 0 to --sparsity-coefficient."""
    sparsity_control: Literal["target-l0", "fixed"] = "target-l0"
    """JumpReLU's λ: target-l0 steers it per layer so L0 ends at --k; fixed ramps it to --sparsity-coefficient."""
    sparsity_control_rate: float = 0.5
    """target-l0: change of λ per step, in units of --sparsity-coefficient, at a relative L0 error of 1 (clipped to ±1)."""

    @property
    def warmup(self) -> int:
        """The warmup steps in effect."""
        return default_warmup(self.steps) if self.warmup_steps is None else self.warmup_steps

    def validate(self) -> None:
        """Raise `TrainingError` naming the first bad setting."""
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise TrainingError(f"--warmup-steps cannot be negative, got {self.warmup}")
        if self.warmup > self.steps:
            raise TrainingError(f"--warmup-steps {self.warmup} is more than --steps {self.steps}, so the learning rate would "
                                f"never reach its peak: pass --warmup-steps {self.steps // 10} (a tenth of the run) or fewer")
        if not self.sparsity_control_rate > 0:
            raise TrainingError(f"--sparsity-control-rate must be positive, got {self.sparsity_control_rate}")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.sparsity_ramp <= 1:
            raise TrainingError("--decay-fraction and --sparsity-ramp are fractions of the run: use values in [0, 1]")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"--lr must be a positive number, got {self.lr}")


@dataclass
class StreamConfig:
    """The activation stream: shuffle buffer, normalisation sample and optional disk cache."""

    buffer_size: int = 2**17
    """Token rows held in the shuffle buffer on the training device; batches mix the images it holds."""
    norm_tokens: int = 2**16
    """Token rows sampled to estimate the normalisation statistics."""
    cache_dir: Path | None = None
    """Read activations from this disk cache, building it first if it does not exist."""
    cache_dtype: Literal["float16", "float32"] = "float16"
    """Storage type of a new disk cache."""

    def validate(self) -> None:
        """Raise `TrainingError` naming the first bad setting."""
        for name in ("buffer_size", "norm_tokens"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    """`vitclt train`: train transcoders on a backbone's MLPs from streamed activations."""

    backbone: str = "demo"
    """Backbone: a hub id (openai/clip-vit-base-patch32), a local CLIPModel directory, or `demo`."""
    dataset: str = "demo"
    """Dataset spec, e.g. cifar100:/data/cifar-100-python, imagenet100:/data/imagenet, coco:/data/coco, folder:DIR."""
    split: str = "train"
    """Dataset split to train on: train, test (= val), or all (the whole of a folder: dataset without split folders)."""
    max_images: int | None = None
    """Train on a class-stratified subset of this many images (quick runs)."""
    tokens: TokenSet = "all"
    """Tokens whose activations are rows: cls, patches or all."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Backbone, buffer and autocast type (auto: bfloat16 on CUDA, float32 on CPU); weights stay float32."""

    # Groups: on the command line their flags are flat (--lr, not --optim.lr).
    sweep: Annotated[SweepConfig, OmitArgPrefixes] = field(default_factory=SweepConfig)
    """The transcoders to train."""
    transcoder: Annotated[TranscoderConfig, OmitArgPrefixes] = field(default_factory=TranscoderConfig)
    """Settings every trained transcoder shares (the fields the run fills in itself stay at their defaults)."""
    optim: Annotated[OptimConfig, OmitArgPrefixes] = field(default_factory=OptimConfig)
    """Optimiser and schedules."""
    stream: Annotated[StreamConfig, OmitArgPrefixes] = field(default_factory=StreamConfig)
    """Activation stream."""
    runtime: Annotated[RuntimeConfig, OmitArgPrefixes] = field(default_factory=RuntimeConfig)
    """Device, threads, image decoding, seed, progress bars."""

    out: Path = Path("runs/train")
    """Run directory; each transcoder is written to a subdirectory named after it."""
    checkpoint_every: int = 1000
    """Write a checkpoint every this many steps (and at the end)."""
    log_every: int = 25
    """Update the progress bar (and TensorBoard) every this many steps."""
    resume: bool = False
    """Continue the run in --out from its last checkpoint (starts afresh if it has none)."""
    overwrite: bool = False
    """Delete the run in --out (its own files only, and only a run of this command) and start over."""
    tensorboard: bool = False
    """Log to OUT/tb (needs the tensorboard package)."""
    feature_shards: int = 1
    """Under torchrun: split every layer's features over this many processes (the rest are data replicas; docs/distributed.md)."""

    def validate(self) -> None:
        """Raise `TrainingError` naming the first bad setting; every group checks its own."""
        self.sweep.validate()
        self.optim.validate()
        self.stream.validate()
        try:
            self.runtime.validate()
        except VitcltError as err:
            raise TrainingError(str(err)) from None
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        defaults = TranscoderConfig()
        for name in run_filled_fields():
            if getattr(self.transcoder, name) != getattr(defaults, name):
                raise TrainingError(f"TrainConfig.transcoder.{name} is filled in by the run for each transcoder: leave it at "
                                    "its default and set the sweep (--topology, --sparsifier, --models, --k) or the run's "
                                    "--backbone / --tokens instead")
        if self.feature_shards < 1:
            raise TrainingError(f"--feature-shards must be at least 1, got {self.feature_shards}")
        if self.resume and self.overwrite:
            raise TrainingError("--resume and --overwrite contradict each other: pick one")

    def to_json(self) -> dict:
        """A JSON-ready dict of the settings, one nested object per group.

        The transcoder fields a run fills in (shape, topology, sparsifier, k, backbone) are left out:
        here they would only be unused defaults; the run records each transcoder's real ones.
        """
        raw = jsonable(dataclasses.asdict(self))
        for name in run_filled_fields():
            raw["transcoder"].pop(name, None)
        return raw

    @classmethod
    def from_json(cls, raw: dict) -> TrainConfig:
        """Inverse of `to_json`; also reads the flat configs vitclt 0.1 saved."""
        return _from_dict(cls, raw)


def _from_dict(cls: type, raw: dict) -> Any:
    """Build dataclass `cls` from a (possibly flat) dict: groups from their nested object, else from the top level."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        kind = typing.get_origin(hints[f.name]) or hints[f.name]
        if dataclasses.is_dataclass(kind):
            if isinstance(raw.get(f.name), dict):
                values[f.name] = _from_dict(kind, raw[f.name])
            else:  # a flat config: the group's settings are top-level keys (the run-filled ones belong elsewhere)
                filled = run_filled_fields() if kind is TranscoderConfig else ()
                values[f.name] = _from_dict(kind, {k: v for k, v in raw.items() if k not in filled})
        elif f.name in raw:
            value = raw[f.name]
            if isinstance(value, list) or (kind is tuple and isinstance(value, str)):
                value = tuple(value) if isinstance(value, list) else (value,)
            elif value is not None and Path in typing.get_args(hints[f.name]) + (hints[f.name],):
                value = Path(value)
            values[f.name] = value
    return cls(**values)


def run_filled_fields() -> tuple[str, ...]:
    """The `TranscoderConfig` fields a training run fills in itself (hidden from the command line)."""
    hints = typing.get_type_hints(TranscoderConfig, include_extras=True)
    return tuple(name for name, hint in hints.items() if _SUPPRESS in getattr(hint, "__metadata__", ()))


_SUPPRESS = typing.get_args(Suppress[int])[1]
"""tyro's marker of a field hidden from the command line."""


def flat_settings(saved: dict, steps: int | None = None) -> dict[str, Any]:
    """A saved TrainConfig (nested or flat) as {flag name: value}, with the warmup in effect.

    Flag names are unique across the groups (the flags are flat), so they name a setting alone.
    The transcoder fields a run fills in itself are not settings and are left out. A default
    warmup is resolved against `steps` when given (a resume may change --steps), else the saved steps.
    """
    filled = set(run_filled_fields())
    out: dict[str, Any] = {}
    for key, value in saved.items():
        if isinstance(value, dict):
            out.update({k: v for k, v in value.items() if not (key == "transcoder" and k in filled)})
        else:
            out[key] = value
    steps = out.get("steps") if steps is None else steps
    if out.get("warmup_steps") is None and isinstance(steps, int):
        out["warmup_steps"] = default_warmup(steps)
    return out


RESUMABLE = frozenset({"steps", "threads", "device", "workers", "cache_dir", "cache_dtype", "out", "checkpoint_every",
                       "log_every", "resume", "overwrite", "tensorboard", "progress", "feature_shards"})
"""Settings (flag names) a resumed run may change; any other difference is refused. A new --steps
recomputes the schedule for the new total, so only an unchanged one reproduces the uninterrupted run."""


def transcoder_configs(cfg: TrainConfig, n_layers: int, d_model: int, backbone: str | None = None,
                       fingerprint: str = "") -> dict[str, TranscoderConfig]:
    """The transcoders a run trains, by subdirectory name, each checked by `TranscoderConfig.validate`.

    One per (topology, sparsifier, k), from `--models` or else every `--topology` × `--sparsifier`;
    under `--sparsity-control fixed` JumpReLU's L0 is not set by k, so it gets one. Names are the
    sparsifier, with `-k{k}` appended when several values of k are swept, prefixed by `{topology}-`
    when several topologies are. `fingerprint` is the backbone's `Backbone.fingerprint`, recorded so
    that evaluation can refuse other weights.
    """
    pairs = cfg.sweep.pairs()
    ks = cfg.sweep.k
    topologies = sorted({t for t, _ in pairs})
    out: dict[str, TranscoderConfig] = {}
    for topology, sparsifier in pairs:
        one = sparsifier == "jumprelu" and cfg.optim.sparsity_control == "fixed"
        for k in ks[:1] if one else ks:
            name = sparsifier if len(ks) == 1 or one else f"{sparsifier}-k{k}"
            name = f"{topology}-{name}" if len(topologies) > 1 else name
            tcfg = dataclasses.replace(cfg.transcoder, n_layers=n_layers, d_model=d_model, topology=topology,
                                       sparsifier=sparsifier, k=k, backbone=cfg.backbone if backbone is None else backbone,
                                       backbone_fingerprint=fingerprint, tokens=cfg.tokens)
            try:
                tcfg.validate()
            except VitcltError as err:
                raise TrainingError(f"transcoder {name!r}: {err}") from None
            if not 1 <= k <= tcfg.features:
                raise TrainingError(f"transcoder {name!r}: --k {k} must be between 1 and the {tcfg.features} features per "
                                    "layer: change --k, or raise --expansion")
            out[name] = tcfg
    return out


def default_lr(n_features: int) -> float:
    """Adam learning rate scaled down for wide dictionaries (the 1/√width rule sparsify uses)."""
    return 2e-4 / math.sqrt(n_features / 2**14)
