"""The report's figures, drawn from metrics.json's contents with matplotlib (Agg, PNG files).

Each function takes the relevant block of metrics.json and an output path, and returns the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import FixedLocator, FormatStrFormatter, MaxNLocator, NullFormatter  # noqa: E402
from PIL import Image  # noqa: E402

from vitclt.report.frontier import frontier_curves, frontier_metrics  # noqa: E402
from vitclt.report.summary import accuracy_label  # noqa: E402

TOKEN_STYLE = {"cls": ("tab:blue", "o"), "patches": ("tab:orange", "s"), "all": ("tab:green", "^")}
"""Colour and marker per token subset, shared by every figure."""

DPI = 110


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def replacement_figure(metrics: dict, path: Path) -> Path:
    """Top-1 per replacement window, one panel per transcoder: a line per token subset, the
    zero-ablation control dashed, and the clean baseline with a ±1 pp band (as in the paper)."""
    names = list(metrics["transcoders"])
    windows = metrics["windows"]
    baseline = metrics["baseline"]["top1"]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.6), squeeze=False, sharey=True,
                             layout="constrained")
    x = np.arange(len(windows))
    for ax, name in zip(axes.flat, names):
        rep = metrics["transcoders"][name]["replacement"]
        ax.axhspan(baseline - 1, baseline + 1, color="tab:green", alpha=0.12, label="baseline ±1 pp")
        ax.axhline(baseline, color="tab:green", lw=1)
        for tokens in metrics["tokens"]:
            colour, marker = TOKEN_STYLE.get(tokens, ("k", "x"))
            ax.plot(x, [rep[w][tokens]["top1"] for w in windows], marker=marker, color=colour, label=tokens)
            ax.plot(x, [metrics["zero_ablation"][w][tokens] for w in windows], ls="--", lw=0.8, color=colour, alpha=0.6)
        ax.set_xticks(x, [w.replace("-", "→") for w in windows])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("replaced layers")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    axes[0, 0].set_ylabel(f"{accuracy_label(metrics)} top-1 (%)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], ls="--", color="grey"))
    labels.append("zero-ablation control")
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9)
    fig.suptitle("Cascaded replacement (full cascade → last layer only)", fontsize=11)
    return _save(fig, path)


def contribution_figure(name: str, attribution: dict, path: Path, groups: Sequence[str] | None = None) -> Path:
    """C_proj heatmaps (source × target), diverging colours centred at 0 (blue = destructive); by default of the
    CLS token and the patches (the patches alone on a model without a CLS token, where they are all tokens)."""
    groups = groups or [g for g in attribution if g != "all"]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.8 * len(groups) + 1, 4.6), squeeze=False, layout="constrained")
    lim = max(max(float(np.abs(np.array(attribution[g]["matrix"])).max()) for g in groups), 1e-6)
    for ax, group in zip(axes[0], groups):
        m = np.array(attribution[group]["matrix"], dtype=float)
        L = len(m)
        masked = np.ma.masked_where(np.tril(np.ones_like(m, dtype=bool), -1), m)
        im = ax.imshow(masked, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -lim, lim))
        if L <= 16:
            for s in range(L):
                for t in range(s, L):
                    ax.text(t, s, f"{m[s, t]:.2f}".replace("0.", "."), ha="center", va="center", fontsize=max(5, 9 - L // 3),
                            color="white" if abs(m[s, t]) > 0.6 * lim else "black")
        ax.set_xticks(range(L), [f"L{i}" for i in range(L)], fontsize=7)
        ax.set_yticks(range(L), [f"L{i}" for i in range(L)], fontsize=7)
        ax.set_xlabel("target layer")
        ax.set_ylabel("source layer")
        ax.set_title({"cls": "[CLS]", "patches": "Patches", "all": "All tokens"}.get(group, group), fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.85, label="projection score (neg = destructive)")
    fig.suptitle(f"{name}: cross-layer contribution scores C_proj", fontsize=11)
    return _save(fig, path)


def reconstruction_figure(metrics: dict, path: Path, names: Sequence[str] | None = None) -> Path:
    """Per-layer R², cosine and MSE (rows) per token group (columns: CLS, patches, all), a line per transcoder."""
    names = list(names or metrics["transcoders"])
    shown = ("r2", "cosine", "mse")
    groups = metrics["token_groups"]
    fig, axes = plt.subplots(len(shown), len(groups), figsize=(4 * len(groups), 2.6 * len(shown)), squeeze=False, sharex=True,
                             layout="constrained")
    for j, group in enumerate(groups):
        for i, metric in enumerate(shown):
            ax = axes[i, j]
            for name in names:
                values = metrics["transcoders"][name]["reconstruction"][group]["per_layer"][metric]
                ax.plot(range(len(values)), values, marker=".", label=name)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if i == 0:
                ax.set_title(group, fontsize=10)
            if j == 0:
                ax.set_ylabel(metric)
        axes[-1, j].set_xlabel("layer")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Reconstruction of MLP outputs on clean activations", fontsize=11)
    return _save(fig, path)


def faithfulness_figure(name: str, faithfulness: dict, path: Path, accuracy: str) -> Path:
    """Top-1 of each edit per token set (error bars: std over seeds), with the clean baseline; `accuracy` names
    the task head's accuracy (`vitclt.report.summary.accuracy_label`)."""
    token_sets = list(faithfulness)
    edits = [k for k, v in faithfulness[token_sets[0]].items() if isinstance(v, dict) and "top1" in v]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(edits) * len(token_sets) / 2, 3.4), layout="constrained")
    width = 0.8 / len(token_sets)
    x = np.arange(len(edits))
    for i, tokens in enumerate(token_sets):
        block = faithfulness[tokens]
        colour, _ = TOKEN_STYLE.get(tokens, ("grey", None))
        ax.bar(x + (i - (len(token_sets) - 1) / 2) * width, [block[e]["top1"] for e in edits], width,
               yerr=[block[e]["std"] for e in edits], color=colour, alpha=0.8, capsize=3, label=tokens)
    baseline = faithfulness[token_sets[0]]["baseline"]
    ax.axhline(baseline, color="k", lw=1, ls="--", label="clean baseline")
    k = faithfulness[token_sets[0]]["k"]
    ax.set_xticks(x, [e.replace("topk", f"top{k}").replace("bottomk", f"bottom{k}").replace("keep_random", f"keep_{k}_random")
                      for e in edits], rotation=20, fontsize=8)
    ax.set_ylabel(f"{accuracy} top-1 (%)")
    lo = min(min(faithfulness[t][e]["top1"] for e in edits) for t in token_sets)
    ax.set_ylim(max(0.0, lo - 5), max(baseline, *(faithfulness[t][e]["top1"] for t in token_sets for e in edits)) + 3)
    ax.legend(fontsize=8)
    ax.set_title(f"{name}: necessity / sufficiency of the last layer's sources", fontsize=10)
    return _save(fig, path)


def retrieval_precision_figure(metrics: dict, path: Path) -> Path:
    """Label precision@k of code retrieval per layer, a line per transcoder, with chance and the final embedding."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4), layout="constrained")
    k = None
    for name, entry in metrics["transcoders"].items():
        ret = entry["retrieval"]
        k = ret["k"]
        ax.plot(range(len(ret["precision_at_k"])), ret["precision_at_k"], marker=".", label=name)
        chance = ret["chance"]
    ax.axhline(chance, color="grey", ls=":", label="chance")
    ax.axhline(metrics["baseline"]["embedding_precision_at_k"], color="k", ls="--", lw=1, label="final image embedding")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"label precision@{k}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Cross-layer retrieval by transcoder code", fontsize=10)
    return _save(fig, path)


def _thumb(image: Image.Image, size: int = 96) -> np.ndarray:
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)).resize((size, size)))


def retrieval_figure(name: str, retrieval: dict, dataset, path: Path, query: int = 0) -> Path:
    """One row per layer: the query image at left, then its nearest images by that layer's code."""
    q = retrieval["queries"][query]
    rows = retrieval["neighbours"][query]
    sims = retrieval["similarities"][query]
    n_cols = 1 + max(len(r) for r in rows)
    labels = getattr(dataset, "labels", None)
    classnames = getattr(dataset, "classnames", None)

    def caption(i: int) -> str:
        return classnames[int(labels[i])] if labels is not None and classnames else str(i)

    query_image = _thumb(dataset[q][0])
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.3 * n_cols, 1.35 * len(rows) + 0.3), squeeze=False,
                             layout="constrained")
    for layer, (neigh, sim) in enumerate(zip(rows, sims)):
        axes[layer, 0].imshow(query_image)
        axes[layer, 0].set_ylabel(f"Layer {layer}", fontsize=8)
        for c, (i, s) in enumerate(zip(neigh, sim), start=1):
            axes[layer, c].imshow(_thumb(dataset[int(i)][0]))
            same = labels is not None and labels[int(i)] == labels[q]
            axes[layer, c].set_title(f"{caption(int(i))[:14]} {s:.2f}", fontsize=6, color="tab:green" if same else "black")
        for ax in axes[layer]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title(f"query: {caption(q)[:14]}", fontsize=6)
    fig.suptitle(f"{name}: nearest images by {retrieval['pool']} code (green: same label)", fontsize=9)
    return _save(fig, path)


def frontier_figure(metrics: dict, path: Path) -> Path:
    """Every frontier metric against measured L0 (log scale), one panel per metric and one curve per topology ×
    sparsifier (`vitclt.report.frontier`); CLTs solid, other topologies dashed."""
    panels = frontier_metrics(metrics)
    curves = frontier_curves(metrics)
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows + 0.8), squeeze=False, layout="constrained")
    colours = plt.get_cmap("tab10")
    for ax, metric in zip(axes.flat, panels):
        for i, (curve, points) in enumerate(curves.items()):
            shown = [p for p in points if p[metric.key] is not None]
            if not shown:
                continue
            ax.plot([p["l0"] for p in shown], [p[metric.key] for p in shown], marker="o", color=colours(i % 10),
                    ls="-" if curve.startswith("clt") else "--", label=curve)
        ax.set_xscale("log")
        # Plain numbers at the sweep's target L0s: log-scale's default labels (2×10⁰ ...) collide at these ranges.
        ax.xaxis.set_major_locator(FixedLocator(sorted({p["k"] for pts in curves.values() for p in pts if p["k"]})))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(metric.label + (" ↑" if metric.higher_is_better else " ↓"), fontsize=9)
        ax.set_xlabel("L0 (measured, all tokens)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize=9)
    return _save(fig, path)
