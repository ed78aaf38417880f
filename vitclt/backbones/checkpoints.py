"""Reading a checkpoint's state dict safely, and checking it against a family's layout.

Weights are read with safetensors; a `.bin` / `.pt` / `.pth` file goes through torch's restricted
unpickler (`torch.load(weights_only=True)`), which builds tensors, dicts and plain values only and
refuses any other object, so a checkpoint can never run code. Never plain pickle.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from .base import BackboneError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
"""File suffixes `read_state_dict` reads."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint file, by name; a training checkpoint's `state_dict` entry is unwrapped.

    A `module.` prefix (from DistributedDataParallel) is stripped. Raises `BackboneError` naming the
    file if it is unreadable or holds anything but tensors.
    """
    path = Path(path)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise BackboneError(f"{path} is not a weights file: expected one of {', '.join(WEIGHT_SUFFIXES)}")
    if path.suffix == ".safetensors":
        try:
            state = safetensors.torch.load_file(path)
        except (safetensors.SafetensorError, OSError) as err:
            raise BackboneError(f"{path} is not a readable safetensors file ({err}): re-download or re-save it") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BackboneError(f"{path} is not a plain tensor checkpoint ({first}); only tensors are read from pickled "
                                "files: convert it to safetensors or re-download it") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors by name: save the model's state_dict()")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def check_layout(state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], what: str, source: str) -> None:
    """Raise `BackboneError` at the first key of `expected` (in order) that is missing or of another shape,
    else at the first key of `state` that `expected` lacks."""
    for key, shape in expected.items():
        if key not in state:
            raise BackboneError(f"{source} does not match the {what} layout: missing tensor {key} of shape {tuple(shape)}")
        if tuple(state[key].shape) != tuple(shape):
            raise BackboneError(f"{source} does not match the {what} layout: {key} has shape {tuple(state[key].shape)}, "
                                f"expected {tuple(shape)}")
    for key in state:
        if key not in expected:
            raise BackboneError(f"{source} does not match the {what} layout: unexpected tensor {key} of shape "
                                f"{tuple(state[key].shape)}")


def hub_checkpoint(repo: str, config_name: str, weight_names: tuple[str, ...], family: str) -> tuple[Path, Path]:
    """(config file, weights file) of a `family` checkpoint in hub repo `repo`: the first of `weight_names` it has."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        config = Path(hf_hub_download(repo, config_name))
        for name in weight_names:
            try:
                return config, Path(hf_hub_download(repo, name))
            except EntryNotFoundError:
                continue
    except Exception as err:  # offline, unknown repo, no access: all end the same way
        raise BackboneError(f"could not load a {family} model from hub id {repo!r}: {str(err).splitlines()[0]}; "
                            f"pass a local directory with {config_name} and the weights") from None
    raise BackboneError(f"hub repo {repo!r} has no {family} weights ({' or '.join(weight_names)})")
