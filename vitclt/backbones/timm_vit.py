"""timm-format ViTs (`vit_base_patch16_224` and friends, the layout of most ImageNet-trained ViTs).

timm imports torchvision, so the network is rebuilt here as a small module with timm's own
parameter names (from timm's `timm/models/vision_transformer.py`: VisionTransformer and Block) and
the same math, and the checkpoint's state dict loads into it unchanged:

    cls_token, reg_token, pos_embed, patch_embed.proj, norm_pre,
    blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma},
    norm, fc_norm, head

Everything else is read from the tensors' shapes: width, depth, patch size, MLP width, number of
classes, which optional parts exist (class and register tokens, position embeddings with or
without the prefix tokens, qkv bias, layer scale, pre-norm, fc_norm). What the weights cannot say
comes from the architecture name in timm's config.json: the number of heads (`model_args.num_heads`,
else timm's for that width), the layer-norm epsilon (1e-5 for `*_clip_*` models, else timm's 1e-6)
and QuickGELU (`*quickgelu*`). With layer scale, the captured MLP output is ``ls2(mlp(x))``, what is
added to the residual stream. The task head is the checkpoint's own classifier (`own_head`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitclt.io import read_json_object

from .base import Backbone, BackboneError, MLPSite
from .checkpoints import WEIGHT_SUFFIXES, check_layout, hub_checkpoint, read_state_dict
from .classifiers import LinearHead
from .transforms import RESAMPLE, EvalTransform, ImagePrep

HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
"""timm's head counts for its ViT widths (tiny, small, base, large, huge, giant, gigantic)."""
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
"""timm's weight file names on the Hub, safetensors first."""


@dataclass(frozen=True)
class TimmViTConfig:
    """The shape of a timm VisionTransformer, as far as this module implements it."""

    width: int
    """Embedding width D."""
    depth: int
    """Number of blocks."""
    heads: int
    """Attention heads per block."""
    patch_size: int
    """Side of a square patch."""
    grid: int
    """Patches per side of the (square) image."""
    mlp_width: int
    """Hidden width of each block's MLP."""
    num_classes: int = 0
    """Rows of the classifier head; 0 without a head."""
    class_token: bool = True
    """Whether a CLS token leads the sequence."""
    reg_tokens: int = 0
    """Register tokens after the CLS token."""
    no_embed_class: bool = False
    """Position embeddings cover the patches only (prefix tokens get none)."""
    qkv_bias: bool = True
    """Whether the qkv projection has a bias."""
    layer_scale: bool = False
    """Whether blocks carry ls1 / ls2 (timm's init_values)."""
    pre_norm: bool = False
    """A norm_pre LayerNorm after the embeddings (timm's CLIP ViTs)."""
    final_norm: bool = True
    """A `norm` on every token after the blocks."""
    fc_norm: bool = False
    """A `fc_norm` on the pooled features (timm's avg-pool models)."""
    global_pool: str = "token"
    """"token": the CLS token; "avg": the mean of the patch tokens."""
    eps: float = 1e-6
    """LayerNorm epsilon."""
    quick_gelu: bool = False
    """QuickGELU instead of GELU in the MLPs."""

    @property
    def n_prefix(self) -> int:
        """CLS and register tokens."""
        return int(self.class_token) + self.reg_tokens


def _ln(cfg: TimmViTConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.width, eps=cfg.eps)


class _QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class _LayerScale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, cfg: TimmViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.act = _QuickGELU() if cfg.quick_gelu else nn.GELU()
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Attention(nn.Module):
    def __init__(self, cfg: TimmViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))


class _Block(nn.Module):
    def __init__(self, cfg: TimmViTConfig):
        super().__init__()
        self.norm1 = _ln(cfg)
        self.attn = _Attention(cfg)
        self.ls1 = _LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()
        self.norm2 = _ln(cfg)
        self.mlp = _Mlp(cfg)
        self.ls2 = _LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.ls1(self.attn(self.norm1(h)))
        return h + self.ls2(self.mlp(self.norm2(h)))


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: TimmViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels_B3HW: Tensor) -> Tensor:
        return self.proj(pixels_B3HW).flatten(2).transpose(1, 2)


class TimmViT(nn.Module):
    """timm's VisionTransformer forward (eval mode) with timm's parameter names."""

    def __init__(self, cfg: TimmViTConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        if cfg.reg_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, cfg.width))
        n_pos = cfg.grid**2 + (0 if cfg.no_embed_class else cfg.n_prefix)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, cfg.width))
        self.patch_embed = _PatchEmbed(cfg)
        self.norm_pre = _ln(cfg) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = _ln(cfg) if cfg.final_norm else nn.Identity()
        self.fc_norm = _ln(cfg) if cfg.fc_norm else nn.Identity()
        self.head = nn.Linear(cfg.width, cfg.num_classes) if cfg.num_classes else nn.Identity()

    def forward_features(self, pixels_B3HW: Tensor) -> Tensor:
        """Every token after the blocks and the final norm, (B, T, D)."""
        x = self.patch_embed(pixels_B3HW)
        B = x.shape[0]
        prefix = []
        if self.cfg.class_token:
            prefix.append(self.cls_token.expand(B, -1, -1))
        if self.cfg.reg_tokens:
            prefix.append(self.reg_token.expand(B, -1, -1))
        if self.cfg.no_embed_class:
            x = torch.cat([*prefix, x + self.pos_embed], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + self.pos_embed
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pre_logits(self, pixels_B3HW: Tensor) -> Tensor:
        """The pooled features the classifier reads, (B, D)."""
        x = self.forward_features(pixels_B3HW)
        pooled = x[:, 0] if self.cfg.global_pool == "token" else x[:, self.cfg.n_prefix :].mean(dim=1)
        return self.fc_norm(pooled)

    def forward(self, pixels_B3HW: Tensor) -> Tensor:
        """Class logits (B, C)."""
        return self.head(self.pre_logits(pixels_B3HW))


def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def infer_config(state: Mapping[str, Tensor], timm_cfg: Mapping[str, Any] | None = None,
                 source: str = "checkpoint") -> TimmViTConfig:
    """The `TimmViTConfig` of a timm ViT state dict; `timm_cfg` is timm's config.json (architecture, model_args)."""
    timm_cfg = timm_cfg or {}
    arch = str(timm_cfg.get("architecture", ""))
    args = timm_cfg.get("model_args") or {}
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise BackboneError(f"{source} does not match the timm ViT layout: missing tensor {key}")
    W, _, p, p2 = state["patch_embed.proj.weight"].shape
    if p != p2:
        raise BackboneError(f"{source}: non-square patches {p}x{p2} are not supported")
    class_token = "cls_token" in state
    reg_tokens = state["reg_token"].shape[1] if "reg_token" in state else 0
    n_prefix = int(class_token) + reg_tokens
    n_pos = state["pos_embed"].shape[1]
    if n_pos > n_prefix and _is_square(n_pos - n_prefix):
        grid, no_embed_class = math.isqrt(n_pos - n_prefix), False
    elif _is_square(n_pos):
        grid, no_embed_class = math.isqrt(n_pos), n_prefix > 0
    else:
        raise BackboneError(f"{source}: pos_embed has {n_pos} positions, not a square grid plus {n_prefix} prefix tokens")
    depth = sum(1 for k in state if k.startswith("blocks.") and k.endswith(".norm1.weight"))
    heads = int(args.get("num_heads") or HEADS_BY_WIDTH.get(W) or max(W // 64, 1))
    if W % heads:
        raise BackboneError(f"{source}: width {W} is not divisible by {heads} heads; set model_args.num_heads in config.json")
    has_fc_norm = "fc_norm.weight" in state
    global_pool = timm_cfg.get("global_pool") or ("avg" if has_fc_norm or not class_token else "token")
    if global_pool not in ("token", "avg"):
        raise BackboneError(f"{source}: timm global_pool {global_pool!r} is not supported: use a 'token' or 'avg' model")
    return TimmViTConfig(
        width=W, depth=depth, heads=heads, patch_size=p, grid=grid,
        mlp_width=state["blocks.0.mlp.fc1.weight"].shape[0],
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        class_token=class_token, reg_tokens=reg_tokens, no_embed_class=no_embed_class,
        qkv_bias="blocks.0.attn.qkv.bias" in state, layer_scale="blocks.0.ls1.gamma" in state,
        pre_norm="norm_pre.weight" in state, final_norm="norm.weight" in state, fc_norm=has_fc_norm,
        global_pool=global_pool, eps=1e-5 if "_clip_" in arch else 1e-6, quick_gelu="quickgelu" in arch,
    )


def timm_layout(cfg: TimmViTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a timm ViT of this config, by name, with its shape: the module's own state dict."""
    with torch.device("meta"):
        model = TimmViT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def eval_transform(pretrained_cfg: Mapping[str, Any], image_size: int) -> EvalTransform:
    """timm's eval transform from a pretrained_cfg: short side to floor(size / crop_pct), centre crop, normalise.

    Without one, timm's ViT defaults: bicubic, crop_pct 0.9, mean = std = 0.5.
    """
    size = int((pretrained_cfg.get("input_size") or [3, image_size, image_size])[-1])
    interpolation = pretrained_cfg.get("interpolation", "bicubic")
    crop_pct = float(pretrained_cfg.get("crop_pct") or 0.9)
    mode = pretrained_cfg.get("crop_mode", "center")
    if interpolation not in RESAMPLE or mode not in ("center", "squash"):
        raise BackboneError(f"timm preprocessing interpolation={interpolation!r} crop_mode={mode!r} is not supported: "
                            f"use {', '.join(RESAMPLE)} with crop_mode center or squash")
    return EvalTransform(resize=math.floor(size / crop_pct), crop=size, mean=tuple(pretrained_cfg.get("mean", (0.5,) * 3)),
                         std=tuple(pretrained_cfg.get("std", (0.5,) * 3)), resample=RESAMPLE[interpolation],
                         squash=mode == "squash")


class TimmViTBackbone(Backbone):
    """A timm-format ViT checkpoint; its task head is the checkpoint's own classifier."""

    has_text_tower = False

    def __init__(self, model: TimmViT, transform: EvalTransform, labels: Sequence[str] | None = None, name: str = "timm"):
        cfg = model.cfg
        self.model = model.eval().requires_grad_(False)
        self.transform = transform
        self.labels = tuple(labels) if labels else None
        self.name = name
        self.n_layers = cfg.depth
        self.d_model = cfg.width
        self.n_prefix_tokens = cfg.n_prefix
        self.patch_size = cfg.patch_size
        self.image_size = cfg.grid * cfg.patch_size
        if transform.crop != self.image_size:
            raise BackboneError(f"{name}: the preprocessing crops {transform.crop} px but the position embeddings are for "
                                f"{self.image_size} px: fix pretrained_cfg.input_size in config.json")

    @classmethod
    def from_checkpoint(cls, weights: str | Path, timm_cfg: Mapping[str, Any] | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, name: str | None = None) -> TimmViTBackbone:
        """Load a timm ViT state-dict file, described by timm's config.json (`timm_cfg`) where there is one."""
        timm_cfg = timm_cfg or {}
        state = read_state_dict(weights)
        cfg = infer_config(state, timm_cfg, str(weights))
        check_layout(state, timm_layout(cfg), "timm ViT", str(weights))
        with torch.device("meta"):
            model = TimmViT(cfg)
        model.load_state_dict(state, assign=True)
        model = model.to(device=device, dtype=dtype or torch.float32)
        transform = eval_transform(timm_cfg.get("pretrained_cfg") or {}, cfg.grid * cfg.patch_size)
        return cls(model, transform, timm_cfg.get("label_names"), name=name or str(weights))

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> TimmViTBackbone:
        """Load from a directory or Hub repo in timm's layout (config.json + model.safetensors), or a weights file
        (with timm's config.json beside it, if there is one)."""
        source_str = str(source)
        path = Path(source_str)
        if path.is_file():
            weights, config_path = path, path.parent / "config.json"
        elif path.is_dir():
            found = [path / n for n in WEIGHT_NAMES if (path / n).is_file()]
            if not found:
                raise BackboneError(f"{path} holds no timm weights: expected {' or '.join(WEIGHT_NAMES)}")
            weights, config_path = found[0], path / "config.json"
        elif path.suffix in WEIGHT_SUFFIXES or source_str.startswith((".", "/", "~")):
            raise BackboneError(f"timm checkpoint {source_str!r} does not exist: pass a weights file, a directory or a hub id")
        else:
            config_path, weights = hub_checkpoint(source_str, "config.json", WEIGHT_NAMES, "timm")
        timm_cfg = {}
        if config_path.is_file():
            timm_cfg = read_json_object(config_path, BackboneError, "re-download it")
        return cls.from_checkpoint(weights, timm_cfg, device=device, dtype=dtype, name=source_str)

    def fingerprint_tensors(self) -> Iterable[tuple[str, Tensor]]:
        """Every parameter: embeddings, blocks, norms and the classifier head (the task is part of the image path)."""
        yield from self.model.named_parameters()

    @property
    def mlps(self) -> Sequence[nn.Module]:
        return [block.mlp for block in self.model.blocks]

    @property
    def mlp_sites(self) -> Sequence[MLPSite]:
        """The MLP's input, and its output after the layer scale ls2 where there is one."""
        return [MLPSite(b.mlp, b.ls2 if self.model.cfg.layer_scale else b.mlp) for b in self.model.blocks]

    @property
    def device(self) -> torch.device:
        return self.model.pos_embed.device

    @property
    def image_prep(self) -> ImagePrep:
        """timm's eval transform (`eval_transform`)."""
        return self.transform

    @torch.inference_mode()
    def image_embeds(self, pixels_B3HW: Tensor) -> Tensor:
        """The pre-logits features (pooled, after fc_norm), (B, D): what the classifier head reads."""
        return self.model.pre_logits(pixels_B3HW.to(self.device, self.model.pos_embed.dtype)).float()

    def own_head(self) -> LinearHead | None:
        """The checkpoint's classifier: logits = pre-logits @ head.weightᵀ + head.bias."""
        if not self.model.cfg.num_classes:
            return None
        head = self.model.head
        return LinearHead(head.weight.detach().float(), head.bias.detach().float(), labels=self.labels, kind="own")
