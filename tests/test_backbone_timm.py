"""timm-format ViTs: the rebuilt network against an independent forward of timm's layout, its own
classifier as the task head, timm's eval transform, and layout mismatches.

timm imports torchvision, which cannot load here, so the reference is written from timm's
VisionTransformer (timm/models/vision_transformer.py: _pos_embed, Block, forward_head) as plain
tensor operations on the checkpoint's own tensors.
"""

import json
import math

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

from vitclt.backbones import BackboneError, load_backbone
from vitclt.backbones.heads import build_task_head
from vitclt.backbones.timm_vit import TimmViTBackbone
from vitclt.backbones.tiny import build_tiny_timm

from .conftest import random_images

VARIANTS = {
    "token": dict(),
    "layerscale-registers-avg": dict(layer_scale=True, reg_tokens=2, global_pool="avg"),
}


def _ln(x, s, name):
    return F.layer_norm(x, x.shape[-1:], s[name + ".weight"], s[name + ".bias"], 1e-6)


def reference(s, px, heads=2, patch=8, reg=0, pool="token"):
    """timm VisionTransformer.forward in eval mode: (logits, per-block MLP inputs, per-block residual MLP outputs)."""
    x = F.conv2d(px, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    B = x.shape[0]
    prefix = [s["cls_token"].expand(B, -1, -1)] + ([s["reg_token"].expand(B, -1, -1)] if reg else [])
    x = torch.cat([*prefix, x], 1) + s["pos_embed"]
    xs, ys = [], []
    depth = sum(1 for k in s if k.endswith(".norm1.weight"))
    for i in range(depth):
        b = f"blocks.{i}."
        T, D = x.shape[1], x.shape[2]
        qkv = (_ln(x, s, b + "norm1") @ s[b + "attn.qkv.weight"].T + s[b + "attn.qkv.bias"]).reshape(B, T, 3, heads, D // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(D // heads)).softmax(-1) @ v
        a = a.transpose(1, 2).reshape(B, T, D) @ s[b + "attn.proj.weight"].T + s[b + "attn.proj.bias"]
        x = x + (a * s[b + "ls1.gamma"] if b + "ls1.gamma" in s else a)
        x_in = _ln(x, s, b + "norm2")
        y = F.gelu(x_in @ s[b + "mlp.fc1.weight"].T + s[b + "mlp.fc1.bias"]) @ s[b + "mlp.fc2.weight"].T + s[b + "mlp.fc2.bias"]
        y = y * s[b + "ls2.gamma"] if b + "ls2.gamma" in s else y
        xs.append(x_in)
        ys.append(y)
        x = x + y
    if pool == "token":
        feats = _ln(x, s, "norm")[:, 0]
    else:
        feats = _ln(x[:, 1 + reg :].mean(1), s, "fc_norm")
    return feats @ s["head.weight"].T + s["head.bias"], xs, ys


@pytest.fixture(scope="module", params=list(VARIANTS))
def timm_model(request, tmp_path_factory):
    """(directory, state dict, variant options, backbone) of a tiny timm ViT with a 5-class head."""
    opts = VARIANTS[request.param]
    directory = build_tiny_timm(tmp_path_factory.mktemp("timm"), seed=0, **opts)
    return directory, safetensors.torch.load_file(directory / "model.safetensors"), opts, load_backbone(directory)


def test_forward_capture_and_own_head_match_timms_architecture(timm_model):
    _, state, opts, bb = timm_model
    assert isinstance(bb, TimmViTBackbone)
    px = bb.preprocess(random_images(3))
    with bb.capture() as cap:
        emb = bb.image_embeds(px)
    with torch.no_grad():
        ref_logits, xs, ys = reference(state, px, reg=opts.get("reg_tokens", 0), pool=opts.get("global_pool", "token"))
    torch.testing.assert_close(bb.own_head().logits(emb), ref_logits, rtol=1e-5, atol=1e-5)
    for layer in range(bb.n_layers):
        torch.testing.assert_close(cap.inputs[layer], xs[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cap.outputs[layer], ys[layer], rtol=1e-5, atol=1e-5)


def test_own_head_accuracy_equals_the_reference_argmax_and_restricts_by_label_name(timm_model):
    _, state, opts, bb = timm_model
    images = random_images(6, seed=4)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    head = build_task_head(bb, [f"class {i}" for i in range(5)])
    assert head.kind == "own" and head.n_classes == 5
    px = bb.preprocess(images)
    with torch.no_grad():
        ref_logits, _, _ = reference(state, px, reg=opts.get("reg_tokens", 0), pool=opts.get("global_pool", "token"))
    top1, _ = head.correct(bb.image_embeds(px), labels)
    assert torch.equal(top1, ref_logits.argmax(1) == labels)
    sub = build_task_head(bb, ["Class_3", "class 1"])  # a dataset of two of the classes, in its own order
    torch.testing.assert_close(sub.logits(bb.image_embeds(px)), ref_logits[:, [3, 1]], rtol=1e-5, atol=1e-5)
    with pytest.raises(BackboneError, match="'zebra' is not among"):
        build_task_head(bb, ["class 1", "zebra"])


def test_sequence_has_cls_then_registers_then_patches(timm_model):
    _, _, opts, bb = timm_model
    reg = opts.get("reg_tokens", 0)
    assert bb.n_prefix_tokens == 1 + reg and bb.n_tokens == 1 + reg + 16
    assert bb.token_index("patches") == slice(1 + reg, bb.n_tokens)


def test_preprocess_is_timms_eval_transform(timm_model):
    """crop_pct 0.875 on 32 px: short side to floor(32 / 0.875) = 36, centre crop 32 with torchvision's rounding."""
    _, _, _, bb = timm_model
    image = random_images(1, size=(45, 38))[0]  # → 42×36 after the resize (int(36 * 45 / 38) = 42)
    resized = image.resize((42, 36), Image.BICUBIC)
    left, top = round((42 - 32) / 2), round((36 - 32) / 2)
    arr = np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32).transpose(2, 0, 1) / 255.0
    ref = torch.from_numpy((arr - 0.5) / 0.5)
    assert torch.equal(bb.preprocess([image])[0], ref)


def test_a_bare_weights_file_loads_with_timm_prefix(timm_model):
    directory, _, _, bb = timm_model
    weights = directory / "model.safetensors"
    assert load_backbone(f"timm:{weights}").fingerprint == bb.fingerprint


def test_a_checkpoint_of_another_layout_names_the_first_mismatch(tmp_path):
    directory = build_tiny_timm(tmp_path / "m")
    state = safetensors.torch.load_file(directory / "model.safetensors")
    state["blocks.2.mlp.fc2.weight"] = torch.zeros(32, 64)
    safetensors.torch.save_file(state, directory / "model.safetensors")
    with pytest.raises(BackboneError) as err:
        load_backbone(directory)
    assert "blocks.2.mlp.fc2.weight has shape (32, 64), expected (32, 128)" in str(err.value)


def test_an_attention_pool_checkpoint_is_refused_at_its_first_foreign_tensor(tmp_path):
    directory = build_tiny_timm(tmp_path / "m")
    state = safetensors.torch.load_file(directory / "model.safetensors")
    state["attn_pool.latent"] = torch.zeros(1, 1, 32)
    safetensors.torch.save_file(state, directory / "model.safetensors")
    with pytest.raises(BackboneError, match="unexpected tensor attn_pool.latent of shape \\(1, 1, 32\\)"):
        load_backbone(directory)


def test_heads_come_from_model_args_or_timms_table(tmp_path):
    directory = build_tiny_timm(tmp_path / "m")
    cfg = json.loads((directory / "config.json").read_text())
    del cfg["model_args"]  # width 32 is not a timm width: 32 // 64 would be 0 heads, so at least 1
    (directory / "config.json").write_text(json.dumps(cfg))
    assert load_backbone(directory).model.blocks[0].attn.heads == 1
