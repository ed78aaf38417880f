"""Frontiers: every point of a sweep in metrics.json, the figure and the per-L0 summary drawn from metrics.json alone."""

import json
import shutil

import pytest

from tests.conftest import write_image_folder
from tests.test_eval_replacement import make_transcoder
from vitclt.commands.eval import EvalConfig, run
from vitclt.eval.options import EvalOptions
from vitclt.report.figures import frontier_figure
from vitclt.report.frontier import frontier_curves, frontier_points, frontier_summary
from vitclt.report.html import render_html
from vitclt.runtime import RuntimeConfig

KS = (2, 4, 8)
CURVES = [("clt", "relu-topk"), ("clt", "jumprelu"), ("plt", "relu-topk"), ("plt", "jumprelu")]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_clip_dir):
    """metrics.json and report.html of a sweep: CLT and PLT × ReLU-TopK and JumpReLU × k 2, 4, 8 (random transcoders)."""
    root = tmp_path_factory.mktemp("frontier")
    for topology, sparsifier in CURVES:
        for seed, k in enumerate(KS):
            tc = make_transcoder(topology, sparsifier, k=k, seed=seed)
            tc.cfg.backbone = str(tiny_clip_dir)
            tc.save_pretrained(root / "run" / f"{topology}-{sparsifier}-k{k}")
    write_image_folder(root / "images" / "test", ["cat", "dog", "boat"], 3, seed=10)
    report = run(EvalConfig(root / "run", dataset=f"folder:{root / 'images'}", out=root / "eval",
                            options=EvalOptions(seeds=2, retrieval_k=2, retrieval_queries=1),
                            runtime=RuntimeConfig(images_per_forward=9, workers=0, progress=False, threads=1)))
    return root, report


def test_metrics_json_holds_every_point_of_the_sweep(evaluated):
    root, _ = evaluated
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    curves = frontier_curves(metrics)
    assert sorted(curves) == sorted(f"{t} {s}" for t, s in CURVES)
    for curve, points in curves.items():
        assert sorted(p["k"] for p in points) == list(KS), curve
        assert [p["l0"] for p in points] == sorted(p["l0"] for p in points)
    by_name = {p["name"]: p for p in frontier_points(metrics)}
    assert by_name["clt-relu-topk-k4"]["l0"] == pytest.approx(4.0)
    assert by_name["plt-relu-topk-k4"]["faithfulness_gap"] is None  # faithfulness is measured on CLTs only
    assert by_name["clt-jumprelu-k8"]["faithfulness_gap_spread"] is not None


def test_frontier_figure_and_summary_come_from_metrics_json_alone(evaluated, tmp_path):
    root, _ = evaluated
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    # Nothing but the dict: the transcoders, the images and the eval directory are gone.
    shutil.copytree(root, tmp_path / "kept")
    for sub in ("run", "images", "eval"):
        shutil.rmtree(root / sub)
    try:
        assert frontier_figure(metrics, tmp_path / "frontier.png").stat().st_size > 10_000
        summary = frontier_summary(metrics)
    finally:
        for sub in ("run", "images", "eval"):
            shutil.copytree(tmp_path / "kept" / sub, root / sub)
    assert {r.k for r in summary} == set(KS)
    for row in summary:
        if row.metric.key == "fvu_all":
            entries = {n: e for n, e in metrics["transcoders"].items() if e["k"] == row.k}
            fvu = {n: e["reconstruction"]["all"]["mean"]["fvu"] for n, e in entries.items()}
            best, second = sorted(fvu, key=fvu.get)[:2]
            assert (row.best, row.runner_up) == (best, second)
            assert row.margin == pytest.approx(fvu[second] - fvu[best])


def test_report_opens_with_the_frontiers(evaluated):
    root, report = evaluated
    html = report.read_text()
    assert "Sparsity–fidelity frontiers" in html and 'alt="sparsity-fidelity frontiers"' in html
    assert html.index("Sparsity–fidelity frontiers") < html.index("Reconstruction of MLP outputs")
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    figs = {"frontier": root / "eval" / "figures" / "frontier.png"}
    page = render_html(metrics, {**{k: root / "eval" / "figures" / "reconstruction.png" for k in
                                    ("reconstruction", "replacement", "retrieval_precision")},
                                 "attribution": {}, "faithfulness": {}, "retrieval": {}, **figs})
    assert "12 models on 4 curves" in page
