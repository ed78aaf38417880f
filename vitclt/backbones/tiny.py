"""Small CLIPModels of the real class, built from a small config, for tests and examples.

They go through the same loading path as real checkpoints: saved to a directory with
`save_pretrained` (safetensors), then loaded with `load_backbone(dir)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .tokenizer import clip_tokenizer


def tiny_clip_config(
    n_layers: int = 3,
    width: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    text_layers: int = 2,
    text_width: int = 32,
    projection_dim: int = 32,
    heads: int = 2,
    text_heads: int = 2,
) -> CLIPConfig:
    """A CLIPConfig with CLIP's real vocabulary (49408 ids) and small towers."""
    return CLIPConfig(
        vision_config=dict(
            hidden_size=width, intermediate_size=4 * width, num_hidden_layers=n_layers,
            num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
        ),
        text_config=dict(
            hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=text_layers,
            num_attention_heads=text_heads, max_position_embeddings=77, vocab_size=49408,
        ),
        projection_dim=projection_dim,
    )


def build_tiny_clip(out_dir: str | Path, seed: int = 0, config: CLIPConfig | None = None) -> Path:
    """Save a randomly initialised (seeded) CLIPModel with its processor and tokenizer to `out_dir`."""
    config = config or tiny_clip_config()
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    size = config.vision_config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out_dir)
    clip_tokenizer().save_pretrained(out_dir)
    return out_dir
