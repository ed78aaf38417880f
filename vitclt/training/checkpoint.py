"""The run directory: what a training run writes, how a checkpoint is made atomic, and resume.

    OUT/run.json                      the command that made the run, the TrainConfig and the transcoders' configs
    OUT/training_state.safetensors    everything resume needs, for every transcoder (see `save_state`)
    OUT/<name>/config.json            the transcoder's config (Transcoder.save_pretrained)
    OUT/<name>/model.safetensors      its weights, normalisation folded in
    OUT/<name>/training.json          the TrainConfig, the step and the latest per-layer training metrics
    OUT/tb/<name>/                    TensorBoard events (with --tensorboard)

Every file is written to a temporary file and renamed over the old one, and the training state is a
single file, so a kill at any moment leaves the last complete state: resume reads only
training_state.safetensors, whose tensors (unfolded weights, optimiser moments, steps-since-fired
counters, normalisation statistics, RNG states) are safetensors and whose scalars (step, stream
position, configs) are JSON in its metadata. Nothing is pickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from vitclt.io import write_json, write_safetensors
from vitclt.training.config import RESUMABLE, TrainConfig, TrainingError, flat_settings

RUN_FILE = "run.json"
STATE_FILE = "training_state.safetensors"
TRAINING_FILE = "training.json"
STATE_VERSION = 1
META_KEY = "vitclt_training_state"


def save_state(out: Path, tensors: dict[str, Tensor], meta: dict) -> Path:
    """Write the training state atomically: `tensors` as safetensors, `meta` as JSON in its header."""
    return write_safetensors(out / STATE_FILE, tensors, metadata={META_KEY: json.dumps({"version": STATE_VERSION, **meta})})


def read_state_meta(out: Path) -> dict | None:
    """The JSON part of a run's training state, or None if it has none."""
    path = out / STATE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
    except (KeyError, ValueError, OSError) as err:
        raise TrainingError(f"{path} is not a vitclt training state ({err}): move it away, or pass --overwrite") from None
    if meta.get("version") != STATE_VERSION:
        raise TrainingError(f"{path} has state version {meta.get('version')}, this vitclt reads {STATE_VERSION}")
    return meta


def load_state_tensors(out: Path, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The tensor part of a run's training state."""
    return load_file(str(out / STATE_FILE), device=str(device))


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, Tensor]:
    """An optimiser's per-parameter state as flat named tensors (hyper-parameters are re-derived on resume)."""
    return {f"{prefix}.{i}.{key}": value for i, state in opt.state_dict()["state"].items()
            for key, value in state.items() if isinstance(value, Tensor)}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], prefix: str) -> None:
    """Restore the state saved by `optimizer_tensors` into `opt`."""
    sd = opt.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    sd["state"] = state
    opt.load_state_dict(sd)


def rng_tensors() -> dict[str, Tensor]:
    """Torch's CPU and CUDA generator states."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def restore_rng(tensors: dict[str, Tensor]) -> None:
    """Restore the generator states saved by `rng_tensors` (CUDA ones only where CUDA is present)."""
    torch.set_rng_state(tensors["rng.cpu"].cpu())
    cuda = [tensors[k].cpu() for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """Settings (by flag name) that differ between a saved run and `cfg`, ignoring those a resume may change.

    A setting the saved config lacks (it was written by an older vitclt) counts as its default.
    """
    now = flat_settings(cfg.to_json())
    steps = cfg.optim.steps  # a default warmup follows a changed --steps, as it would have in a run of that length
    then = {**flat_settings(TrainConfig().to_json(), steps), **flat_settings(saved, steps)}
    return [f"{k}: run has {then.get(k)!r}, now {v!r}" for k, v in now.items() if k not in RESUMABLE and then.get(k) != v]


LEGACY_COMMAND = "an earlier vitclt"
"""What made a run whose records name no command (vitclt 0.1 did not record it)."""


def run_command(out: Path) -> str | None:
    """The command that made the run in `out` (`train`, `reproduce`, `demo`), or None if `out` holds no run."""
    try:
        return json.loads((out / RUN_FILE).read_text()).get("command", LEGACY_COMMAND)
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        return LEGACY_COMMAND
    try:
        meta = read_state_meta(out)
    except TrainingError:
        return LEGACY_COMMAND
    return None if meta is None else meta.get("command", LEGACY_COMMAND)


def check_owner(out: Path, command: str) -> None:
    """Refuse to touch a run in `out` that another command made (a legacy run belongs to `train`)."""
    maker = run_command(out)
    if maker is None or maker == command or (maker == LEGACY_COMMAND and command == "train"):
        return
    made = "vitclt train or an earlier vitclt" if maker == LEGACY_COMMAND else f"vitclt {maker}"
    raise TrainingError(f"{out} holds a run made by `{made}`, which `vitclt {command}` will neither overwrite nor resume: "
                        "choose another --out (or move that run away)")


def prepare_run_dir(cfg: TrainConfig, command: str = "train") -> dict | None:
    """Check `cfg.out` against --resume / --overwrite; returns the state metadata to resume from, or None.

    Refuses to touch a run another command made, to start over a run that has a checkpoint unless
    told to resume or overwrite, and to resume with settings that would change what is trained.
    """
    out = Path(cfg.out)
    check_owner(out, command)
    if cfg.overwrite:
        remove_run(out)
        return None
    meta = read_state_meta(out)
    if not cfg.resume:
        if meta is not None:
            if meta["finished"]:
                what, how = f"a finished run ({meta['step']} steps)", "--resume with a larger --steps to train it further"
            else:
                total = flat_settings(meta["train_config"]).get("steps")
                what, how = f"an unfinished run (step {meta['step']} of {total})", "--resume to continue it"
            raise TrainingError(f"{out} already holds {what}: pass {how}, --overwrite to start over, or choose another --out")
        if (out / RUN_FILE).is_file():
            raise TrainingError(f"{out} holds a run that stopped before its first checkpoint: pass --resume or --overwrite "
                                "to start it again, or choose another --out")
        return None
    if meta is None:
        return None
    diff = config_differences(meta["train_config"], cfg)
    if diff:
        raise TrainingError(f"cannot resume the run in {out} with different settings (" + "; ".join(diff)
                            + "): pass the run's original settings, or choose another --out")
    if meta["step"] > cfg.optim.steps or (meta["step"] == cfg.optim.steps and not meta["finished"]):
        raise TrainingError(f"the run in {out} is at step {meta['step']}: resume it with --steps above that")
    return meta


def remove_run(out: Path) -> None:
    """Delete a run's own files in `out` (run.json, the training state, its transcoder dirs, tb/), nothing else.

    Prints each path it removes. Callers check first that the run is theirs (`check_owner`).
    """
    names: set[str] = set()
    try:
        names |= set(json.loads((out / RUN_FILE).read_text()).get("transcoders", {}))
    except (OSError, ValueError):
        pass
    try:
        names |= set((read_state_meta(out) or {}).get("transcoders", {}))
    except TrainingError:
        pass
    dirs = [out / name for name in sorted(names) if name and Path(name).name == name and name not in (".", "..")]
    for path in [*dirs, out / "tb"]:
        if path.is_dir():
            print(f"removing {path}")
            shutil.rmtree(path, ignore_errors=True)
    for path in (out / STATE_FILE, out / RUN_FILE):
        if path.is_file():
            print(f"removing {path}")
            path.unlink()


def write_run_file(out: Path, cfg: TrainConfig, transcoders: dict[str, dict], command: str = "train") -> Path:
    """Record at the start of a run what made it and what it trains."""
    return write_json(out / RUN_FILE, {"command": command, "train_config": cfg.to_json(), "transcoders": transcoders})
