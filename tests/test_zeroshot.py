"""Classification under a task head: zero-shot equals an independent computation of CLIP's protocol."""

import json

import numpy as np
import pytest
import torch

from vitclt.backbones import Replacement
from vitclt.backbones.heads import zero_shot_head
from vitclt.cli import main
from vitclt.data.datasets import load_dataset
from vitclt.eval.zeroshot import build_classifier, evaluate, zero_mlp

from .conftest import write_image_folder

CLASSES = ["cat", "dog", "red car", "tree", "boat", "house"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "art of a {}."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder whose test/ split has 6 classes and 4 images each, PNG on disk."""
    root = tmp_path_factory.mktemp("folder")
    write_image_folder(root / "test", CLASSES, 4, seed=100)
    return root


def _reference_top1(bb, images, labels, classnames, templates) -> float:
    """CLIP's protocol computed directly with the model's own methods and numpy."""
    model, tok = bb.model, bb.tokenizer
    with torch.no_grad():
        class_vecs = []
        for name in classnames:
            t = tok([tp.format(name) for tp in templates], padding=True, return_tensors="pt")
            e = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
            e = getattr(e, "pooler_output", e).numpy()
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
            m = e.mean(0)
            class_vecs.append(m / np.linalg.norm(m))
        px = bb.processor(images=images, return_tensors="pt")["pixel_values"]
        f = model.get_image_features(pixel_values=px)
        f = getattr(f, "pooler_output", f).numpy()
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    pred = (f @ np.stack(class_vecs).T).argmax(1)
    return 100 * float((pred == np.asarray(labels)).mean())


def test_zeroshot_accuracy_equals_an_independent_computation(tiny_backbone, folder):
    ds = load_dataset(f"folder:{folder}")
    images, labels = zip(*[ds[i] for i in range(len(ds))])
    head = zero_shot_head(tiny_backbone, ds.classnames, TEMPLATES)
    got = evaluate(tiny_backbone, ds, head, images_per_forward=5, progress=False)
    assert got.n_images == 24
    assert got.top1 == pytest.approx(_reference_top1(tiny_backbone, list(images), labels, ds.classnames, TEMPLATES))
    assert got.top1 <= got.top5 <= 100


def test_identity_replacement_gives_the_clean_accuracy_and_zeroing_changes_embeddings(tiny_backbone, folder):
    ds = load_dataset(f"folder:{folder}")
    head = zero_shot_head(tiny_backbone, ds.classnames, TEMPLATES)
    clean = evaluate(tiny_backbone, ds, head, progress=False)
    same = evaluate(tiny_backbone, ds, head, replacement=Replacement(lambda layer, x, y: y, [0, 1, 2]), progress=False)
    assert same == clean
    px = tiny_backbone.preprocess([ds[i][0] for i in range(4)])
    with tiny_backbone.replace(zero_mlp, [0, 1, 2]):
        zeroed = tiny_backbone.image_embeds(px)
    assert not torch.allclose(zeroed, tiny_backbone.image_embeds(px))


def test_template_without_placeholder_is_refused(tiny_backbone):
    with pytest.raises(ValueError, match=r"\{\}"):
        build_classifier(tiny_backbone, CLASSES, ["a photo"])


def test_cli_writes_json_with_templates_and_classnames_overrides(tiny_clip_dir, folder, tmp_path, capsys):
    tfile = tmp_path / "t.txt"
    tfile.write_text("\n".join(TEMPLATES) + "\n")
    cfile = tmp_path / "c.txt"
    cfile.write_text("\n".join(f"{c} thing" for c in CLASSES) + "\n")
    out = tmp_path / "zs.json"
    main(["zeroshot", "--backbone", str(tiny_clip_dir), "--dataset", f"folder:{folder}", "--templates", str(tfile),
          "--classnames", str(cfile), "--out", str(out), "--ablate-layers", "1-2", "--device", "cpu", "--no-progress"])
    record = json.loads(out.read_text())
    assert {"top1", "top5", "n_images", "backbone", "dataset"} <= record.keys()
    assert record["n_images"] == 24 and record["n_templates"] == 3 and record["ablated_layers"] == [1, 2]
    assert "top-1" in capsys.readouterr().out


def test_cli_reports_a_missing_dataset_without_a_traceback(tiny_clip_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["zeroshot", "--backbone", str(tiny_clip_dir), "--dataset", f"cifar100:{tmp_path / 'nope'}"])
    assert exit_.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_ablate_layers_use_the_window_grammar_and_ablate_their_union(tiny_clip_dir, folder, tmp_path):
    out = tmp_path / "zs.json"
    main(["zeroshot", "--backbone", str(tiny_clip_dir), "--dataset", f"folder:{folder}", "--out", str(out),
          "--ablate-layers", "0", "last:1", "--device", "cpu", "--no-progress", "--images-per-forward", "7"])
    record = json.loads(out.read_text())
    assert record["ablated_layers"] == [0, 2] and record["config"]["runtime"]["images_per_forward"] == 7


def test_zeroshot_refuses_an_unwritable_out_before_loading_anything(tmp_path, capsys, monkeypatch):
    import vitclt.backbones

    monkeypatch.setattr(vitclt.backbones, "load_backbone", lambda *a, **k: pytest.fail("loaded the backbone first"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["zeroshot", "--out", str(tmp_path / "file" / "zs.json")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "choose another --out" in err
