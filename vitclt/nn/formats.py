"""A transcoder on disk: normalisation folding, vitclt's checkpoint format, circuit-tracer's format.

vitclt's format is a directory holding ``config.json`` (the `TranscoderConfig`) and
``model.safetensors`` (the state dict with the normalisation statistics folded into the weights, so
a saved transcoder maps raw activations to raw activations). ``Transcoder.save_pretrained`` and
``Transcoder.from_pretrained`` call `save_pretrained` and `read_config` / `load_weights` here.

circuit-tracer's format (`export_circuit_tracer`) is one pair of files per source layer i:
``W_enc_{i}.safetensors`` (W_enc_{i} [F, D], b_enc_{i} [F], b_dec_{i} [D], threshold_{i} [F]) and
``W_dec_{i}.safetensors`` (W_dec_{i} [F, L−i, D], target layers i..L−1 on the middle axis), all in raw
units. Weights are only read with safetensors (never unpickled).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from vitclt.errors import ConfigError, VitcltError
from vitclt.io import write_json, write_safetensors
from vitclt.nn.config import TranscoderConfig

if TYPE_CHECKING:
    from vitclt.nn.transcoder import Transcoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(VitcltError, ValueError):
    """A transcoder directory is missing, corrupt, or does not fit its config or the backbone."""


def folded_state(model: Transcoder) -> dict[str, Tensor]:
    """The state dict with the normalisation folded into the weights (new tensors, no grad).

    Encoder: pre = ((x − μ_x)/s_x)·Wᵀ + b = x·(W/s_x)ᵀ + (b − W·μ_x/s_x), so thresholds on the
    pre-activations stay valid. Decoder: ŷ_raw = s_y·(Σ z W + b) + μ_y.
    """
    with torch.no_grad():
        state = {k: v.detach() for k, v in model.state_dict().items()}
        sx, mx = model.x_scale_L, model.x_mean_LD
        sy, my = model.y_scale_L, model.y_mean_LD
        W_enc = [W.detach() for W in model.W_enc]
        for i, W_FD in enumerate(W_enc):
            state[f"W_enc.{i}"] = W_FD / sx[i]
        state["b_enc"] = model.b_enc.detach() - torch.stack([W_FD @ mx[i] for i, W_FD in enumerate(W_enc)]) / sx[:, None]
        for i, decoders in enumerate(model.W_dec):
            for t, j in enumerate(model.targets(i)):
                state[f"W_dec.{i}.{t}"] = decoders[t].detach() * sy[j]
        state["b_dec"] = model.b_dec.detach() * sy[:, None] + my
        state["x_mean_LD"] = torch.zeros_like(mx)
        state["x_scale_L"] = torch.ones_like(sx)
        state["y_mean_LD"] = torch.zeros_like(my)
        state["y_scale_L"] = torch.ones_like(sy)
    return state


def fold_normalization(model: Transcoder) -> None:
    """Fold the statistics into W_enc, b_enc, W_dec, b_dec and reset them to identity (in place)."""
    folded = folded_state(model)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(folded[name])


def save_pretrained(model: Transcoder, directory: str | os.PathLike) -> Path:
    """Write config.json and model.safetensors (normalisation folded) atomically; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS_NAME, folded_state(model), metadata={"format": "pt"})
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
    """The validated `TranscoderConfig` of a transcoder directory; `CheckpointError` naming the file if broken."""
    directory = Path(directory)
    _check_directory(directory)
    path = directory / CONFIG_NAME
    fix = "restore it from the run that wrote it, or save the transcoder again"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}): {fix}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not a transcoder config object: {fix}")
    try:
        cfg = TranscoderConfig.from_dict(raw)
        cfg.validate()
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except TypeError as err:  # a field of the wrong type, e.g. "n_layers": "3"
        raise CheckpointError(f"{path} has a setting of the wrong type ({err}): {fix}") from None
    return cfg


def load_weights(model: Transcoder, directory: str | os.PathLike, device: torch.device | str | None = None) -> None:
    """Load a directory's model.safetensors into `model`, whose config must match the file's tensors."""
    path = Path(directory) / WEIGHTS_NAME
    try:
        state = safetensors.torch.load_file(path, device=str(torch.device(device or "cpu")))
    except safetensors.SafetensorError as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}), probably empty or truncated by an interrupted "
            "copy: copy it again, or save the transcoder again"
        ) from None
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


def export_circuit_tracer(model: Transcoder, directory: str | os.PathLike) -> Path:
    """Write circuit-tracer's per-layer files (see the module docstring) into `directory`.

    W_dec_{i} has zeros where there is no decoder (off the diagonal for a PLT). A TopK sparsifier is
    written as a JumpReLU with its running per-layer threshold: circuit-tracer knows no TopK.
    """
    if model.cfg.topology == "sae":
        raise CheckpointError("circuit-tracer takes transcoders (clt or plt), not an sae: export a clt or plt")
    threshold_LF = model.sparsifier.thresholds().float().cpu()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    folded = folded_state(model)
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
    return directory
