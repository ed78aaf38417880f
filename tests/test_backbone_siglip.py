"""SigLIP: capture through the model's own submodules, no CLS token, its own text tower and scoring."""

import pytest
import torch
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from vitclt.backbones import BackboneError, load_backbone
from vitclt.backbones.heads import build_task_head, zero_shot_head
from vitclt.backbones.hf_siglip import SiglipBackbone
from vitclt.backbones.tiny import build_tiny_siglip

from .conftest import random_images


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    """A tiny SiglipModel (3 layers, width 32, 32 px, patch 8: 16 tokens) loaded from its directory."""
    return load_backbone(build_tiny_siglip(tmp_path_factory.mktemp("siglip"), seed=0))


def test_capture_equals_a_forward_through_the_models_own_submodules(siglip):
    px = siglip.preprocess(random_images(3))
    with siglip.capture() as cap:
        emb = siglip.image_embeds(px)
    vm = siglip.model.vision_model
    with torch.no_grad():
        h = vm.embeddings(px)
        for i, layer in enumerate(vm.encoder.layers):
            h = h + layer.self_attn(layer.layer_norm1(h))[0]
            x = layer.layer_norm2(h)
            y = layer.mlp.fc2(layer.mlp.activation_fn(layer.mlp.fc1(x)))
            torch.testing.assert_close(cap.inputs[i], x, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cap.outputs[i], y, rtol=1e-5, atol=1e-5)
            h = h + y
        pooled = vm.head(vm.post_layernorm(h))
    torch.testing.assert_close(emb, torch.nn.functional.normalize(pooled, dim=-1), rtol=1e-5, atol=1e-5)


def test_siglip_has_no_cls_token_so_cls_selection_is_refused(siglip):
    assert siglip.n_prefix_tokens == 0 and siglip.n_tokens == 16 and not siglip.has_cls_token
    with pytest.raises(BackboneError, match="no CLS token"):
        siglip.token_index("cls")
    assert siglip.token_index("patches") == slice(0, 16)


def test_patch_edits_at_the_last_layer_reach_the_pooled_embedding(siglip):
    """Unlike CLIP, SigLIP pools every token with its attention head: no token is invisible to the embedding."""
    px = siglip.preprocess(random_images(2))
    clean = siglip.image_embeds(px)
    with siglip.replace(lambda layer, x, y: torch.zeros_like(y), [siglip.n_layers - 1], [5]):
        assert not torch.allclose(siglip.image_embeds(px), clean)


def test_preprocess_is_the_models_own_processor(siglip, tmp_path):
    images = random_images(2, size=(47, 31))
    ref = SiglipImageProcessorPil(size={"height": 32, "width": 32})(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(siglip.preprocess(images), ref)
    gray = images[0].convert("L")
    assert siglip.preprocess([gray]).shape == (1, 3, 32, 32)


def test_text_is_padded_to_the_full_context_as_siglip_was_trained(siglip):
    """SigLIP's text embedding is the last position's, so a prompt's embedding must not depend on its batch."""
    short, long = "a cat", "a photo of a very large and rather fluffy grey cat sitting"
    alone = siglip.text_embeds([short])
    batched = siglip.text_embeds([short, long])
    torch.testing.assert_close(alone[0], batched[0], rtol=1e-5, atol=1e-6)
    ids = siglip.tokenizer([short], padding="max_length", max_length=siglip.max_text_length, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = siglip.model.text_model(input_ids=ids).pooler_output
    torch.testing.assert_close(alone, torch.nn.functional.normalize(ref, dim=-1), rtol=1e-5, atol=1e-6)


def test_zero_shot_head_scores_like_siglips_own_forward(siglip):
    classnames = ["cat", "dog", "red square", "tree"]
    head = zero_shot_head(siglip, classnames, ["{}"])
    images = random_images(5, seed=3)
    px = siglip.preprocess(images)
    logits = head.logits(siglip.image_embeds(px))
    ids = siglip.tokenizer(classnames, padding="max_length", max_length=siglip.max_text_length, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        own = siglip.model(input_ids=ids, pixel_values=px).logits_per_image
    torch.testing.assert_close(logits, own, rtol=1e-4, atol=1e-4)
    scale, bias = siglip.logit_scale_bias()
    assert bias == pytest.approx(-3.0) and scale == pytest.approx(torch.e**2, rel=1e-5)
    # The match probability is the sigmoid of the logit: its argmax is the logit's.
    assert torch.equal(torch.sigmoid(own).argmax(1), logits.argmax(1))
    labels = torch.tensor([0, 1, 2, 3, 0])
    top1, _ = head.correct(siglip.image_embeds(px), labels)
    assert torch.equal(top1, own.argmax(1) == labels)


def test_auto_head_of_siglip_is_zero_shot(siglip):
    head = build_task_head(siglip, ["cat", "dog"], ["a photo of a {}."])
    assert head.kind == "zeroshot" and head.n_classes == 2


def test_a_missing_sentencepiece_tokenizer_is_a_clear_error_only_when_text_is_used(tmp_path):
    directory = build_tiny_siglip(tmp_path / "m")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)
    bb = load_backbone(directory)
    assert isinstance(bb, SiglipBackbone)
    bb.image_embeds(bb.preprocess(random_images(1)))  # images need no tokenizer
    with pytest.raises(BackboneError, match="tokenizer"):
        bb.text_embeds(["a cat"])
