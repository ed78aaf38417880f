"""DINOv2: capture of ls2(mlp(norm2 h)) through the model's own submodules (MLP and SwiGLU, with and
without registers), the processor's crop, and the linear-probe task head."""

import pytest
import torch
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

from vitclt.backbones import BackboneError, load_backbone
from vitclt.backbones.heads import LinearHead, build_task_head, fit_probe
from vitclt.backbones.tiny import build_tiny_dinov2

from .conftest import random_images

VARIANTS = {"plain": dict(), "registers-swiglu": dict(registers=2, swiglu=True), "registers": dict(registers=3)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def dino(request, tmp_path_factory):
    """(directory, backbone) of a tiny DINOv2 variant: 3 layers, width 32, patch 8 on a 32-px crop."""
    directory = build_tiny_dinov2(tmp_path_factory.mktemp(f"dino_{request.param}"), seed=0, **VARIANTS[request.param])
    return directory, load_backbone(directory)


def _mlp(mlp, x):
    if hasattr(mlp, "gate_proj"):  # SwiGLU (the giant model)
        return mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    return mlp.fc2(mlp.activation_fn(mlp.fc1(x)))


def test_capture_is_norm2_output_and_the_layer_scaled_mlp_output(dino):
    _, bb = dino
    px = bb.preprocess(random_images(3))
    with bb.capture() as cap:
        emb = bb.image_embeds(px)
    m = bb.model
    with torch.no_grad():
        h = m.embeddings(px)
        for i, layer in enumerate(m.encoder.layer):
            h = h + layer.layer_scale1(layer.attention(layer.norm1(h))[0])
            x = layer.norm2(h)
            y = layer.layer_scale2.lambda1 * _mlp(layer.mlp, x)
            torch.testing.assert_close(cap.inputs[i], x, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cap.outputs[i], y, rtol=1e-5, atol=1e-5)
            # The layer scale is part of the captured output (the tiny model's scales are not 1).
            assert not torch.allclose(cap.outputs[i], _mlp(layer.mlp, x), atol=1e-3)
            h = h + y
        cls = m.layernorm(h)[:, 0]
    torch.testing.assert_close(emb, cls, rtol=1e-5, atol=1e-5)


def test_sequence_is_cls_then_registers_then_patches(dino):
    _, bb = dino
    registers = bb.model.config.to_dict().get("num_register_tokens", 0)
    assert bb.n_prefix_tokens == 1 + registers
    assert bb.n_tokens == 1 + registers + 16
    assert bb.token_index("cls") == slice(0, 1)
    assert bb.token_index("patches") == slice(1 + registers, bb.n_tokens)


def test_preprocess_is_the_saved_processor_and_sets_the_token_count(dino):
    directory, bb = dino
    images = random_images(2, size=(53, 41))
    ref = BitImageProcessorPil.from_pretrained(directory)(images=images, return_tensors="pt")["pixel_values"]
    px = bb.preprocess(images)
    assert torch.equal(px, ref) and px.shape == (2, 3, 32, 32)
    # The model is configured for 40 px; the sequence length follows the processor's 32-px crop.
    assert bb.model.config.image_size == 40 and bb.image_size == 32


def test_zero_shot_is_refused_without_a_text_tower(dino):
    _, bb = dino
    assert not bb.has_text_tower
    with pytest.raises(BackboneError, match="no text tower"):
        bb.text_embeds(["a cat"])
    with pytest.raises(BackboneError, match="linear probe"):
        build_task_head(bb, ["a", "b"], ["{}"])


def test_probe_is_a_ridge_regression_and_its_accuracy_matches_an_independent_solve(dino):
    _, bb = dino
    images = random_images(24, seed=7)
    labels = torch.arange(24) % 3
    batches = [(images[i : i + 8], labels[i : i + 8]) for i in range(0, 24, 8)]
    head = build_task_head(bb, ["a", "b", "c"], train_batches=batches)
    assert isinstance(head, LinearHead) and head.kind == "probe"
    emb = bb.image_embeds(bb.preprocess(images)).double()
    # Independent: least squares on [X - mean, 1] with sqrt(lambda) ridge rows, one-hot targets.
    Xc = emb - emb.mean(0)
    lam = 1e-3 * float(Xc.square().sum()) / emb.shape[1]
    A = torch.cat([torch.cat([Xc, torch.ones(24, 1, dtype=torch.float64)], 1),
                   torch.cat([lam**0.5 * torch.eye(emb.shape[1], dtype=torch.float64),
                              torch.zeros(emb.shape[1], 1, dtype=torch.float64)], 1)])
    Y = torch.cat([torch.nn.functional.one_hot(labels, 3).double(), torch.zeros(emb.shape[1], 3, dtype=torch.float64)])
    sol = torch.linalg.lstsq(A, Y).solution
    ref_logits = Xc @ sol[:-1] + sol[-1]
    torch.testing.assert_close(head.logits(emb.float()), ref_logits.float(), rtol=1e-3, atol=1e-4)
    top1, _ = head.correct(emb.float(), labels)
    assert torch.equal(top1, ref_logits.argmax(1) == labels)


def test_probe_is_deterministic_and_scores_a_replaced_forward_with_the_clean_fit(dino):
    _, bb = dino
    images = random_images(12, seed=2)
    labels = torch.arange(12) % 2
    a = fit_probe(bb, [(images, labels)], 2)
    b = fit_probe(bb, [(images, labels)], 2)
    assert torch.equal(a.W_CP, b.W_CP) and torch.equal(a.b_C, b.b_C)
    px = bb.preprocess(images)
    clean = a.logits(bb.image_embeds(px))
    with bb.replace(lambda layer, x, y: torch.zeros_like(y), [bb.n_layers - 1], "cls"):
        ablated = a.logits(bb.image_embeds(px))
    assert not torch.allclose(clean, ablated)


def test_an_empty_training_split_is_a_clear_error(dino):
    _, bb = dino
    with pytest.raises(BackboneError, match="empty"):
        fit_probe(bb, [], 2)
