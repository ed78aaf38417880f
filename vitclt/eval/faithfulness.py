"""Faithfulness of contribution scores: necessity and sufficiency of the top-ranked source layers.

Sources are ranked by their score into the last layer (C_proj[:, L−1], for the token set being
evaluated). Only the last layer's MLP output is replaced, at the chosen tokens, by an edited
reconstruction: the decoder bias plus the terms c_{s→L−1} of a subset of sources. Edits:

- `full`: every source (the plain last-layer replacement, the reference for the edits);
- `drop_top1` (necessity): every source but the top-ranked one;
- `keep_topk` (sufficiency): only the k top-ranked sources;
- controls the paper lacks: `keep_bottomk` (the k lowest-ranked), `drop_random` (one source drawn
  uniformly from the sources *other than* the top-ranked one, so it is never the necessity edit) and
  `keep_random` (k distinct sources drawn uniformly from all of them, without replacement), each
  drawn once per seed with `numpy.random.default_rng(seed)`.

Everything before the last layer runs clean, so every code comes from the clean forward.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from vitclt.backbones import Backbone
from vitclt.eval.replacement import Setting, Window, transcoder_setting

EDITS = ("full", "drop_top1", "keep_topk", "keep_bottomk", "drop_random", "keep_random")
"""The edits, in report order."""

RANDOM_EDITS = ("drop_random", "keep_random")
"""Edits drawn at random, once per seed."""


class Edit(NamedTuple):
    """One edited reconstruction: the edit's kind, the seed (random edits) and the sources kept."""

    kind: str
    seed: int | None
    sources: list[int]


def default_top_k(n_layers: int) -> int:
    """k for sufficiency: L/3 rounded, so 4 of 12 sources as in the paper (1 of 3 for a 3-layer model)."""
    return min(max(1, round(n_layers / 3)), max(1, n_layers - 1))


def plan_edits(ranking: Sequence[int], k: int, seeds: Sequence[int]) -> list[Edit]:
    """Every edit for a ranking of the last layer's sources (highest score first)."""
    n = len(ranking)
    if n < 2:
        raise ValueError(f"faithfulness edits need at least two source layers into the last layer, got {n}")
    if not 1 <= k <= n:
        raise ValueError(f"top-k for sufficiency must be between 1 and the {n} source layers, got {k}")
    every = sorted(ranking)
    edits = [
        Edit("full", None, every),
        Edit("drop_top1", None, sorted(ranking[1:])),
        Edit("keep_topk", None, sorted(ranking[:k])),
        Edit("keep_bottomk", None, sorted(ranking[-k:])),
    ]
    others = list(ranking[1:])
    for seed in seeds:
        rng = np.random.default_rng(seed)
        dropped = others[int(rng.integers(len(others)))]
        edits.append(Edit("drop_random", seed, [s for s in every if s != dropped]))
        edits.append(Edit("keep_random", seed, sorted(int(s) for s in rng.choice(n, size=k, replace=False))))
    return edits


def edit_name(prefix: str, tokens: str, edit: Edit) -> str:
    """The grid setting name of an edit."""
    return f"{prefix}/faith/{tokens}/{edit.kind}" + ("" if edit.seed is None else f"/{edit.seed}")


def faithfulness_settings(prefix: str, transcoder, backbone: Backbone, rankings: dict[str, Sequence[int]], k: int,
                          seeds: Sequence[int]) -> tuple[list[Setting], dict[str, list[Edit]]]:
    """Grid settings for every edit and token set, and the edits planned per token set."""
    last = backbone.n_layers - 1
    settings, plans = [], {}
    for tokens, ranking in rankings.items():
        plans[tokens] = plan_edits(ranking, k, seeds)
        for edit in plans[tokens]:
            settings.append(transcoder_setting(edit_name(prefix, tokens, edit), transcoder, backbone,
                                               Window(last, last), tokens, keep_sources={last: edit.sources}))
    return settings, plans


def summarize(prefix: str, top1: dict[str, float], plans: dict[str, list[Edit]], baseline: float,
              rankings: dict[str, Sequence[int]], scores: dict[str, Sequence[float]], k: int) -> dict:
    """metrics.json's faithfulness block: per token set, each edit's top-1 (mean ± std over seeds)
    and its deltas (percentage points) against the clean model and against the full reconstruction."""
    out = {}
    for tokens, edits in plans.items():
        full = top1[edit_name(prefix, tokens, edits[0])]
        block = {"ranking": list(rankings[tokens]), "scores": list(scores[tokens]), "k": k, "baseline": baseline}
        for kind in EDITS:
            mine = [e for e in edits if e.kind == kind]
            runs = [top1[edit_name(prefix, tokens, e)] for e in mine]
            mean = statistics.fmean(runs)
            block[kind] = {
                "top1": mean,
                "std": statistics.pstdev(runs) if len(runs) > 1 else 0.0,
                "runs": runs,
                "sources": [e.sources for e in mine],
                "delta_baseline": mean - baseline,
                "delta_full": mean - full,
            }
        out[tokens] = block
    return out
