"""Family detection and its errors, and the task heads every family's evaluation goes through."""

import json

import pytest
import torch
from transformers import CLIPModel, ViTConfig, ViTModel

from vitclt.backbones import BackboneError, load_backbone
from vitclt.backbones.heads import build_task_head, zero_shot_head
from vitclt.backbones.hf_siglip import SiglipBackbone
from vitclt.backbones.loading import FAMILIES
from vitclt.backbones.tiny import build_tiny_siglip

from .conftest import random_images


def _assert_lists_families(message: str):
    assert "\n" not in message
    for family in FAMILIES:
        assert family in message


def test_a_directory_of_an_unsupported_architecture_lists_the_supported_families(tmp_path):
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
    with pytest.raises(BackboneError) as err:
        load_backbone(tmp_path / "vit")
    assert "'vit' model (ViTModel)" in str(err.value)
    _assert_lists_families(str(err.value))


def test_a_config_naming_no_architecture_lists_the_supported_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(BackboneError) as err:
        load_backbone(tmp_path)
    assert "names no model_type" in str(err.value)
    _assert_lists_families(str(err.value))


def test_a_lone_weights_file_of_unknown_family_asks_for_a_prefix(tmp_path):
    import safetensors.torch

    safetensors.torch.save_file({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")
    with pytest.raises(BackboneError) as err:
        load_backbone(tmp_path / "weights.safetensors")
    assert "openclip:FILE or timm:FILE" in str(err.value)
    _assert_lists_families(str(err.value))


def test_hf_prefix_detects_the_family_too(tmp_path):
    assert isinstance(load_backbone(f"hf:{build_tiny_siglip(tmp_path / 's')}"), SiglipBackbone)


def test_clip_zero_shot_head_equals_clips_own_logits(tiny_backbone):
    classnames = ["cat", "dog", "tree"]
    head = zero_shot_head(tiny_backbone, classnames, ["{}"])
    px = tiny_backbone.preprocess(random_images(4))
    tok = tiny_backbone.tokenizer(classnames, padding=True, return_tensors="pt")
    model: CLIPModel = tiny_backbone.model
    with torch.no_grad():
        own = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=px).logits_per_image
    torch.testing.assert_close(head.logits(tiny_backbone.image_embeds(px)), own, rtol=1e-4, atol=1e-4)
    assert head.bias == 0.0


def test_clip_zero_shot_classifier_is_evals_protocol(tiny_backbone):
    from vitclt.eval.zeroshot import build_classifier

    classnames, templates = ["cat", "dog"], ["a photo of a {}.", "a drawing of a {}."]
    torch.testing.assert_close(zero_shot_head(tiny_backbone, classnames, templates).classifier_CP,
                               build_classifier(tiny_backbone, classnames, templates))


@pytest.mark.parametrize("kind,match", [("own", "no classifier of its own"), ("nearest", "unknown task head"),
                                        ("probe", "needs the labelled training split")])
def test_a_head_that_cannot_be_built_is_a_clear_error(tiny_backbone, kind, match):
    with pytest.raises(BackboneError, match=match):
        build_task_head(tiny_backbone, ["cat", "dog"], ["{}"], kind=kind)


def test_a_probe_can_replace_zero_shot_on_a_text_model(tiny_backbone):
    images = random_images(6)
    head = build_task_head(tiny_backbone, ["a", "b"], kind="probe", train_batches=[(images, torch.tensor([0, 1] * 3))])
    assert head.kind == "probe" and head.logits(tiny_backbone.image_embeds(tiny_backbone.preprocess(images))).shape == (6, 2)


def _edit_json(path, edit):
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


DISAGREEING_CONFIGS = {
    # family: (builder, config file, edit making it disagree with the weights, what the one line names)
    "clip-layers": ("clip", "config.json", lambda c: c["vision_config"].update(num_hidden_layers=6),
                    "the config implies .* weight values, the safetensors files hold"),
    "clip-width": ("clip", "config.json", lambda c: c["vision_config"].update(intermediate_size=2_000_000_000),
                   r"the config implies \d{3},\d{3},\d{3},\d{3} weight values"),
    "siglip-layers": ("siglip", "config.json", lambda c: c["vision_config"].update(num_hidden_layers=6),
                      "the config implies .* weight values, the safetensors files hold"),
    "dinov2-layers": ("dinov2", "config.json", lambda c: c.update(num_hidden_layers=6),
                      "the config implies .* weight values, the safetensors files hold"),
    "dinov2-width": ("dinov2", "config.json", lambda c: c.update(mlp_ratio=10_000_000), "the config implies"),
    "openclip-layers": ("openclip", "open_clip_config.json", lambda c: c["model_cfg"]["vision_cfg"].update(layers=6),
                        "missing tensor visual.transformer.resblocks.3"),
}


@pytest.mark.parametrize("case", list(DISAGREEING_CONFIGS))
def test_a_backbone_config_that_disagrees_with_its_weights_is_refused_before_allocating(case, tmp_path, monkeypatch):
    from vitclt.backbones import tiny

    family, config_name, edit, named = DISAGREEING_CONFIGS[case]
    directory = getattr(tiny, f"build_tiny_{'open_clip' if family == 'openclip' else family}")(tmp_path / family)
    _edit_json(directory / config_name, edit)
    from transformers import PreTrainedModel

    def allocating(*args, **kwargs):
        raise AssertionError("transformers built the model before the config was checked against the weights")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(allocating))
    with pytest.raises(BackboneError, match=named) as err:
        load_backbone(directory)
    assert "\n" not in str(err.value) and str(directory) in str(err.value)
