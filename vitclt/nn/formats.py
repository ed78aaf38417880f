"""A transcoder on disk: vitclt's checkpoint format, circuit-tracer's format (export).

vitclt's format is a directory holding ``config.json`` (the `TranscoderConfig`) and
``model.safetensors`` (the state dict with the normalisation statistics folded into the weights,
`Transcoder.folded_state`, so a saved transcoder maps raw activations to raw activations).
``Transcoder.save_pretrained`` and ``Transcoder.from_pretrained`` call `save_pretrained` and
`read_config` / `load_weights` here.

A directory may also be named by a Hugging Face hub id (``org/repo[@revision]``, ``hf:org/repo``):
`read_config` and `load_weights` resolve it through `vitclt.nn.hub.resolve_directory` (cache,
revisions, offline mode), so ``Transcoder.from_pretrained("org/repo")`` works; local paths win.

circuit-tracer's format (`export_circuit_tracer`, read back by `vitclt.nn.foreign.load_circuit_tracer`) is
one pair of files per source layer i: ``W_enc_{i}.safetensors`` (W_enc_{i} [F, D], b_enc_{i} [F], b_dec_{i} [D],
threshold_{i} [F]) and ``W_dec_{i}.safetensors`` (W_dec_{i} [F, L−i, D], target layers i..L−1 on the
middle axis), all in raw units, plus ``vitclt_config.json`` (the exported model's `TranscoderConfig`).
A TopK sparsifier becomes a JumpReLU; with a calibration sample its thresholds are fitted per feature
(`vitclt.nn.calibrate`), else its running per-layer threshold is used.

The functions here take a `Transcoder` but do not import its module (which imports this one); reading
other tools' files into a new `Transcoder` is `vitclt.nn.foreign`. vitclt's own weights are only read
with safetensors (never unpickled).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from vitclt.errors import ConfigError, VitcltError
from vitclt.io import read_json_object, write_json, write_safetensors
from vitclt.nn.config import TranscoderConfig
from vitclt.nn.hub import resolve_directory

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(VitcltError, ValueError):
    """A transcoder directory is missing, corrupt, or does not fit its config or the backbone."""


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write config.json and model.safetensors (normalisation folded) atomically; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS_NAME, model.folded_state(), metadata={"format": "pt"})
    write_json(directory / CONFIG_NAME, dataclasses.asdict(model.cfg))
    return directory


def _check_directory(directory: Path) -> None:
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise CheckpointError(
                f"{directory} has no {name}: a transcoder directory holds {CONFIG_NAME} and "
                f"{WEIGHTS_NAME}, as written by Transcoder.save_pretrained; pass such a directory"
            )


def read_config(directory: str | os.PathLike) -> TranscoderConfig:
    """The validated `TranscoderConfig` of a transcoder directory (or hub id); `CheckpointError` naming the file if broken."""
    directory = resolve_directory(directory)
    _check_directory(directory)
    path = directory / CONFIG_NAME
    fix = "restore it from the run that wrote it, or save the transcoder again"
    raw = read_json_object(path, CheckpointError, fix, kind="transcoder config")
    try:
        cfg = TranscoderConfig.from_dict(raw)
        cfg.validate()
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except TypeError as err:  # a field of the wrong type, e.g. "n_layers": "3"
        raise CheckpointError(f"{path} has a setting of the wrong type ({err}): {fix}") from None
    return cfg


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}
"""The safetensors header's dtype names that torch tensors can have."""


def weights_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name → (shape, dtype name) of every tensor in safetensors file `path`, from its header alone (nothing is loaded)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except (safetensors.SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}), probably empty or truncated by an interrupted "
            "copy: copy it again, or save the transcoder again"
        ) from None


def header_mismatches(header: dict[str, tuple[tuple[int, ...], str]],
                      expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> list[str]:
    """What differs between a file's tensors (`weights_header`) and the `expected` name → (shape, dtype), in words."""
    problems = [f"{k} has shape {header[k][0]}, config implies {shape}" for k, (shape, _) in expected.items()
                if k in header and header[k][0] != shape]
    problems += [f"missing {k}" for k in expected if k not in header]
    problems += [f"unexpected {k}" for k in header if k not in expected]
    for k, (_, dtype) in expected.items():
        stored = _SAFETENSORS_DTYPES.get(header[k][1]) if k in header else dtype
        # Floating weights may be stored at another precision; an integer or boolean where a float belongs may not.
        kind = (stored.is_floating_point, stored == torch.bool) if stored is not None else None
        if kind != (dtype.is_floating_point, dtype == torch.bool):
            problems.append(f"{k} is stored as {header[k][1]}, expected {str(dtype).removeprefix('torch.')}")
    return problems


def check_weights_header(directory: Path, expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
                         cfg: TranscoderConfig) -> None:
    """Refuse, in one line and before any allocation, a model.safetensors whose tensors are not the ones `cfg` implies."""
    path = directory / WEIGHTS_NAME
    problems = header_mismatches(weights_header(path), expected)
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(
            f"{directory / CONFIG_NAME} does not match {path} ({cfg.topology}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
            f"{cfg.features} features in the config): " + "; ".join(problems[:5]) + more
            + f": restore the {CONFIG_NAME} saved with these weights, or save the transcoder again"
        )


def load_weights(model: nn.Module, directory: str | os.PathLike, device: torch.device | str | None = None) -> None:
    """Load a directory's (or hub id's) model.safetensors into `model`, whose config must match the file's tensors."""
    path = resolve_directory(directory) / WEIGHTS_NAME
    try:
        state = safetensors.torch.load_file(path, device=str(torch.device(device or "cpu")))
    except safetensors.SafetensorError as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}), probably empty or truncated by an interrupted "
            "copy: copy it again, or save the transcoder again"
        ) from None
    _load_state(model, state, path)


def _load_state(model: nn.Module, state: dict[str, Tensor], path: Path | str) -> None:
    """Assign `state` to `model` after checking its names and shapes against the model's config."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k} has shape {tuple(state[k].shape)}, config implies {shape}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    if problems:
        cfg = model.cfg
        raise CheckpointError(
            f"{path} does not match {CONFIG_NAME} ({cfg.topology}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
            f"{cfg.features} features): " + "; ".join(problems[:10])
        )
    model.load_state_dict(state, strict=True, assign=True)


CIRCUIT_TRACER_CONFIG = "vitclt_config.json"
CALIBRATION_NAME = "calibration.json"


def export_circuit_tracer(model: nn.Module, directory: str | os.PathLike, calibration_x_NLD: Tensor | None = None,
                          calibration_y_NLD: Tensor | None = None) -> Path:
    """Write circuit-tracer's per-layer files (see the module docstring) into `directory`.

    W_dec_{i} has zeros where there is no decoder (off the diagonal for a PLT). circuit-tracer knows no
    TopK, so a TopK sparsifier is written as a JumpReLU: with `calibration_x_NLD` (MLP inputs, raw
    units) its thresholds are fitted per feature on that sample (`vitclt.nn.calibrate`), and the L0
    and FVU of the exported model beside the original's (on `calibration_y_NLD` when given) are
    printed and written to calibration.json; without it, the running per-layer threshold is used.
    """
    from vitclt.nn.calibrate import calibrate_jumprelu

    if model.cfg.topology == "sae":
        raise CheckpointError("circuit-tracer takes transcoders (clt or plt), not an sae: export a clt or plt")
    calibration = None
    if calibration_x_NLD is not None:
        calibration = calibrate_jumprelu(model, calibration_x_NLD, calibration_y_NLD)
        threshold_LF = calibration.threshold_LF.float().cpu()
    else:
        threshold_LF = model.sparsifier.thresholds().float().cpu()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    folded = model.folded_state()
    L, n_feat, D = model.n_layers, model.n_features, model.d_model
    for i in range(L):
        encoder = {
            f"W_enc_{i}": folded[f"W_enc.{i}"],
            f"b_enc_{i}": folded["b_enc"][i],
            f"b_dec_{i}": folded["b_dec"][i],
            f"threshold_{i}": threshold_LF[i],
        }
        # Middle axis: target layer j at position j − i.
        W_dec_FJD = torch.zeros(n_feat, L - i, D, dtype=folded["b_dec"].dtype)
        for t, j in enumerate(model.targets(i)):
            W_dec_FJD[:, j - i] = folded[f"W_dec.{i}.{t}"].cpu()
        for name, tensors in ((f"W_enc_{i}", encoder), (f"W_dec_{i}", {f"W_dec_{i}": W_dec_FJD})):
            write_safetensors(directory / f"{name}.safetensors", tensors)
    write_json(directory / CIRCUIT_TRACER_CONFIG, dataclasses.asdict(dataclasses.replace(model.cfg, sparsifier="jumprelu")))
    if calibration is not None:
        write_json(directory / CALIBRATION_NAME, calibration.summary())
        print(calibration.describe())
    return directory
