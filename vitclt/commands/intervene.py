"""`vitclt intervene`: set features of one image and compare the top classes before and after (docs/circuits.md).

The config module imports no torch: `--help` and bad flags stay fast; `run` loads the library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from tyro.conf import OmitArgPrefixes, Positional

from vitclt.commands.explain import ScoreConfig
from vitclt.runtime import RuntimeConfig


@dataclass
class InterveneConfig:
    """`vitclt intervene RUN_DIR --image PATH --set L:F=V`: change features, compare top classes before and after."""

    run_dir: Positional[Path]
    """A transcoder directory or a run directory holding one (see --transcoder)."""
    image: Path
    """Image to intervene on."""
    set: tuple[str, ...]
    """Changes, each LAYER:FEATURE[@TOKENS]=VALUE or LAYER:FEATURE[@TOKENS]*SCALE (TOKENS: all, cls, patches or 0,5,7)."""
    classes: str = "demo"
    """Dataset spec whose class names and prompt templates make the zero-shot classifier."""
    templates: str | None = None
    """Prompt templates: a file or a shipped set; default: the dataset's own."""
    target: str | None = None
    """Class whose score change is reported and predicted; default: the predicted class."""
    target_score: Annotated[ScoreConfig, OmitArgPrefixes] = field(default_factory=ScoreConfig)
    """Which score of the target class is reported and predicted."""
    top: int = 5
    """Classes listed before and after."""
    predict: bool = True
    """Also build the attribution graph and print its linear prediction of the target's change."""
    precision: Literal["float32", "float64"] = "float32"
    """Arithmetic of the attribution graph used for the prediction."""
    transcoder: str | None = None
    """Name of the transcoder in RUN_DIR when it holds several."""
    backbone: str | None = None
    """Backbone spec; default: the one the transcoder was trained on."""
    out: Path | None = None
    """Write the report as JSON here."""
    runtime: Annotated[RuntimeConfig, OmitArgPrefixes] = field(default_factory=lambda: RuntimeConfig(workers=0))
    """Device, threads, seed, progress bars."""


def run(cfg: InterveneConfig) -> dict:
    """Run the interventions and print the top classes before and after, both ways."""
    from vitclt.runtime import check_writable_file, setup

    if cfg.out:
        check_writable_file(cfg.out)  # first: a bad --out fails before torch, or any model, loads
    import dataclasses

    import torch

    from vitclt.backbones import load_backbone
    from vitclt.circuits.errors import CircuitError
    from vitclt.circuits.inputs import check_transcoder, class_index, find_transcoder, load_classes, read_image
    from vitclt.circuits.intervene import check_interventions, intervene, parse_intervention
    from vitclt.circuits.pipeline import image_graph, resolve_score
    from vitclt.eval.suite import backbone_spec
    from vitclt.eval.zeroshot import build_classifier
    from vitclt.io import write_json
    from vitclt.nn.transcoder import Transcoder

    if not cfg.set:
        raise CircuitError("nothing to do: pass at least one --set LAYER:FEATURE=VALUE (or *SCALE)")
    changes = [parse_intervention(s) for s in cfg.set]
    device = setup(cfg.runtime)
    tc_name, tc_dir = find_transcoder(cfg.run_dir, cfg.transcoder)
    classnames, templates = load_classes(cfg.classes, cfg.templates)
    target = class_index(cfg.target, classnames) if cfg.target is not None else None
    versus = class_index(cfg.target_score.versus, classnames) if cfg.target_score.versus is not None else None
    image = read_image(cfg.image)
    backbone = load_backbone(backbone_spec({tc_name: tc_dir}, cfg.backbone), device=device)
    transcoder = Transcoder.from_pretrained(tc_dir, device=backbone.device)
    check_transcoder(transcoder, backbone)
    check_interventions(changes, transcoder, backbone)
    classifier = build_classifier(backbone, classnames, templates)
    pixels = backbone.preprocess([image])
    if target is None:
        with torch.no_grad():
            target = int((backbone.image_embeds(pixels).float() @ classifier.float().T)[0].argmax())
    score = resolve_score(backbone, pixels, classifier, target, cfg.target_score.score, versus)
    graph = None
    if cfg.predict:
        dtype = torch.float64 if cfg.precision == "float64" else torch.float32
        graph = image_graph(backbone, transcoder, pixels, classifier, target, dtype, score=score)
    rep = intervene(backbone, transcoder, pixels, changes, classifier, classnames, target, graph=graph, top=cfg.top, score=score)
    for ch in rep.changes:
        # Only the tokens that changed: scaling leaves every token where the feature is inactive at 0→0.
        pairs = ", ".join(f"t{t}: {a:.3g}→{b:.3g}" for t, a, b in zip(ch["tokens"], ch["clean"], ch["new"]) if a != b)
        pairs = pairs or f"no change at its {len(ch['tokens'])} token(s) (inactive there, or already at the value)"
        print(f"layer {ch['layer']} feature {ch['feature']}: {pairs if len(pairs) < 300 else pairs[:300] + ' …'}")
    cols = [("clean", rep.clean), ("CLT replacement", rep.replacement), ("original + decoder change", rep.original)]
    print("  ".join(f"{name:<34}" for name, _ in cols))
    for k in range(len(rep.clean.top)):
        print("  ".join(f"{r.top[k][0][:26]:<26} {r.top[k][1]:+.4f}" for _, r in cols))
    delta = lambda r: r.score - rep.clean.score  # noqa: E731
    predicted = "n/a (a changed feature is inactive there)" if rep.predicted is None else f"{rep.predicted:+.4f}"
    predicted = predicted if cfg.predict else "not computed"
    print(f"target {score.describe(classnames)}: clean {rep.clean.score:.4f}; change predicted by the graph {predicted}, "
          f"measured {delta(rep.replacement):+.4f} (CLT replacement), {delta(rep.original):+.4f} (original model)")
    record = {**dataclasses.asdict(rep), "image": str(cfg.image), "interventions": list(cfg.set)}
    if cfg.out:
        print(f"wrote {write_json(cfg.out, record)}")
    return record
