"""One self-contained HTML page (figures embedded as base64 PNG) from an eval's metrics.json.

The page reads top to bottom: what was evaluated and how, reconstruction, cascaded replacement,
contribution scores, faithfulness, retrieval, the baseline comparison, then the full configs.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path

from vitclt.io import write_text
from vitclt.report import figures
from vitclt.report.frontier import frontier_curves, frontier_summary
from vitclt.report.summary import accuracy_label, headline

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.88em}th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;margin:.5em 0}
.note{background:#f7f7f2;border-left:4px solid #c9c38f;padding:.5em .8em;font-size:.92em}
.neg{color:#b22}.pos{color:#171}pre{background:#f6f6f6;padding:.7em;overflow-x:auto;font-size:.8em}
details{margin:.5em 0}summary{cursor:pointer;color:#335}
"""

LABELS = {"mse": "MSE", "r2": "R²", "cosine": "cosine", "fvu": "FVU", "l0": "L0", "dead_pct": "dead %"}


def _esc(x) -> str:
    return html.escape(str(x))


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return _esc(x)


def _delta(x: float) -> str:
    cls = "neg" if x < -1e-9 else "pos" if x > 1e-9 else ""
    return f'<span class="{cls}">{x:+.2f}</span>'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """An HTML table; the first `left` columns are left-aligned text, cells are already HTML."""
    th = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(header))
    cell = lambda i, c: f'<td class="{"l" if i < left else ""}">{c}</td>'  # noqa: E731
    body = "".join("<tr>" + "".join(cell(i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


HEAD_PROTOCOL = {
    "zeroshot": "Task head: zero-shot; for each class, the text embeddings of every template filled with the class name, "
                "normalised, averaged and renormalised; an image gets the class with the highest cosine (scored the "
                "model's own way, scale · cosine + bias).",
    "probe": "Task head: a linear probe, ridge regression of one-hot labels on the clean image embeddings of the training "
             "split (closed form, no seed); its accuracy on the evaluated split is the baseline.",
    "own": "Task head: the checkpoint's own classifier on its pre-logits, restricted to the dataset's classes by name.",
}
"""The protocol paragraph's sentence per task head."""

_CLS_NOTE = ('<p class="note">A model that reads its image embedding from the CLS token after the last block (CLIP, '
             "open_clip, DINOv2) cannot be changed by an edit of the patch tokens' last-layer MLP output, so there the "
             "<code>all</code> edits act through the CLS token alone (with the all-token ranking).</p>")


def _head_description(metrics: dict) -> str:
    """The task head in a few words: which kind, and for a probe what it was fitted on."""
    base = metrics["baseline"]
    if base["head"] == "probe":
        return f"a linear probe fitted on {base['probe_images']} images of the {base['probe_split']} split"
    return {"zeroshot": f"zero-shot with {len(metrics['dataset'].get('templates', []))} prompt templates",
            "own": "the checkpoint's own classifier"}[base["head"]]


def _clts(metrics: dict) -> list[str]:
    return [n for n, e in metrics["transcoders"].items() if e["topology"] == "clt"]


def _metric_names(metrics: dict) -> list[str]:
    """The reconstruction metrics, in the order metrics.json lists them."""
    return list(next(iter(metrics["transcoders"].values()))["reconstruction"]["all"]["mean"])


def _edits(block: dict) -> list[str]:
    """The faithfulness edits of one token set's block, in the order metrics.json lists them."""
    return [k for k, v in block.items() if isinstance(v, dict) and "top1" in v]


def _header(metrics: dict) -> str:
    bb, ds, base = metrics["backbone"], metrics["dataset"], metrics["baseline"]
    rows = [[_esc(n), _esc(e["topology"]), _esc(e["sparsifier"]), _fmt(e["k"]), _fmt(e["n_features"]),
             f'<a href="{_esc(e["browser"])}">features</a>' if e.get("browser") else "—"]
            for n, e in metrics["transcoders"].items()]
    top = headline(metrics)
    return (
        f"<h1>vitclt evaluation: {_esc(bb['name'])} on {_esc(ds.get('name', ds.get('spec')))}</h1>"
        f"<p>{bb['n_layers']} layers, width {bb['d_model']}, {bb['n_tokens']} tokens. "
        f"Eval set: <b>{ds.get('n_images')}</b> images of the <b>{_esc(ds.get('split'))}</b> split "
        f"({_esc(ds.get('subset'))}), {ds.get('n_classes')} classes. Task head: {_esc(_head_description(metrics))}. "
        f"Clean {accuracy_label(metrics)} top-1 <b>{base['top1']:.2f}%</b>, top-5 {base['top5']:.2f}%.</p>"
        + (f'<p class="note">{_esc(ds["split_note"])}</p>' if ds.get("split_note") else "")
        + "".join(f'<p class="note"><b>Backbone mismatch:</b> {_esc(n)} was trained on other weights than '
                  f"{_esc(bb['name'])} (fingerprint {_esc(e['config'].get('backbone_fingerprint'))}, evaluated on "
                  f"{_esc(bb.get('fingerprint'))}); its numbers describe a transcoder used off its training backbone.</p>"
                  for n, e in metrics["transcoders"].items() if e.get("backbone_mismatch"))
        + _table(["transcoder", "topology", "sparsifier", "k", "features / layer", "browser"], rows)
        + f"<p><b>Headline.</b> Reconstruction R² and cosine (all tokens, layer means); {accuracy_label(metrics)} top-1 (%) "
        "with the full "
        "cascade and with only the last layers replaced (all tokens); for CLTs, the faithfulness edits of the last layer "
        "beside their random controls. Details in the sections below.</p>"
        + _table([_esc(h) for h in top.header], [[_esc(c) for c in r] for r in top.rows])
    )


def _frontier(metrics: dict, fig: Path) -> str:
    curves = frontier_curves(metrics)
    rows = []
    for r in frontier_summary(metrics):
        digits = 2 if r.metric.key in ("top1_full", "top1_last", "faithfulness_gap", "dead_pct") else 4
        spread = f" ± {r.spread:.{digits}f}" if r.spread is not None else ""
        margin = "tie" if r.margin == 0 else _fmt(r.margin, digits)
        rows.append([_fmt(r.k), _esc(r.metric.label), _esc(r.best), _fmt(r.value, digits) + spread, _fmt(r.l0, 2),
                     _esc(r.runner_up or "–"), margin])
    points = sum(len(p) for p in curves.values())
    return (
        "<h2>Sparsity–fidelity frontiers</h2>"
        f"<p>{points} models on {len(curves)} curves (topology × sparsifier), each metric against the measured L0 "
        "(mean active features per token and layer on the eval set, all tokens). Models at the same target L0 "
        "(<i>k</i>: TopK's k, the L0 a JumpReLU's training was steered to) compare at matched sparsity; the table says, "
        "at each k, which model is best on each metric and by how much over the runner-up (± the standard deviation "
        "over seeds where the metric has seeds: the faithfulness gap's random control). Drawn from metrics.json alone.</p>"
        + _img(fig, "sparsity-fidelity frontiers")
        + _table(["k", "metric", "best", "value", "its L0", "runner-up", "margin"], rows, left=3)
    )


def _reconstruction(metrics: dict, fig: Path) -> str:
    names = _metric_names(metrics)
    rows = []
    for name, e in metrics["transcoders"].items():
        for group, r in e["reconstruction"].items():
            rows.append([_esc(name), group] + [_fmt(r["mean"][m], 2 if m in ("l0", "dead_pct") else 4) for m in names])
    per_layer = []
    for name, e in metrics["transcoders"].items():
        r = e["reconstruction"]["all"]["per_layer"]
        per_layer.append(f"<h4>{_esc(name)} (all tokens)</h4>" + _table(
            ["layer"] + [LABELS[m] for m in names],
            [[str(i)] + [_fmt(r[m][i], 2 if m in ("l0", "dead_pct") else 4) for m in names] for i in range(len(r["mse"]))]))
    return (
        "<h2>Reconstruction of MLP outputs</h2>"
        "<p>On clean activations of the eval set. Layer averages (the paper's numbers are layer-averaged). "
        "MSE is in the backbone's raw activation units; R² = 1 − SSE/SST with SST around the per-dimension mean; "
        "FVU = SSE/SST (= 1 − R²); cosine is the mean over tokens; L0 the mean active features per token and layer; "
        "dead % the features never active on the group's tokens.</p>"
        + _table(["transcoder", "tokens"] + [LABELS[m] for m in names], rows, left=2)
        + _img(fig, "reconstruction per layer")
        + "<details><summary>Per-layer tables</summary>" + "".join(per_layer) + "</details>"
    )


def _replacement(metrics: dict, fig: Path) -> str:
    windows, base = metrics["windows"], metrics["baseline"]["top1"]
    header = ["transcoder", "tokens"] + [w.replace("-", "→") for w in windows]
    rows = []
    for name, e in metrics["transcoders"].items():
        for t in metrics["tokens"]:
            rep = e["replacement"]
            rows.append([_esc(name), t] + [f"{rep[w][t]['top1']:.2f} ({_delta(rep[w][t]['delta_baseline'])})" for w in windows])
    for t in metrics["tokens"]:
        z = metrics["zero_ablation"]
        rows.append(["<i>zero-ablation control</i>", t] + [f"{z[w][t]:.2f} ({_delta(z[w][t] - base)})" for w in windows])
    return (
        "<h2>Cascaded replacement</h2>"
        f"<p>{accuracy_label(metrics).capitalize()} top-1 (%) with the MLP outputs of a window of layers replaced by the "
        "transcoder's reconstruction at "
        f"the given tokens; in parentheses the change against the clean model ({base:.2f}%). Inside the window the codes are "
        "computed from the replaced model's own LN2 outputs, so errors cascade; sources before the window read the clean "
        "model. The zero-ablation rows set the same MLP outputs to zero: the gap between the two is what the transcoder "
        "recovers (<code>recovered</code> in metrics.json). The green band in the figure is ±1 pp around the baseline; "
        "dashed lines are the zero-ablation control.</p>"
        + _table(header, rows, left=2) + _img(fig, "cascaded replacement")
    )


def _attribution(metrics: dict, figs: dict[str, Path]) -> str:
    if not figs:
        return ""
    parts = ["<h2>Linear decomposition and contribution scores</h2>",
             "<p>C_proj[i→j] = mean over images and tokens of ⟨c_{i→j}, ŷ_j⟩ / ‖ŷ_j‖², on the clean forward's codes, with "
             "ŷ_j = Σ_i c_{i→j} excluding the decoder bias, so every column sums to exactly 1. Rows are sources, columns "
             "targets; negative (blue) scores oppose the reconstruction. The bias's own share (its score on ŷ_j + bias) is "
             "listed below each matrix.</p>"]
    for name, fig in figs.items():
        att = metrics["transcoders"][name]["attribution"]
        L = len(next(iter(att.values()))["matrix"])
        tops = []
        for g in att:
            col = [att[g]["matrix"][s][L - 1] for s in range(L)]
            order = sorted(range(L), key=lambda s: -col[s])[:4]
            tops.append(f"{g}: " + ", ".join(f"L{s} {col[s]:.3f}" for s in order))
        bias = ", ".join(f"{b:.3f}" for b in att["all"]["bias_share"])
        parts.append(f"<h3>{_esc(name)}</h3>" + _img(fig, f"{name} contribution scores")
                     + f"<p>Top-{min(4, L)} sources into the last layer — {'; '.join(tops)}.<br>"
                     f"Bias share per target (all tokens): {bias}.</p>")
    return "".join(parts)


def _faithfulness(metrics: dict, figs: dict[str, Path]) -> str:
    if not figs:
        return ""
    first = metrics["transcoders"][next(iter(figs))]["faithfulness"]
    edits = _edits(next(iter(first.values())))
    k = next(iter(first.values()))["k"]
    seeds = len(next(iter(first.values()))["drop_random"]["runs"])
    names = {"full": "full", "drop_top1": "drop top-1", "keep_topk": f"keep top-{k}", "keep_bottomk": f"keep bottom-{k}",
             "drop_random": "drop a random one", "keep_random": f"keep {k} random"}
    header = ["transcoder", "tokens", "baseline"] + [names[e] for e in edits]
    rows = []
    for name in figs:
        for tokens, b in metrics["transcoders"][name]["faithfulness"].items():
            cells = []
            for e in edits:
                std = f" ± {b[e]['std']:.2f}" if e in ("drop_random", "keep_random") else ""
                cells.append(f"{b[e]['top1']:.2f}{std}<br>{_delta(b[e]['delta_baseline'])} / {_delta(b[e]['delta_full'])}")
            rows.append([_esc(name), tokens, f"{b['baseline']:.2f}"] + cells)
    return (
        "<h2>Faithfulness: necessity and sufficiency</h2>"
        f"<p>Sources ranked by their score into the last layer (C_proj for the token set evaluated). Only the last layer's "
        f"MLP output is replaced, at the given tokens, by the decoder bias plus a subset of source terms: all of them "
        f"(<code>full</code>), all but the top-ranked one (necessity), only the top {k} (sufficiency), and the controls: "
        f"only the bottom {k}, all but a random one, {k} random ones ({seeds} seeds, mean ± std). Cells: top-1 (%), then the "
        "change against the clean model / against <code>full</code>, in pp.</p>"
        + (_CLS_NOTE if {"all", "cls"} <= set(first) else "")
        + _table(header, rows, left=2) + "".join(_img(f, f"{n} faithfulness") for n, f in figs.items())
    )


def _retrieval(metrics: dict, precision_fig: Path, neighbour_figs: dict[str, list[Path]]) -> str:
    names = list(metrics["transcoders"])
    first = metrics["transcoders"][names[0]]["retrieval"]
    L = len(first["precision_at_k"])
    precision = {n: metrics["transcoders"][n]["retrieval"]["precision_at_k"] for n in names}
    rows = [[str(layer)] + [f"{precision[n][layer]:.3f}" for n in names] for layer in range(L)]
    pool = "the CLS token's dense code" if first["pool"] == "cls" else "the mean of the patch tokens' dense codes"
    figs = "".join(_img(f, f"{n} retrieval") for n, fs in neighbour_figs.items() for f in fs)
    return (
        "<h2>Cross-layer retrieval</h2>"
        f"<p>Each image is represented at layer ℓ by {pool} (F dimensions, inactive features 0); neighbours are the "
        f"gallery images (the eval set, the query excluded) with the highest cosine. Label precision@{first['k']}: the "
        f"fraction of an image's {first['k']} nearest neighbours with its label, over every image as a query "
        f"(chance {first['chance']:.3f}; the model's final image embedding, by cosine: "
        f"{metrics['baseline']['embedding_precision_at_k']:.3f}).</p>"
        + _table(["layer"] + [_esc(n) for n in names], rows) + _img(precision_fig, "retrieval precision") + figs
    )


def _comparison(metrics: dict) -> str:
    windows, tokens = metrics["windows"], metrics["tokens"]
    header = (["transcoder", "topology", "sparsifier", "k", "L0", "MSE", "R²", "cosine", "dead %"]
              + [f"{w.replace('-', '→')} {t}" for w in windows for t in tokens])
    rows = []
    for name, c in metrics["comparison"].items():
        rows.append([_esc(name), _esc(c["topology"]), _esc(c["sparsifier"]), _fmt(c["k"]), _fmt(c["l0"], 2), _fmt(c["mse"]),
                     _fmt(c["r2"]), _fmt(c["cosine"]), _fmt(c["dead_pct"], 2)]
                    + [f"{c['replacement'][w][t]:.2f}" for w in windows for t in tokens])
    has_sae = any(c["topology"] == "sae" for c in metrics["comparison"].values())
    note = ('<p class="note">The SAE reads the MLP output y_ℓ itself and reconstructs it (y → y), so its "replacement" '
            "passes the true MLP output through a sparse bottleneck; it does not replace the MLP's computation the way a "
            "transcoder (x_ℓ → y_ℓ) does, and its numbers are an upper reference rather than a like-for-like rival.</p>"
            ) if has_sae else ""
    return (
        "<h2>Baselines: CLT vs per-layer transcoder vs SAE</h2>"
        "<p>All trained on the same activation stream; TopK models share k, so L0 is matched. Reconstruction on all tokens "
        "(layer averages); replacement top-1 (%) per window and tokens.</p>"
        + _table(header, rows, left=3) + note
    )


def _json_details(summary: str, value) -> str:
    """A collapsed block showing `value` as indented JSON."""
    return f"<details><summary>{_esc(summary)}</summary><pre>{_esc(json.dumps(value, indent=2, default=str))}</pre></details>"


def _protocol(metrics: dict) -> str:
    ds = metrics["dataset"]
    templates = "".join(f"<li><code>{_esc(t)}</code></li>" for t in ds.get("templates", []))
    classes = ", ".join(_esc(c) for c in ds.get("classnames", []))
    configs = "".join(_json_details(f"{n} config.json", e["config"]) for n, e in metrics["transcoders"].items())
    context = _json_details("run context", metrics["context"]) if metrics.get("context") else ""
    return (
        "<h2>Protocol and configuration</h2>"
        f"<p>Dataset <code>{_esc(ds.get('spec'))}</code>, split <b>{_esc(ds.get('split'))}</b>, {ds.get('n_images')} images "
        f"({_esc(ds.get('subset'))}), {ds.get('n_classes')} classes. {HEAD_PROTOCOL[metrics['baseline']['head']]} The head "
        "is built once from the clean model and kept fixed: under a replacement only the image embeddings change. Timing: "
        f"pass 1 {metrics['timing']['pass1_s']:.1f} s, pass 2 {metrics['timing']['pass2_s']:.1f} s.</p>"
        + (f"<details><summary>{len(ds['templates'])} prompt templates</summary><ul>{templates}</ul></details>"
           if ds.get("templates") else "")
        + f"<details><summary>{ds.get('n_classes')} class names</summary><p>{classes}</p></details>"
        + _json_details("eval config", metrics["config"])
        + configs + context
        + "<p>Every number on this page is in <code>metrics.json</code> next to this file; its keys are documented in "
        "docs/metrics.md.</p>"
    )


def draw_figures(metrics: dict, dataset, fig_dir: Path) -> dict:
    """Draw every figure of the report into `fig_dir`; returns their paths by section."""
    fig_dir = Path(fig_dir)
    clts = _clts(metrics)
    tcs = metrics["transcoders"]
    out = {
        "frontier": figures.frontier_figure(metrics, fig_dir / "frontier.png"),
        "reconstruction": figures.reconstruction_figure(metrics, fig_dir / "reconstruction.png"),
        "replacement": figures.replacement_figure(metrics, fig_dir / "replacement.png"),
        "retrieval_precision": figures.retrieval_precision_figure(metrics, fig_dir / "retrieval_precision.png"),
        "attribution": {n: figures.contribution_figure(n, tcs[n]["attribution"], fig_dir / f"contributions_{n}.png")
                        for n in clts},
        "faithfulness": {n: figures.faithfulness_figure(n, tcs[n]["faithfulness"], fig_dir / f"faithfulness_{n}.png",
                                                        accuracy_label(metrics)) for n in clts},
        "retrieval": {n: [figures.retrieval_figure(n, tcs[n]["retrieval"], dataset, fig_dir / f"retrieval_{n}_q{q}.png", q)
                          for q in range(len(tcs[n]["retrieval"]["queries"]))] for n in clts},
    }
    return out


def render_html(metrics: dict, figs: dict) -> str:
    """The report page as one HTML string."""
    body = (
        _header(metrics)
        + _frontier(metrics, figs["frontier"])
        + _reconstruction(metrics, figs["reconstruction"])
        + _replacement(metrics, figs["replacement"])
        + _attribution(metrics, figs["attribution"])
        + _faithfulness(metrics, figs["faithfulness"])
        + _retrieval(metrics, figs["retrieval_precision"], figs["retrieval"])
        + _comparison(metrics)
        + _protocol(metrics)
    )
    parts = body.split("<h2>")
    # Sections without content for this run (no CLT: no scores) are left out, so number at the end.
    body = parts[0] + "".join(f"<h2>{i}. {part}" for i, part in enumerate(parts[1:], start=1))
    title = f"vitclt eval: {metrics['backbone']['name']} on {metrics['dataset'].get('name', '')}"
    head = f'<head><meta charset="utf-8"><title>{_esc(title)}</title><style>{CSS}</style></head>'
    return f'<!DOCTYPE html><html lang="en">{head}<body>{body}</body></html>\n'


def write_report(metrics: dict, dataset, out_dir: Path) -> Path:
    """Draw the figures into OUT/figures and write OUT/report.html; returns the report's path."""
    out_dir = Path(out_dir)
    page = render_html(metrics, draw_figures(metrics, dataset, out_dir / "figures"))
    # Atomic, so a crash never leaves half a report over a previous one.
    return write_text(out_dir / "report.html", page)
