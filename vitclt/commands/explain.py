"""`vitclt explain`: the attribution graph of one image (or of a class's images) and its viewer (docs/circuits.md).

The config module imports no torch: `--help` and bad flags stay fast; `run` loads the library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from tyro.conf import OmitArgPrefixes, Positional

from vitclt.runtime import RuntimeConfig


@dataclass
class ScoreConfig:
    """What the graph explains about the target class (docs/circuits.md, "The target"; vitclt.circuits.targets)."""

    score: Literal["logit-diff", "logit-mean", "cosine"] = "logit-diff"
    """Target score: its cosine minus --versus's (logit-diff), minus the mean cosine (logit-mean), or the cosine alone."""
    versus: str | None = None
    """Class that --score logit-diff subtracts; default: the runner-up (the image's best other class)."""


@dataclass
class ExplainConfig:
    """`vitclt explain RUN_DIR --image PATH`: the features, errors and patches behind a class's zero-shot score, as a viewer."""

    run_dir: Positional[Path]
    """A transcoder directory (config.json + model.safetensors) or a run directory holding one (see --transcoder)."""
    image: Path | None = None
    """Image to explain (PNG, JPEG, ...); or use --class-images for a class-level circuit."""
    class_images: str | None = None
    """Instead of one image: aggregate the graphs of this class's images in the --classes dataset."""
    classes: str = "demo"
    """Dataset spec whose class names and prompt templates make the zero-shot classifier (demo, cifar100:DIR, folder:DIR, ...)."""
    templates: str | None = None
    """Prompt templates: a file or a shipped set (cifar100, imagenet, imagenet7, coco); default: the dataset's own."""
    target: str | None = None
    """Class whose score (--score: by default its cosine minus the runner-up's) is explained; default: the predicted class."""
    top_class: bool = False
    """Refuse a --target: explain the predicted class (which is explained anyway when --target is not given)."""
    target_score: Annotated[ScoreConfig, OmitArgPrefixes] = field(default_factory=ScoreConfig)
    """Which score of the target class the graph explains."""
    split: str = "test"
    """Split of --classes read by --class-images: test, train, or all (the whole of a folder: dataset without split folders)."""
    max_images: int = 16
    """Images of the class aggregated by --class-images (the first ones of the split)."""
    transcoder: str | None = None
    """Name of the transcoder in RUN_DIR when it holds several."""
    backbone: str | None = None
    """Backbone spec; default: the one the transcoder was trained on."""
    browser: Path | None = None
    """Feature browser (vitclt browse) to link features to; default: RUN_DIR/browser, else the one beside the transcoder."""
    node_fraction: float = 0.8
    """Keep the fewest nodes carrying this share of the influence on the target."""
    edge_fraction: float = 0.98
    """Keep the fewest edges carrying this share of the pruned graph's edge influence."""
    effects_top: int = 10
    """For this many top feature nodes, measure the effect of zeroing each (two forwards each)."""
    precision: Literal["float32", "float64"] = "float32"
    """Arithmetic of the attribution (float64: slower, exact to ~1e-12)."""
    rows_per_sweep: int = 256
    """Graph rows computed per backward sweep (memory ∝ rows × tokens × width)."""
    out: Path | None = None
    """Viewer directory (default: RUN_DIR/circuits/<image or class>-<target>); an earlier viewer there is replaced."""
    runtime: Annotated[RuntimeConfig, OmitArgPrefixes] = field(default_factory=lambda: RuntimeConfig(workers=0))
    """Device, threads, seed, progress bars."""


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "x"


def run(cfg: ExplainConfig) -> Path:
    """Build the graph, write the viewer and print where to open it."""
    import torch

    from vitclt.backbones import load_backbone
    from vitclt.browser.site import feature_labels
    from vitclt.circuits.errors import CircuitError
    from vitclt.circuits.inputs import check_transcoder, class_index, class_members, find_transcoder, load_classes, read_image
    from vitclt.circuits.pipeline import explain_class, explain_image
    from vitclt.circuits.viewer import browser_link, check_output, graph_summary, write_viewer
    from vitclt.eval.suite import backbone_spec
    from vitclt.eval.zeroshot import build_classifier
    from vitclt.nn.transcoder import Transcoder
    from vitclt.runtime import setup

    if (cfg.image is None) == (cfg.class_images is None):
        raise CircuitError("pass exactly one of --image PATH (one image) and --class-images CLASS (a class-level circuit)")
    if cfg.target is not None and cfg.top_class:
        raise CircuitError("--target and --top-class exclude each other: drop one")
    if cfg.max_images < 1 or cfg.rows_per_sweep < 1 or cfg.effects_top < 0:
        raise CircuitError("--max-images and --rows-per-sweep must be at least 1, --effects-top at least 0")
    device = setup(cfg.runtime)
    # The cheap inputs first, so that a wrong name or path fails before a model loads.
    tc_name, tc_dir = find_transcoder(cfg.run_dir, cfg.transcoder)
    classnames, templates = load_classes(cfg.classes, cfg.templates)
    target = class_index(cfg.target, classnames) if cfg.target is not None else None
    versus = class_index(cfg.target_score.versus, classnames) if cfg.target_score.versus is not None else None
    if cfg.class_images is not None:
        target = class_index(cfg.class_images, classnames) if target is None else target
        name = classnames[class_index(cfg.class_images, classnames)]
        stem = f"class-{_slug(name)}"
        data, members = class_members(cfg.classes, cfg.split, name, cfg.max_images)
    else:
        image = read_image(cfg.image)
        stem = _slug(Path(cfg.image).stem)
    run_dir = Path(cfg.run_dir)
    out = cfg.out or (run_dir / "circuits" / f"{stem}-{_slug(classnames[target]) if target is not None else 'top'}")
    check_output(out)
    backbone = load_backbone(backbone_spec({tc_name: tc_dir}, cfg.backbone), device=device)
    transcoder = Transcoder.from_pretrained(tc_dir, device=backbone.device)
    check_transcoder(transcoder, backbone)
    classifier = build_classifier(backbone, classnames, templates)
    dtype = torch.float64 if cfg.precision == "float64" else torch.float32
    common = dict(node_fraction=cfg.node_fraction, edge_fraction=cfg.edge_fraction, dtype=dtype, batch_size=cfg.rows_per_sweep,
                  score=cfg.target_score.score, versus=versus, progress=cfg.runtime.progress)
    if cfg.class_images is not None:
        class_images = [(i, data[i][0]) for i in members]
        ex = explain_class(backbone, transcoder, [im for _, im in class_images], classifier, classnames, target, **common)
        kind, title, shown = "class", f"{len(members)} images of {cfg.class_images} ({cfg.classes}, {cfg.split})", None
        provenance = {"dataset": {"spec": cfg.classes, "split": cfg.split}}
    else:
        ex = explain_image(backbone, transcoder, image, classifier, classnames, target, effects_top=cfg.effects_top, **common)
        kind, title, shown = "image", Path(cfg.image).name, image
        provenance, class_images = {"source": str(cfg.image)}, []
    # A study's browser sits beside its transcoders (OUT/train/browser), a browse of RUN_DIR in RUN_DIR/browser.
    browser = cfg.browser if cfg.browser is not None else next(
        (d for d in (run_dir / "browser", tc_dir.parent / "browser") if d.is_dir()), None)
    if cfg.out is None and target is None:
        out = run_dir / "circuits" / f"{stem}-{_slug(classnames[ex.target])}"
        check_output(out)
    link = browser_link(out, browser, tc_name)
    meta = {"title": title, "kind": kind, "target_name": classnames[ex.target], "backbone": backbone.name, "transcoder": tc_name,
            "grid": backbone.image_size // backbone.patch_size, "browser": link,
            "node_fraction": cfg.node_fraction, "edge_fraction": cfg.edge_fraction, **provenance,
            "target_formula": ex.score.describe(classnames) if ex.score else f"mean {cfg.target_score.score}"}
    write_viewer(out, ex, meta, shown, class_images=class_images,
                 labels=feature_labels(browser, link["tc"]) if link else None)
    g, p = ex.graph, ex.pruned
    total = float(g.adjacency[g.target].sum())
    formula = ex.score.describe(classnames) if ex.score else f"{cfg.target_score.score} of {classnames[ex.target]}"
    print(f"target {classnames[ex.target]!r}: {formula} = {g.score:.4f}, sum of direct effects {total:.4f}")
    print(f"graph: {graph_summary(g)}; kept {int(p.node_mask.sum())} nodes ({p.node_fraction:.1%} of influence) and "
          f"{int(p.edge_mask.sum())} edges ({p.edge_fraction:.1%}) in {ex.seconds['attribution']:.2f} s + "
          f"{ex.seconds['pruning']:.2f} s pruning")
    print(f"open the viewer: {out / 'index.html'}")
    return out
