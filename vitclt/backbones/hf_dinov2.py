"""`transformers` DINOv2 (`Dinov2Model`, and `Dinov2WithRegistersModel`), by hub id or directory.

A DINOv2 block is ``h = h + ls1(attn(norm1(h))); h = h + ls2(mlp(norm2(h)))`` with a learned layer
scale ls2 (a per-channel vector). The captured MLP input is `norm2`'s output and the captured MLP
output is **``ls2(mlp(x))``, what is added to the residual stream**: a transcoder predicts the
block's actual contribution, and replacing it is exact (`MLPSite(mlp, layer_scale2)`). The giant
model's MLP is a SwiGLU (`gate_proj`, `up_proj`, `down_proj`), the others' fc1 → GELU → fc2: the
MLP module's input and output are read the same way for both.

Sequence: CLS, then the register tokens (with registers), then the patches; `n_prefix_tokens`
counts CLS and registers, "cls" is position 0 and "patches" excludes the registers. The image size
is the processor's crop (224 for the released models, whose position embeddings are interpolated
from 518), not the config's. DINOv2 has no text tower: its image representation is the CLS token
after the final layer norm (`pooler_output`), and its task head is a linear probe fitted on it
(`vitclt.backbones.heads`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import Dinov2Model, Dinov2WithRegistersModel, PreTrainedModel
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

from .base import Backbone, MLPSite
from .hf_files import load_hf_model, load_processor, read_hf_config
from .transforms import HFImagePrep, ImagePrep

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_processor() -> BitImageProcessorPil:
    """DINOv2's released preprocessing: short side to 256 (bicubic), centre crop 224, ImageNet mean/std."""
    return BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


class Dinov2Backbone(Backbone):
    """A DINOv2 vision transformer (with or without registers); the task head is a linear probe."""

    has_text_tower = False

    def __init__(self, model: Dinov2Model | Dinov2WithRegistersModel, processor: BitImageProcessorPil | None = None,
                 name: str = "dinov2"):
        cfg = model.config
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.n_layers = cfg.num_hidden_layers
        self.d_model = cfg.hidden_size
        self.n_prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0))
        self.processor = processor or default_processor()
        crop = self.processor.crop_size if self.processor.do_center_crop else self.processor.size
        self.image_size = int(crop["height"])
        self.patch_size = int(cfg.patch_size)

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, registers: bool | None = None) -> Dinov2Backbone:
        """Load a Dinov2Model (or, with `registers`, a Dinov2WithRegistersModel) and its image processor."""
        source = str(source)
        if registers is None:
            registers = _model_type(source) == "dinov2_with_registers"
        model_cls: type[PreTrainedModel] = Dinov2WithRegistersModel if registers else Dinov2Model
        model = load_hf_model(model_cls, source, dtype, "DINOv2", "facebook/dinov2-base").to(device)
        return cls(model, load_processor(BitImageProcessorPil, source), name=source)

    def fingerprint_tensors(self) -> Iterable[tuple[str, Tensor]]:
        """Every parameter of the vision model (embeddings, registers, blocks, final norm)."""
        yield from self.model.named_parameters()

    @property
    def mlps(self) -> Sequence[nn.Module]:
        return [layer.mlp for layer in self.model.encoder.layer]

    @property
    def mlp_sites(self) -> Sequence[MLPSite]:
        """The MLP's input, and its output after the layer scale: what joins the residual stream."""
        return [MLPSite(layer.mlp, layer.layer_scale2) for layer in self.model.encoder.layer]

    @property
    def device(self) -> torch.device:
        return self.model.layernorm.weight.device

    @cached_property
    def image_prep(self) -> ImagePrep:
        """The BiT image processor's short-side resize and centre crop, then its rescale and normalise."""
        return HFImagePrep(self.processor)

    @torch.inference_mode()
    def image_embeds(self, pixels_B3HW: Tensor) -> Tensor:
        """The CLS token after the final layer norm, (B, D), not normalised: what a DINOv2 probe reads."""
        return self.model(pixel_values=pixels_B3HW.to(self.device, self.model.dtype)).pooler_output.float()


def _model_type(source: str) -> str | None:
    config = read_hf_config(source)
    return config.get("model_type") if config else None
