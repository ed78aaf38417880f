"""HuggingFace `transformers` CLIP (`CLIPModel`), by hub id or local directory.

The paper's backbones are `openai/clip-vit-base-patch32` and `openai/clip-vit-base-patch16`. In
transformers, block ℓ's MLP is `vision_model.encoder.layers[ℓ].mlp` and its input is the output of
`.layer_norm2`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPModel, CLIPTokenizer, CLIPTokenizerFast, PreTrainedTokenizerBase
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .base import Backbone
from .hf_files import load_hf_model, load_processor
from .tokenizer import clip_tokenizer
from .transforms import HFImagePrep, ImagePrep


def _pooled(out) -> Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the embedding; 4.x a tensor."""
    return out if isinstance(out, Tensor) else out.pooler_output


def _load_tokenizer(source: str, max_length: int) -> PreTrainedTokenizerBase:
    local = Path(source)
    has_files = any((local / f).is_file() for f in ("tokenizer.json", "vocab.json"))
    if not local.is_dir() or has_files:
        for cls in (CLIPTokenizerFast, CLIPTokenizer):
            try:
                return cls.from_pretrained(source, model_max_length=max_length)
            except (OSError, ValueError, TypeError):
                continue
    # A model saved without tokenizer files: CLIP's own BPE is bundled with vitclt.
    return clip_tokenizer(max_length)


class HFClipBackbone(Backbone):
    """A `transformers` CLIPModel's vision tower (and text tower, for zero-shot)."""

    n_prefix_tokens = 1
    has_text_tower = True

    def __init__(
        self,
        model: CLIPModel,
        processor: CLIPImageProcessorPil | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        name: str = "clip",
    ):
        vc = model.config.vision_config
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.n_layers = vc.num_hidden_layers
        self.d_model = vc.hidden_size
        self.image_size = vc.image_size
        self.patch_size = vc.patch_size
        self.max_text_length = model.config.text_config.max_position_embeddings
        self.processor = processor or CLIPImageProcessorPil(
            size={"shortest_edge": vc.image_size}, crop_size={"height": vc.image_size, "width": vc.image_size}
        )
        self.tokenizer = tokenizer or clip_tokenizer(self.max_text_length)

    @classmethod
    def from_pretrained(
        cls, source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> HFClipBackbone:
        """Load a CLIPModel (with its image processor and tokenizer) from a hub id or a directory."""
        source = str(source)
        model = load_hf_model(CLIPModel, source, dtype, "CLIP", "openai/clip-vit-base-patch32")
        model.to(device)
        tokenizer = _load_tokenizer(source, model.config.text_config.max_position_embeddings)
        return cls(model, load_processor(CLIPImageProcessorPil, source), tokenizer, name=source)

    def fingerprint_tensors(self) -> Iterable[tuple[str, Tensor]]:
        """The vision tower's parameters (embeddings, blocks, layer norms) and the visual projection."""
        yield from self.model.vision_model.named_parameters(prefix="vision_model")
        yield from self.model.visual_projection.named_parameters(prefix="visual_projection")

    @property
    def mlps(self) -> Sequence[nn.Module]:
        return [layer.mlp for layer in self.model.vision_model.encoder.layers]

    @property
    def device(self) -> torch.device:
        return self.model.visual_projection.weight.device

    @cached_property
    def image_prep(self) -> ImagePrep:
        """The CLIP image processor's resize and crop, then its rescale and normalise (`transforms`)."""
        return HFImagePrep(self.processor)

    @torch.inference_mode()
    def image_embeds(self, pixels_B3HW: Tensor) -> Tensor:
        pooled = _pooled(self.model.vision_model(pixel_values=pixels_B3HW.to(self.device, self.model.dtype)))
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def logit_scale_bias(self) -> tuple[float, float]:
        """CLIP scores an image against a class by ``exp(logit_scale) · cosine``, without a bias."""
        return float(self.model.logit_scale.exp()), 0.0

    @torch.inference_mode()
    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        pooled = _pooled(self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)
