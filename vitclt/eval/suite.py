"""The evaluation suite: every metric of `vitclt eval` for one or several transcoders, as metrics.json's dict.

Two passes over the eval set, each looping over image batches outermost (a batch is decoded and
preprocessed once per pass):

1. the clean forward (with capture) gives the baseline accuracy under the task head (built once from
   the clean model, before this, and fixed) and every transcoder's codes,
   from which reconstruction metrics, contribution scores and the retrieval gallery accumulate;
   then every replacement setting (window × tokens, per transcoder, plus the zero-ablation
   control) runs one forward on the same pixels;
2. for each CLT, the faithfulness edits of the last layer's reconstruction, ranked by the
   contribution scores of pass 1, again one forward per edit.

`evaluate_suite` returns the metrics (keys in `vitclt.eval.metric_keys`, documented in
docs/metrics.md); the `vitclt eval` command (`vitclt.commands.eval`) adds the run's description,
writes metrics.json and renders the report.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vitclt.backbones import Backbone
from vitclt.backbones.heads import TaskHead
from vitclt.data.batches import pixel_batches
from vitclt.errors import ConfigError, InputNotFoundError
from vitclt.eval.attribution import ContributionAccumulator, rank_sources
from vitclt.eval.faithfulness import default_top_k, faithfulness_settings, summarize
from vitclt.eval.options import EvalOptions
from vitclt.eval.reconstruction import ReconstructionAccumulator, token_groups
from vitclt.eval.replacement import GridBatch, ReplacementGrid, encode_rows, transcoder_setting, zero_setting
from vitclt.eval.retrieval import CodeGallery, evaluate_retrieval, precision_at_k
from vitclt.eval.windows import Window, default_windows, parse_windows
from vitclt.io import jsonable
from vitclt.nn import Transcoder
from vitclt.nn.hub import resolve_source
from vitclt.runtime import RuntimeConfig

SCHEMA = "vitclt.eval/1"
"""metrics.json format version; bumped when a documented key changes meaning or disappears."""


def find_transcoders(run_dir: Path, max_depth: int = 3) -> dict[str, Path]:
    """Transcoder directories (config.json + model.safetensors) in `run_dir`, by name.

    `run_dir` itself if it is one (named after it); else every one below it, named by its path
    relative to `run_dir` with `/` read as `-` (`clt/jumprelu` → `clt-jumprelu`), in sorted order.
    `run_dir` may be a hub id (`org/repo[@revision]`, `hf:org/repo`): `vitclt.nn.hub.resolve_source`
    downloads it (or reads the hub cache) and names a transcoder at its top after the repo.
    """
    run_dir, top_name, _ = resolve_source(run_dir)
    if not run_dir.is_dir():
        raise InputNotFoundError(f"run directory {run_dir} does not exist: pass a directory written by vitclt train")
    is_tc = lambda p: (p / "config.json").is_file() and (p / "model.safetensors").is_file()  # noqa: E731
    if is_tc(run_dir):
        return {top_name: run_dir}
    found, frontier = {}, [run_dir]
    for _ in range(max_depth):
        below = [p for d in frontier for p in sorted(d.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        found.update({"-".join(p.relative_to(run_dir).parts): p for p in below if is_tc(p)})
        frontier = [p for p in below if not is_tc(p)]
    if not found:
        raise InputNotFoundError(f"no transcoder in {run_dir}: expected config.json + model.safetensors there or in its "
                                 "subdirectories: pass a directory written by vitclt train (or one transcoder directory)")
    return dict(sorted(found.items()))


RUN_FILE = "run.json"
"""The file a training run records its command and transcoders in: `vitclt.training.checkpoint.RUN_FILE`, named here
because eval does not import training (a test keeps the two equal)."""


def featured_transcoder(paths: dict[str, Path]) -> str | None:
    """The transcoder a study features: its ReLU-TopK CLT (of a sweep over k, the one at the middle k), else its first
    CLT in the order of `paths`; None without a CLT.

    `vitclt reproduce` and `demo` browse it; from their output directory explain, intervene and push default to it.
    """
    def config(path: Path) -> dict:
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return {}
        return cfg if isinstance(cfg, dict) else {}

    clts = {name: cfg for name, cfg in ((n, config(p)) for n, p in paths.items()) if cfg.get("topology") == "clt"}
    topk = sorted((n for n, cfg in clts.items() if cfg.get("sparsifier") == "relu-topk"), key=lambda n: clts[n].get("k", 0))
    return topk[len(topk) // 2] if topk else next(iter(clts), None)


def _study(run_dir: Path) -> list[str] | None:
    """The transcoders, in training order, of the `vitclt reproduce`/`demo` run at `run_dir` or `run_dir`/train; None if
    `run_dir` is not such a run (a `vitclt train` run names its transcoder with --transcoder)."""
    for path in (run_dir / RUN_FILE, run_dir / "train" / RUN_FILE):
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("command", "train") != "train":
            return list(meta.get("transcoders") or [])
    return None


def _own_name(key: str, path: Path) -> str:
    """A transcoder's name as its training run, metrics.json, the demo's table and the browser call it (the directory
    name when its parent is a training run), else its key in `find_transcoders`."""
    return path.name if (path.parent / RUN_FILE).is_file() else key


def pick_transcoder(run_dir: str | Path, name: str | None = None) -> tuple[str, Path]:
    """(name, directory) of one transcoder in `run_dir`: the one named `name`, else the only one there, else (in a
    `vitclt reproduce` or `demo` directory) the featured one.

    `name` may be its name under `run_dir` (`train-clt-relu-topk`) or any trailing part of that path
    (`clt-relu-topk`, the name metrics.json, the demo's table and the browser use).
    """
    found = find_transcoders(run_dir)  # its own message names the fix
    if name is not None:
        matches = [key for key, path in found.items() if key == name or _tail_is(path, Path(run_dir), name)]
        if len(matches) != 1:
            problem = "several transcoders match" if matches else "no transcoder named"
            raise ConfigError(f"{problem} {name!r} in {run_dir}; found: {', '.join(matches or found)}")
        return _own_name(matches[0], found[matches[0]]), found[matches[0]]
    if len(found) > 1:
        order = _study(Path(run_dir))
        if order is not None:
            by_name = {_own_name(key, path): path for key, path in found.items()}
            ordered = {n: by_name[n] for n in order if n in by_name} | by_name
            featured = featured_transcoder(ordered)
            if featured is not None:
                print(f"note: {run_dir} holds {len(found)} transcoders; using its featured {featured} "
                      "(pick another with --transcoder NAME)")
                return featured, ordered[featured]
        raise ConfigError(f"{run_dir} holds {len(found)} transcoders ({', '.join(found)}): pick one with --transcoder NAME")
    key, path = next(iter(found.items()))
    return _own_name(key, path), path


def _tail_is(path: Path, run_dir: Path, name: str) -> bool:
    """Whether `name` is the trailing part of `path` below `run_dir`, its directories joined with `-`."""
    try:
        parts = path.relative_to(run_dir).parts
    except ValueError:
        return False
    return any("-".join(parts[i:]) == name for i in range(len(parts)))


def load_transcoders(paths: dict[str, Path], backbone: Backbone, allow_mismatch: bool = False) -> dict[str, Transcoder]:
    """Load each transcoder onto the backbone's device, checking it fits the backbone.

    A transcoder whose recorded backbone fingerprint differs from `backbone.fingerprint` was trained
    on other weights of the same shape; it is refused unless `allow_mismatch` (then `describe`
    marks it in metrics.json and the report). An empty recorded fingerprint (older checkpoints,
    custom row sources) cannot be checked and passes.
    """
    out = {}
    for name, path in paths.items():
        tc = Transcoder.from_pretrained(path, device=backbone.device)
        try:
            tc.check_compatible(backbone.n_layers, backbone.d_model)
        except ValueError as e:
            raise ConfigError(f"transcoder {name} ({path}) does not fit backbone {backbone.name}: {e}") from None
        if not allow_mismatch and backbone_mismatch(tc, backbone):
            raise ConfigError(
                f"transcoder {name} ({path}) was trained on backbone weights with fingerprint {tc.cfg.backbone_fingerprint}, "
                f"but {backbone.name} has fingerprint {backbone.fingerprint}: evaluate it on the backbone it was trained on "
                "(--backbone), or pass --allow-backbone-mismatch to evaluate anyway (the report marks it)")
        out[name] = tc.to(backbone.device).eval()
    return out


def backbone_mismatch(tc: Transcoder, backbone: Backbone) -> bool:
    """Whether `tc` records a backbone fingerprint that is not `backbone`'s (False when it records none)."""
    recorded = tc.cfg.backbone_fingerprint
    return bool(recorded) and recorded != backbone.fingerprint


def backbone_spec(paths: dict[str, Path], override: str | None) -> str:
    """The backbone to evaluate on: `override`, else the one every transcoder was trained on."""
    specs = {name: json.loads((p / "config.json").read_text()).get("backbone") for name, p in paths.items()}
    distinct = {s for s in specs.values() if s}
    if override:
        if distinct and distinct != {override}:
            print(f"note: the transcoders were trained on {', '.join(sorted(distinct))}; evaluating them on {override}")
        return override
    if len(distinct) != 1:
        raise ConfigError(f"cannot tell the backbone from the transcoders' configs ({specs}): pass --backbone")
    return distinct.pop()


def describe(tc, path: Path | None = None, backbone: Backbone | None = None) -> dict:
    """A transcoder's identity for metrics.json: topology, sparsifier, k, width, full config, and
    whether it was trained on other weights than `backbone`'s."""
    cfg = tc.cfg
    return {
        "path": str(path) if path else None,
        "backbone_mismatch": backbone is not None and backbone_mismatch(tc, backbone),
        "browser": None,
        "topology": cfg.topology,
        "sparsifier": cfg.sparsifier,
        "k": cfg.k,
        "n_features": tc.n_features,
        "config": jsonable(asdict(cfg)),
    }


class ReplaceKey(NamedTuple):
    """A replacement setting of the grid: a transcoder (None: the zero-ablation control), a window, the tokens."""

    transcoder: str | None
    window: Window
    tokens: str


def _clean_codes(transcoders: dict[str, Transcoder], x_BTLD: torch.Tensor, y_BTLD: torch.Tensor) -> dict[str, list]:
    return {name: [encode_rows(tc, layer, x_BTLD[:, :, layer], y_BTLD[:, :, layer]) for layer in range(x_BTLD.shape[2])]
            for name, tc in transcoders.items()}


class CleanPass(NamedTuple):
    """What pass 1 leaves for the rest: accuracies, every accumulator and the grid's top-1."""

    top1: float
    top5: float
    n_images: int
    embeds_NP: torch.Tensor
    recon: dict[str, ReconstructionAccumulator]
    attribution: dict[str, dict]
    gallery: dict[str, CodeGallery]
    grid_top1: dict[str, float]


def _clean_pass(backbone: Backbone, dataset, head: TaskHead, transcoders: dict[str, Transcoder],
                windows: list[Window], options: EvalOptions, runtime: RuntimeConfig) -> CleanPass:
    """Pass 1: per batch, the clean forward, every accumulator, and every replacement setting."""
    L, T = backbone.n_layers, backbone.n_tokens
    groups = token_groups(backbone)  # without cls where the model has no CLS token
    recon = {n: ReconstructionAccumulator(L, backbone.d_model, tc.n_features, groups, backbone.device)
             for n, tc in transcoders.items()}
    attrib = {n: ContributionAccumulator(L, T, groups) for n, tc in transcoders.items() if tc.cfg.topology == "clt"}
    gallery = {n: CodeGallery(L, tc.n_features, T, backbone.n_prefix_tokens, options.retrieval_pool)
               for n, tc in transcoders.items()}
    settings = [zero_setting(ReplaceKey(None, w, t), w, t) for w in windows for t in options.replace_tokens]
    settings += [transcoder_setting(ReplaceKey(n, w, t), tc, backbone, w, t)
                 for n, tc in transcoders.items() for w in windows for t in options.replace_tokens]
    grid = ReplacementGrid(backbone, head, settings)
    n1 = n5 = n = 0
    embeds = []
    bar = tqdm(total=len(dataset), desc=f"eval 1/2 ({len(settings)} replacement settings)", unit="img",
               disable=not runtime.progress)
    for pixels, labels_B in pixel_batches(backbone, dataset, runtime.images_per_forward, runtime.workers, runtime.fast_decode):
        with backbone.capture() as cap:
            emb_BP = backbone.image_embeds(pixels)
        hit1, hit5 = head.correct(emb_BP, labels_B)
        n1, n5, n = n1 + int(hit1.sum()), n5 + int(hit5.sum()), n + len(labels_B)
        embeds.append(emb_BP.cpu())
        x_BTLD, y_BTLD = cap.x_BTLD(), cap.y_BTLD()
        codes = _clean_codes(transcoders, x_BTLD, y_BTLD)
        for name, tc in transcoders.items():
            y_hat_NLD = torch.stack([tc.decode_layer(layer, codes[name][: layer + 1]) for layer in range(L)], dim=1)
            recon[name].update(y_BTLD, y_hat_NLD.unflatten(0, (len(labels_B), T)), codes[name])
            gallery[name].update(codes[name], labels_B)
            if name in attrib:
                attrib[name].update(tc, codes[name])
        grid.update(GridBatch(pixels, labels_B, {id(tc): codes[name] for name, tc in transcoders.items()}))
        bar.update(len(labels_B))
        bar.set_postfix(clean_top1=f"{100 * n1 / n:.2f}")
    bar.close()
    attribution = {name: {g: r._asdict() for g, r in acc.result().items()} for name, acc in attrib.items()}
    return CleanPass(100 * n1 / n, 100 * n5 / n, n, torch.cat(embeds), recon, attribution, gallery, grid.top1())


def _faithfulness_pass(backbone: Backbone, dataset, head: TaskHead, clts: dict[str, Transcoder],
                       attribution: dict[str, dict], baseline: float, options: EvalOptions,
                       runtime: RuntimeConfig) -> dict[str, dict]:
    """Pass 2: rank each CLT's sources by pass 1's scores and run every edit; metrics.json's blocks."""
    if not clts:
        return {}
    last = backbone.n_layers - 1
    k = options.top_k or default_top_k(backbone.n_layers)
    seeds = list(range(runtime.seed, runtime.seed + options.seeds))
    settings, plans, rankings, scores = [], {}, {}, {}
    for name, tc in clts.items():
        rankings[name] = {t: rank_sources(attribution[name][t]["matrix"]) for t in options.faith_tokens}
        scores[name] = {t: [row[last] for row in attribution[name][t]["matrix"]] for t in options.faith_tokens}
        mine, plans[name] = faithfulness_settings(name, tc, backbone, rankings[name], k, seeds)
        settings += mine
    grid = ReplacementGrid(backbone, head, settings)
    bar = tqdm(total=len(dataset), desc=f"eval 2/2 ({len(settings)} faithfulness edits)", unit="img",
               disable=not runtime.progress)
    for pixels, labels_B in pixel_batches(backbone, dataset, runtime.images_per_forward, runtime.workers, runtime.fast_decode):
        with backbone.capture() as cap:
            backbone.image_embeds(pixels)
        codes = _clean_codes(clts, cap.x_BTLD(), cap.y_BTLD())
        grid.update(GridBatch(pixels, labels_B, {id(tc): codes[name] for name, tc in clts.items()}))
        bar.update(len(labels_B))
    bar.close()
    top1 = grid.top1()
    return {name: summarize(name, top1, plans[name], baseline, rankings[name], scores[name], k) for name in clts}


@torch.inference_mode()
def evaluate_suite(backbone: Backbone, dataset, head: TaskHead, transcoders: dict[str, Transcoder],
                   options: EvalOptions, runtime: RuntimeConfig, paths: dict[str, Path] | None = None) -> dict:
    """Every metric of the suite for `transcoders` on `dataset`, accuracies under `head` (built from the clean
    model, e.g. by `vitclt.eval.task.task_head`): metrics.json's dict without the run's description (`run_dir`,
    `dataset`, `config`, `context`, and the probe's split and size, which the command adds).

    Token choices left to their defaults in `options` are filled in for the backbone (`EvalOptions.for_backbone`).
    """
    options, _ = options.for_backbone(backbone.has_cls_token, backbone.name)
    if len(dataset) < 2:
        raise ConfigError("the eval set needs at least two images (retrieval compares images with each other): "
                          "use a larger --eval-images or dataset")
    windows = parse_windows(options.windows, backbone.n_layers) if options.windows else default_windows(backbone.n_layers)
    t0 = time.perf_counter()
    clean = _clean_pass(backbone, dataset, head, transcoders, windows, options, runtime)
    t1 = time.perf_counter()
    clts = {name: tc for name, tc in transcoders.items() if tc.cfg.topology == "clt"}
    faithfulness = _faithfulness_pass(backbone, dataset, head, clts, clean.attribution, clean.top1, options, runtime)
    t2 = time.perf_counter()

    # Cosine, so normalised: DINOv2's and timm's embeddings are not (CLIP's and SigLIP's already are).
    emb_precision = precision_at_k(F.normalize(clean.embeds_NP.float(), dim=-1), next(iter(clean.gallery.values())).labels_N,
                                   options.retrieval_k)
    top1 = clean.grid_top1
    zero = {(w, t): top1[ReplaceKey(None, w, t)] for w in windows for t in options.replace_tokens}
    metrics = {
        "schema": SCHEMA,
        "backbone": {"name": backbone.name, "n_layers": backbone.n_layers, "d_model": backbone.d_model,
                     "n_tokens": backbone.n_tokens, "fingerprint": backbone.fingerprint},
        "baseline": {"head": head.kind, "top1": clean.top1, "top5": clean.top5, "n_images": clean.n_images,
                     "embedding_precision_at_k": emb_precision},
        "token_groups": list(token_groups(backbone)),
        "windows": [w.label for w in windows],
        "tokens": list(options.replace_tokens),
        "zero_ablation": {w.label: {t: zero[w, t] for t in options.replace_tokens} for w in windows},
        "transcoders": {},
        "comparison": {},
        "timing": {"pass1_s": t1 - t0, "pass2_s": t2 - t1},
    }
    for name, tc in transcoders.items():
        entry = describe(tc, (paths or {}).get(name), backbone)
        entry["reconstruction"] = {g: r._asdict() for g, r in clean.recon[name].result().items()}
        entry["replacement"] = {w.label: {t: _replacement_entry(top1[ReplaceKey(name, w, t)], clean.top1, zero[w, t])
                                          for t in options.replace_tokens} for w in windows}
        entry["retrieval"] = evaluate_retrieval(clean.gallery[name], options.retrieval_k, options.retrieval_queries,
                                                options.retrieval_neighbours, runtime.seed)._asdict()
        if name in clts:
            entry["attribution"] = clean.attribution[name]
            entry["faithfulness"] = faithfulness[name]
        metrics["transcoders"][name] = entry
        metrics["comparison"][name] = _comparison_row(entry)
    return metrics


def _replacement_entry(top1: float, baseline: float, zero: float) -> dict:
    recovered = (top1 - zero) / (baseline - zero) if baseline != zero else None
    return {"top1": top1, "delta_baseline": top1 - baseline, "recovered": recovered}


def _comparison_row(entry: dict) -> dict:
    rec = entry["reconstruction"]["all"]["mean"]
    return {
        "topology": entry["topology"], "sparsifier": entry["sparsifier"], "k": entry["k"],
        **{m: rec[m] for m in ("l0", "mse", "r2", "cosine", "fvu", "dead_pct")},
        "replacement": {w: {t: v["top1"] for t, v in row.items()} for w, row in entry["replacement"].items()},
    }
