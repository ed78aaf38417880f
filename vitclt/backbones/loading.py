"""`load_backbone(spec)`: a backbone from a hub id, a directory, a weights file, a `family:` prefix or an alias.

Without a prefix the family is read from the files: a directory's (or hub repo's) config.json names
a transformers `model_type` (clip, siglip, dinov2, dinov2_with_registers) or a timm `architecture`;
a directory with only open_clip_config.json is an open_clip checkpoint; a weights file is told apart
by the config beside it. Anything else is one line listing the supported families.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from .base import Backbone, BackboneError
from .checkpoints import WEIGHT_SUFFIXES
from .hf_clip import HFClipBackbone
from .hf_dinov2 import Dinov2Backbone
from .hf_files import check_source, read_hf_config
from .hf_siglip import SiglipBackbone
from .open_clip import CONFIG_NAME as OPEN_CLIP_CONFIG
from .open_clip import OpenClipBackbone
from .timm_vit import TimmViTBackbone

FAMILIES: dict[str, str] = {
    "clip": "transformers CLIPModel (openai/clip-vit-base-patch32)",
    "siglip": "transformers SiglipModel (google/siglip-base-patch16-224)",
    "dinov2": "transformers Dinov2Model, with or without registers (facebook/dinov2-base)",
    "openclip": "open_clip CLIP ViT checkpoints (laion/CLIP-ViT-B-32-laion2B-s34B-b79K)",
    "timm": "timm-format ViTs (timm/vit_base_patch16_224.augreg2_in21k_ft_in1k)",
}
"""The supported backbone families, with an example each; the keys are also spec prefixes."""

MODEL_TYPES: dict[str, str] = {"clip": "clip", "siglip": "siglip", "dinov2": "dinov2", "dinov2_with_registers": "dinov2"}
"""transformers `model_type` (config.json) → family."""


def supported() -> str:
    """The families as one line, for error messages."""
    return "; ".join(f"{k}: {v}" for k, v in FAMILIES.items())


def _has_open_clip_config(source: str) -> bool:
    path = Path(source)
    if path.is_dir():
        return (path / OPEN_CLIP_CONFIG).is_file()
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(source, OPEN_CLIP_CONFIG)
    except Exception:
        return False
    return True


def detect_family(source: str) -> str:
    """The family of a directory, weights file or hub id, read from its config files."""
    path = Path(source)
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise BackboneError(f"{path} is not a model directory or weights file ({', '.join(WEIGHT_SUFFIXES)})")
        if (path.parent / OPEN_CLIP_CONFIG).is_file():
            return "openclip"
        sibling = read_hf_config(str(path.parent)) or {}
        if "architecture" in sibling:
            return "timm"
        raise BackboneError(f"cannot tell which family the weights file {path} is: prefix it (openclip:FILE or "
                            f"timm:FILE) or put its config beside it; supported: {supported()}")
    check_source(source, "openai/clip-vit-base-patch32")
    where = "directory" if path.is_dir() else "hub id"
    config = read_hf_config(source)
    if config is not None:
        if "model_type" in config:
            family = MODEL_TYPES.get(config["model_type"])
            if family is None:
                arch = ", ".join(config.get("architectures") or []) or config["model_type"]
                raise BackboneError(f"{where} {source!r} holds a {config['model_type']!r} model ({arch}), which vitclt "
                                    f"cannot load; supported families: {supported()}")
            return family
        if "architecture" in config:
            return "timm"
    if _has_open_clip_config(source):
        return "openclip"
    if config is not None:
        raise BackboneError(f"could not load a model from {where} {source!r}: its config.json names no model_type or "
                            f"architecture; supported families: {supported()}")
    raise BackboneError(f"could not load a model from {where} {source!r}: it holds no config.json or {OPEN_CLIP_CONFIG}; "
                        f"pass a model directory (a CLIPModel saved with save_pretrained, ...); "
                        f"supported families: {supported()}")


def _load_auto(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Backbone:
    source = str(source)
    return LOADERS[detect_family(source)](source, device=device, dtype=dtype)


LOADERS: dict[str, Callable[..., Backbone]] = {
    "hf": _load_auto,
    "clip": HFClipBackbone.from_pretrained,
    "siglip": SiglipBackbone.from_pretrained,
    "dinov2": Dinov2Backbone.from_pretrained,
    "openclip": OpenClipBackbone.from_pretrained,
    "timm": TimmViTBackbone.from_pretrained,
}
"""Backbone loaders by spec prefix (`timm:DIR`); `hf` (the default) detects the family from the files."""


def _demo_dir() -> Path:
    path = Path(str(resources.files("vitclt.assets").joinpath("demo_clip")))
    if not (path / "model.safetensors").is_file():
        raise BackboneError(f"the embedded demo model is missing from {path}: reinstall vitclt, "
                            "or rebuild it with `python tools/train_demo_clip.py` in a source checkout")
    return path


ALIASES: dict[str, Callable[[], str | Path]] = {"demo": _demo_dir}
"""Short names that resolve to a directory: `demo` is the small CLIP shipped inside vitclt."""


def load_backbone(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Backbone:
    """Load a backbone from a spec: `[family:]hub-id-or-directory-or-file`, or an alias such as `demo`.

    Families: clip, siglip, dinov2, openclip, timm (see `FAMILIES`); without a prefix the family is
    detected from the model's config files.
    """
    spec = str(spec)
    if spec in ALIASES:
        backbone = HFClipBackbone.from_pretrained(ALIASES[spec](), device=device, dtype=dtype)
        backbone.name = spec
        return backbone
    family, sep, rest = spec.partition(":")
    if sep and family in LOADERS:
        return LOADERS[family](rest, device=device, dtype=dtype)
    if sep and not Path(spec).exists() and "/" not in family:
        known = ", ".join(sorted(LOADERS))
        raise BackboneError(f"unknown backbone family {family!r} in {spec!r}: known families are {known} "
                            "(or pass a hub id / directory)")
    return _load_auto(spec, device=device, dtype=dtype)
