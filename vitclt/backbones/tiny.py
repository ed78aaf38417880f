"""Small models of every family, of the real class or in the real checkpoint layout, for tests and examples.

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


def randomize_norms_and_biases(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every LayerNorm a random γ (1 + 0.1·N(0, 1)) and β, and every other bias, random values (0.1·N(0, 1)).

    transformers initialises γ = 1, β = 0 and biases 0; with those, code that reads the wrong LayerNorm
    or drops a bias computes the same numbers, so no test could tell. The scales match `random_state`.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(module, torch.nn.LayerNorm) and weight is not None:
                weight.copy_(1 + 0.1 * torch.randn(weight.shape, generator=gen))
            if isinstance(bias, torch.nn.Parameter):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))
            for name, p in module.named_parameters(recurse=False):
                if name.endswith("_bias") and p.dim() == 1:  # packed projections: in_proj_bias
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def build_tiny_clip(out_dir: str | Path, seed: int = 0, config: CLIPConfig | None = None) -> Path:
    """Save a seeded random CLIPModel (random LayerNorms and biases too) with its processor and tokenizer to `out_dir`."""
    config = config or tiny_clip_config()
    torch.manual_seed(seed)
    model = randomize_norms_and_biases(CLIPModel(config), seed + 1).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    size = config.vision_config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out_dir)
    clip_tokenizer().save_pretrained(out_dir)
    return out_dir


def random_state(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random tensors for a layout (name → shape) at scales that keep activations O(1).

    Norm weights near 1, layer scales in [0.1, 1], other vectors small, matrices ~ N(0, 1/fan_in),
    and a scalar log-scale of log(10).
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in layout.items():
        leaf = name.rsplit(".", 1)[-1]
        if len(shape) == 0:
            t = torch.tensor(2.302585)
        elif leaf in ("gamma", "lambda1"):
            t = 0.1 + 0.9 * torch.rand(shape, generator=gen)
        elif len(shape) == 1 and leaf == "weight":
            t = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            t = 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            t = torch.randn(shape, generator=gen) / max(fan_in, 1) ** 0.5
        out[name] = t.contiguous()
    return out


def tiny_siglip_config(n_layers: int = 3, width: int = 32, image_size: int = 32, patch_size: int = 8,
                       text_layers: int = 2, text_length: int = 16):
    """A SiglipConfig with small towers and CLIP's vocabulary size (the tests tokenise with CLIP's BPE)."""
    from transformers import SiglipConfig

    return SiglipConfig(
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=n_layers,
                           num_attention_heads=2, image_size=image_size, patch_size=patch_size),
        text_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=text_layers,
                         num_attention_heads=2, max_position_embeddings=text_length, vocab_size=49408,
                         projection_size=width),
    )


def build_tiny_siglip(out_dir: str | Path, seed: int = 0, config=None) -> Path:
    """Save a seeded SiglipModel of the real class, its image processor and a (CLIP BPE) tokenizer to `out_dir`.

    Real SigLIP checkpoints carry a SentencePiece tokenizer; this one carries CLIP's, which needs no
    extra package. LayerNorms and biases are random (`randomize_norms_and_biases`); logit scale and bias
    are set away from their init so that scoring tests can see them.
    """
    from transformers import SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    config = config or tiny_siglip_config()
    torch.manual_seed(seed)
    model = randomize_norms_and_biases(SiglipModel(config), seed + 1).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-3.0)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    size = config.vision_config.image_size
    SiglipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(out_dir)
    clip_tokenizer(config.text_config.max_position_embeddings).save_pretrained(out_dir)
    return out_dir


def build_tiny_dinov2(out_dir: str | Path, seed: int = 0, registers: int = 0, swiglu: bool = False,
                      n_layers: int = 3, width: int = 32) -> Path:
    """Save a seeded Dinov2Model (Dinov2WithRegistersModel with `registers`) and a BitImageProcessor to `out_dir`.

    Patch 8 on a 32-px crop (16 patches) of a model configured for 40 px, so the position embeddings
    are interpolated as in the released models (518 → 224). Layer scales, CLS and register tokens,
    LayerNorms and biases are random, not their init values (1, 0), so that tests see them.
    """
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    common = dict(hidden_size=width, num_hidden_layers=n_layers, num_attention_heads=2, mlp_ratio=4, patch_size=8,
                  image_size=40, use_swiglu_ffn=swiglu)
    torch.manual_seed(seed)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    randomize_norms_and_biases(model, seed + 2)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.copy_(0.1 + 0.9 * torch.rand(p.shape, generator=gen))
            elif name.endswith(("cls_token", "register_tokens")):
                p.copy_(torch.randn(p.shape, generator=gen))
    out_dir = Path(out_dir)
    model.eval().save_pretrained(out_dir)
    BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(out_dir)
    return out_dir


def tiny_open_clip_config(quick_gelu: bool = True) -> dict:
    """An open_clip_config.json ({model_cfg, preprocess_cfg}) of a small CLIP ViT with CLIP's vocabulary."""
    return {
        "model_cfg": {
            "embed_dim": 24, "quick_gelu": quick_gelu,
            "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }


def build_tiny_open_clip(out_dir: str | Path, seed: int = 0, quick_gelu: bool = True, fmt: str = "safetensors") -> Path:
    """Write a seeded random open_clip CLIP ViT checkpoint (open_clip's tensor names) and its config to `out_dir`.

    `fmt` "safetensors" writes open_clip_model.safetensors, "bin" open_clip_pytorch_model.bin (a
    plain tensor state dict, as open_clip publishes).
    """
    import json

    import safetensors.torch

    from .open_clip import hf_config, openclip_layout

    config = tiny_open_clip_config(quick_gelu)
    state = random_state(openclip_layout(hf_config(config["model_cfg"])), seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    if fmt == "safetensors":
        safetensors.torch.save_file(state, out_dir / "open_clip_model.safetensors")
    else:
        torch.save(state, out_dir / "open_clip_pytorch_model.bin")
    return out_dir


def build_tiny_timm(out_dir: str | Path, seed: int = 0, n_classes: int = 5, layer_scale: bool = False,
                    reg_tokens: int = 0, global_pool: str = "token") -> Path:
    """Write a seeded random timm ViT checkpoint (timm's tensor names) and timm's config.json to `out_dir`.

    Width 32, 2 heads, 3 blocks, patch 8 on 32 px; the head has `n_classes` named classes.
    """
    import json

    import safetensors.torch

    from .timm_vit import TimmViTConfig, timm_layout

    cfg = TimmViTConfig(width=32, depth=3, heads=2, patch_size=8, grid=4, mlp_width=128, num_classes=n_classes,
                        reg_tokens=reg_tokens, layer_scale=layer_scale, global_pool=global_pool,
                        final_norm=global_pool == "token", fc_norm=global_pool == "avg")
    state = random_state(timm_layout(cfg), seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, out_dir / "model.safetensors")
    timm_cfg = {
        "architecture": "vit_tiny_test_patch8_32", "num_classes": n_classes, "num_features": cfg.width,
        "global_pool": global_pool, "model_args": {"num_heads": cfg.heads},
        "pretrained_cfg": {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 0.875,
                           "crop_mode": "center", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "label_names": [f"class {i}" for i in range(n_classes)],
    }
    (out_dir / "config.json").write_text(json.dumps(timm_cfg, indent=2))
    return out_dir
