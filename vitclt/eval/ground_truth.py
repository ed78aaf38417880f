"""What each feature tracks, measured against the demo world's ground truth.

The demo world knows every image's colour, shape, class, size, position and background, and the
object's pixel mask (`vitclt.data.world`). A *concept* is one value of one of those families. It is
*present* in an image when the main object has it, and at a patch token when the object covers at
least `PATCH_COVER` of the patch (colour, shape, class, size) or none of it (background; position
is image level only).

A feature's ground truth is the concept, at image level (fires = max over tokens > 0) or patch
level (fires at that patch token), whose set of items where it is present has the highest IoU
with the set where the feature fires. The feature is *scored* only when that best IoU beats a
shuffled-firing null: under a random permutation of the feature's firing over the items, the
intersection with a concept follows a hypergeometric law, so P(IoU_c ≥ u) is a hypergeometric
tail; the p-value of the best IoU u* is bounded by the union Σ_c P(IoU_c ≥ u*) over every concept
and level (a valid, slightly conservative test of the maximum). Each tail is bounded above by its
first term over one minus the (decreasing) ratio of successive terms, so nothing is sampled.

A label *names* a concept when every word of the concept's name is among the label's words and
no longer concept of the same family is (so "top left" names the position "top left", not "top").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vitclt.data.world import BACKGROUNDS, CLASSNAMES, COLOURS, POSITIONS, SHAPES, SIZES, Scene, object_mask

FAMILIES: tuple[str, ...] = ("colour", "shape", "class", "size", "position", "background")
"""Concept families, in table order."""
PATCH_COVER = 0.25
"""Least share of a patch the object must cover for its colour, shape, class and size to be present there."""
PATCH_FAMILIES = ("colour", "shape", "class", "size", "background")
"""Families that have a patch-level presence."""


@dataclass(frozen=True)
class Concept:
    """One value of one attribute family of the demo world."""

    family: str
    """One of FAMILIES."""
    name: str
    """Its words, e.g. "red", "red circle", "top left", "striped"."""

    @property
    def words(self) -> frozenset[str]:
        """The words a label must contain to name it."""
        return frozenset(self.name.split())


def _position_name(phrase: str) -> str:
    """"at the top left" → "top left"."""
    return " ".join(w for w in phrase.split() if w not in ("at", "on", "in", "the"))


def world_concepts() -> list[Concept]:
    """Every concept of the demo world, family by family."""
    out = [Concept("colour", c) for c in COLOURS]
    out += [Concept("shape", s) for s in SHAPES]
    out += [Concept("class", n) for n in CLASSNAMES]
    out += [Concept("size", s) for s in SIZES]
    out += [Concept("position", _position_name(p)) for row in POSITIONS for p in row]
    out += [Concept("background", b) for b in BACKGROUNDS]
    return out


def scene_value(scene: Scene, family: str) -> str:
    """The name of the scene's concept of `family`."""
    return {"colour": scene.colour, "shape": scene.shape, "class": f"{scene.colour} {scene.shape}", "size": scene.size,
            "position": _position_name(scene.position), "background": scene.background}[family]


def image_presence(scenes: list[Scene], concepts: list[Concept]) -> np.ndarray:
    """present_NV: whether each image has each concept (its main object's attributes)."""
    index = {(c.family, c.name): i for i, c in enumerate(concepts)}
    out = np.zeros((len(scenes), len(concepts)), dtype=bool)
    for n, scene in enumerate(scenes):
        for family in FAMILIES:
            i = index.get((family, scene_value(scene, family)))
            if i is not None:
                out[n, i] = True
    return out


def patch_cover(scene: Scene, grid: int) -> np.ndarray:
    """(grid, grid): the share of each patch that the main object covers."""
    mask = object_mask(scene)
    h = mask.shape[0] // grid
    return mask[: h * grid, : h * grid].reshape(grid, h, grid, h).mean((1, 3))


def patch_presence(scenes: list[Scene], concepts: list[Concept], grid: int) -> np.ndarray:
    """present_NTV: whether each patch of each image has each concept (T = the grid² patches, row-major)."""
    image_NV = image_presence(scenes, concepts)
    family_V = np.array([c.family for c in concepts])
    on_object_V = np.isin(family_V, [f for f in PATCH_FAMILIES if f != "background"])
    on_background_V = family_V == "background"
    out = np.zeros((len(scenes), grid * grid, len(concepts)), dtype=bool)
    for n, scene in enumerate(scenes):
        cover_T = patch_cover(scene, grid).reshape(-1)
        obj_T, bg_T = cover_T >= PATCH_COVER, cover_T == 0
        out[n] = (obj_T[:, None] & (image_NV[n] & on_object_V)[None]) | (bg_T[:, None] & (image_NV[n] & on_background_V)[None])
    return out


def _log_choose(n: Tensor, k: Tensor) -> Tensor:
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def hypergeom_tail_bound(k: Tensor, N: Tensor, K: Tensor, n: Tensor) -> Tensor:
    """An upper bound on P(X ≥ k) for X ~ Hypergeometric(N items, K marked, n drawn), elementwise (float64).

    Past the mode the ratio of successive terms falls, so the tail is at most pmf(k) / (1 − ratio(k));
    at or before the mode the bound is 1. Exact (0) when k exceeds min(K, n).
    """
    k, N, K, n = (t.double() for t in torch.broadcast_tensors(k, N, K, n))
    hi = torch.minimum(K, n)
    lo = torch.clamp(n + K - N, min=0)
    kk = torch.clamp(k, lo, hi)
    log_pmf = _log_choose(K, kk) + _log_choose(N - K, n - kk) - _log_choose(N, n)
    ratio = (K - kk) * (n - kk) / ((kk + 1) * (N - K - n + kk + 1))
    bound = torch.where(ratio < 1, log_pmf.exp() / (1 - ratio).clamp_min(1e-300), torch.ones_like(k))
    bound = torch.where(k <= lo, torch.ones_like(bound), bound)
    return torch.where(k > hi, torch.zeros_like(bound), bound.clamp(max=1.0))


@dataclass
class Match:
    """Each feature's best-matching concept and the evidence for it (arrays over features)."""

    concept: np.ndarray
    """Index into the concept list of the best concept (−1 for a feature that never fires)."""
    level: np.ndarray
    """0: image level, 1: patch level."""
    iou: np.ndarray
    """The best IoU."""
    p: np.ndarray
    """Upper bound on its p-value under shuffled firing (1 for a feature that never fires)."""

    def scored(self, alpha: float = 0.01) -> np.ndarray:
        """Features whose best IoU beats the shuffled-firing null at level `alpha`."""
        return (self.concept >= 0) & (self.p < alpha)


def _iou_counts(fires_NF: Tensor, present_NV: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    inter_FV = fires_NF.double().T @ present_NV.double()
    return inter_FV, fires_NF.sum(0).double(), present_NV.sum(0).double()


def match_concepts(fires_NF: Tensor, present_NV: Tensor, patch_fires_NF: Tensor | None = None,
                   patch_present_NV: Tensor | None = None) -> Match:
    """The best concept of every feature by IoU, at image level (N images) and optionally at patch level (its N rows are
    patch tokens)."""
    levels = [(fires_NF.bool(), present_NV.bool())]
    if patch_fires_NF is not None and patch_present_NV is not None:
        levels.append((patch_fires_NF.bool(), patch_present_NV.bool()))
    counts = [_iou_counts(f, p) for f, p in levels]
    ious = []
    for inter_FV, nf_F, nv_V in counts:
        union = nf_F[:, None] + nv_V[None, :] - inter_FV
        ious.append(torch.where(union > 0, inter_FV / union.clamp_min(1), torch.zeros_like(inter_FV)))
    ious = torch.stack(ious, 1)
    F_, nL, C = ious.shape
    best, flat = ious.view(F_, -1).max(1)
    # Union bound over every (level, concept): IoU_c ≥ u ⇔ intersection ≥ u (n_f + n_c) / (1 + u).
    p = torch.zeros(F_, dtype=torch.float64)
    for (inter_FV, nf_F, nv_V), (fires_NF, _) in zip(counts, levels):
        X = torch.tensor(float(fires_NF.shape[0]), dtype=torch.float64)
        need_FV = torch.ceil(best[:, None] * (nf_F[:, None] + nv_V[None, :]) / (1 + best[:, None]) - 1e-9)
        p += hypergeom_tail_bound(need_FV, X, nv_V[None, :], nf_F[:, None]).sum(1)
    never = counts[0][1] == 0
    return Match(
        concept=torch.where(never, -1, flat % C).numpy(),
        level=(flat // C).numpy(),
        iou=best.numpy(),
        p=torch.where(never, 1.0, p.clamp(max=1.0)).numpy(),
    )


def names(label: str, concept: Concept, concepts: list[Concept]) -> bool:
    """Whether `label` names `concept`: it holds the concept's words and those of no longer concept of its family."""
    words = frozenset(label.lower().replace(",", " ").split())
    if not concept.words <= words:
        return False
    return not any(c.family == concept.family and c.words > concept.words and c.words <= words for c in concepts)


def naming_matrix(labels: list[str], concepts: list[Concept]) -> np.ndarray:
    """hits: which labels name which concepts."""
    return np.array([[names(label, c, concepts) for c in concepts] for label in labels], dtype=bool).reshape(len(labels),
                                                                                                           len(concepts))


@dataclass
class LabelScore:
    """How often a feature's top label names its ground-truth concept, and the same with labels shuffled."""

    n: int
    """Scored features counted."""
    named: float
    """Share whose top label names the ground-truth concept."""
    shuffled: float
    """The same share with labels shuffled among these features (mean over permutations)."""


def label_score(hit_N: np.ndarray, label_N: np.ndarray, truth_N: np.ndarray, hits: np.ndarray, permutations: int = 200,
                seed: int = 0) -> LabelScore:
    """Score labels of N scored features: `hit_N` whether each label names its truth; shuffled via `hits[label, truth]`.

    `label_N` indexes the label vocabulary (rows of `hits`), `truth_N` the concepts (its columns).
    """
    n = len(hit_N)
    if n == 0:
        return LabelScore(0, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    shuffled = [hits[label_N[rng.permutation(n)], truth_N].mean() for _ in range(permutations)]
    return LabelScore(n, float(np.mean(hit_N)), float(np.mean(shuffled)))


def roc_auc(positive_N: np.ndarray, negative_M: np.ndarray) -> float:
    """Area under the ROC curve of scores separating positives from negatives (ties count one half)."""
    pos, neg = np.asarray(positive_N, np.float64), np.asarray(negative_M, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    both = np.concatenate([pos, neg])
    order = both.argsort(kind="stable")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def scenes_with(concept: Concept, n: int, seed: int = 0, max_tries: int = 10_000) -> list[tuple[Scene, np.random.Generator]]:
    """n random scenes of the world (any of its 48 classes) that have `concept`, each with the rng that renders it.

    Rejection sampling from the world's own scene distribution, so every other attribute keeps its law.
    """
    from vitclt.data.world import sample_scene

    out: list[tuple[Scene, np.random.Generator]] = []
    for t in range(max_tries * n):
        rng = np.random.default_rng([seed, 7, t])
        label = CLASSNAMES.index(concept.name) if concept.family == "class" else int(rng.integers(len(CLASSNAMES)))
        scene = sample_scene(rng, label)
        if scene_value(scene, concept.family) == concept.name:
            out.append((scene, rng))
            if len(out) == n:
                return out
    raise ValueError(f"could not draw {n} scenes with {concept.family} {concept.name!r}")
