"""`vitclt demo` end to end, reduced to CI size: the shipped model, the generated world, every report section."""

import json

import pytest

from vitclt.cli import main
from vitclt.eval.metric_keys import check_metric_keys

SECTIONS = [
    "Reconstruction of MLP outputs",
    "Cascaded replacement",
    "Linear decomposition and contribution scores",
    "Faithfulness: necessity and sufficiency",
    "Cross-layer retrieval",
    "Baselines: CLT vs per-layer transcoder vs SAE",
    "Protocol and configuration",
]


@pytest.mark.slow
def test_reduced_demo_runs_end_to_end_and_its_report_holds_every_section(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--quick", "--out", str(out), "--train-images", "96", "--steps", "12", "--eval-images", "48",
          "--seeds", "1", "--batch-size", "256", "--no-progress", "--device", "cpu"])
    report = out / "eval" / "report.html"
    assert f"open the report: {report}" in capsys.readouterr().out
    html = report.read_text()
    for section in SECTIONS:
        assert section in html, section
    assert "data:image/png;base64," in html and "<img src=\"figures/" not in html
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert check_metric_keys(metrics) == []
    assert sorted(metrics["transcoders"]) == ["clt-abs-topk", "clt-jumprelu", "clt-relu-topk", "plt-relu-topk", "sae-relu-topk"]
    assert metrics["backbone"]["name"] == "demo" and metrics["dataset"]["n_images"] == 48
