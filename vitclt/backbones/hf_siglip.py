"""`transformers` SigLIP (`SiglipModel`: google/siglip-base-patch16-224 and siblings), by hub id or directory.

Block ℓ's MLP is `vision_model.encoder.layers[ℓ].mlp` (input: `.layer_norm2`'s output), as in CLIP.
Two differences matter here:

- **No CLS token.** SigLIP's sequence is the patch tokens only; the image embedding is an attention
  pooling head (`vision_model.head`, a learned probe query) over all of them after the final norm.
  So `n_prefix_tokens` is 0, "cls" is not a token selection ("patches" and "all" are the same
  tokens), and the pooled embedding depends on every token at the last layer.
- **Its own scoring.** An image and a text match with probability ``sigmoid(exp(t) · cos + b)``
  (learned `logit_scale` t and `logit_bias` b); the class with the largest logit has the largest
  probability, so top-1 is the argmax of either. Texts are padded to the full context length
  (64), as SigLIP was trained: its text embedding is the last position's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, SiglipModel
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from .base import Backbone, BackboneError
from .hf_files import load_hf_model, load_processor
from .transforms import HFImagePrep, ImagePrep


def _square(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


class SiglipBackbone(Backbone):
    """A `transformers` SiglipModel's vision tower, and its text tower for zero-shot."""

    n_prefix_tokens = 0
    has_text_tower = True

    def __init__(
        self,
        model: SiglipModel,
        processor: SiglipImageProcessorPil | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        name: str = "siglip",
        source: str | None = None,
    ):
        vc = model.config.vision_config
        if not vc.vision_use_head:
            raise BackboneError(f"{name}: a SigLIP vision tower without its pooling head has no image embedding")
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.n_layers = vc.num_hidden_layers
        self.d_model = vc.hidden_size
        self.image_size = _square(vc.image_size)
        self.patch_size = _square(vc.patch_size)
        self.max_text_length = model.config.text_config.max_position_embeddings
        self.processor = processor or SiglipImageProcessorPil(size={"height": self.image_size, "width": self.image_size})
        self._tokenizer = tokenizer
        self._source = source

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> SiglipBackbone:
        """Load a SiglipModel and its image processor; the tokenizer is loaded on first use of the text tower."""
        source = str(source)
        model = load_hf_model(SiglipModel, source, dtype, "SigLIP", "google/siglip-base-patch16-224").to(device)
        return cls(model, load_processor(SiglipImageProcessorPil, source), name=source, source=source)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer (SigLIP's is SentencePiece: it needs the `sentencepiece` package)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if self._source is None:
                raise BackboneError(f"{self.name} was built without a tokenizer: pass one to SiglipBackbone")
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self._source)
            except (OSError, ValueError, ImportError, TypeError) as err:
                raise BackboneError(f"could not load the tokenizer of {self._source!r} ({str(err).splitlines()[0]}): "
                                    "SigLIP's tokenizer needs `pip install sentencepiece`") from None
        return self._tokenizer

    def fingerprint_tensors(self) -> Iterable[tuple[str, Tensor]]:
        """The vision tower's parameters, its attention-pooling head included."""
        yield from self.model.vision_model.named_parameters(prefix="vision_model")

    @property
    def mlps(self) -> Sequence[nn.Module]:
        return [layer.mlp for layer in self.model.vision_model.encoder.layers]

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @cached_property
    def image_prep(self) -> ImagePrep:
        """The SigLIP image processor's resize (both sides, no crop), then its rescale and normalise."""
        return HFImagePrep(self.processor)

    @torch.inference_mode()
    def image_embeds(self, pixels_B3HW: Tensor) -> Tensor:
        out = self.model.vision_model(pixel_values=pixels_B3HW.to(self.device, self.model.dtype))
        return F.normalize(out.pooler_output.float(), dim=-1)

    @torch.inference_mode()
    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_text_length,
                             return_tensors="pt")
        # SigLIP reads no attention mask: its text embedding is the last (padded) position's.
        out = self.model.text_model(input_ids=tok["input_ids"].to(self.device))
        return F.normalize(out.pooler_output.float(), dim=-1)

    def logit_scale_bias(self) -> tuple[float, float]:
        """SigLIP's logit ``exp(logit_scale) · cosine + logit_bias``; its sigmoid is the match probability."""
        return float(self.model.logit_scale.exp()), float(self.model.logit_bias)
