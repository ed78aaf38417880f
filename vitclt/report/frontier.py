"""Sparsity-fidelity frontiers, read from metrics.json alone: every metric against L0, one curve per topology × sparsifier.

A point is one transcoder: its measured L0 (reconstruction, all tokens, layer mean) and its
metrics. The per-L0 summary groups the points by the L0 their training targeted (`k`: TopK's k,
the L0 a JumpReLU was steered to) and says, for each metric, which curve is best there and by how
much over the runner-up, with the seed-to-seed spread where the metric was measured over seeds
(the random controls of the faithfulness edits; training seeds are one per run). Nothing here reads
anything but the metrics dict, so a report can be redrawn from a metrics.json copied anywhere.
"""

from __future__ import annotations

from typing import NamedTuple

from vitclt.report.summary import _tokens, _windows


class FrontierMetric(NamedTuple):
    """One frontier panel: the point key, its label, and whether higher is better."""

    key: str
    label: str
    higher_is_better: bool


def frontier_metrics(metrics: dict) -> list[FrontierMetric]:
    """The panels, in order: FVU and R² per token group, cascaded top-1, the faithfulness gap, dead share."""
    full, last = _windows(metrics)
    arrow = lambda w: w.replace("-", "→")  # noqa: E731
    out = []
    for group in metrics["token_groups"]:
        out += [FrontierMetric(f"fvu_{group}", f"FVU ({group})", False), FrontierMetric(f"r2_{group}", f"R² ({group})", True)]
    out += [FrontierMetric("top1_full", f"top-1 % (cascade {arrow(full)})", True),
            FrontierMetric("top1_last", f"top-1 % (last window {arrow(last)})", True),
            FrontierMetric("faithfulness_gap", "faithfulness: top-1 drop random − drop top-1 source (pp)", True),
            FrontierMetric("dead_pct", "dead features %", False)]
    return out


def frontier_points(metrics: dict) -> list[dict]:
    """One dict per transcoder: name, curve (topology × sparsifier), k, measured l0, and every frontier metric
    (None where it was not measured, e.g. faithfulness of a non-CLT); `<key>_spread` the std over seeds where there is one."""
    full, last = _windows(metrics)
    tokens = _tokens(metrics["tokens"])
    points = []
    for name, e in metrics["transcoders"].items():
        rec = e["reconstruction"]
        point = {"name": name, "curve": f"{e['topology']} {e['sparsifier']}", "k": e.get("k"), "l0": rec["all"]["mean"]["l0"]}
        for group in metrics["token_groups"]:
            point[f"fvu_{group}"] = rec[group]["mean"]["fvu"]
            point[f"r2_{group}"] = rec[group]["mean"]["r2"]
        point["top1_full"] = e["replacement"][full][tokens]["top1"]
        point["top1_last"] = e["replacement"][last][tokens]["top1"]
        faith = e.get("faithfulness")
        if faith:
            block = faith[_tokens(faith)]
            point["faithfulness_gap"] = block["drop_random"]["top1"] - block["drop_top1"]["top1"]
            point["faithfulness_gap_spread"] = block["drop_random"]["std"] if len(block["drop_random"]["runs"]) > 1 else None
        else:
            point["faithfulness_gap"] = point["faithfulness_gap_spread"] = None
        point["dead_pct"] = rec["all"]["mean"]["dead_pct"]
        points.append(point)
    return points


def frontier_curves(metrics: dict) -> dict[str, list[dict]]:
    """The points of each curve (topology × sparsifier), sorted by measured L0."""
    curves: dict[str, list[dict]] = {}
    for point in frontier_points(metrics):
        curves.setdefault(point["curve"], []).append(point)
    return {curve: sorted(points, key=lambda p: p["l0"]) for curve, points in curves.items()}


class SummaryRow(NamedTuple):
    """At one target L0, the best model on one metric and its margin over the runner-up."""

    k: int | None
    metric: FrontierMetric
    best: str
    value: float
    l0: float
    runner_up: str | None
    margin: float | None
    spread: float | None


def frontier_summary(metrics: dict) -> list[SummaryRow]:
    """Per target L0 (k) and metric: the best model, its value and measured L0, the runner-up and the margin."""
    by_k: dict = {}
    for point in frontier_points(metrics):
        by_k.setdefault(point["k"], []).append(point)
    rows = []
    for k in sorted(by_k, key=lambda v: (v is None, v)):
        for metric in frontier_metrics(metrics):
            ranked = sorted((p for p in by_k[k] if p[metric.key] is not None), key=lambda p: p[metric.key],
                            reverse=metric.higher_is_better)
            if not ranked:
                continue
            best = ranked[0]
            second = ranked[1] if len(ranked) > 1 else None
            rows.append(SummaryRow(k, metric, best["name"], best[metric.key], best["l0"], second and second["name"],
                                   None if second is None else abs(best[metric.key] - second[metric.key]),
                                   best.get(f"{metric.key}_spread")))
    return rows
