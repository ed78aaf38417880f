"""`vitclt eval` end to end on a tiny backbone and a tiny dataset: metrics.json, figures, report.html."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vitclt.cli import main
from vitclt.commands.eval import EvalConfig, run
from vitclt.errors import VitcltError
from vitclt.eval.metric_keys import METRIC_KEYS, check_metric_keys, markdown_table
from vitclt.eval.options import EvalOptions
from vitclt.eval.suite import find_transcoders
from vitclt.report.summary import headline, headline_table
from vitclt.runtime import RuntimeConfig

from .conftest import write_image_folder
from .test_eval_replacement import make_transcoder

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
CLASSES = ["cat", "dog", "boat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder whose test/ split has 3 classes × 4 random PNG images."""
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root / "test", CLASSES, 4, seed=10)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_clip_dir):
    """A run directory like `vitclt reproduce` writes: CLTs and the PLT / SAE baselines, nested by topology."""
    root = tmp_path_factory.mktemp("run")
    for topology, sparsifier in (("clt", "relu-topk"), ("clt", "jumprelu"), ("plt", "relu-topk"), ("sae", "relu-topk")):
        tc = make_transcoder(topology, sparsifier)
        tc.cfg.backbone = str(tiny_clip_dir)
        tc.save_pretrained(root / topology / sparsifier)
    return root


def test_find_transcoders_names_nested_directories(run_dir, tmp_path):
    found = find_transcoders(run_dir)
    assert list(found) == ["clt-jumprelu", "clt-relu-topk", "plt-relu-topk", "sae-relu-topk"]
    assert find_transcoders(run_dir / "plt" / "relu-topk") == {"relu-topk": run_dir / "plt" / "relu-topk"}
    with pytest.raises(FileNotFoundError, match="no transcoder"):
        find_transcoders(tmp_path)


def test_eval_writes_every_documented_key_and_a_self_contained_report(run_dir, folder, tmp_path, capsys):
    out = tmp_path / "eval"
    report = run(EvalConfig(run_dir, dataset=f"folder:{folder}", out=out,
                            options=EvalOptions(seeds=2, retrieval_k=2, retrieval_queries=1),
                            runtime=RuntimeConfig(images_per_forward=5, workers=0, progress=False, threads=1)))
    printed = capsys.readouterr().out
    assert report == out / "report.html" and f"report: {report}" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert check_metric_keys(metrics) == []
    assert metrics["baseline"]["n_images"] == 12 and metrics["windows"] == ["0-2", "1-2", "2-2"]
    clt = metrics["transcoders"]["clt-relu-topk"]
    for group in ("cls", "patches", "all"):
        m = clt["attribution"][group]["matrix"]
        for j in range(3):
            assert sum(m[i][j] for i in range(3)) == pytest.approx(1.0, abs=1e-9)
            assert all(m[i][j] == 0 for i in range(j + 1, 3))
    assert "attribution" not in metrics["transcoders"]["plt-relu-topk"]
    faith = clt["faithfulness"]["all"]
    assert faith["k"] == 1 and len(faith["drop_random"]["runs"]) == 2
    assert faith["full"]["delta_full"] == 0
    assert clt["reconstruction"]["all"]["mean"]["l0"] == pytest.approx(4.0)
    html = report.read_text()
    assert html.count("data:image/png;base64,") >= 8 and 'src="figures' not in html
    for section in ("Reconstruction", "Cascaded replacement", "contribution scores", "Faithfulness", "retrieval",
                    "Baselines", "Protocol", "a photo of a {}."):
        assert section in html
    assert sorted(p.name for p in (out / "figures").iterdir())[:3] == ["contributions_clt-jumprelu.png",
                                                                      "contributions_clt-relu-topk.png",
                                                                      "faithfulness_clt-jumprelu.png"]
    assert "reads its image embedding from the CLS token after the last block" in html
    # The printed headline table and the report's carry the numbers of metrics.json.
    table = headline(metrics)
    assert headline_table(metrics) in printed
    row = next(r for r in table.rows if r[0] == "clt-relu-topk")
    assert row[1] == f"{clt['reconstruction']['all']['mean']['l0']:.1f}"
    assert row[2] == f"{clt['reconstruction']['all']['mean']['r2']:.4f}"
    assert row[4] == f"{clt['replacement']['0-2']['all']['top1']:.2f}"
    assert row[5] == f"{clt['replacement']['2-2']['all']['top1']:.2f}"
    assert row[6:] == [f"{faith[e]['top1']:.2f}" for e in ("drop_top1", "drop_random", "keep_topk", "keep_random")]
    assert "".join(f"<td class=\"\">{c}</td>" for c in row[1:]) in html


def test_cli_eval_runs_and_reports_bad_input(run_dir, folder, tmp_path, capsys):
    main(["eval", str(run_dir / "clt" / "relu-topk"), "--dataset", f"folder:{folder}", "--windows", "2-2",
          "--replace-tokens", "cls", "all", "--seeds", "1", "--out", str(tmp_path / "e"), "--no-progress"])
    assert "report:" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["windows"] == ["2-2"] and metrics["tokens"] == ["cls", "all"]
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path / "missing"), "--dataset", f"folder:{folder}"])
    assert "does not exist" in capsys.readouterr().err


def test_mismatched_backbone_is_a_clear_error(tmp_path, folder, tiny_clip_dir):
    tc = make_transcoder(n_layers=4)
    tc.cfg.backbone = str(tiny_clip_dir)
    tc.save_pretrained(tmp_path / "tc")
    with pytest.raises(ValueError, match="does not fit backbone"):
        run(EvalConfig(tmp_path / "tc", dataset=f"folder:{folder}", runtime=RuntimeConfig(workers=0, progress=False)))


def test_docs_list_exactly_the_documented_keys():
    doc = DOCS.read_text()
    assert markdown_table() in doc, "docs/metrics.md is out of date: paste vitclt.eval.metric_keys.markdown_table()"
    keys = re.findall(r"^\| `([^`]+)` \|", doc, flags=re.M)
    assert keys == [k.key for k in METRIC_KEYS]


def test_eval_into_an_unwritable_directory_fails_at_once_in_one_line(run_dir, tmp_path, capsys, monkeypatch):
    import vitclt.backbones

    monkeypatch.setattr(vitclt.backbones, "load_backbone", lambda *a, **k: pytest.fail("loaded the backbone first"))
    (tmp_path / "file").write_text("")
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(run_dir), "--out", str(tmp_path / "file" / "eval")])
    assert time.perf_counter() - start < 1 and exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"cannot write to {tmp_path / 'file' / 'eval'}" in err and "--out" in err


def test_eval_templates_take_a_shipped_set_name(run_dir, folder, tmp_path):
    main(["eval", str(run_dir / "clt" / "relu-topk"), "--dataset", f"folder:{folder}", "--windows", "2", "--seeds", "1",
          "--templates", "imagenet7", "--out", str(tmp_path / "e"), "--no-progress"])
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert len(metrics["dataset"]["templates"]) == 7 and metrics["windows"] == ["2-2"]


def test_the_report_renders_metrics_without_the_evaluation_library():
    code = ("import sys, vitclt.report.html, vitclt.report.summary; "
            "print(sorted(m for m in sys.modules if m.startswith('vitclt.eval')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_transcoder_trained_on_other_weights_is_refused_unless_allowed_and_then_marked(folder, tiny_clip_dir, tmp_path,
                                                                                         tiny_backbone):
    tc = make_transcoder("clt", "relu-topk")
    tc.cfg.backbone = str(tiny_clip_dir)
    tc.cfg.backbone_fingerprint = "0" * 16  # trained on weights of the same shape that are not these
    tc.save_pretrained(tmp_path / "run" / "clt")
    cfg = EvalConfig(tmp_path / "run", dataset=f"folder:{folder}", out=tmp_path / "eval",
                     options=EvalOptions(seeds=1, retrieval_k=2, retrieval_queries=1),
                     runtime=RuntimeConfig(images_per_forward=6, workers=0, progress=False, threads=1))
    with pytest.raises(VitcltError, match=f"fingerprint 0{{16}}, but .* has fingerprint {tiny_backbone.fingerprint}: .*"
                                          "--allow-backbone-mismatch"):
        run(cfg)
    assert not (tmp_path / "eval" / "metrics.json").exists()
    cfg.allow_backbone_mismatch = True
    report = run(cfg)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["transcoders"]["clt"]["backbone_mismatch"] is True
    assert metrics["backbone"]["fingerprint"] == tiny_backbone.fingerprint
    assert "Backbone mismatch:" in report.read_text()
