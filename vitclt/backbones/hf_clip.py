"""HuggingFace `transformers` CLIP (`CLIPModel`), by hub id or local directory.

The paper's backbones are `openai/clip-vit-base-patch32` and `openai/clip-vit-base-patch16`. In
transformers, block ℓ's MLP is `vision_model.encoder.layers[ℓ].mlp` and its input is the output of
`.layer_norm2`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import safetensors
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from transformers import CLIPModel, CLIPTokenizer, CLIPTokenizerFast, PreTrainedTokenizerBase
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .base import Backbone, BackboneError
from .tokenizer import clip_tokenizer


def _pooled(out) -> Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the embedding; 4.x a tensor."""
    return out if isinstance(out, Tensor) else out.pooler_output


RESAVE = "re-download the model, or load it and save it again with save_pretrained"
"""The fix for a damaged file in a model directory."""


def check_model_files(directory: Path) -> None:
    """Raise `BackboneError` naming the first unreadable JSON config or safetensors file in `directory`.

    transformers reports these without the file name (safetensors) or the fix; checking the headers
    first costs a few milliseconds (the weights are memory-mapped, not read).
    """
    for name in ("config.json", "preprocessor_config.json"):
        path = directory / name
        if path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise BackboneError(f"{path} is not valid JSON ({err}): {RESAVE}") from None
            if not isinstance(raw, dict):
                raise BackboneError(f"{path} holds a JSON {type(raw).__name__}, not a config object: {RESAVE}")
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safetensors.safe_open(path, framework="pt"):
                pass
        except safetensors.SafetensorError as err:
            raise BackboneError(
                f"{path} is not a readable safetensors file ({err}), probably empty or truncated by an interrupted "
                f"download or copy: {RESAVE}"
            ) from None


def _load_processor(source: str) -> CLIPImageProcessorPil:
    try:
        return CLIPImageProcessorPil.from_pretrained(source)
    except OSError:
        return None


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
        is_dir = Path(source).is_dir()
        if not is_dir and (source.startswith((".", "/", "~")) or Path(source).suffix):
            raise BackboneError(f"backbone path {source!r} does not exist: pass a directory holding config.json and "
                                "model.safetensors, or a hub id such as openai/clip-vit-base-patch32")
        if is_dir:
            check_model_files(Path(source))
        try:
            model = CLIPModel.from_pretrained(source, dtype=dtype or torch.float32)
        except safetensors.SafetensorError as e:  # a damaged file in the hub cache
            raise BackboneError(f"a weights file of {source!r} is unreadable ({e}): {RESAVE} "
                                "(delete the model from the Hugging Face cache to download it again)") from None
        except (OSError, ValueError) as e:
            where = "directory" if is_dir else "hub id"
            raise BackboneError(
                f"could not load a CLIP model from {where} {source!r}: {str(e).splitlines()[0]}; "
                "pass a local directory with config.json + model.safetensors (a CLIPModel saved with "
                "save_pretrained), or a hub id such as openai/clip-vit-base-patch32 on a machine with internet access"
            ) from None
        model.to(device)
        tokenizer = _load_tokenizer(source, model.config.text_config.max_position_embeddings)
        return cls(model, _load_processor(source), tokenizer, name=source)

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

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.model.dtype)

    @torch.inference_mode()
    def image_embeds(self, pixels_B3HW: Tensor) -> Tensor:
        pooled = _pooled(self.model.vision_model(pixel_values=pixels_B3HW.to(self.device, self.model.dtype)))
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.inference_mode()
    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        pooled = _pooled(self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)
