"""open_clip checkpoints: the mapping onto CLIPModel against an independent forward of open_clip's layout.

open_clip imports torchvision, which cannot load here, so the reference is written from open_clip's
architecture (src/open_clip/transformer.py: VisionTransformer, TextTransformer,
ResidualAttentionBlock with nn.MultiheadAttention; model.py: CLIP) as plain tensor operations on
the checkpoint's own tensors.
"""

import json
import math

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vitclt.backbones import BackboneError, load_backbone
from vitclt.backbones.heads import zero_shot_head
from vitclt.backbones.open_clip import OpenClipBackbone
from vitclt.backbones.tiny import build_tiny_open_clip, tiny_open_clip_config
from vitclt.backbones.tokenizer import clip_tokenizer

from .conftest import random_images


def _ln(x, s, name, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], s[name + ".weight"], s[name + ".bias"], eps)


def _block(x, s, b, heads, act, mask=None):
    """open_clip's ResidualAttentionBlock: x + attn(ln_1 x); then x + mlp(ln_2 x). Returns (x, mlp in, mlp out)."""
    B, T, D = x.shape
    h = _ln(x, s, b + "ln_1")
    q, k, v = (h @ s[b + "attn.in_proj_weight"].T + s[b + "attn.in_proj_bias"]).split(D, dim=-1)
    q, k, v = (t.reshape(B, T, heads, D // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // heads)
    if mask is not None:
        scores = scores + mask
    a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
    x = x + a @ s[b + "attn.out_proj.weight"].T + s[b + "attn.out_proj.bias"]
    x_in = _ln(x, s, b + "ln_2")
    y = act(x_in @ s[b + "mlp.c_fc.weight"].T + s[b + "mlp.c_fc.bias"]) @ s[b + "mlp.c_proj.weight"].T + s[b + "mlp.c_proj.bias"]
    return x + y, x_in, y


def _act(quick_gelu):
    return (lambda t: t * torch.sigmoid(1.702 * t)) if quick_gelu else F.gelu


def reference_image(s, cfg, px):
    """open_clip VisionTransformer.forward (pool_type 'tok'): returns (features, per-block MLP inputs, outputs)."""
    v = cfg["model_cfg"]["vision_cfg"]
    act, heads = _act(cfg["model_cfg"]["quick_gelu"]), v["width"] // v["head_width"]
    x = F.conv2d(px, s["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + s["visual.positional_embedding"]
    x = _ln(x, s, "visual.ln_pre")
    xs, ys = [], []
    for i in range(v["layers"]):
        x, x_in, y = _block(x, s, f"visual.transformer.resblocks.{i}.", heads, act)
        xs.append(x_in)
        ys.append(y)
    return _ln(x, s, "visual.ln_post")[:, 0] @ s["visual.proj"], xs, ys


def reference_text(s, cfg, prompts):
    """open_clip CLIP.encode_text: ids padded with 0 to the context, causal mask, pooled at the argmax id."""
    t = cfg["model_cfg"]["text_cfg"]
    tok = clip_tokenizer()
    ids = torch.zeros(len(prompts), t["context_length"], dtype=torch.long)
    for i, p in enumerate(prompts):
        row = tok(p)["input_ids"]
        ids[i, : len(row)] = torch.tensor(row)
    x = s["token_embedding.weight"][ids] + s["positional_embedding"]
    mask = torch.full((t["context_length"],) * 2, float("-inf")).triu(1)
    for i in range(t["layers"]):
        x, _, _ = _block(x, s, f"transformer.resblocks.{i}.", t["heads"], _act(cfg["model_cfg"]["quick_gelu"]), mask)
    x = _ln(x, s, "ln_final")
    return x[torch.arange(len(prompts)), ids.argmax(-1)] @ s["text_projection"]


@pytest.fixture(scope="module", params=[True, False], ids=["quickgelu", "gelu"])
def checkpoint(request, tmp_path_factory):
    """(directory, state dict, config, backbone) of a tiny open_clip checkpoint with QuickGELU or GELU."""
    directory = build_tiny_open_clip(tmp_path_factory.mktemp("oc"), seed=0, quick_gelu=request.param)
    state = safetensors.torch.load_file(directory / "open_clip_model.safetensors")
    return directory, state, tiny_open_clip_config(request.param), load_backbone(directory)


def test_image_path_and_capture_match_open_clips_architecture(checkpoint):
    _, state, cfg, bb = checkpoint
    assert isinstance(bb, OpenClipBackbone)
    px = bb.preprocess(random_images(3))
    with bb.capture() as cap:
        emb = bb.image_embeds(px)
    with torch.no_grad():
        ref, xs, ys = reference_image(state, cfg, px)
    torch.testing.assert_close(emb, F.normalize(ref, dim=-1), rtol=1e-5, atol=1e-5)
    for layer in range(bb.n_layers):
        torch.testing.assert_close(cap.inputs[layer], xs[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cap.outputs[layer], ys[layer], rtol=1e-5, atol=1e-5)


def test_text_path_matches_open_clips_architecture(checkpoint):
    _, state, cfg, bb = checkpoint
    prompts = ["a photo of a cat.", "a red square", "dog"]
    with torch.no_grad():
        ref = reference_text(state, cfg, prompts)
    torch.testing.assert_close(bb.text_embeds(prompts), F.normalize(ref, dim=-1), rtol=1e-5, atol=1e-5)


def test_zero_shot_head_uses_the_checkpoints_logit_scale(checkpoint):
    _, state, _, bb = checkpoint
    head = zero_shot_head(bb, ["cat", "dog"], ["a photo of a {}."])
    assert head.scale == pytest.approx(float(state["logit_scale"].exp())) and head.bias == 0


def test_the_activation_comes_from_the_config(tmp_path):
    """The weights do not say QuickGELU or GELU: the same tensors under the other flag give other embeddings."""
    quick = build_tiny_open_clip(tmp_path / "q", quick_gelu=True)
    exact = build_tiny_open_clip(tmp_path / "g", quick_gelu=False)
    a, b = load_backbone(quick), load_backbone(exact)
    px = a.preprocess(random_images(2))
    assert not torch.allclose(a.image_embeds(px), b.image_embeds(px))


def test_bin_checkpoint_loads_through_the_restricted_unpickler(tmp_path, checkpoint):
    directory, _, cfg, bb = checkpoint
    binary = build_tiny_open_clip(tmp_path / "bin", seed=0, quick_gelu=cfg["model_cfg"]["quick_gelu"], fmt="bin")
    assert load_backbone(binary).fingerprint == bb.fingerprint


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickled_object_in_a_bin_file_is_refused_without_running_it(tmp_path, capsys):
    directory = build_tiny_open_clip(tmp_path / "evil", fmt="bin")
    state = torch.load(directory / "open_clip_pytorch_model.bin", weights_only=True)
    state["extra"] = _Payload()
    torch.save(state, directory / "open_clip_pytorch_model.bin")
    with pytest.raises(BackboneError, match="not a plain tensor checkpoint"):
        load_backbone(directory)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("edit,expected", [
    ("shape", "visual.transformer.resblocks.1.mlp.c_fc.weight has shape (64, 32), expected (128, 32)"),
    ("missing", "missing tensor visual.ln_post.weight of shape (32,)"),
    ("extra", "unexpected tensor visual.attn_pool.query of shape (4, 32)"),
])
def test_a_checkpoint_of_another_layout_names_the_first_mismatch(tmp_path, edit, expected):
    directory = build_tiny_open_clip(tmp_path / "m")
    path = directory / "open_clip_model.safetensors"
    state = safetensors.torch.load_file(path)
    if edit == "shape":
        state["visual.transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(64, 32)
    elif edit == "missing":
        del state["visual.ln_post.weight"]
    else:
        state["visual.attn_pool.query"] = torch.zeros(4, 32)
    safetensors.torch.save_file(state, path)
    with pytest.raises(BackboneError) as err:
        load_backbone(directory)
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("section,key,value", [("vision_cfg", "ls_init_value", 1e-5), ("text_cfg", "hf_model_name", "roberta"),
                                               ("vision_cfg", "layers", [3, 4, 6, 3]), ("vision_cfg", "brand_new_option", True)])
def test_an_unsupported_open_clip_architecture_is_refused(tmp_path, section, key, value):
    directory = build_tiny_open_clip(tmp_path / "m")
    cfg = json.loads((directory / "open_clip_config.json").read_text())
    cfg["model_cfg"][section][key] = value
    (directory / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BackboneError, match="not supported|unknown open_clip option"):
        load_backbone(directory)


def test_a_weights_file_loads_with_its_config_beside_it_and_not_without(tmp_path, checkpoint):
    directory, _, _, bb = checkpoint
    weights = directory / "open_clip_model.safetensors"
    assert load_backbone(weights).fingerprint == bb.fingerprint
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(weights.read_bytes())
    with pytest.raises(BackboneError, match="openclip:FILE"):
        load_backbone(lone)
    with pytest.raises(BackboneError, match="open_clip_config.json"):
        load_backbone(f"openclip:{lone}")


def test_preprocess_is_open_clips_torchvision_transform_not_transformers_crop(tmp_path):
    """Resize the short side to 32 (a 40×36 image becomes 35×32), centre-crop with torchvision's rounding."""
    cfg = tiny_open_clip_config()
    bb = OpenClipBackbone.from_checkpoint(build_tiny_open_clip(tmp_path / "oc") / "open_clip_model.safetensors", cfg)
    image = random_images(1, size=(40, 36))[0]
    resized = image.resize((35, 32), Image.BICUBIC)
    left = round((35 - 32) / 2)  # torchvision: int(round(1.5)) = 2
    arr = np.asarray(resized.crop((left, 0, left + 32, 32)), dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.array(cfg["preprocess_cfg"]["mean"], dtype=np.float32)[:, None, None]
    std = np.array(cfg["preprocess_cfg"]["std"], dtype=np.float32)[:, None, None]
    ref = torch.from_numpy((arr - mean) / std)
    px = bb.preprocess([image])
    assert torch.equal(px[0], ref)
    # transformers' CLIP processor crops at (35 - 32) // 2 = 1: one pixel off from open_clip here.
    hf = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                               image_mean=cfg["preprocess_cfg"]["mean"], image_std=cfg["preprocess_cfg"]["std"])
    assert not torch.allclose(hf(images=[image], return_tensors="pt")["pixel_values"][0], ref)

