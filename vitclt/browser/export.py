"""The same feature data in the layouts other tools read.

* circuit-tracer's feature-examples frontend reads ``features/<scan>/<id>.json`` with
  ``id = cantor(layer, feature) = (layer + feature)(layer + feature + 1)/2 + feature`` (its
  ``Node.feature_node``) and the fields of its ``frontend/feature_models.Model``:
  ``transcoder_id, index, examples_quantiles[{quantile_name, examples[{tokens, tokens_acts_list,
  train_token_ind, is_repeated_datapoint}]}], top_logits, bottom_logits, act_min, act_max,
  quantile_values, histogram, activation_frequency``. Tokens are the image's positions
  ("CLS", "r0c0", ...); "logits" are the feature's top and bottom CLIP text labels.
* SAEDashboard's Neuronpedia batches (``NeuronpediaDashboardBatch``): ``batch-<n>.json`` holding
  ``{model_id, layer, sae_set, features[{feature_index, pos_str, pos_values, neg_str, neg_values,
  frac_nonzero, freq_hist_data_bar_values, freq_hist_data_bar_heights, n_prompts_total,
  n_tokens_in_prompt, dataset, decoder_weights_dist, activations[{bin_min, bin_max, bin_contains,
  tokens, values}], ...}]}``.

Both carry the sees and writes labels (`vitclt.browser.sees`, `vitclt.browser.writes`) under keys of
their own, since neither format has a field for them: ``sees_labels`` / ``writes_labels`` (circuit-tracer)
and ``sees_str, sees_values, sees_baselines, sees_shown`` / ``writes_str, ...`` (Neuronpedia): the
concept, its score, its shuffled baseline and whether it beats that baseline's 99th percentile.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vitclt.browser.collect import HIST_BINS, HIST_BINS_PER_OCTAVE, HIST_LOG2_MIN, TopList

NEURONPEDIA_BATCH = 128
"""Features per Neuronpedia batch file."""


def cantor(layer: int, feature: int) -> int:
    """circuit-tracer's feature id: the Cantor pairing of (layer, feature)."""
    s = layer + feature
    return s * (s + 1) // 2 + feature


def token_names(n_prefix: int, grid: int) -> list[str]:
    """Names of an image's token positions: CLS (and other prefix tokens), then patches by row and column."""
    prefix = ["CLS"] + [f"prefix{i}" for i in range(1, n_prefix)]
    return prefix + [f"r{r}c{c}" for r in range(grid) for c in range(grid)]


def _examples(top: TopList, layer: int, feature: int, tokens: list[str]) -> list[dict]:
    keep = np.flatnonzero(np.isfinite(top.score_LFK[layer, feature].numpy()))
    acts = np.round(top.tokens_LFKT[layer, feature, keep].numpy().astype(np.float64), 4)
    return [
        {"tokens": tokens, "tokens_acts_list": row.tolist(), "train_token_ind": int(row.argmax()), "is_repeated_datapoint": False}
        for row in acts
    ]


def explained(pages, kind: str, layer: int, feature: int) -> list[list]:
    """[[concept, score, shuffled baseline, shown], ...] of one feature, best first ([] without such labels)."""
    lab = getattr(pages, kind, None)
    if lab is None:
        return []
    rows = zip(lab.index_LFK[layer, feature].tolist(), lab.score_LFK[layer, feature].tolist(),
               lab.baseline_LFK[layer, feature].tolist(), lab.shown_LFK[layer, feature].tolist())
    return [[pages.concepts[i], round(s, 4), round(b, 4), bool(ok)] for i, s, b, ok in rows if s == s]


def _neuronpedia_explained(pages, layer: int, feature: int) -> dict:
    out = {}
    for kind in ("sees", "writes"):
        rows = explained(pages, kind, layer, feature)
        for key, col in zip(("str", "values", "baselines", "shown"), zip(*rows) if rows else ([], [], [], [])):
            out[f"{kind}_{key}"] = list(col)
    return out


def _hist_centres() -> np.ndarray:
    return 2.0 ** (HIST_LOG2_MIN + (np.arange(HIST_BINS) + 0.5) / HIST_BINS_PER_OCTAVE)


def write_circuit_tracer(out: Path, pages, tokens: list[str]) -> Path:
    """Write ``out/features/<tc id>/<cantor id>.json`` for every live feature; returns the scan directory."""
    scan = out / "features" / pages.id
    scan.mkdir(parents=True, exist_ok=True)
    st, lab = pages.stats, pages.labels
    freq_LF = (st.fire_LF.double() / max(st.n_tokens, 1)).numpy()
    for layer, feature in zip(*np.nonzero(~st.dead_LF.numpy())):
        layer, feature = int(layer), int(feature)
        top_words = bottom_words = []
        if lab is not None:
            top_words = [pages.words[i] for i in lab.word_LFK[layer, feature].tolist()]
            bottom_words = [pages.words[i] for i in lab.word_bottom_LFK[layer, feature].tolist()]
        record = {
            "transcoder_id": f"{pages.id}/layer{layer}",
            "index": feature,
            "examples_quantiles": [
                {"quantile_name": "Top activations", "examples": _examples(st.top_max, layer, feature, tokens)},
                {"quantile_name": "Top CLS activations", "examples": _examples(st.top_cls, layer, feature, tokens)},
                {"quantile_name": "Random sample of firing images", "examples": _examples(st.sample, layer, feature, tokens)},
            ],
            "top_logits": top_words,
            "bottom_logits": bottom_words,
            "act_min": 0.0,
            "act_max": round(float(st.max_LF[layer, feature]), 4),
            "quantile_values": [],
            "histogram": st.hist_LFG[layer, feature].tolist(),
            "activation_frequency": float(freq_LF[layer, feature]),
            "sees_labels": explained(pages, "sees", layer, feature),
            "writes_labels": explained(pages, "writes", layer, feature),
        }
        (scan / f"{cantor(layer, feature)}.json").write_text(json.dumps(record, separators=(",", ":")))
    return scan


def write_neuronpedia(out: Path, pages, tokens: list[str], model_id: str, dataset: str) -> Path:
    """Write ``out/<tc id>/batch-<n>.json`` (SAEDashboard's Neuronpedia batches, one layer per batch file)."""
    root = out / pages.id
    root.mkdir(parents=True, exist_ok=True)
    st, lab = pages.stats, pages.labels
    freq_LF = (st.fire_LF.double() / max(st.n_tokens, 1)).numpy()
    centres = np.round(_hist_centres(), 6).tolist()
    L, F = freq_LF.shape
    n = 0
    for layer in range(L):
        for start in range(0, F, NEURONPEDIA_BATCH):
            features = []
            for feature in range(start, min(start + NEURONPEDIA_BATCH, F)):
                pos_str = pos_values = neg_str = neg_values = []
                if lab is not None:
                    pos_str = [pages.words[i] for i in lab.word_LFK[layer, feature].tolist()]
                    pos_values = np.round(lab.word_score_LFK[layer, feature].double().numpy(), 4).tolist()
                    neg_str = [pages.words[i] for i in lab.word_bottom_LFK[layer, feature].tolist()]
                    neg_values = np.round(lab.word_bottom_score_LFK[layer, feature].double().numpy(), 4).tolist()
                acts = [
                    {"bin_min": -1, "bin_max": -1, "bin_contains": -1, "tokens": ex["tokens"], "values": ex["tokens_acts_list"]}
                    for ex in _examples(st.top_max, layer, feature, tokens)
                ]
                features.append({
                    "feature_index": feature,
                    "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
                    "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
                    "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
                    "neg_str": neg_str, "neg_values": neg_values, "pos_str": pos_str, "pos_values": pos_values,
                    "frac_nonzero": float(freq_LF[layer, feature]),
                    "freq_hist_data_bar_values": centres,
                    "freq_hist_data_bar_heights": st.hist_LFG[layer, feature].tolist(),
                    "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
                    "n_prompts_total": st.n_images, "n_tokens_in_prompt": len(tokens), "dataset": dataset,
                    "decoder_weights_dist": np.round(pages.norms_LFJ[layer, feature].double().numpy(), 4).tolist(),
                    "activations": acts,
                    **_neuronpedia_explained(pages, layer, feature),
                })
            batch = {"model_id": model_id, "layer": layer, "sae_set": pages.id, "features": features}
            (root / f"batch-{n}.json").write_text(json.dumps(batch, separators=(",", ":")))
            n += 1
    return root
