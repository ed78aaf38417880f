"""Evaluation on every backbone family: its task head, token sets, and a CLT trained and evaluated through the CLI.

Each family's tiny model scores with its own head (zero-shot with a text tower, the checkpoint's
classifier for timm, a linear probe fitted on the training split for DINOv2); the baseline is that
head's accuracy, recomputed here by hand; replacing every MLP output with the captured true one
gives exactly the baseline; SigLIP, which has no CLS token, is evaluated without one.
"""

import json

import numpy as np
import pytest
import torch

from vitclt.backbones import Replacement, load_backbone
from vitclt.backbones.heads import zero_shot_head
from vitclt.cli import main
from vitclt.data.batches import image_batches
from vitclt.data.datasets import load_dataset
from vitclt.errors import ConfigError
from vitclt.eval.metric_keys import check_metric_keys
from vitclt.eval.options import EvalOptions, HeadOptions
from vitclt.eval.replacement import GridBatch, ReplacementGrid, Setting, clean_setting
from vitclt.eval.task import task_head
from vitclt.eval.zeroshot import evaluate
from vitclt.runtime import RuntimeConfig

from .conftest import write_image_folder
from .test_backbone_families import FAMILIES

CLASSES = ["class_0", "class_1", "class_2"]  # read as "class 0".., the tiny timm checkpoint's label names
TEMPLATES = ["a photo of a {}.", "art of the {}."]
HEAD = {"clip": "zeroshot", "siglip": "zeroshot", "openclip": "zeroshot", "dinov2": "probe", "dinov2-reg-swiglu": "probe",
        "timm": "own", "timm-ls-reg-avg": "own"}
BATCH = 8
RUNTIME = RuntimeConfig(images_per_forward=BATCH, workers=0, progress=False, threads=1)
COMMON = ["--device", "cpu", "--threads", "1", "--no-progress", "--images-per-forward", str(BATCH), "--workers", "0"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder with train/ (3 classes × 5) and test/ (3 classes × 3) splits of random PNGs."""
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root / "train", CLASSES, 5, seed=20)
    write_image_folder(root / "test", CLASSES, 3, seed=40)
    return root


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    path = tmp_path_factory.mktemp("templates") / "templates.txt"
    path.write_text("\n".join(TEMPLATES) + "\n")
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, model directory, backbone loaded from it)."""
    directory = FAMILIES[request.param][0](tmp_path_factory.mktemp(request.param.replace("-", "_")))
    return request.param, directory, load_backbone(directory)


def _embeds(bb, dataset):
    """Clean image embeddings (N, P) and labels of a dataset, in the batches the commands use."""
    embeds, labels = [], []
    with torch.inference_mode():
        for images, labels_B in image_batches(dataset, BATCH):
            embeds.append(bb.image_embeds(bb.preprocess(images)))
            labels.append(labels_B)
    return torch.cat(embeds).double().numpy(), torch.cat(labels).numpy()


def _reference_top1(name, bb, folder):
    """The clean accuracy by hand: a ridge probe in numpy (DINOv2), the checkpoint's head rows (timm), CLIP's protocol."""
    test = load_dataset(f"folder:{folder}", "test")
    X_test, y_test = _embeds(bb, test)
    if HEAD[name] == "probe":
        X, y = _embeds(bb, load_dataset(f"folder:{folder}", "train"))
        mu, Y = X.mean(0), np.eye(len(CLASSES))[y]
        Xc = X - mu
        gram = Xc.T @ Xc
        W = np.linalg.solve(gram + 1e-3 * np.trace(gram) / X.shape[1] * np.eye(X.shape[1]), Xc.T @ (Y - Y.mean(0)))
        logits = X_test @ W + (Y.mean(0) - mu @ W)
    elif HEAD[name] == "own":
        head = bb.model.head  # rows 0..2 are "class 0".."class 2"
        logits = X_test @ head.weight.detach().double().numpy()[:3].T + head.bias.detach().double().numpy()[:3]
    else:
        return evaluate(bb, test, zero_shot_head(bb, test.classnames, TEMPLATES), BATCH, progress=False).top1
    return 100 * int((logits.argmax(1) == y_test).sum()) / len(y_test)


def _precision_at_k(X, y, k):
    """Label precision@k of retrieval by cosine, by hand."""
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    sim = X @ X.T
    np.fill_diagonal(sim, -np.inf)
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return float((y[top] == y[:, None]).mean())


def test_a_clt_trains_and_evaluates_end_to_end_through_the_cli(family, folder, templates, tmp_path, capsys):
    name, directory, bb = family
    run = tmp_path / "run"
    main(["train", "--backbone", str(directory), "--dataset", f"folder:{folder}", "--split", "train", "--k", "4",
          "--expansion", "2", "--steps", "4", "--warmup-steps", "0", "--batch-size", "32",
          "--buffer-size", str(8 * bb.n_tokens), "--norm-tokens", "64", "--out", str(run), *COMMON])
    capsys.readouterr()
    main(["eval", str(run), "--dataset", f"folder:{folder}", "--templates", str(templates), "--seeds", "1",
          "--retrieval-k", "2", *COMMON])
    printed = capsys.readouterr().out
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert check_metric_keys(metrics) == []
    base = metrics["baseline"]
    assert base["head"] == HEAD[name] and base["n_images"] == 9
    assert base["top1"] == _reference_top1(name, bb, folder)
    assert (base["probe_split"], base["probe_images"]) == (("train", 15) if HEAD[name] == "probe" else (None, None))
    assert metrics["dataset"]["templates"] == (TEMPLATES if HEAD[name] == "zeroshot" else [])
    X, y = _embeds(bb, load_dataset(f"folder:{folder}", "test"))
    assert base["embedding_precision_at_k"] == pytest.approx(_precision_at_k(X, y, 2), abs=1e-12)
    # The head is named in what is printed, the headline and the report.
    label = {"zeroshot": "zero-shot", "probe": "linear-probe", "own": "own-classifier"}[HEAD[name]]
    assert "task head: " in printed and f"{label} top-1 (%)" in printed
    assert f"Clean {label} top-1" in (run / "eval" / "report.html").read_text()
    [entry] = metrics["transcoders"].values()
    if bb.has_cls_token:
        assert metrics["tokens"] == ["cls", "patches", "all"] and metrics["token_groups"] == ["cls", "patches", "all"]
        assert list(entry["faithfulness"]) == ["all", "cls"] and entry["retrieval"]["pool"] == "cls"
    else:
        assert metrics["tokens"] == ["patches", "all"] and metrics["token_groups"] == ["patches", "all"]
        assert list(entry["faithfulness"]) == ["all"] and entry["retrieval"]["pool"] == "patches"
        assert set(entry["reconstruction"]) == set(entry["attribution"]) == {"patches", "all"}
        assert "has no CLS token, so the defaults leave cls out" in printed
        for flags in (["--replace-tokens", "cls", "all"], ["--faith-tokens", "cls"], ["--retrieval-pool", "cls"]):
            with pytest.raises(SystemExit) as exit_:
                main(["eval", str(run), "--dataset", f"folder:{folder}", "--out", str(tmp_path / "cls"), *flags, *COMMON])
            err = capsys.readouterr().err.strip()
            assert exit_.value.code == 2 and err.count("\n") == 0 and f"{flags[0]} cls" in err and "no CLS token" in err


def test_replacing_every_mlp_with_its_captured_output_gives_exactly_the_baseline(family, folder):
    """Under each family's head (a probe fitted on the train split for DINOv2), in every token set the model has."""
    name, _, bb = family
    test = load_dataset(f"folder:{folder}", "test")
    task = task_head(bb, test, TEMPLATES, HeadOptions(), f"folder:{folder}", "test", RUNTIME)
    assert task.kind == HEAD[name]
    captured = {}
    token_sets = ["patches", "all", [0, bb.n_tokens - 1]] + (["cls"] if bb.has_cls_token else [])

    def true_output(layer, x, y):
        return captured[layer].clone()

    settings = [clean_setting()] + [Setting(f"captured/{t}", lambda codes, t=t: Replacement(true_output, range(bb.n_layers), t))
                                    for t in token_sets]
    grid = ReplacementGrid(bb, task.head, settings)
    with torch.inference_mode():
        for images, labels_B in image_batches(test, BATCH):
            pixels = bb.preprocess(images)
            with bb.capture() as cap:
                clean_BC = task.head.logits(bb.image_embeds(pixels))
            captured.update(enumerate(cap.outputs))
            with bb.replace(true_output, range(bb.n_layers)):
                assert torch.equal(task.head.logits(bb.image_embeds(pixels)), clean_BC)
            grid.update(GridBatch(pixels, labels_B, {}))
    top1 = grid.top1()
    baseline = evaluate(bb, test, task.head, BATCH, progress=False).top1
    assert baseline == _reference_top1(name, bb, folder)
    assert set(top1.values()) == {baseline}


@pytest.mark.parametrize("name", ["dinov2", "timm"])
def test_zeroshot_command_without_a_text_tower_uses_the_probe_or_the_own_head_and_refuses_zeroshot(
        name, folder, tmp_path, capsys):
    directory = FAMILIES[name][0](tmp_path / "model")
    out = tmp_path / "zs.json"
    main(["zeroshot", "--backbone", str(directory), "--dataset", f"folder:{folder}", "--out", str(out), *COMMON])
    record, printed = json.loads(out.read_text()), capsys.readouterr().out
    assert record["head"] == HEAD[name] and record["n_templates"] == 0
    assert record["top1"] == _reference_top1(name, load_backbone(directory), folder)
    if name == "dinov2":
        assert record["probe_images"] == 15 and "task head: a linear probe, fitted on 15 images of the train split" in printed
    else:
        assert "task head: the checkpoint's own classifier" in printed
    for flags, message in ((["--head", "zeroshot"], "has no text tower; use --head probe"),
                           (["--head", "probe", "--split", "train"], "fitted on the evaluated images")):
        with pytest.raises(SystemExit) as exit_:
            main(["zeroshot", "--backbone", str(directory), "--dataset", f"folder:{folder}", *flags, *COMMON])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and err.count("\n") == 0 and message in err


def test_a_probe_head_can_be_forced_on_a_model_with_a_text_tower(tiny_backbone, folder):
    test = load_dataset(f"folder:{folder}", "test")
    task = task_head(tiny_backbone, test, TEMPLATES, HeadOptions(head="probe", probe_images=6), f"folder:{folder}",
                     "test", RUNTIME)
    assert (task.kind, task.probe_split, task.probe_images) == ("probe", "train", 6)
    assert task.note == "task head: a linear probe, fitted on 6 images of the train split"


def test_token_defaults_adapt_to_a_model_without_a_cls_token_and_an_explicit_cls_is_refused():
    resolved, note = EvalOptions().for_backbone(has_cls_token=True)
    assert (resolved.replace_tokens, resolved.faith_tokens, resolved.retrieval_pool, note) == (
        ("cls", "patches", "all"), ("all", "cls"), "cls", "")
    resolved, note = EvalOptions().for_backbone(has_cls_token=False, model="siglip")
    assert (resolved.replace_tokens, resolved.faith_tokens, resolved.retrieval_pool) == (("patches", "all"), ("all",), "patches")
    assert note.count("\n") == 0 and note.startswith("siglip has no CLS token")
    kept, note = EvalOptions(replace_tokens=("all",), retrieval_pool="patches").for_backbone(has_cls_token=False)
    assert (kept.replace_tokens, kept.retrieval_pool) == (("all",), "patches") and "--replace-tokens" not in note
    with pytest.raises(ConfigError, match="--faith-tokens cls: this model has no CLS token"):
        EvalOptions(faith_tokens=("all", "cls")).for_backbone(has_cls_token=False)
