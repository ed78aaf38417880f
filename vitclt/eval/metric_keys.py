"""Every key of metrics.json with its meaning: the source of docs/metrics.md and of its check.

A key is a dotted path; `<...>` segments stand for every key at that level: `<name>` a transcoder
(its directory name), `<group>` a token group (those of `token_groups`: cls, patches, all, without cls
on a model without a CLS token), `<window>` a replacement window
("3-11"), `<tokens>` a replaced token subset, `<metric>` a reconstruction metric, `<edit>` a
faithfulness edit. Keys marked CLT-only exist only for cross-layer transcoders.
"""

from __future__ import annotations

from typing import NamedTuple

from vitclt.eval.faithfulness import EDITS
from vitclt.eval.reconstruction import METRICS
from vitclt.eval.replacement import TOKEN_SETS


class MetricKey(NamedTuple):
    """A documented metrics.json key."""

    key: str
    meaning: str
    clt_only: bool = False


TC = "transcoders.<name>"
REC = f"{TC}.reconstruction.<group>"
REP = f"{TC}.replacement.<window>.<tokens>"
ATT = f"{TC}.attribution.<group>"
FAI = f"{TC}.faithfulness.<tokens>"
RET = f"{TC}.retrieval"

METRIC_KEYS: list[MetricKey] = [
    MetricKey("schema", "format version of this file, `vitclt.eval/1`"),
    MetricKey("run_dir", "the evaluated run directory, relative to this file's directory (as given when it is not a local "
              "directory, e.g. a hub id)"),
    MetricKey("backbone.name", "backbone spec the model was loaded from"),
    MetricKey("backbone.n_layers", "number of transformer blocks L"),
    MetricKey("backbone.d_model", "residual width D"),
    MetricKey("backbone.n_tokens", "sequence length T (prefix tokens: CLS and any registers, then patches)"),
    MetricKey("backbone.fingerprint", "digest of the backbone's image-path weights (`Backbone.fingerprint`)"),
    MetricKey("dataset.spec", "dataset spec as passed to --dataset"),
    MetricKey("dataset.name", "the dataset's own name"),
    MetricKey("dataset.split", "split evaluated (test = held-out)"),
    MetricKey("dataset.n_images", "images evaluated"),
    MetricKey("dataset.n_classes", "number of classes of the task head"),
    MetricKey("dataset.classnames", "class names in label order (as put into the prompts of a zero-shot head)"),
    MetricKey("dataset.templates", "prompt templates of a zero-shot head (class vectors are the renormalised mean over "
              "templates); empty for other heads"),
    MetricKey("dataset.subset", "how the images were chosen (whole split, or a class-stratified subset and its seed)"),
    MetricKey("dataset.split_note", "how the split was made when the data has none of its own (e.g. a held-out share of "
              "a flat folder); empty otherwise"),
    MetricKey("config", "the eval configuration: every `vitclt eval` flag, nested by group (`options` with its `task`, "
              "`runtime`)"),
    MetricKey("context", "extra context of the run, e.g. the training settings from `vitclt reproduce` (may be empty)"),
    MetricKey("baseline.head", "the task head every accuracy is measured with: zeroshot (text tower), own (the "
              "checkpoint's classifier) or probe (a linear probe fitted on the clean embeddings of the training split)"),
    MetricKey("baseline.probe_split", "split the probe was fitted on (null unless the head is a probe)"),
    MetricKey("baseline.probe_images", "images the probe was fitted on (null unless the head is a probe)"),
    MetricKey("baseline.top1", "top-1 (%) of the clean model under the task head (for a probe: the probe's accuracy)"),
    MetricKey("baseline.top5", "top-5 (%) of the clean model under the task head"),
    MetricKey("baseline.n_images", "images the accuracies are over"),
    MetricKey("baseline.embedding_precision_at_k", "label precision@k of retrieval by the cosine of the clean model's "
              "final image embeddings (a reference for the per-layer code retrieval)"),
    MetricKey("token_groups", "token groups reconstruction and contribution scores are reported for: cls, patches, all "
              "(no cls on a model without a CLS token, e.g. SigLIP)"),
    MetricKey("windows", "replacement windows evaluated, as `start-end` labels"),
    MetricKey("tokens", "token subsets replaced in the cascade (the default leaves out cls on a model without a CLS token)"),
    MetricKey("zero_ablation.<window>.<tokens>", "top-1 (%) with the MLP outputs of the window zeroed at those "
              "tokens: the control"),
    MetricKey(f"{TC}.path", "the transcoder's directory, relative to this file's directory when it lies in the run "
              "(older files hold it absolute; readers accept both)"),
    MetricKey(f"{TC}.browser", "its page in the feature browser built in RUN_DIR/browser, relative to metrics.json "
              "(null when none was built)"),
    MetricKey(f"{TC}.backbone_mismatch", "true when the transcoder was trained on other backbone weights than the "
              "evaluated ones (its config's backbone_fingerprint differs; only with --allow-backbone-mismatch)"),
    MetricKey(f"{TC}.topology", "clt, plt or sae"),
    MetricKey(f"{TC}.sparsifier", "jumprelu, relu-topk, abs-topk or batch-topk"),
    MetricKey(f"{TC}.k", "target active features per token and layer: TopK's k, the L0 a JumpReLU was steered to"),
    MetricKey(f"{TC}.n_features", "features per layer F"),
    MetricKey(f"{TC}.config", "the transcoder's full config.json"),
    MetricKey(f"{REC}.mean.<metric>", "layer average of a reconstruction metric (mse, r2, cosine, fvu, l0, dead_pct) "
              "on clean activations"),
    MetricKey(f"{REC}.per_layer.<metric>", "the metric per layer (list of L)"),
    MetricKey(f"{REC}.n_tokens", "tokens of the group the metrics are over"),
    MetricKey(f"{REP}.top1", "top-1 (%) with the window's MLP outputs at those tokens replaced by the "
              "cascaded reconstruction"),
    MetricKey(f"{REP}.delta_baseline", "top1 minus the clean top-1 (percentage points)"),
    MetricKey(f"{REP}.recovered", "(top1 − zero-ablation top1) / (clean − zero-ablation top1): share of the "
              "ablation's loss the transcoder recovers (null if ablation costs nothing)"),
    MetricKey(f"{RET}.pool", "retrieval vector: cls (the CLS token's dense code) or patches (mean patch code; the "
              "default without a CLS token)"),
    MetricKey(f"{RET}.k", "neighbours counted by precision@k"),
    MetricKey(f"{RET}.precision_at_k", "per layer: mean fraction of an image's k nearest neighbours (cosine of codes) "
              "sharing its label"),
    MetricKey(f"{RET}.chance", "expected precision of random neighbours"),
    MetricKey(f"{RET}.queries", "dataset indices of the figure's query images"),
    MetricKey(f"{RET}.neighbours", "neighbours[q][ℓ]: dataset indices of query q's nearest images at layer ℓ"),
    MetricKey(f"{RET}.similarities", "their cosine similarities"),
    MetricKey(f"{ATT}.matrix", "C_proj[source][target] (L × L; 0 where source > target); columns sum to 1 (ŷ without "
              "the decoder bias)", True),
    MetricKey(f"{ATT}.bias_share", "per target: the decoder bias's projection score on ŷ + bias", True),
    MetricKey(f"{ATT}.skipped", "per target: tokens left out because ŷ was exactly zero", True),
    MetricKey(f"{ATT}.n_tokens", "tokens the scores average over", True),
    MetricKey(f"{FAI}.ranking", "source layers ranked by their score into the last layer, highest first", True),
    MetricKey(f"{FAI}.scores", "C_proj[s][L−1] per source s, for this token set", True),
    MetricKey(f"{FAI}.k", "sources kept by the sufficiency edits", True),
    MetricKey(f"{FAI}.baseline", "clean top-1 (%)", True),
    MetricKey(f"{FAI}.<edit>.top1", "top-1 (%) with the last layer's MLP output at these tokens replaced by the "
              "edited reconstruction (mean over seeds for random edits)", True),
    MetricKey(f"{FAI}.<edit>.std", "standard deviation over seeds (0 for deterministic edits)", True),
    MetricKey(f"{FAI}.<edit>.runs", "top-1 of each seed (one entry for deterministic edits)", True),
    MetricKey(f"{FAI}.<edit>.sources", "the sources kept, per run", True),
    MetricKey(f"{FAI}.<edit>.delta_baseline", "top1 minus the clean top-1 (pp)", True),
    MetricKey(f"{FAI}.<edit>.delta_full", "top1 minus the unedited last-layer replacement's top-1 (pp)", True),
    MetricKey("comparison.<name>.topology", "baseline table: topology"),
    MetricKey("comparison.<name>.sparsifier", "baseline table: sparsifier"),
    MetricKey("comparison.<name>.k", "baseline table: k"),
    MetricKey("comparison.<name>.<metric>", "baseline table: layer-averaged reconstruction metric on all tokens"),
    MetricKey("comparison.<name>.replacement.<window>.<tokens>", "baseline table: replacement top-1 (%)"),
    MetricKey("timing.pass1_s", "seconds of pass 1 (clean forward, codes, reconstruction, attribution, replacement grid)"),
    MetricKey("timing.pass2_s", "seconds of pass 2 (faithfulness edits)"),
]
"""Every documented key of metrics.json."""

FIXED = {"<group>": TOKEN_SETS, "<metric>": METRICS, "<edit>": EDITS}
"""Placeholders whose values are fixed (`<group>`: those `token_groups` lists); the others stand for whatever keys
are present."""


def _expand(node, parts: list[str], path: str, out: list[str], fixed: dict = FIXED) -> None:
    """Append to `out` every concrete path of `parts` (below `path`) that `node` lacks."""
    if not parts:
        return
    head, rest = parts[0], parts[1:]
    where = f"{path}.{head}".lstrip(".")
    if not isinstance(node, dict):
        out.append(where)
        return
    keys = list(fixed[head]) if head in fixed else list(node) if head.startswith("<") else [head]
    if not keys:
        out.append(where)
    for key in keys:
        if key in node:
            _expand(node[key], rest, f"{path}.{key}", out, fixed)
        else:
            out.append(f"{path}.{key}".lstrip("."))


def check_metric_keys(metrics: dict) -> list[str]:
    """Documented keys missing from `metrics` (as concrete paths); empty when all are there."""
    missing: list[str] = []
    groups = metrics.get("token_groups")
    fixed = {**FIXED, "<group>": groups} if isinstance(groups, list) and groups else FIXED
    clts = {n: e for n, e in metrics.get("transcoders", {}).items() if isinstance(e, dict) and e.get("topology") == "clt"}
    for mk in METRIC_KEYS:
        parts = mk.key.split(".")
        if mk.clt_only:
            # CLT-only keys live under transcoders.<name>: check them for the CLTs only.
            for name, entry in clts.items():
                _expand(entry, parts[2:], f"transcoders.{name}", missing, fixed)
        else:
            _expand(metrics, parts, "", missing, fixed)
    return missing


def markdown_table() -> str:
    """The key table of docs/metrics.md."""
    rows = ["| key | meaning |", "|---|---|"]
    for mk in METRIC_KEYS:
        rows.append(f"| `{mk.key}` | {mk.meaning}{' (CLT only)' if mk.clt_only else ''} |")
    return "\n".join(rows)
