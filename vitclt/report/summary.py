"""The headline table of an evaluation, read from metrics.json: what `vitclt demo` ends with and the report opens with.

Per model, grouped by the L0 it was trained to: its measured L0, reconstruction R² and cosine (all tokens,
layer averages), top-1 under the task head
(zero-shot, a linear probe or the checkpoint's own classifier) with the full cascade and with only
the last layers replaced (all tokens), and for CLTs the faithfulness edits beside their random controls
(necessity: drop the top-ranked source vs drop a random one; sufficiency: keep the top k vs keep k
random ones). Numbers are exactly those of metrics.json.
"""

from __future__ import annotations

from typing import NamedTuple

HEAD_LABELS = {"zeroshot": "zero-shot", "probe": "linear-probe", "own": "own-classifier"}
"""How an accuracy is named for each task head (metrics.json's `baseline.head`)."""


def accuracy_label(metrics: dict) -> str:
    """What the accuracies of `metrics` are: "zero-shot", "linear-probe" or "own-classifier" (top-1)."""
    return HEAD_LABELS[metrics["baseline"]["head"]]


class Headline(NamedTuple):
    """The table: column titles and rows of formatted cells (the first cell names the row)."""

    header: list[str]
    rows: list[list[str]]


def _span(label: str) -> tuple[int, int]:
    """(start, end) of a window's metrics.json label `"3-11"`."""
    start, _, end = label.partition("-")
    return int(start), int(end)


def _windows(metrics: dict) -> tuple[str, str]:
    """The labels of the widest window (the full cascade) and of the narrowest one ending last (the last layers)."""
    spans = {label: _span(label) for label in metrics["windows"]}
    last = max(end for _, end in spans.values())
    ending = [label for label, (_, end) in spans.items() if end == last] or list(spans)
    return min(ending, key=lambda w: spans[w][0]), max(ending, key=lambda w: spans[w][0])


def _tokens(available) -> str:
    return "all" if "all" in available else next(iter(available))


def headline(metrics: dict) -> Headline:
    """The headline table of `metrics` (a metrics.json dict)."""
    full, last = _windows(metrics)
    tokens = _tokens(metrics["tokens"])
    arrow = lambda w: w.replace("-", "→")  # noqa: E731
    k = None
    for entry in metrics["transcoders"].values():
        if "faithfulness" in entry:
            k = next(iter(entry["faithfulness"].values()))["k"]
            break
    header = ["model", "L0", "R²", "cosine", f"top-1 {arrow(full)}", f"top-1 {arrow(last)}"]
    if k is not None:
        header += ["drop top-1", "drop random", f"keep top-{k}", f"keep {k} random"]
    pct = lambda x: f"{x:.2f}"  # noqa: E731
    rows = []
    # Grouped by the L0 the models were trained to (stable within a group), so neighbours compare at matched sparsity.
    by_k = sorted(metrics["transcoders"].items(), key=lambda item: (item[1].get("k") is None, item[1].get("k") or 0))
    for name, e in by_k:
        rec = e["reconstruction"]["all"]["mean"]
        row = [name, f"{rec['l0']:.1f}", f"{rec['r2']:.4f}", f"{rec['cosine']:.4f}", pct(e["replacement"][full][tokens]["top1"]),
               pct(e["replacement"][last][tokens]["top1"])]
        if k is not None:
            faith = e.get("faithfulness")
            if faith:
                block = faith[_tokens(faith)]
                row += [pct(block[edit]["top1"]) for edit in ("drop_top1", "drop_random", "keep_topk", "keep_random")]
            else:
                row += ["–"] * 4
        rows.append(row)
    base = pct(metrics["baseline"]["top1"])
    zero = metrics["zero_ablation"]
    filler = ["–"] * (len(header) - 6)
    rows.append(["clean model", "–", "–", "–", base, base] + filler)
    rows.append(["zero-ablation", "–", "–", "–", pct(zero[full][tokens]), pct(zero[last][tokens])] + filler)
    return Headline(header, rows)


def headline_table(metrics: dict) -> str:
    """The headline table as aligned text, with a line saying what the columns are."""
    table = headline(metrics)
    widths = [max(len(r[i]) for r in [table.header, *table.rows]) for i in range(len(table.header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    tokens = _tokens(metrics["tokens"])
    note = (f"{accuracy_label(metrics)} top-1 (%) on {metrics['baseline']['n_images']} images with MLP outputs replaced "
            f"at {tokens} tokens; "
            "L0 (measured), R² and cosine of the reconstruction (all tokens, layer mean); rows grouped by target L0")
    if len(table.header) > 6:
        note += "; faithfulness edits of the last layer beside their random controls"
    return "\n".join([note, line(table.header), *(line(r) for r in table.rows)])
