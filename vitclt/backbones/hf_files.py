"""Loading `transformers` models and processors by hub id or directory, with one-line errors.

Shared by the transformers families (CLIP, SigLIP, DINOv2): the same checks of a directory's files,
the same messages for a missing path, an unknown hub id or a damaged file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import safetensors
import torch

from vitclt.io import read_json_object

from .base import BackboneError

RESAVE = "re-download the model, or load it and save it again with save_pretrained"
"""The fix for a damaged file in a model directory."""


def check_model_files(directory: Path) -> None:
    """Raise `BackboneError` naming the first unreadable JSON config or safetensors file in `directory`.

    transformers reports these without the file name (safetensors) or the fix; checking the headers
    first costs a few milliseconds (the weights are memory-mapped, not read).
    """
    for name in ("config.json", "preprocessor_config.json", "open_clip_config.json"):
        path = directory / name
        if path.is_file():
            read_json_object(path, BackboneError, RESAVE)
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safetensors.safe_open(path, framework="pt"):
                pass
        except safetensors.SafetensorError as err:
            raise BackboneError(
                f"{path} is not a readable safetensors file ({err}), probably empty or truncated by an interrupted "
                f"download or copy: {RESAVE}"
            ) from None


def check_weights_match(model_cls: Any, directory: Path) -> None:
    """Raise `BackboneError` if `directory`'s config.json implies more weights than its safetensors files hold.

    Before anything is allocated: the model is built on the meta device from the config and its
    state dict's size is compared with the sizes in the files' headers. transformers would
    otherwise allocate the whole model first (a config claiming a 2-billion-wide MLP), or fill the
    tensors the files lack (12 layers over 6-layer weights) with random values and only print a
    report. Sizes, not names, are compared: transformers renames and fuses checkpoint tensors on
    loading (legacy names, fused projections), which preserves their sizes. Tensors the files hold
    that the model does not use (a task head) are allowed.
    """
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return  # pytorch_model.bin only: transformers' own checks apply
    stored = 0
    for path in files:
        with safetensors.safe_open(path, framework="pt") as f:  # readable: check_model_files opened it
            stored += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    try:
        config = model_cls.config_class.from_pretrained(directory)
        with torch.device("meta"):
            implied = sum(t.numel() for t in model_cls(config).state_dict().values())
    except (OSError, ValueError, TypeError):
        return  # a config transformers cannot read: load_hf_model reports it in one line
    if implied > stored:
        raise BackboneError(f"{directory / 'config.json'} does not match the weights in {directory}: the config implies "
                            f"{implied:,} weight values, the safetensors files hold {stored:,} (more layers or wider ones "
                            f"than were saved): restore the config.json saved with these weights, or {RESAVE}")


def check_source(source: str, example: str) -> bool:
    """Whether `source` is an existing directory; a path-like string that does not exist raises."""
    is_dir = Path(source).is_dir()
    if not is_dir and (source.startswith((".", "/", "~")) or Path(source).suffix):
        raise BackboneError(f"backbone path {source!r} does not exist: pass a directory holding config.json and "
                            f"model.safetensors, or a hub id such as {example}")
    if is_dir:
        check_model_files(Path(source))
    return is_dir


def load_hf_model(model_cls: Any, source: str, dtype: torch.dtype | None, family: str, example: str):
    """`model_cls.from_pretrained(source)` in `dtype` (float32 by default), its failures as one-line BackboneErrors."""
    is_dir = check_source(source, example)
    if is_dir:
        check_weights_match(model_cls, Path(source))
    try:
        return model_cls.from_pretrained(source, dtype=dtype or torch.float32)
    except safetensors.SafetensorError as e:  # a damaged file in the hub cache
        raise BackboneError(f"a weights file of {source!r} is unreadable ({e}): {RESAVE} "
                            "(delete the model from the Hugging Face cache to download it again)") from None
    except (OSError, ValueError) as e:
        where = "directory" if is_dir else "hub id"
        raise BackboneError(
            f"could not load a {family} model from {where} {source!r}: {str(e).splitlines()[0]}; "
            f"pass a local directory with config.json + model.safetensors (a {model_cls.__name__} saved with "
            f"save_pretrained), or a hub id such as {example} on a machine with internet access"
        ) from None


def load_processor(processor_cls: Any, source: str):
    """The image processor saved with the model, or None when there is none."""
    try:
        return processor_cls.from_pretrained(source)
    except OSError:
        return None


def read_hf_config(source: str) -> dict[str, Any] | None:
    """config.json of a directory or hub repo as a dict, or None if it has none."""
    path = Path(source)
    if path.is_dir():
        file = path / "config.json"
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(source, "config.json")).read_text(encoding="utf-8"))
    except EntryNotFoundError:
        return None
    except Exception as err:  # offline without a cached copy, unknown repo, no access, bad id
        raise BackboneError(f"could not load a model from hub id {source!r}: {str(err).splitlines()[0]}; pass a local "
                            "directory with config.json + model.safetensors, or a hub id such as "
                            "openai/clip-vit-base-patch32 on a machine with internet access") from None
