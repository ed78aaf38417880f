"""`vitclt eval RUN_DIR`: the evaluation suite on a run's transcoders, written as metrics.json and report.html."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import tyro
from tyro.conf import OmitArgPrefixes

from vitclt.eval.options import EvalOptions
from vitclt.runtime import RuntimeConfig


@dataclass
class EvalConfig:
    """`vitclt eval RUN_DIR`: reconstruction, replacement, attribution, faithfulness, retrieval, report."""

    run_dir: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """A transcoder directory (config.json + model.safetensors) or a directory of several."""
    dataset: str = "demo"
    """Eval dataset spec, e.g. cifar100:/data/cifar-100-python, imagenet100:/data/imagenet, folder:DIR."""
    split: str = "test"
    """Dataset split: test (= val, held out), train, or all (the whole of a folder: dataset without split folders)."""
    backbone: str | None = None
    """Backbone spec; default: the one named in the transcoders' config."""
    eval_images: int | None = None
    """Evaluate on a class-stratified subset of this many images (default: the whole split)."""
    templates: str | None = None
    """Prompt templates (zero-shot head): a file (one per line, with {}) or a shipped set: cifar100, imagenet, imagenet7, coco."""
    classnames: Path | None = None
    """File of class names (one per line, label order); default: the dataset's shipped names."""
    allow_backbone_mismatch: bool = False
    """Evaluate transcoders trained on other weights of the same shape (their fingerprint differs); the report marks them."""
    options: Annotated[EvalOptions, OmitArgPrefixes, tyro.conf.arg(name="evaluation")] = field(default_factory=EvalOptions)
    """What the suite measures: task head, windows, tokens, faithfulness and retrieval settings."""
    runtime: Annotated[RuntimeConfig, OmitArgPrefixes] = field(default_factory=lambda: RuntimeConfig(workers=0))
    """Device, threads, image decoding, seed (of the subset, the random controls and the retrieval queries), progress bars."""
    out: Path | None = None
    """Output directory; default: RUN_DIR/eval."""

    @property
    def out_dir(self) -> Path:
        """Where metrics.json, figures/ and report.html go."""
        return Path(self.out) if self.out else Path(self.run_dir) / "eval"


def dataset_protocol(cfg: EvalConfig, dataset, templates: Sequence[str]) -> dict:
    """metrics.json's description of the task: the data, its classes and (for a zero-shot head) prompts."""
    return {
        "spec": cfg.dataset, "name": getattr(dataset, "name", cfg.dataset), "split": cfg.split,
        "n_images": len(dataset), "n_classes": len(dataset.classnames),
        "classnames": list(dataset.classnames), "templates": list(templates),
        "split_note": getattr(dataset, "split_note", ""),
        "subset": (f"class-stratified {cfg.eval_images} images (seed {cfg.runtime.seed})" if cfg.eval_images
                   else "the whole split"),
    }


def run_relative(path: Path | str, run_dir: Path | str, out: Path) -> str:
    """`path` as metrics.json records it: relative to metrics.json's directory when it lies in the run (so a copied or
    moved run still finds its transcoders), else as given (a hub id, the hub cache)."""
    resolved, run = Path(path).resolve(), Path(run_dir).resolve()
    inside = Path(run_dir).is_dir() and (resolved == run or run in resolved.parents)
    return os.path.relpath(resolved, Path(out).resolve()) if inside else str(path)


def run(cfg: EvalConfig, context: dict | None = None) -> Path:
    """Run `vitclt eval`: evaluate, write metrics.json, figures and report.html, print the headline table;
    return the report's path.

    `context` (e.g. the training run's settings, from `vitclt reproduce`) is stored under `context`.
    """
    from vitclt.backbones import load_backbone
    from vitclt.browser import browser_pages
    from vitclt.data.datasets import load_dataset
    from vitclt.data.prompts import get_templates
    from vitclt.eval.metric_keys import check_metric_keys
    from vitclt.eval.suite import backbone_spec, evaluate_suite, find_transcoders, load_transcoders
    from vitclt.eval.task import task_head
    from vitclt.eval.zeroshot import dataset_templates
    from vitclt.io import jsonable, write_json
    from vitclt.report.html import write_report
    from vitclt.report.summary import headline_table
    from vitclt.runtime import check_writable_dir, setup

    cfg.options.validate()
    paths = find_transcoders(cfg.run_dir)
    out = check_writable_dir(cfg.out_dir)
    device = setup(cfg.runtime)
    dataset = load_dataset(cfg.dataset, cfg.split, max_images=cfg.eval_images, seed=cfg.runtime.seed, classnames=cfg.classnames)
    if getattr(dataset, "split_note", ""):
        print(f"note: {dataset.split_note}")
    templates = get_templates(cfg.templates) if cfg.templates else dataset_templates(dataset)
    backbone = load_backbone(backbone_spec(paths, cfg.backbone), device=device)
    options, note = cfg.options.for_backbone(backbone.has_cls_token, backbone.name)
    if note:
        print(f"note: {note}")
    transcoders = load_transcoders(paths, backbone, cfg.allow_backbone_mismatch)
    # The head is built once from the clean model, before any replacement (a probe: on the training split).
    task = task_head(backbone, dataset, templates, options.task, cfg.dataset, cfg.split, cfg.runtime, cfg.classnames)
    print(task.note)
    if task.kind != "zeroshot":
        templates = []
    suite = evaluate_suite(backbone, dataset, task.head, transcoders, options, cfg.runtime, paths)
    suite["baseline"] = {"head": task.kind, "probe_split": task.probe_split, "probe_images": task.probe_images,
                         **suite["baseline"]}
    # Link each transcoder to its feature browser when `vitclt browse` (or reproduce) built one in RUN_DIR/browser.
    pages = browser_pages(Path(cfg.run_dir) / "browser")
    for name, entry in suite["transcoders"].items():
        page = pages.get(name)
        entry["browser"] = os.path.relpath(Path(cfg.run_dir) / "browser", out) + "/" + page if page else None
        entry["path"] = run_relative(paths[name], cfg.run_dir, out)
    metrics = {"schema": suite.pop("schema"), "run_dir": run_relative(cfg.run_dir, cfg.run_dir, out),
               "backbone": suite.pop("backbone"),
               "dataset": dataset_protocol(cfg, dataset, templates), "config": jsonable(asdict(cfg)), **suite,
               "context": jsonable(context or {})}
    missing = check_metric_keys(metrics)
    if missing:
        raise RuntimeError(f"metrics.json lacks documented keys {missing}: a bug in vitclt, please report it")
    write_json(out / "metrics.json", metrics)
    report = write_report(metrics, dataset, out)
    print(f"metrics: {out / 'metrics.json'}")
    print(headline_table(metrics))
    print(f"report: {report}")
    return report
