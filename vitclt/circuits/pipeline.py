"""One call per job: the pruned graph of one image (with measured effects of its top features), or of a class."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm

from vitclt.circuits.aggregate import aggregate
from vitclt.circuits.errors import CircuitError
from vitclt.circuits.graph import FEATURE, Graph, attribute
from vitclt.circuits.intervene import Intervention, clean_pass, intervene
from vitclt.circuits.local import LocalReplacement
from vitclt.circuits.prune import Pruned, prune
from vitclt.circuits.targets import DEFAULT_SCORE, TargetScore, target_score


@dataclass
class Explanation:
    """A graph, its pruning, the classes, and (for one image) measured effects of its top features."""

    graph: Graph
    pruned: Pruned
    target: int
    """Index of the target class."""
    top: list[tuple[str, float]]
    """Top classes of the clean model (cosine), best first; for a class circuit, over its images (mean)."""
    effects: dict[str, dict] = field(default_factory=dict)
    """node id → {activation, predicted, replacement, original}: the change of the target score when the
    feature is set to 0 at its token, predicted by the graph and measured both ways."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of attribution, pruning and the effect measurements."""
    score: TargetScore | None = None
    """What the graph explains (targets.py); None for a class circuit (each image has its own runner-up)."""


def _scores(backbone, pixels_B3HW, classifier_CP) -> torch.Tensor:
    return backbone.image_embeds(pixels_B3HW).float() @ classifier_CP.float().T


def resolve_score(backbone, pixels_B3HW: torch.Tensor, classifier_CP: torch.Tensor, target: int, score: str | TargetScore,
                  versus: int | None = None) -> TargetScore:
    """`score` as a `TargetScore` of class `target` on this image (a kind name is resolved at its clean cosines)."""
    if isinstance(score, TargetScore):
        return score
    with torch.no_grad():
        cos_C = _scores(backbone, pixels_B3HW, classifier_CP)[0]
    return target_score(score, cos_C, target, versus)


def image_graph(backbone, transcoder, pixels_B3HW: torch.Tensor, classifier_CP: torch.Tensor, target: int,
                dtype: torch.dtype = torch.float32, batch_size: int = 256, score: str | TargetScore = DEFAULT_SCORE,
                versus: int | None = None) -> Graph:
    """The full attribution graph of one image towards `score` of class `target` (targets.py; `versus`: the class a
    logit-diff subtracts, default the runner-up)."""
    score = resolve_score(backbone, pixels_B3HW, classifier_CP, target, score, versus)
    model = LocalReplacement(backbone, transcoder, pixels_B3HW[0], score.direction(classifier_CP), dtype=dtype)
    graph = attribute(model, batch_size=batch_size)
    graph.meta["target_score"] = {"kind": score.kind, "target": score.target, "versus": score.versus}
    return graph


def explain_image(backbone, transcoder, image: Image.Image, classifier_CP: torch.Tensor, classnames: Sequence[str],
                  target: int | None = None, *, node_fraction: float = 0.8, edge_fraction: float = 0.98,
                  effects_top: int = 10, dtype: torch.dtype = torch.float32, batch_size: int = 256,
                  score: str = DEFAULT_SCORE, versus: int | None = None, progress: bool = True) -> Explanation:
    """The pruned attribution graph of `image` towards `score` (targets.py) of class `target` (default: the predicted
    class), and for its `effects_top` most influential feature nodes the predicted and measured effects of zeroing each.
    `progress` shows a bar over the three phases (attribution, pruning, effects)."""
    pixels = backbone.preprocess([image])
    with torch.no_grad():
        cos_C = _scores(backbone, pixels, classifier_CP)[0]
    target = int(cos_C.argmax()) if target is None else target
    top = cos_C.topk(min(5, len(classnames)))
    tscore = target_score(score, cos_C, target, versus)
    bar = tqdm(total=3, desc="explain: attribution", unit="phase", disable=not progress, leave=False)
    t0 = time.perf_counter()
    graph = image_graph(backbone, transcoder, pixels, classifier_CP, target, dtype, batch_size, tscore)
    bar.update()
    bar.set_description("explain: pruning")
    t1 = time.perf_counter()
    pruned = prune(graph.adjacency, graph.target, node_fraction, edge_fraction)
    bar.update()
    bar.set_description(f"explain: effects of {effects_top} features")
    t2 = time.perf_counter()
    effects = feature_effects(backbone, transcoder, pixels, graph, pruned, classifier_CP, classnames, tscore, effects_top)
    t3 = time.perf_counter()
    bar.update()
    bar.close()
    return Explanation(graph, pruned, target, [(classnames[int(i)], float(v)) for v, i in zip(top.values, top.indices)],
                       effects, {"attribution": t1 - t0, "pruning": t2 - t1, "effects": t3 - t2}, tscore)


def feature_effects(backbone, transcoder, pixels_B3HW, graph: Graph, pruned: Pruned, classifier_CP, classnames,
                    score: TargetScore, n: int) -> dict[str, dict]:
    """For the `n` kept feature nodes of largest influence: the change of `score` (the graph's target) when each is
    zeroed at its token."""
    if n <= 0:
        return {}
    feats = torch.nonzero(pruned.node_mask & (graph.kind_N == FEATURE)).flatten()
    feats = feats[pruned.influence[feats].argsort(descending=True)[:n]]
    clean = clean_pass(backbone, transcoder, pixels_B3HW)
    out = {}
    for node in feats.tolist():
        iv = Intervention(int(graph.layer_N[node]), int(graph.feature_N[node]), [int(graph.token_N[node])], value=0.0)
        rep = intervene(backbone, transcoder, pixels_B3HW, [iv], classifier_CP, classnames, score.target, graph=graph,
                        clean=clean, score=score)
        out[graph.node_id(node)] = {
            "activation": float(graph.value_N[node]), "predicted": rep.predicted,
            "replacement": rep.replacement.score - rep.clean.score, "original": rep.original.score - rep.clean.score,
            "replacement_top": rep.replacement.top[0][0], "original_top": rep.original.top[0][0],
        }
    return out


def explain_class(backbone, transcoder, images: Sequence[Image.Image], classifier_CP: torch.Tensor, classnames: Sequence[str],
                  target: int, *, node_fraction: float = 0.8, edge_fraction: float = 0.98, dtype: torch.dtype = torch.float32,
                  batch_size: int = 256, score: str = DEFAULT_SCORE, versus: int | None = None,
                  progress: bool = True) -> Explanation:
    """The class-level circuit: graphs of `images` towards `score` of `target` (a logit-diff against each image's own
    runner-up unless `versus` is given), grouped, averaged and pruned (`aggregate`).

    `progress` shows a bar over the images' attributions."""
    if not images:
        raise CircuitError(f"no images of class {classnames[target]!r} to aggregate: raise --max-images or pick another split")
    t0 = time.perf_counter()
    graphs, mean_cos = [], torch.zeros(len(classnames))
    for image in tqdm(images, desc="explain: attributing images", unit="img", disable=not progress, leave=False):
        pixels = backbone.preprocess([image])
        with torch.no_grad():
            mean_cos += _scores(backbone, pixels, classifier_CP)[0].cpu()
        graphs.append(image_graph(backbone, transcoder, pixels, classifier_CP, target, dtype, batch_size, score, versus))
    graph = aggregate(graphs)
    graph.meta["target_score"] = {"kind": score, "target": target, "versus": versus}
    t1 = time.perf_counter()
    pruned = prune(graph.adjacency, graph.target, node_fraction, edge_fraction)
    mean_cos /= len(images)
    top = mean_cos.topk(min(5, len(classnames)))
    return Explanation(graph, pruned, target, [(classnames[int(i)], float(v)) for v, i in zip(top.values, top.indices)],
                       {}, {"attribution": t1 - t0, "pruning": time.perf_counter() - t1})
