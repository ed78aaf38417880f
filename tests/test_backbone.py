"""Capture and replacement on the blocks' MLPs, checked against the model's own submodules."""

import shutil

import pytest
import safetensors.torch
import torch
from transformers import CLIPModel

from vitclt.backbones import BackboneError, load_backbone
from vitclt.backbones.tiny import build_tiny_clip, tiny_clip_config

from .conftest import random_images


def _manual_mlp_io(model: CLIPModel, pixels):
    """LN2 outputs and MLP outputs by running the vision tower's submodules by hand."""
    vm = model.vision_model
    h = vm.pre_layrnorm(vm.embeddings(pixels))
    xs, ys = [], []
    for layer in vm.encoder.layers:
        attn = layer.self_attn(layer.layer_norm1(h))
        h = h + (attn[0] if isinstance(attn, tuple) else attn)
        x = layer.layer_norm2(h)
        y = layer.mlp.fc2(layer.mlp.activation_fn(layer.mlp.fc1(x)))
        xs.append(x)
        ys.append(y)
        h = h + y
    return xs, ys


def test_capture_returns_ln2_output_and_mlp_output_of_every_layer(tiny_backbone, images):
    px = tiny_backbone.preprocess(images)
    with tiny_backbone.capture() as cap:
        tiny_backbone.image_embeds(px)
    with torch.no_grad():
        xs, ys = _manual_mlp_io(tiny_backbone.model, px)
    assert len(cap.inputs) == tiny_backbone.n_layers == 3
    for layer in range(tiny_backbone.n_layers):
        torch.testing.assert_close(cap.inputs[layer], xs[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cap.outputs[layer], ys[layer], rtol=1e-5, atol=1e-5)
    assert cap.x_BTLD().shape == (len(images), tiny_backbone.n_tokens, 3, tiny_backbone.d_model)


def test_capture_leaves_no_hooks_behind(tiny_backbone, images):
    px = tiny_backbone.preprocess(images)
    with tiny_backbone.capture():
        tiny_backbone.image_embeds(px)
    assert all(not m._forward_hooks for m in tiny_backbone.mlps)


def test_replacing_every_mlp_by_its_own_output_is_bit_identical(tiny_backbone, images):
    px = tiny_backbone.preprocess(images)
    clean = tiny_backbone.image_embeds(px)
    for tokens in ("all", "cls", "patches", [0, 3, 5]):
        with tiny_backbone.replace(lambda layer, x, y: y.clone(), range(tiny_backbone.n_layers), tokens):
            replaced = tiny_backbone.image_embeds(px)
        assert torch.equal(clean, replaced), tokens


def test_cls_replacement_at_last_layer_touches_only_the_cls_path(tiny_backbone, images):
    px = tiny_backbone.preprocess(images)
    last = tiny_backbone.n_layers - 1
    with tiny_backbone.capture() as clean:
        clean_emb = tiny_backbone.image_embeds(px)
    with tiny_backbone.capture() as cap, tiny_backbone.replace(lambda layer, x, y: torch.zeros_like(y), [last], "cls"):
        emb = tiny_backbone.image_embeds(px)
    # Inputs at the last layer are unchanged; the patch tokens' MLP output there is the true one.
    assert torch.equal(cap.inputs[last], clean.inputs[last])
    assert torch.equal(cap.outputs[last][:, 1:], clean.outputs[last][:, 1:])
    assert not torch.allclose(emb, clean_emb)


def test_replaced_patches_at_last_layer_do_not_change_the_cls_embedding(tiny_backbone, images):
    """CLIP pools the CLS token after the last block, so editing only patches there is invisible."""
    px = tiny_backbone.preprocess(images)
    clean = tiny_backbone.image_embeds(px)
    with tiny_backbone.replace(lambda layer, x, y: torch.zeros_like(y), [tiny_backbone.n_layers - 1], "patches"):
        assert torch.equal(tiny_backbone.image_embeds(px), clean)


def test_replacement_at_an_early_layer_cascades_into_later_inputs(tiny_backbone, images):
    px = tiny_backbone.preprocess(images)
    with tiny_backbone.capture() as clean:
        tiny_backbone.image_embeds(px)
    with tiny_backbone.capture() as cap, tiny_backbone.replace(lambda layer, x, y: torch.zeros_like(y), [0], "all"):
        tiny_backbone.image_embeds(px)
    assert torch.equal(cap.inputs[0], clean.inputs[0])
    for layer in range(1, tiny_backbone.n_layers):
        assert not torch.allclose(cap.inputs[layer], clean.inputs[layer])


def test_replacement_fn_sees_every_layer_up_to_the_last_replaced_one(tiny_backbone, images):
    px = tiny_backbone.preprocess(images)
    calls = []

    def record(layer, x, y):
        calls.append(layer)
        return y

    with tiny_backbone.replace(record, [1], "all"):
        tiny_backbone.image_embeds(px)
    assert calls == [0, 1]


def test_replacement_of_wrong_shape_is_a_clear_error(tiny_backbone, images):
    px = tiny_backbone.preprocess(images)
    with pytest.raises(BackboneError, match="expected"):
        with tiny_backbone.replace(lambda layer, x, y: y[:, :1], [0], "all"):
            tiny_backbone.image_embeds(px)


@pytest.mark.parametrize("tokens", ["everything", [99]])
def test_bad_token_selection_is_a_clear_error(tiny_backbone, tokens):
    with pytest.raises(BackboneError):
        tiny_backbone.token_index(tokens)


def test_preprocess_matches_the_model_processor_and_handles_gray_and_rgba(tiny_backbone):
    rgb = random_images(1)[0]
    gray, rgba = rgb.convert("L"), rgb.convert("RGBA")
    px = tiny_backbone.preprocess([rgb, gray, rgba])
    assert px.shape == (3, 3, 32, 32)
    ref = tiny_backbone.processor(images=[rgb], return_tensors="pt")["pixel_values"]
    assert torch.equal(px[:1], ref)
    torch.testing.assert_close(px[2], px[0])


def test_text_embeds_are_normalised_and_tokenised_like_clip(tiny_backbone):
    emb = tiny_backbone.text_embeds(["a photo of a cat.", "a red square"])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert tiny_backbone.tokenizer("a photo of a cat.")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 269, 49407]


def test_tiny_model_is_seedable_and_goes_through_the_loader(tmp_path, images):
    a = load_backbone(build_tiny_clip(tmp_path / "a", seed=1))
    b = load_backbone(build_tiny_clip(tmp_path / "b", seed=1))
    c = load_backbone(build_tiny_clip(tmp_path / "c", seed=2))
    px = a.preprocess(images)
    assert torch.equal(a.image_embeds(px), b.image_embeds(px))
    assert not torch.allclose(a.image_embeds(px), c.image_embeds(px))


def test_model_saved_without_tokenizer_gets_clips_bundled_one(tmp_path):
    CLIPModel(tiny_clip_config()).save_pretrained(tmp_path)
    bb = load_backbone(tmp_path)
    assert bb.tokenizer("a dog")["input_ids"] == [49406, 320, 1929, 49407]


@pytest.mark.parametrize("spec", ["/no/such/dir", "./missing-model", "openai/not-a-real-clip", "weird:thing"])
def test_wrong_backbone_id_or_path_is_a_clear_error(spec):
    with pytest.raises(BackboneError) as err:
        load_backbone(spec)
    assert "hub id" in str(err.value) or "known families" in str(err.value)


def test_directory_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="could not load"):
        load_backbone(tmp_path)


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_fingerprint_is_stable_across_save_and_load_and_dtype(tmp_path, tiny_clip_dir, tiny_backbone):
    fp = tiny_backbone.fingerprint
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert load_backbone(tiny_clip_dir).fingerprint == fp
    tiny_backbone.model.save_pretrained(tmp_path / "resaved")
    assert load_backbone(tmp_path / "resaved").fingerprint == fp
    # float16 weights convert to float32 exactly: loading them either way keeps the fingerprint.
    CLIPModel(tiny_clip_config()).half().save_pretrained(tmp_path / "half")
    as_fp16 = load_backbone(tmp_path / "half", dtype=torch.float16)
    assert as_fp16.fingerprint == load_backbone(tmp_path / "half").fingerprint != fp


@pytest.mark.parametrize("tower,changes", [("vision_model.encoder.layers.1.mlp.fc1.weight", True),
                                            ("visual_projection.weight", True),
                                            ("text_model.encoder.layers.0.mlp.fc1.weight", False)])
def test_one_changed_weight_changes_the_fingerprint_of_the_image_path_only(tmp_path, tiny_clip_dir, tower, changes):
    fp = load_backbone(tiny_clip_dir).fingerprint
    edited = _copy_model(tiny_clip_dir, tmp_path / "edited")
    state = safetensors.torch.load_file(edited / "model.safetensors")
    state[tower][0, 0] += 1e-3
    safetensors.torch.save_file(state, edited / "model.safetensors", metadata={"format": "pt"})
    assert (load_backbone(edited).fingerprint != fp) == changes


@pytest.mark.parametrize("name,damage", [("model.safetensors", "empty"), ("model.safetensors", "truncated"),
                                         ("config.json", "truncated"), ("config.json", "empty"),
                                         ("preprocessor_config.json", "truncated")])
def test_a_damaged_model_file_is_one_line_naming_it(tmp_path, tiny_clip_dir, name, damage):
    broken = _copy_model(tiny_clip_dir, tmp_path / "broken")
    data = (broken / name).read_bytes()
    (broken / name).write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with pytest.raises(BackboneError) as err:
        load_backbone(broken)
    message = str(err.value)
    assert str(broken / name) in message and "re-download" in message and "\n" not in message
