"""`build_browser`: transcoders + backbone + dataset → a static feature browser on disk.

The output is written into a temporary sibling directory and renamed into place at the end, so a
failure or an interrupt never leaves half a site; an earlier browser at the same place (marked by
`MARKER`) is replaced, anything else there is refused.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vitclt.browser.collect import HIST_BINS_PER_OCTAVE, HIST_LOG2_MIN, FeatureCollector, FeatureStats
from vitclt.browser.concepts import ConceptLabels
from vitclt.browser.export import explained
from vitclt.browser.geometry import Neighbours, decoder_norms, later_fraction, nearest_features, residual_writes
from vitclt.browser.labels import (
    LabelCheck,
    Labels,
    build_vocabulary,
    final_projection,
    label_check,
    label_features,
    write_directions,
)
from vitclt.browser.site import SHARD_SIZE, ListView, copy_static, thumbnail, write_data
from vitclt.errors import OutputError, VitcltError
from vitclt.io import record_written

MARKER = ".vitclt-browser"
"""File that marks a directory as a browser written by `vitclt browse` (so it may be replaced)."""


class BrowserError(VitcltError, ValueError):
    """The browser cannot be built from these inputs; the message says how to fix it."""


@dataclass
class TranscoderPages:
    """Everything the pages show about one transcoder."""

    id: str
    """Directory-safe name used in the site's paths."""
    name: str
    """Name as found in the run directory."""
    config: dict
    """The transcoder's config.json."""
    trained_on: tuple[str, str]
    """(dataset spec, split) it was trained on; ("unknown", "") if not recorded."""
    stats: FeatureStats
    """The streaming pass's statistics."""
    norms_LFJ: torch.Tensor
    """Decoder norm per target layer."""
    later_LF: torch.Tensor
    """Share of decoder norm written to later layers."""
    neighbours: Neighbours
    """Nearest features by write direction."""
    labels: Labels | None
    """Text labels (None without a text tower)."""
    words: list[str]
    """The vocabulary the word labels index."""
    classnames: list[str]
    """The class names the class labels index."""
    majority: np.ndarray
    """(L, F, 3): (class, count, of) of each feature's top images by max activation; class −1 when none."""
    check: LabelCheck | None
    """The measured label check over all layers."""
    check_layers: list[LabelCheck]
    """The same check per source layer (empty without labels)."""
    concepts: list[str]
    """The concept vocabulary the sees and writes labels index."""
    sees: ConceptLabels | None
    """What each feature sees: SoftWPMI of its top images (None without a text tower)."""
    writes: ConceptLabels | None
    """What each feature writes: its embedding Jacobian write read by the text tower (None without one)."""


def _safe_id(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "transcoder"
    out, n = base, 1
    while out in taken:
        n += 1
        out = f"{base}-{n}"
    taken.add(out)
    return out


def _trained_on(path: Path) -> tuple[str, str]:
    """(dataset spec, split) recorded in a transcoder's training.json; ("unknown", "") if not recorded."""
    try:
        train = json.loads((path / "training.json").read_text()).get("train_config") or {}
    except (OSError, ValueError):
        return "unknown", ""
    return str(train.get("dataset") or "unknown"), str(train.get("split") or "")


def prepare_output(out: Path) -> Path:
    """Check `out` can be written (before any compute) and return an empty temporary directory beside it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} is a file: pass --out with a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise OutputError(f"output directory {out} exists and was not written by vitclt browse: choose another --out or empty it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as e:
        raise OutputError(f"cannot write the browser to {out}: {e.strerror or e}; choose a writable --out") from None


def finish_output(tmp: Path, out: Path) -> None:
    """Move the finished site from `tmp` to `out`, replacing an earlier browser there."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        out.rename(old / "site")
    tmp.rename(out)
    record_written(out)
    if old is not None:
        shutil.rmtree(old)
        print(f"replaced the earlier browser in {out}")


def _majority(top_images_LFK: torch.Tensor, valid_LFK: torch.Tensor, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(class, count, of) of the most common label among each feature's valid top images, vectorised."""
    L, F, K = top_images_LFK.shape
    lab = torch.tensor(np.asarray(labels), dtype=torch.long)[top_images_LFK.clamp_min(0)]
    counts = torch.zeros(L * F, n_classes, dtype=torch.long)
    counts.scatter_add_(1, lab.view(L * F, K), valid_LFK.view(L * F, K).long())
    best, cls = counts.max(1)
    of = valid_LFK.view(L * F, K).sum(1)
    cls = torch.where(of > 0, cls, -1)
    return torch.stack([cls, best, of], 1).view(L, F, 3).numpy()


def _feature_record(p: TranscoderPages, layer: int, f: int, views: dict[str, ListView], cols: dict) -> dict | None:
    """The detail JSON of one feature (None for a dead feature)."""
    st = p.stats
    if bool(st.dead_LF[layer, f]):
        return None
    top, top_tok = views["top"].entries(layer, f)
    cls, cls_tok = views["cls"].entries(layer, f)
    samples, samples_tok = views["sample"].entries(layer, f, by_value=True)
    hist = st.hist_LFG[layer, f]
    nz = torch.nonzero(hist).flatten()
    first, last = (int(nz[0]), int(nz[-1])) if len(nz) else (0, 0)
    labels = {"classes": [], "words": []}
    if p.labels is not None:
        lab = p.labels
        labels = {
            "classes": [[p.classnames[i], s] for i, s in zip(lab.class_LFK[layer, f].tolist(), cols["class_score"][layer][f])],
            "words": [[p.words[i], s] for i, s in zip(lab.word_LFK[layer, f].tolist(), cols["word_score"][layer][f])],
        }
    nb = p.neighbours
    near = [[i, c] for i, c in zip(nb.same_LFK[layer, f].tolist(), cols["same_cos"][layer][f]) if i >= 0]
    near_other = [
        [ly, i, c] for ly, i, c in zip(nb.other_layer_LFK[layer, f].tolist(), nb.other_LFK[layer, f].tolist(),
                                       cols["other_cos"][layer][f]) if i >= 0
    ]
    maj = p.majority[layer, f].tolist()
    return {**{kind: explained(p, kind, layer, f) for kind in ("sees", "writes")},
        "freq": cols["freq"][layer][f], "img_freq": cols["img_freq"][layer][f], "mean": cols["mean"][layer][f],
        "max": cols["max"][layer][f], "later": cols["later"][layer][f], "norms": cols["norms"][layer][f],
        "write_norm": cols["write_norm"][layer][f] if p.labels is not None else None,
        "labels": labels, "majority": maj if maj[0] >= 0 else None,
        "top": top, "top_tok": top_tok, "cls": cls, "cls_tok": cls_tok, "samples": samples, "samples_tok": samples_tok,
        "hist": {"first": first, "counts": hist[first : last + 1].tolist()},
        "near": near, "near_other": near_other,
    }


def top_explained(p: TranscoderPages, lab: ConceptLabels | None, layer: int) -> tuple[list[str], list]:
    """Per feature of a layer: its top label if shown ("" if not) and its score above the shuffled baseline (None if none)."""
    F = p.stats.fire_LF.shape[1]
    if lab is None or lab.index_LFK.shape[2] == 0:
        return [""] * F, [None] * F
    shown = lab.shown_LFK[layer, :, 0].tolist()
    names = [p.concepts[i] if ok else "" for i, ok in zip(lab.index_LFK[layer, :, 0].tolist(), shown)]
    margin = (lab.score_LFK[layer, :, 0] - lab.baseline_LFK[layer, :, 0]).double()
    return names, [round(m, 4) if m == m else None for m in margin.tolist()]


def _columns(p: TranscoderPages) -> dict:
    """Per-layer Python lists of every rounded number the pages show (vectorised once, read per feature)."""
    st = p.stats
    r = lambda t, d=4: np.round(t.double().numpy(), d).tolist()  # noqa: E731
    cols = {
        "freq": r(st.fire_LF.double() / max(st.n_tokens, 1), 7),
        "img_freq": r(st.image_fire_LF.double() / max(st.n_images, 1), 6),
        "mean": r(st.mean_LF), "max": r(st.max_LF), "later": r(p.later_LF, 3), "norms": r(p.norms_LFJ),
        "same_cos": r(p.neighbours.same_cos_LFK.nan_to_num(neginf=0.0), 3),
        "other_cos": r(p.neighbours.other_cos_LFK.nan_to_num(neginf=0.0), 3),
    }
    if p.labels is not None:
        cols.update(class_score=r(p.labels.class_score_LFK), word_score=r(p.labels.word_score_LFK),
                    write_norm=r(p.labels.write_norm_LF))
    return cols


def write_transcoder(root: Path, p: TranscoderPages) -> set[int]:
    """Write one transcoder's index and detail shards under root/data/<id>; returns the images they show."""
    st = p.stats
    L, F = st.fire_LF.shape
    views = {"top": ListView(st.top_max, st.max_LF.numpy()), "cls": ListView(st.top_cls, st.max_LF.numpy()),
             "sample": ListView(st.sample, st.max_LF.numpy())}
    cols = _columns(p)
    dead = st.dead_LF.numpy()
    thumbs = np.where(views["top"].valid_LFK[:, :, 0], views["top"].image_LFK[:, :, 0], -1)
    used: set[int] = set()
    for v in views.values():
        used.update(np.unique(v.image_LFK[v.valid_LFK]).tolist())
    for layer in range(L):
        label = [""] * F
        word = [""] * F
        if p.labels is not None:
            label = [p.classnames[i] for i in p.labels.class_LFK[layer, :, 0].tolist()] if p.labels.class_LFK.shape[2] else label
            word = [p.words[i] for i in p.labels.word_LFK[layer, :, 0].tolist()] if p.labels.word_LFK.shape[2] else word
        write_data(root / "data" / p.id / f"index-L{layer}.js", f"{p.id}/index-L{layer}", {
            "layer": layer, "freq": cols["freq"][layer], "mean": cols["mean"][layer], "later": cols["later"][layer],
            "norms": [x for row in cols["norms"][layer] for x in row], "dead": dead[layer].astype(int).tolist(),
            "label": label, "word": word, "thumb": thumbs[layer].tolist(),
            **{f"{kind}{suffix}": col for kind in ("sees", "writes")
               for suffix, col in zip(("", "_margin"), top_explained(p, getattr(p, kind), layer))},
        })
        for start in range(0, F, SHARD_SIZE):
            records = [_feature_record(p, layer, f, views, cols) for f in range(start, min(start + SHARD_SIZE, F))]
            key = f"{p.id}/L{layer}/s{start // SHARD_SIZE}"
            write_data(root / "data" / f"{key}.js", key, {"start": start, "features": records})
    return used


def _load_transcoders(source: Path, names: list[str] | None) -> dict[str, Path]:
    from vitclt.eval.suite import featured_transcoder, find_transcoders

    try:
        found = find_transcoders(source)
    except FileNotFoundError as e:
        raise BrowserError(str(e)) from None  # its message names the fix
    featured = featured_transcoder(found)
    if not names and featured is not None:  # the index opens on the first: the featured CLT, as explain and push pick it
        found = {featured: found[featured]} | found
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise BrowserError(f"no transcoder named {', '.join(missing)} in {source}; found: {', '.join(found)}")
        found = {n: found[n] for n in names}
    return found


def browser_pages(site: str | Path) -> dict[str, str]:
    """The index page of each transcoder in a finished browser at `site`, by name (relative to `site`); {} if none."""
    site = Path(site)
    try:
        summary = json.loads((site / "browse.json").read_text())
    except (OSError, ValueError):
        return {}
    if not (site / MARKER).is_file():
        return {}
    return {name: f"index.html?tc={entry['id']}" for name, entry in summary.get("transcoders", {}).items()}


def build_browser(
    source: str | Path,
    dataset: str = "demo",
    out: str | Path | None = None,
    *,
    backbone: str | None = None,
    transcoders: list[str] | None = None,
    split: str = "test",
    max_images: int | None = None,
    top_k: int = 16,
    samples: int = 16,
    vocab_size: int = 3000,
    label_samples: int = 128,
    templates: str | Path | None = None,
    concepts: str | Path | None = None,
    writes: bool = True,
    images_per_forward: int = 64,
    thumb_size: int = 128,
    exports: bool = True,
    device: str | torch.device = "cpu",
    workers: int = 0,
    fast_decode: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Build the feature browser of the transcoder(s) in `source` on `dataset`; returns the site directory.

    `source` is a transcoder directory or a run directory holding several (`transcoders` picks some
    by name); `out` defaults to SOURCE/browser. Open OUT/index.html from disk or any static server.
    `templates` (a shipped set name or a file) replaces the dataset's prompt templates for the class
    labels; `concepts` (a file, one word per line) extends the sees/writes vocabulary; `writes`
    computes the writes-labels (embedding Jacobians at every feature's top images).
    """
    from vitclt.backbones import load_backbone
    from vitclt.data.batches import pixel_batches
    from vitclt.data.datasets import load_dataset
    from vitclt.eval.suite import backbone_spec
    from vitclt.eval.zeroshot import dataset_templates
    from vitclt.nn.transcoder import Transcoder

    start = time.perf_counter()
    source = Path(source)
    if top_k < 1 or samples < 1 or images_per_forward < 1 or thumb_size < 8 or vocab_size < 0 or label_samples < 1:
        raise BrowserError("--top-k, --samples, --label-samples and --images-per-forward must be at least 1, --thumb-size "
                           "at least 8, --vocab-size ≥ 0")
    paths = _load_transcoders(source, transcoders)
    from vitclt.browser.concepts import read_words
    from vitclt.data.prompts import get_templates

    template_list = get_templates(templates) if templates is not None else None
    extra_words = read_words(concepts) if concepts is not None else []
    out = Path(out) if out is not None else source / "browser"
    tmp = prepare_output(out)
    try:
        data = load_dataset(dataset, split, max_images=max_images, seed=seed)
        if len(data) == 0:
            raise BrowserError(f"dataset {dataset} ({split}) has no images")
        if getattr(data, "split_note", ""):  # e.g. a folder without split directories: why fewer images are browsed
            print(f"note: {data.split_note}")
        bb = load_backbone(backbone_spec(paths, backbone), device=device)
        models: dict[str, Transcoder] = {}
        for name, path in paths.items():
            tc = Transcoder.from_pretrained(path, device=bb.device).eval()
            try:
                tc.check_compatible(bb.n_layers, bb.d_model)
            except ValueError as e:
                raise BrowserError(f"transcoder {name} ({path}) does not fit backbone {bb.name}: {e}") from None
            models[name] = tc
        projection = final_projection(bb)
        collectors = {n: FeatureCollector(tc, bb.n_tokens, top_k, samples, seed, label_samples if projection else 0)
                      for n, tc in models.items()}
        sigma_sum, first = 0.0, 0
        embeds = []

        def record_sigma(module, args, output):
            nonlocal sigma_sum
            h = args[0].float()
            sigma_sum += float((h.var(-1, unbiased=False) + module.eps).sqrt().sum())

        hook = projection[0].register_forward_hook(record_sigma) if projection else None
        bar = tqdm(total=len(data), desc="browse", unit="img", disable=not progress)
        try:
            for pixels, labels_B in pixel_batches(bb, data, images_per_forward, workers, fast_decode):
                with bb.capture() as cap:
                    embed_BP = bb.image_embeds(pixels)
                if projection is not None:
                    embeds.append(embed_BP.float().cpu())
                x_BTLD, y_BTLD = cap.x_BTLD(), None
                for name, col in collectors.items():
                    if models[name].cfg.topology == "sae":
                        y_BTLD = cap.y_BTLD() if y_BTLD is None else y_BTLD
                        col.update(y_BTLD, first)
                    else:
                        col.update(x_BTLD, first)
                first += len(labels_B)
                bar.update(len(labels_B))
        finally:
            bar.close()
            if hook is not None:
                hook.remove()
        pass_s = time.perf_counter() - start

        # After the streaming pass: text labels, each transcoder's pages, thumbnails and exports, one step each.
        after = tqdm(total=2 + len(models) * (2 if exports else 1), desc="browse: text labels", unit="step", disable=not progress)
        vocab = concept_vocab = None
        if projection is not None:
            try:
                templates_used = template_list or dataset_templates(data)
                vocab = build_vocabulary(bb, list(data.classnames), templates_used, vocab_size)
                concept_vocab = _concept_vocabulary(bb, data, templates_used, vocab_size, extra_words, seed)
            except VitcltError as e:
                print(f"no text labels: {e}", file=sys.stderr)
        sigma = sigma_sum / first if first else 1.0
        used: set[int] = set()
        pages_all: list[TranscoderPages] = []
        taken: set[str] = set()
        labels_np = np.asarray(data.labels)
        after.update()
        for name, tc in models.items():
            after.set_description(f"browse: pages of {name}")
            st = collectors[name].result()
            norms = decoder_norms(tc)
            alive = ~st.dead_LF
            neighbours = nearest_features(residual_writes(tc), alive)
            labels = None
            if vocab is not None:
                labels = label_features(write_directions(tc, projection[0], projection[1], sigma), vocab)
            majority = _majority(st.top_max.image_LFK, torch.isfinite(st.top_max.score_LFK), labels_np, len(data.classnames))
            check, check_layers = None, []
            if labels is not None and labels.class_LFK.shape[2]:
                ok_LF = (majority[:, :, 0] >= 0) & (majority[:, :, 2] >= min(top_k, 3)) & alive.numpy()
                top_LF, maj_LF = labels.class_LFK[:, :, 0].numpy(), majority[:, :, 0]
                check = label_check(top_LF[ok_LF], maj_LF[ok_LF], list(data.classnames), seed=seed)
                check_layers = [label_check(top_LF[i][ok_LF[i]], maj_LF[i][ok_LF[i]], list(data.classnames), seed=seed)
                                for i in range(tc.n_layers)]
            sees = writes_lab = None
            if concept_vocab is not None:
                from vitclt.browser.sees import concept_probs, sees_labels
                from vitclt.browser.writes import jacobian_writes, writes_labels

                top, seen = st.top_max, st.label_sample if st.label_sample is not None else st.sample
                probs = concept_probs(torch.cat(embeds), concept_vocab.text_VP, groups=concept_vocab.kinds)
                sees = sees_labels(probs, seen.image_LFK, torch.isfinite(seen.score_LFK), seen.value_LFK, seed=seed)
                w_LFP = jacobian_writes(bb, tc, data, top, images_per_forward, progress) if writes else None
                if w_LFP is not None:
                    writes_lab = writes_labels(w_LFP, concept_vocab.text_VP, alive, seed=seed)
            p = TranscoderPages(
                id=_safe_id(name, taken), name=name, config=dict(tc.cfg.__dict__), trained_on=_trained_on(paths[name]),
                stats=st, norms_LFJ=norms, later_LF=later_fraction(norms), neighbours=neighbours, labels=labels,
                words=vocab.words if vocab else [], classnames=list(data.classnames), majority=majority, check=check,
                check_layers=check_layers, concepts=concept_vocab.names if concept_vocab else [], sees=sees, writes=writes_lab,
            )
            used |= write_transcoder(tmp, p)
            pages_all.append(p)
            after.update()

        after.set_description("browse: thumbnails")
        image_files = _write_images(tmp, data, sorted(used), thumb_size)
        after.update()
        subset = subset_record(data, dataset, seed, max_images)
        site = {
            "title": source.resolve().name,
            "dataset": dataset, "split": data.split, "n_images": first, "n_tokens": bb.n_tokens,
            "n_prefix": bb.n_prefix_tokens, "grid": bb.image_size // bb.patch_size, "backbone": bb.name,
            "hist": {"log2_min": HIST_LOG2_MIN, "per_octave": HIST_BINS_PER_OCTAVE},
            "classnames": list(data.classnames),
            "images": {"files": image_files, "labels": {str(i): int(labels_np[i]) for i in used},
                       "index": {str(i): dataset_index(data, i) for i in used}},
            "subset": {**{k: v for k, v in subset.items() if k != "indices"}, "subsampled": subset["indices"] is not None},
            "transcoders": [_transcoder_meta(p, dataset) for p in pages_all],
        }
        write_data(tmp / "data" / "site.js", "site", site)
        copy_static(tmp)
        if exports:
            from vitclt.browser.export import token_names, write_circuit_tracer, write_neuronpedia

            names = token_names(bb.n_prefix_tokens, bb.image_size // bb.patch_size)
            for p in pages_all:
                after.set_description(f"browse: exports of {p.name}")
                write_circuit_tracer(tmp / "circuit-tracer", p, names)
                write_neuronpedia(tmp / "neuronpedia", p, names, bb.name, dataset)
                after.update()
        after.close()
        summary = {
            "dataset": dataset, "split": data.split, "n_images": first, "backbone": bb.name, "sigma_final": sigma,
            "subset": subset, "pass_seconds": pass_s, "seconds": time.perf_counter() - start,
            "transcoders": {p.name: {"id": p.id, "trained_on": list(p.trained_on), "dead": int(p.stats.dead_LF.sum()),
                                     "label_check": p.check.__dict__ if p.check else None,
                                     "label_check_by_layer": [c.__dict__ for c in p.check_layers],
                                     "labels_shown": _shown_summary(p)} for p in pages_all},
            "concept_vocabulary": {"size": len(concept_vocab.names), "kinds": sorted(set(concept_vocab.kinds)),
                                   "extra_words": len(extra_words)} if concept_vocab else None,
        }
        (tmp / "browse.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (tmp / MARKER).write_text("written by vitclt browse; `vitclt browse` may replace this directory\n")
        finish_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for p in pages_all:
        c = p.check
        if c is not None and c.n_features:
            print(f"{p.name}: top class label = majority class of top images for {c.agreement:.1%} of {c.n_features} features "
                  f"(shuffled labels: {c.shuffled:.1%}); shares a word with it: {c.word_agreement:.1%} "
                  f"(shuffled: {c.word_shuffled:.1%})")
            for i, cl in enumerate(p.check_layers):
                print(f"  layer {i}: {cl.agreement:.1%} (shuffled {cl.shuffled:.1%}) of {cl.n_features}; "
                      f"shares a word {cl.word_agreement:.1%} (shuffled {cl.word_shuffled:.1%})")
    for p in pages_all:
        shown = _shown_summary(p)
        if shown:
            print(f"{p.name}: a sees / writes label beats its shuffled baseline for "
                  + " / ".join(f"{v:.1%}" for v in shown.values()) + " of live features (" + " / ".join(shown) + ")")
    print(f"browsed {first} images in {time.perf_counter() - start:.1f} s (streaming pass {pass_s:.1f} s)")
    return out


def _concept_vocabulary(bb, data, templates: list[str], vocab_size: int, extra: list[str], seed: int):
    """The sees/writes vocabulary: the demo world's concepts on its images, else class names and common words; plus `extra`."""
    from vitclt.browser.concepts import common_words, word_vocabulary, world_vocabulary

    if getattr(data, "template_set", None) == "demo":
        vocab = world_vocabulary(bb, seed=seed)
    else:
        vocab = word_vocabulary(bb, common_words(vocab_size), list(data.classnames), templates)
    return vocab.extend(word_vocabulary(bb, extra)) if extra else vocab


def _shown_summary(p: TranscoderPages) -> dict | None:
    """Share of live features whose top sees / writes label is shown (beats its shuffled baseline's 99th percentile)."""
    alive = ~p.stats.dead_LF
    out = {}
    for kind in ("sees", "writes"):
        lab = getattr(p, kind)
        if lab is not None and lab.index_LFK.shape[2]:
            out[kind] = float(lab.shown_LFK[..., 0][alive].float().mean()) if alive.any() else 0.0
    return out or None


def _transcoder_meta(p: TranscoderPages, dataset: str) -> dict:
    cfg = p.config
    c = p.check
    spec, split = p.trained_on
    return {
        "id": p.id, "name": p.name, "topology": cfg.get("topology"), "sparsifier": cfg.get("sparsifier"),
        "n_layers": int(p.stats.fire_LF.shape[0]), "n_features": int(p.stats.fire_LF.shape[1]),
        "tokens": cfg.get("tokens"), "trained_on": f"{spec} ({split})" if split else spec,
        "differs": spec != dataset, "n_dead": int(p.stats.dead_LF.sum()), "shard_size": SHARD_SIZE,
        "label_check": None if c is None or not c.n_features else c.__dict__,
    }


def dataset_index(data, i: int) -> int:
    """The index of browsed image `i` in the whole split: ``load_dataset(spec, split)[index]`` is the same image."""
    from vitclt.data.datasets import Subset

    return int(data.indices[i]) if isinstance(data, Subset) else int(i)


def subset_record(data, spec: str, seed: int, max_images: int | None) -> dict:
    """What was browsed, enough to find every image again: spec, split, seed, max_images and the split's indices.

    `indices` is null when the whole split was browsed (`max_images` unset or not below its size).
    """
    from vitclt.data.datasets import Subset

    indices = data.indices if isinstance(data, Subset) else None
    return {"spec": spec, "split": data.split, "seed": seed, "max_images": max_images, "n_images": len(data),
            "indices": None if indices is None else [int(i) for i in indices]}


def _write_images(root: Path, data, ids: list[int], size: int) -> dict[str, str]:
    """Thumbnails of the images the pages show; returns image id → relative path."""
    folder = root / "img"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for i in ids:
        raw, ext = thumbnail(data[i][0], size)
        (folder / f"{i}.{ext}").write_bytes(raw)
        files[str(i)] = f"img/{i}.{ext}"
    return files
