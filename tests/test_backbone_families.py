"""The guarantees every backbone family gives, on a tiny model of each loaded through `load_backbone`.

Capture and replacement act on the blocks' MLPs the same way whatever the family: identity
replacement is bit-identical, replacements cascade, capture sees the true output under a
replacement (also where a layer scale follows the MLP), hooks are removed, the fingerprint follows
the weights, and a transcoder trains on the activations.
"""

from pathlib import Path

import pytest
import safetensors.torch
import torch

from vitclt.backbones import load_backbone
from vitclt.backbones.hf_clip import HFClipBackbone
from vitclt.backbones.hf_dinov2 import Dinov2Backbone
from vitclt.backbones.hf_siglip import SiglipBackbone
from vitclt.backbones.open_clip import OpenClipBackbone
from vitclt.backbones.timm_vit import TimmViTBackbone
from vitclt.backbones.tiny import (
    build_tiny_clip,
    build_tiny_dinov2,
    build_tiny_open_clip,
    build_tiny_siglip,
    build_tiny_timm,
)

from .conftest import random_images

FAMILIES = {
    # name: (builder, class, prefix, weights file, an MLP weight in it)
    "clip": (build_tiny_clip, HFClipBackbone, "clip", "model.safetensors", "vision_model.encoder.layers.1.mlp.fc1.weight"),
    "siglip": (build_tiny_siglip, SiglipBackbone, "siglip", "model.safetensors",
               "vision_model.encoder.layers.1.mlp.fc1.weight"),
    "dinov2": (build_tiny_dinov2, Dinov2Backbone, "dinov2", "model.safetensors", "encoder.layer.1.mlp.fc1.weight"),
    "dinov2-reg-swiglu": (lambda d, seed=0: build_tiny_dinov2(d, seed, registers=2, swiglu=True), Dinov2Backbone, "dinov2",
                          "model.safetensors", "encoder.layer.1.layer_scale2.lambda1"),
    "openclip": (build_tiny_open_clip, OpenClipBackbone, "openclip", "open_clip_model.safetensors",
                 "visual.transformer.resblocks.1.mlp.c_fc.weight"),
    "timm": (build_tiny_timm, TimmViTBackbone, "timm", "model.safetensors", "blocks.1.mlp.fc1.weight"),
    "timm-ls-reg-avg": (lambda d, seed=0: build_tiny_timm(d, seed, layer_scale=True, reg_tokens=2, global_pool="avg"),
                        TimmViTBackbone, "timm", "model.safetensors", "blocks.1.ls2.gamma"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, model directory, backbone loaded from it by detection)."""
    build = FAMILIES[request.param][0]
    directory = build(tmp_path_factory.mktemp(request.param.replace("-", "_")))
    return request.param, directory, load_backbone(directory)


def token_sets(bb):
    return ["all", "patches", [0, 3, bb.n_tokens - 1]] + (["cls"] if bb.has_cls_token else [])


def test_family_is_detected_from_its_files_and_loads_by_prefix_too(family):
    name, directory, bb = family
    _, cls, prefix, _, _ = FAMILIES[name]
    assert type(bb) is cls
    again = load_backbone(f"{prefix}:{directory}")
    assert type(again) is cls and again.fingerprint == bb.fingerprint


def test_tiny_models_have_random_layernorms_and_biases(family):
    """Identity LayerNorms or zero biases would let code that reads the wrong norm or drops a bias pass the tests."""
    _, _, bb = family
    norms = [m for m in bb.model.modules() if isinstance(m, torch.nn.LayerNorm)]
    biases = [(n, p) for n, p in bb.model.named_parameters() if n.endswith("bias") and p.dim() == 1]
    assert norms and biases
    for ln in norms:
        assert (ln.weight - 1).abs().min() > 0 and ln.bias.abs().min() > 0
        assert not torch.allclose(ln.weight, torch.ones_like(ln.weight), atol=0.02)
    for name, b in biases:
        assert not torch.allclose(b, torch.zeros_like(b), atol=0.02), name


def test_capture_records_every_layer_in_one_forward_and_leaves_no_hooks(family):
    _, _, bb = family
    px = bb.preprocess(random_images(3))
    with bb.capture() as cap:
        bb.image_embeds(px)
    assert cap.x_BTLD().shape == cap.y_BTLD().shape == (3, bb.n_tokens, bb.n_layers, bb.d_model)
    with bb.replace(lambda layer, x, y: y, [bb.n_layers - 1]):
        bb.image_embeds(px)
    modules = [m for site in bb.mlp_sites for m in (site.mlp, site.out)]
    assert all(not m._forward_hooks for m in modules)


def test_replacing_every_mlp_output_by_itself_is_bit_identical(family):
    _, _, bb = family
    px = bb.preprocess(random_images(3))
    clean = bb.image_embeds(px)
    for tokens in token_sets(bb):
        with bb.replace(lambda layer, x, y: y.clone(), range(bb.n_layers), tokens):
            assert torch.equal(bb.image_embeds(px), clean), tokens


def test_replacement_cascades_and_capture_still_sees_the_true_output(family):
    _, _, bb = family
    px = bb.preprocess(random_images(3))
    with bb.capture() as clean:
        clean_emb = bb.image_embeds(px)
    seen = []

    def zero_at_1(layer, x, y):
        seen.append((layer, torch.equal(x, clean.inputs[layer])))
        return torch.zeros_like(y)

    with bb.capture() as cap, bb.replace(zero_at_1, [1]):
        emb = bb.image_embeds(px)
    # fn saw layers 0 and 1 with their clean inputs; capture kept layer 1's true (not zeroed) output.
    assert seen == [(0, True), (1, True)]
    assert torch.equal(cap.outputs[1], clean.outputs[1])
    for layer in range(2, bb.n_layers):
        assert not torch.allclose(cap.inputs[layer], clean.inputs[layer])
    assert not torch.allclose(emb, clean_emb)


def test_replacing_with_the_captured_output_reproduces_the_clean_forward(family):
    """What replace() substitutes is exactly what capture() recorded: the stream's residual contribution."""
    _, _, bb = family
    px = bb.preprocess(random_images(2))
    with bb.capture() as clean:
        clean_emb = bb.image_embeds(px)
    with bb.replace(lambda layer, x, y: clean.outputs[layer].clone(), range(bb.n_layers)):
        assert torch.equal(bb.image_embeds(px), clean_emb)


def test_fingerprint_follows_the_weights(family, tmp_path):
    import shutil

    name, directory, bb = family
    _, _, _, weights, key = FAMILIES[name]
    assert len(bb.fingerprint) == 16
    assert load_backbone(directory).fingerprint == bb.fingerprint
    edited = Path(shutil.copytree(directory, tmp_path / "edited"))
    state = safetensors.torch.load_file(edited / weights)
    state[key].view(-1)[0] += 1e-3
    safetensors.torch.save_file(state, edited / weights, metadata={"format": "pt"})
    assert load_backbone(edited).fingerprint != bb.fingerprint


def test_a_transcoder_trains_on_the_activations_of_every_family(family, tmp_path):
    """`vitclt train --backbone DIR` needs only capture(): a short run on each family writes a transcoder."""
    from vitclt.nn import Transcoder
    from vitclt.training import TrainConfig, train

    _, directory, bb = family
    folder = tmp_path / "images"
    for i, im in enumerate(random_images(8, seed=5)):
        (folder / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
        im.save(folder / f"class_{i % 2}" / f"{i}.png")
    cfg = TrainConfig.from_json(dict(
        backbone=str(directory), dataset=f"folder:{folder}", split="all", tokens="all", sparsifier=["relu-topk"], k=[4],
        expansion=2, steps=10, batch_size=32, warmup_steps=2, buffer_size=8 * bb.n_tokens, norm_tokens=64,
        images_per_forward=8, workers=1, checkpoint_every=10, log_every=5, threads=1, device="cpu",
        out=str(tmp_path / "run"), progress=False))
    [path] = train(cfg)
    model = Transcoder.from_pretrained(path)
    assert (model.n_layers, model.d_model) == (bb.n_layers, bb.d_model)
