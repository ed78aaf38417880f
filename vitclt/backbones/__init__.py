"""Backbones: frozen vision transformers whose MLPs can be captured and replaced.

`load_backbone(spec)` is the one entry point: a hub id, a local directory or a weights file of one
of the supported families (transformers CLIP, SigLIP and DINOv2, open_clip CLIP ViTs, timm-format
ViTs; see docs/backbones.md), or `demo`, the small CLIP that ships with vitclt. Task heads (zero-shot,
a linear probe, a checkpoint's classifier) are in `heads`.

Names are imported on first use (PEP 562): importing this package does not import torch or
transformers until one of them is needed.
"""

from __future__ import annotations

from vitclt.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["BackboneError"], "errors"),
    **dict.fromkeys(["Backbone", "Capture", "MLPSite", "Replacement", "ReplaceFn", "TokenSel",
                     "token_index"], "base"),
    **dict.fromkeys(["HFClipBackbone"], "hf_clip"),
    **dict.fromkeys(["SiglipBackbone"], "hf_siglip"),
    **dict.fromkeys(["Dinov2Backbone"], "hf_dinov2"),
    **dict.fromkeys(["OpenClipBackbone"], "open_clip"),
    **dict.fromkeys(["TimmViTBackbone"], "timm_vit"),
    **dict.fromkeys(["LinearHead", "TaskHead", "ZeroShotHead"], "classifiers"),
    **dict.fromkeys(["build_task_head", "fit_probe", "zero_shot_head"], "heads"),
    **dict.fromkeys(["ALIASES", "FAMILIES", "LOADERS", "detect_family", "load_backbone"], "loading"),
}
"""Public name → the submodule of vitclt.backbones that defines it."""

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
