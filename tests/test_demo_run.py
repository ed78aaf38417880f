"""`vitclt demo` end to end, reduced to CI size: the shipped model, the generated world, every report section."""

import json
from pathlib import Path

import pytest

from vitclt.cli import main, parse
from vitclt.commands.demo import DEMO, FRONTIER_MODELS
from vitclt.eval.metric_keys import check_metric_keys
from vitclt.report.summary import headline_table

from .conftest import write_image_folder

SECTIONS = [
    "Sparsity–fidelity frontiers",
    "Reconstruction of MLP outputs",
    "Cascaded replacement",
    "Linear decomposition and contribution scores",
    "Faithfulness: necessity and sufficiency",
    "Cross-layer retrieval",
    "Baselines: CLT vs per-layer transcoder vs SAE",
    "Protocol and configuration",
]


def test_demo_is_a_preset_of_reproduce_with_the_demo_sizes():
    name, cfg = parse(["demo"])
    assert name == "demo" and cfg == DEMO
    assert (cfg.max_images, cfg.optim.steps, cfg.eval_images, cfg.evaluation.seeds) == (2000, 200, 400, 3)
    assert (cfg.sweep.models, cfg.sweep.k, cfg.transcoder.expansion, cfg.optim.batch_size) == (FRONTIER_MODELS, (8, 16, 32), 8,
                                                                                                  1024)
    assert (cfg.runtime.threads, cfg.runtime.workers, cfg.out, cfg.overwrite) == (1, 1, Path("runs/demo"), True)
    quick = parse(["demo", "--quick"])[1].sized()
    sizes = (quick.max_images, quick.optim.steps, quick.eval_images, quick.evaluation.seeds, quick.optim.warmup)
    assert sizes == (400, 100, 160, 2, 10)
    name, cfg = parse(["reproduce", "--windows", "0-2", "last:1"])
    assert name == "reproduce" and cfg.evaluation.windows == ("0-2", "last:1") and cfg.command == "reproduce"


def test_demo_never_touches_a_train_run_in_its_out(tmp_path, tiny_clip_dir, capsys):
    write_image_folder(tmp_path / "img", ["cat", "dog"], 2, seed=3)
    runs = tmp_path / "runs"
    main(["train", "--backbone", str(tiny_clip_dir), "--dataset", f"folder:{tmp_path / 'img'}", "--steps", "2",
          "--warmup-steps", "0", "--batch-size", "34", "--buffer-size", "68", "--norm-tokens", "68", "--k", "4",
          "--expansion", "2", "--out", str(runs / "train"), "--no-progress", "--device", "cpu", "--threads", "1"])
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--out", str(runs)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "made by `vitclt train`" in err and "choose another --out" in err
    assert sorted(p.relative_to(runs) for p in runs.rglob("*")) == before


@pytest.mark.slow
def test_reduced_demo_runs_end_to_end_and_its_report_holds_every_section(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--quick", "--out", str(out), "--max-images", "96", "--steps", "12", "--eval-images", "48",
          "--seeds", "1", "--batch-size", "256", "--no-progress", "--device", "cpu"])
    report = out / "eval" / "report.html"
    printed = capsys.readouterr().out
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    # It ends with the headline table (the numbers of metrics.json), then the report's path.
    assert printed.rstrip().endswith(f"open the report: {report}")
    assert headline_table(metrics) in printed
    html = report.read_text()
    for section in SECTIONS:
        assert section in html, section
    assert "data:image/png;base64," in html and "<img src=\"figures/" not in html
    assert check_metric_keys(metrics) == []
    assert sorted(metrics["transcoders"]) == sorted(f"{m.replace(':', '-')}-k{k}" for m in FRONTIER_MODELS for k in (8, 16, 32))
    assert metrics["backbone"]["name"] == "demo" and metrics["dataset"]["n_images"] == 48
    assert json.loads((out / "train" / "run.json").read_text())["command"] == "demo"
    # The feature browser of the ReLU-TopK CLT at the middle k is built, its path printed, and the report links to it.
    site = out / "train" / "browser"
    assert f"feature browser of clt-relu-topk-k16: {site / 'index.html'}" in printed
    link = metrics["transcoders"]["clt-relu-topk-k16"]["browser"]
    assert link.startswith("../train/browser/index.html?tc=") and f'href="{link}"' in html
    assert (report.parent / link.split("?")[0]).resolve() == (site / "index.html").resolve()
    assert metrics["transcoders"]["clt-jumprelu-k8"]["browser"] is None
