"""open_clip checkpoints (the LAION and DataComp CLIP ViTs), mapped onto a `transformers` CLIPModel.

open_clip's standard CLIP ViT is the same network as OpenAI's CLIP, which `transformers` implements
as CLIPModel, so a checkpoint is read as a state dict (safetensors, or torch's restricted unpickler
for `.bin`) and its tensors are renamed onto a CLIPModel built from the checkpoint's config; open_clip
itself (which imports torchvision) is never imported. The layout, from open_clip's
`src/open_clip/transformer.py` (VisionTransformer, TextTransformer, ResidualAttentionBlock) and
`model.py` (CLIP):

    visual.conv1.weight (no bias), visual.class_embedding, visual.positional_embedding, visual.ln_pre,
    visual.transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias (q; k; v stacked), attn.out_proj,
                                     ln_2, mlp.c_fc, mlp.c_proj},
    visual.ln_post, visual.proj (width × embed_dim, applied as x @ proj);
    token_embedding, positional_embedding, transformer.resblocks.N.*, ln_final, text_projection,
    logit_scale (CustomTextCLIP puts the text tower under `text.`).

The activation is open_clip's `quick_gelu` flag (OpenAI's and the LAION-400M weights: QuickGELU; most
LAION-2B and DataComp weights: exact GELU); it is not in the weights, so the config is required.
Text is pooled at the argmax token id (the end-of-text token), as open_clip does. Images are
preprocessed with open_clip's own eval transform (`transforms.EvalTransform`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import CLIPConfig, CLIPModel

from vitclt.io import read_json_object

from .base import BackboneError
from .checkpoints import check_layout, hub_checkpoint, read_state_dict
from .hf_clip import HFClipBackbone
from .tokenizer import clip_tokenizer
from .transforms import RESAMPLE, EvalTransform, ImagePrep

CONFIG_NAME = "open_clip_config.json"
"""The config file open_clip writes next to its weights on the Hub."""
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""open_clip's weight file names, in the order they are looked for (safetensors first)."""

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_VISION_FIXED: dict[str, Any] = {
    "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
    "final_ln_after_pool": False, "pool_type": "tok", "timm_model_name": None, "act_kwargs": None,
    "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "input_patchnorm": False, "global_average_pool": False,
}
"""open_clip vision options this mapping supports only at these values (others change the network)."""
_TEXT_FIXED: dict[str, Any] = {
    "hf_model_name": None, "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
    "pool_type": "argmax", "proj_type": "linear", "proj_bias": False, "act_kwargs": None, "hf_tokenizer_name": None,
    "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False,
}
"""open_clip text options this mapping supports only at these values."""
_VISION_USED = {"layers", "width", "patch_size", "image_size", "head_width", "mlp_ratio", "norm_kwargs",
                "patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads", "block_type"}
_TEXT_USED = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "norm_kwargs",
              "pad_id", "eos_id", "output_tokens", "tokenizer_kwargs", "block_type"}


def _check_options(cfg: Mapping[str, Any], fixed: Mapping[str, Any], used: set[str], where: str) -> None:
    for key, value in cfg.items():
        if key in fixed:
            if value != fixed[key] and not (fixed[key] is None and value in (None, False)):
                raise BackboneError(f"open_clip option {where}.{key}={value!r} is not supported: vitclt maps the standard "
                                    "CLIP ViT (see docs/backbones.md)")
        elif key not in used and value not in (None, False, 0, "", [], {}):
            raise BackboneError(f"unknown open_clip option {where}.{key}={value!r}: vitclt maps the standard CLIP ViT only")
    if cfg.get("block_type") not in (None, "default"):
        raise BackboneError(f"open_clip option {where}.block_type={cfg['block_type']!r} is not supported")


def _eps(cfg: Mapping[str, Any]) -> float:
    return float((cfg.get("norm_kwargs") or {}).get("eps", 1e-5))


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise BackboneError(f"open_clip {what} {value} is not square: only square images and patches are supported")
        value = value[0]
    return int(value)


def hf_config(model_cfg: Mapping[str, Any]) -> CLIPConfig:
    """The CLIPConfig of the network an open_clip `model_cfg` describes (BackboneError if it is another network)."""
    vision, text = dict(model_cfg.get("vision_cfg") or {}), dict(model_cfg.get("text_cfg") or {})
    if isinstance(vision.get("layers"), (list, tuple)):
        raise BackboneError("open_clip ResNet towers (vision_cfg.layers is a list) are not supported: vitclt needs a ViT")
    _check_options(vision, _VISION_FIXED, _VISION_USED, "vision_cfg")
    _check_options(text, _TEXT_FIXED, _TEXT_USED, "text_cfg")
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    width = int(vision.get("width", 768))
    text_width = int(text.get("width", 512))
    return CLIPConfig(
        vision_config=dict(
            hidden_size=width, intermediate_size=int(width * float(vision.get("mlp_ratio", 4.0))),
            num_hidden_layers=int(vision.get("layers", 12)), num_attention_heads=width // int(vision.get("head_width", 64)),
            image_size=_square(vision.get("image_size", 224), "image_size"),
            patch_size=_square(vision.get("patch_size", 16), "patch_size"), hidden_act=act, layer_norm_eps=_eps(vision),
        ),
        text_config=dict(
            hidden_size=text_width, intermediate_size=int(text_width * float(text.get("mlp_ratio", 4.0))),
            num_hidden_layers=int(text.get("layers", 12)), num_attention_heads=int(text.get("heads", 8)),
            max_position_embeddings=int(text.get("context_length", 77)), vocab_size=int(text.get("vocab_size", 49408)),
            hidden_act=act, layer_norm_eps=_eps(text),
            # eos_token_id 2 makes transformers pool at input_ids.argmax(), open_clip's own text pooling.
            eos_token_id=2,
        ),
        projection_dim=int(model_cfg["embed_dim"]) if "embed_dim" in model_cfg else 512,
    )


def _tower(prefix: str, layers: int, width: int, mlp: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one tower's residual blocks in open_clip's layout."""
    out: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        out.update({
            b + "ln_1.weight": (width,), b + "ln_1.bias": (width,),
            b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
            b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
            b + "ln_2.weight": (width,), b + "ln_2.bias": (width,),
            b + "mlp.c_fc.weight": (mlp, width), b + "mlp.c_fc.bias": (mlp,),
            b + "mlp.c_proj.weight": (width, mlp), b + "mlp.c_proj.bias": (width,),
        })
    return out


def openclip_layout(config: CLIPConfig, text_prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Every tensor of an open_clip CLIP checkpoint of this config, by name, with its shape, in forward order."""
    v, t, e = config.vision_config, config.text_config, config.projection_dim
    W, p = v.hidden_size, v.patch_size
    grid = v.image_size // p
    out: dict[str, tuple[int, ...]] = {
        "visual.conv1.weight": (W, 3, p, p), "visual.class_embedding": (W,),
        "visual.positional_embedding": (grid * grid + 1, W), "visual.ln_pre.weight": (W,), "visual.ln_pre.bias": (W,),
    }
    out.update(_tower("visual.", v.num_hidden_layers, W, v.intermediate_size))
    out.update({"visual.ln_post.weight": (W,), "visual.ln_post.bias": (W,), "visual.proj": (W, e)})
    T = t.hidden_size
    out.update({f"{text_prefix}token_embedding.weight": (t.vocab_size, T),
                f"{text_prefix}positional_embedding": (t.max_position_embeddings, T)})
    out.update(_tower(text_prefix, t.num_hidden_layers, T, t.intermediate_size))
    out.update({f"{text_prefix}ln_final.weight": (T,), f"{text_prefix}ln_final.bias": (T,),
                f"{text_prefix}text_projection": (T, e), "logit_scale": ()})
    return out


def _map_tower(state: Mapping[str, Tensor], src: str, dst: str, layers: int) -> dict[str, Tensor]:
    out = {}
    for i in range(layers):
        s, d = f"{src}transformer.resblocks.{i}.", f"{dst}encoder.layers.{i}."
        q, k, v = state[s + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = state[s + "attn.in_proj_bias"].chunk(3)
        out.update({
            d + "layer_norm1.weight": state[s + "ln_1.weight"], d + "layer_norm1.bias": state[s + "ln_1.bias"],
            d + "self_attn.q_proj.weight": q, d + "self_attn.q_proj.bias": qb,
            d + "self_attn.k_proj.weight": k, d + "self_attn.k_proj.bias": kb,
            d + "self_attn.v_proj.weight": v, d + "self_attn.v_proj.bias": vb,
            d + "self_attn.out_proj.weight": state[s + "attn.out_proj.weight"],
            d + "self_attn.out_proj.bias": state[s + "attn.out_proj.bias"],
            d + "layer_norm2.weight": state[s + "ln_2.weight"], d + "layer_norm2.bias": state[s + "ln_2.bias"],
            d + "mlp.fc1.weight": state[s + "mlp.c_fc.weight"], d + "mlp.fc1.bias": state[s + "mlp.c_fc.bias"],
            d + "mlp.fc2.weight": state[s + "mlp.c_proj.weight"], d + "mlp.fc2.bias": state[s + "mlp.c_proj.bias"],
        })
    return out


def to_hf_state(state: Mapping[str, Tensor], config: CLIPConfig, text_prefix: str = "") -> dict[str, Tensor]:
    """open_clip tensor names → CLIPModel's (q/k/v split from in_proj, projections transposed)."""
    tp = text_prefix
    out = {
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T.contiguous(),
        "text_model.embeddings.token_embedding.weight": state[f"{tp}token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state[f"{tp}positional_embedding"],
        "text_model.final_layer_norm.weight": state[f"{tp}ln_final.weight"],
        "text_model.final_layer_norm.bias": state[f"{tp}ln_final.bias"],
        "text_projection.weight": state[f"{tp}text_projection"].T.contiguous(),
        "logit_scale": state["logit_scale"].reshape(()),
    }
    out.update(_map_tower(state, "visual.", "vision_model.", config.vision_config.num_hidden_layers))
    out.update(_map_tower(state, tp, "text_model.", config.text_config.num_hidden_layers))
    return out


def eval_transform(config: CLIPConfig, preprocess_cfg: Mapping[str, Any]) -> EvalTransform:
    """open_clip's eval transform: short side to the image size, centre crop, OpenAI mean/std unless configured."""
    size = config.vision_config.image_size
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    mode = preprocess_cfg.get("resize_mode", "shortest")
    if interpolation not in RESAMPLE or mode not in ("shortest", "squash"):
        raise BackboneError(f"open_clip preprocessing interpolation={interpolation!r} resize_mode={mode!r} is not "
                            f"supported: use {', '.join(RESAMPLE)} with resize_mode shortest or squash")
    return EvalTransform(resize=size, crop=size, mean=tuple(preprocess_cfg.get("mean", OPENAI_MEAN)),
                         std=tuple(preprocess_cfg.get("std", OPENAI_STD)), resample=RESAMPLE[interpolation],
                         squash=mode == "squash")


class OpenClipBackbone(HFClipBackbone):
    """An open_clip CLIP ViT checkpoint, run as the equivalent `transformers` CLIPModel."""

    @classmethod
    def from_checkpoint(cls, weights: str | Path, config: Mapping[str, Any], device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, name: str | None = None) -> OpenClipBackbone:
        """Load `weights` (a state-dict file) described by an open_clip config ({"model_cfg", "preprocess_cfg"})."""
        model_cfg = config.get("model_cfg", config)
        hf_cfg = hf_config(model_cfg)
        state = {k: v for k, v in read_state_dict(weights).items() if not k.endswith("attn_mask")}
        text_prefix = "text." if "text.token_embedding.weight" in state else ""
        check_layout(state, openclip_layout(hf_cfg, text_prefix), "open_clip CLIP ViT", str(weights))
        with torch.device("meta"):
            model = CLIPModel(hf_cfg)
        model.load_state_dict(to_hf_state(state, hf_cfg, text_prefix), strict=False, assign=True)
        _materialise_buffers(model)
        model = model.to(device=device, dtype=dtype or torch.float32)
        backbone = cls(model, None, clip_tokenizer(hf_cfg.text_config.max_position_embeddings), name=name or str(weights))
        backbone.transform = eval_transform(hf_cfg, config.get("preprocess_cfg") or {})
        return backbone

    transform: EvalTransform
    """open_clip's eval preprocessing (torchvision's arithmetic, see `transforms`)."""

    @property
    def image_prep(self) -> ImagePrep:
        """open_clip's eval transform, not the CLIP processor (their crops differ by a pixel for some sizes)."""
        return self.transform

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> OpenClipBackbone:
        """Load from a directory or Hub repo holding open_clip_config.json and the weights, or a weights file
        with open_clip_config.json beside it."""
        source_str = str(source)
        path = Path(source_str)
        if path.is_file():
            weights, config_path = path, path.parent / CONFIG_NAME
            if not config_path.is_file():
                raise BackboneError(f"{path} has no {CONFIG_NAME} beside it: open_clip weights need their config (the "
                                    "activation is not in the weights); put the model's config there")
        elif path.is_dir():
            config_path = path / CONFIG_NAME
            if not config_path.is_file():
                raise BackboneError(f"{path} holds no {CONFIG_NAME}: pass an open_clip model directory (config + weights)")
            found = [path / n for n in WEIGHT_NAMES if (path / n).is_file()]
            if not found:
                raise BackboneError(f"{path} holds no open_clip weights: expected {' or '.join(WEIGHT_NAMES)}")
            weights = found[0]
        else:
            config_path, weights = hub_checkpoint(source_str, CONFIG_NAME, WEIGHT_NAMES, "open_clip")
        config = read_json_object(config_path, BackboneError, "re-download it")
        return cls.from_checkpoint(weights, config, device=device, dtype=dtype, name=source_str)


def _materialise_buffers(model: torch.nn.Module) -> None:
    """Buffers not in the state dict (position ids) were built on the meta device: rebuild them for real."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if name == "position_ids":
                    module._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
                else:
                    raise BackboneError(f"internal: buffer {name} of {type(module).__name__} has no value")
