"""The model card (README.md) that `vitclt push` publishes with a transcoder.

YAML front matter (library_name, tags) for the hub, then what the transcoder is (from its
config.json), how it was trained (training.json beside it) and, when an evaluation of it exists,
the headline numbers of `vitclt eval` (metrics.json), each with the file and key it was read from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from vitclt.report.summary import headline

TOPOLOGY_WORDS = {
    "clt": "cross-layer transcoder (CLT): each layer's features write to that layer's and every later layer's MLP output",
    "plt": "per-layer transcoder (PLT): each layer's features rebuild that layer's MLP output from its input",
    "sae": "sparse autoencoder (SAE) on each layer's MLP output",
}


class Evaluation(NamedTuple):
    """The metrics.json that evaluated a transcoder, and the transcoder's name in it."""

    path: Path
    """The metrics.json file."""
    name: str
    """The transcoder's key under `transcoders`."""
    metrics: dict
    """Its content."""


def eval_candidates(run_dir: Path, transcoder_dir: Path) -> list[Path]:
    """Where an evaluation of the transcoder may be, nearest first: DIR/eval, RUN_DIR/eval, and one and two levels up."""
    places = [transcoder_dir / "eval", run_dir / "eval", run_dir.parent / "eval", transcoder_dir.parent / "eval",
              transcoder_dir.parent.parent / "eval"]
    out: list[Path] = []
    for p in places:
        candidate = p / "metrics.json"
        if candidate.resolve() not in [q.resolve() for q in out]:
            out.append(candidate)
    return out


def find_evaluation(run_dir: Path, transcoder_dir: Path, name: str) -> Evaluation | None:
    """The first metrics.json among `eval_candidates` with an entry for this transcoder (matched by its recorded path,
    else by name: `name`, or its directory's path read as a metrics.json name); None if there is none."""
    target = transcoder_dir.resolve()
    names = {name, *("-".join(target.parts[i:]) for i in range(1, len(target.parts)))}
    for path in eval_candidates(run_dir, transcoder_dir):
        entries = _entries(path)
        for key, entry in entries.items():
            recorded = entry.get("path") if isinstance(entry, dict) else None
            if recorded and _same(recorded, path, target):
                return Evaluation(path, key, json.loads(path.read_text(encoding="utf-8")))
        # A copied or moved run: its recorded paths point elsewhere, but the name still says which entry it is.
        by_name = [key for key in entries if key in names]
        if len(by_name) == 1:
            return Evaluation(path, by_name[0], json.loads(path.read_text(encoding="utf-8")))
    return None


def _entries(path: Path) -> dict:
    """The `transcoders` entries of the metrics.json at `path`; {} if it is missing or unreadable."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["transcoders"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _same(recorded: str, metrics_path: Path, target: Path) -> bool:
    """Whether a metrics.json `path` entry names `target`: relative to the metrics.json (what eval writes), or, as
    older files wrote it, absolute or relative to where eval ran."""
    if os.path.isabs(recorded):
        candidates = [Path(recorded)]
    else:
        candidates = [metrics_path.parent / recorded, Path(recorded), metrics_path.parent.parent / recorded]
    return any(c.exists() and c.resolve() == target for c in candidates)


def missing_evaluation(run_dir: Path, transcoder_dir: Path, name: str) -> str:
    """Why `find_evaluation` found nothing, in one line: which metrics.json has no entry for `name`, or where it looked."""
    held = [(p, _entries(p)) for p in eval_candidates(run_dir, transcoder_dir) if p.is_file()]
    if held:
        return "; ".join(f"{p} has no entry for {name} (it holds {', '.join(e) or 'none'})" for p, e in held)
    looked = ", ".join(str(p) for p in eval_candidates(run_dir, transcoder_dir))
    return f"No evaluation was found next to the transcoder when it was published (looked for {looked})"


def _training(transcoder_dir: Path) -> dict:
    try:
        return json.loads((transcoder_dir / "training.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _k(cfg: dict) -> str:
    if cfg.get("sparsifier") == "jumprelu":
        return "– (JumpReLU: learned thresholds)"
    per_layer = cfg.get("k_per_layer") or []
    return ", ".join(map(str, per_layer)) + " (per layer)" if per_layer else str(cfg.get("k"))


def _metric_rows(evaluation: Evaluation) -> list[str]:
    """Markdown table rows: metric, value, the metrics.json key it is (values as the headline table formats them)."""
    table = headline(evaluation.metrics)
    row = next(r for r in table.rows if r[0] == evaluation.name)
    cells = dict(zip(table.header, row))
    tokens = "all" if "all" in evaluation.metrics["tokens"] else next(iter(evaluation.metrics["tokens"]))
    tc = f"transcoders.{evaluation.name}"
    full, last = (h.split(" ", 1)[1].replace("→", "-") for h in table.header[4:6])
    base = evaluation.metrics["baseline"]["top1"]
    rows = [
        ("reconstruction R² (all tokens, layer mean)", cells["R²"], f"{tc}.reconstruction.all.mean.r2"),
        ("reconstruction cosine (all tokens, layer mean)", cells["cosine"], f"{tc}.reconstruction.all.mean.cosine"),
        (f"zero-shot top-1 (%), layers {full} replaced (full cascade, {tokens} tokens)", cells[table.header[4]],
         f"{tc}.replacement.{full}.{tokens}.top1"),
        (f"zero-shot top-1 (%), layers {last} replaced (last layers, {tokens} tokens)", cells[table.header[5]],
         f"{tc}.replacement.{last}.{tokens}.top1"),
        ("zero-shot top-1 (%) of the clean model", f"{base:.2f}", "baseline.top1"),
    ]
    faith = evaluation.metrics["transcoders"][evaluation.name].get("faithfulness")
    if faith and len(table.header) > 6:
        group = "all" if "all" in faith else next(iter(faith))
        k = faith[group]["k"]
        labels = {"drop_top1": "faithfulness: drop the top-ranked source layer", "drop_random": "… drop a random source layer",
                  "keep_topk": f"faithfulness: keep only the top-{k} sources", "keep_random": f"… keep {k} random sources"}
        for (edit, label), header in zip(labels.items(), table.header[6:]):
            rows.append((f"{label}, top-1 (%)", cells[header], f"{tc}.faithfulness.{group}.{edit}.top1"))
    return [f"| {label} | {value} | `{key}` |" for label, value, key in rows]


def model_card(cfg: dict, transcoder_dir: Path, name: str, repo_id: str, run_dir: Path | None = None) -> str:
    """README.md for the hub repository of the transcoder in `transcoder_dir` (its config.json as the dict `cfg`)."""
    run_dir = run_dir or transcoder_dir
    training = _training(transcoder_dir)
    train_cfg = training.get("train_config") or {}
    split = train_cfg.get("split")
    topology, sparsifier = cfg.get("topology", "clt"), cfg.get("sparsifier", "")
    tags = ["vitclt", "transcoder", topology, sparsifier, "interpretability", "vision-transformer", "sparse-dictionary"]
    front = "---\nlibrary_name: vitclt\ntags:\n" + "".join(f"- {t}\n" for t in tags if t) + "---\n"
    known = lambda v: "unknown" if v in (None, "") else str(v)  # noqa: E731
    features = cfg.get("n_features") or cfg.get("expansion", 0) * cfg.get("d_model", 0)
    tokens = training.get("tokens")
    setting_rows = [
        ("backbone", f"`{known(cfg.get('backbone'))}`", "config.json `backbone`"),
        ("backbone weights fingerprint", f"`{known(cfg.get('backbone_fingerprint'))}`", "config.json `backbone_fingerprint`"),
        ("training dataset", f"`{known(train_cfg.get('dataset'))}`" + (f" ({train_cfg['split']})" if split else ""),
         "training.json `train_config.dataset`"),
        ("tokens", known(cfg.get("tokens")), "config.json `tokens`"),
        ("topology", topology, "config.json `topology`"),
        ("sparsifier", sparsifier, "config.json `sparsifier`"),
        ("k (active features per token and layer)", _k(cfg), "config.json `k`, `k_per_layer`"),
        ("features per layer", str(features), "config.json `n_features` (or expansion × d_model)"),
        ("layers × width", f"{cfg.get('n_layers')} × {cfg.get('d_model')}", "config.json `n_layers`, `d_model`"),
        ("training steps", known(training.get("step")) + ("" if training.get("finished", True) else " (unfinished run)"),
         "training.json `step`"),
        ("training tokens (rows)", f"{tokens:,}" if isinstance(tokens, int) else "unknown", "training.json `tokens`"),
    ]
    lines = [
        front,
        f"# {name}",
        "",
        f"A sparse {TOPOLOGY_WORDS.get(topology, topology)}, trained with "
        f"[vitclt](https://pypi.org/project/vitclt/) on the MLP blocks of `{known(cfg.get('backbone'))}`. "
        "It maps each block's MLP input (the LN2 output) to its MLP output, in raw activation units "
        "(normalisation folded into the weights).",
        "",
        "## Use",
        "",
        "```python",
        "from vitclt.nn import Transcoder",
        "",
        f'transcoder = Transcoder.from_pretrained("{repo_id}")',
        "```",
        "",
        f"or on the command line: `vitclt eval {repo_id}`, `vitclt browse {repo_id}`, `vitclt explain {repo_id} --image IMG`. "
        "vitclt refuses to use it with a backbone whose weights fingerprint differs from the one below.",
        "",
        "## Transcoder",
        "",
        "| setting | value | read from |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in setting_rows],
        "",
        "## Evaluation",
        "",
    ]
    evaluation = find_evaluation(run_dir, transcoder_dir, name)
    if evaluation is None:
        lines += [f"{missing_evaluation(run_dir, transcoder_dir, name)}; run `vitclt eval {repo_id}` to measure it."]
    else:
        where = os.path.relpath(evaluation.path, run_dir)
        data = evaluation.metrics.get("dataset", {})
        lines += [
            f"From `{where}` (written by `vitclt eval`), entry `{evaluation.name}`: zero-shot classification on "
            f"{data.get('n_images', '?')} images of `{data.get('spec', data.get('name', '?'))}` ({data.get('split', '?')} split) "
            f"with backbone `{evaluation.metrics.get('backbone', {}).get('name', known(cfg.get('backbone')))}`.",
            "",
            "| metric | value | metrics.json key |",
            "|---|---|---|",
            *_metric_rows(evaluation),
        ]
    return "\n".join(lines) + "\n"
