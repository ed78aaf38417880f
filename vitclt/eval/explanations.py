"""Scoring feature labels against the demo world's ground truth (`bench/explanations.py` runs it).

Pieces, each usable alone:

* `world_pass`: one pass over demo-world images recording, per feature, where it fires (image
  level: max over tokens > 0; patch level: at each patch token), its max-over-tokens activation,
  the images' embeddings and their scenes.
* `ground_truth`: each feature's best concept by IoU and whether it beats the shuffled-firing
  null (`vitclt.eval.ground_truth.match_concepts`), layer by layer.
* `score_labels`: for one labelling method (a top label per feature), the share of scored
  features whose label names their ground truth, beside the same share with labels shuffled among
  them, overall, per concept family and per layer.
* `cosy_auc`: for labels that are world concepts, the AUC of the feature's activation on scenes
  rendered to have the label's concept against random scenes (CoSy, Kopf et al. 2024, with the
  world generator as the text-to-image model).
* `zero_shot_ceiling`: the backbone's own zero-shot accuracy per attribute family with the same
  concept text vectors: no labeller reading that text tower can name what it cannot tell apart.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from vitclt.eval.ground_truth import (
    FAMILIES,
    Concept,
    Match,
    image_presence,
    label_score,
    match_concepts,
    naming_matrix,
    patch_presence,
    roc_auc,
    scene_value,
    scenes_with,
)


@dataclass
class WorldPass:
    """What one pass over demo-world images recorded."""

    fires_NLF: torch.Tensor
    """Whether each feature fires anywhere in each image (bool)."""
    fires_NTLF: torch.Tensor
    """Whether it fires at each patch token (bool; T = grid² patches, prefix tokens dropped)."""
    max_NLF: torch.Tensor
    """Its maximum activation over the image's tokens."""
    embed_NP: torch.Tensor
    """The images' normalised embeddings."""
    scenes: list
    """Each image's `Scene`."""
    grid: int
    """Patches per side."""


@torch.no_grad()
def activations(backbone, transcoder, pixels_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(act_BTLF, embed_BP): every feature's activation at every token, and the images' embeddings."""
    with backbone.capture() as cap:
        embed_BP = backbone.image_embeds(pixels_B3HW)
    a_BTLD = cap.y_BTLD() if transcoder.cfg.topology == "sae" else cap.x_BTLD()
    B, T, L, D = a_BTLD.shape
    acts = [transcoder.encode_layer(i, a_BTLD[:, :, i].reshape(B * T, D).to(transcoder.b_dec.device))
            .to_dense(transcoder.n_features).view(B, T, -1).float().cpu() for i in range(L)]
    return torch.stack(acts, 2), embed_BP.float().cpu()


def world_pass(backbone, transcoder, items: list, batch_size: int = 64, progress: bool = True) -> WorldPass:
    """Run `items` (a list of (PIL image, Scene)) through the backbone and transcoder."""
    n_prefix = backbone.n_prefix_tokens
    grid = backbone.image_size // backbone.patch_size
    fires, fires_p, maxes, embeds = [], [], [], []
    for start in tqdm(range(0, len(items), batch_size), desc="world pass", unit="batch", disable=not progress):
        chunk = items[start : start + batch_size]
        act_BTLF, embed_BP = activations(backbone, transcoder, backbone.preprocess([im for im, _ in chunk]))
        fires.append((act_BTLF > 0).any(1))
        fires_p.append(act_BTLF[:, n_prefix:] > 0)
        maxes.append(act_BTLF.amax(1))
        embeds.append(embed_BP)
    return WorldPass(torch.cat(fires), torch.cat(fires_p), torch.cat(maxes), torch.cat(embeds), [s for _, s in items], grid)


@dataclass
class GroundTruth:
    """Each feature's ground-truth concept, layer by layer (arrays (L, F))."""

    concept_LF: np.ndarray
    """Index into `concepts` (−1 when the feature never fires)."""
    level_LF: np.ndarray
    """0: image level, 1: patch level."""
    iou_LF: np.ndarray
    """Best IoU."""
    p_LF: np.ndarray
    """Its p-value bound under shuffled firing."""
    scored_LF: np.ndarray
    """Features that beat the null at `alpha`."""
    concepts: list[Concept]
    """The concept list."""

    @property
    def coverage(self) -> float:
        """Share of the features that fire at all that are scored."""
        alive = self.concept_LF >= 0
        return float(self.scored_LF.sum() / max(alive.sum(), 1))


def ground_truth(wp: WorldPass, concepts: list[Concept], alpha: float = 0.01) -> GroundTruth:
    """Match every feature of every layer to its best concept on the pass's images."""
    present_NV = torch.from_numpy(image_presence(wp.scenes, concepts))
    present_NTV = torch.from_numpy(patch_presence(wp.scenes, concepts, wp.grid))
    N, T, V = present_NTV.shape
    L = wp.fires_NLF.shape[1]
    matches: list[Match] = []
    for layer in range(L):
        matches.append(match_concepts(wp.fires_NLF[:, layer], present_NV, wp.fires_NTLF[:, :, layer].reshape(N * T, -1),
                                      present_NTV.reshape(N * T, V)))
    stack = lambda name: np.stack([getattr(m, name) for m in matches])  # noqa: E731
    return GroundTruth(stack("concept"), stack("level"), stack("iou"), stack("p"),
                       np.stack([m.scored(alpha) for m in matches]), concepts)


def score_labels(labels_LF: list[list[str | None]], gt: GroundTruth, permutations: int = 200, seed: int = 0) -> dict:
    """Share of scored features whose top label names their concept, with its shuffled control, overall / per family / per layer.

    A missing label (None: none shown) names nothing; it is shuffled like any other.
    """
    layer_N, feat_N = np.nonzero(gt.scored_LF)
    labels = [labels_LF[ly][f] or "" for ly, f in zip(layer_N, feat_N)]
    vocab = sorted(set(labels))
    label_N = np.array([vocab.index(x) for x in labels], dtype=np.int64)
    truth_N = gt.concept_LF[layer_N, feat_N]
    hits = naming_matrix(vocab, gt.concepts)
    hit_N = hits[label_N, truth_N] if len(label_N) else np.zeros(0, bool)
    family_N = np.array([gt.concepts[c].family for c in truth_N])

    def part(sel: np.ndarray) -> dict:
        return asdict(label_score(hit_N[sel], label_N[sel], truth_N[sel], hits, permutations, seed))

    return {
        "overall": part(np.ones(len(hit_N), bool)),
        "family": {fam: part(family_N == fam) for fam in FAMILIES},
        "layer": [part(layer_N == ly) for ly in range(gt.scored_LF.shape[0])],
    }


def concept_of(label: str | None, concepts: list[Concept]) -> int | None:
    """The index of the concept whose name is exactly `label`, else None."""
    for i, c in enumerate(concepts):
        if c.name == label:
            return i
    return None


def cosy_auc(backbone, transcoder, labels_LF: list[list[str | None]], gt: GroundTruth, n_images: int = 64, seed: int = 0,
             batch_size: int = 64, progress: bool = True) -> dict:
    """AUC of each scored feature's max activation on scenes having its label's concept against random scenes.

    Only labels that are world concepts can be rendered; the others are counted in `unrenderable`.
    """
    from vitclt.data.world import CLASSNAMES, render, sample_scene

    layer_N, feat_N = np.nonzero(gt.scored_LF)
    wanted = [concept_of(labels_LF[ly][f], gt.concepts) for ly, f in zip(layer_N, feat_N)]
    needed = sorted({c for c in wanted if c is not None})
    items = []
    for c in needed:
        items += [(render(s, r), s) for s, r in scenes_with(gt.concepts[c], n_images, seed + 1)]
    random_items = []
    for t in range(4 * n_images):
        rng = np.random.default_rng([seed + 1, 11, t])
        scene = sample_scene(rng, int(rng.integers(len(CLASSNAMES))))
        random_items.append((render(scene, rng), scene))
    wp = world_pass(backbone, transcoder, items + random_items, batch_size, progress)
    max_NLF = wp.max_NLF.numpy()
    rand = max_NLF[len(items) :]
    aucs = np.full(len(layer_N), np.nan)
    for n, (ly, f, c) in enumerate(zip(layer_N, feat_N, wanted)):
        if c is not None:
            k = needed.index(c)
            aucs[n] = roc_auc(max_NLF[k * n_images : (k + 1) * n_images, ly, f], rand[:, ly, f])
    ok = ~np.isnan(aucs)
    return {
        "mean_auc": float(aucs[ok].mean()) if ok.any() else math.nan,
        "renderable": int(ok.sum()), "unrenderable": int((~ok).sum()),
        "layer": [float(aucs[ok & (layer_N == ly)].mean()) if (ok & (layer_N == ly)).any() else math.nan
                  for ly in range(gt.scored_LF.shape[0])],
    }


def zero_shot_ceiling(embed_NP: torch.Tensor, scenes: list, text_VP: torch.Tensor, concepts: list[Concept]) -> dict:
    """The backbone's zero-shot accuracy per family: argmax cosine among that family's concepts, against the scene's value."""
    sims = torch.nn.functional.normalize(embed_NP.float(), dim=-1) @ torch.nn.functional.normalize(text_VP.float(), dim=-1).T
    out = {}
    for fam in FAMILIES:
        idx = [i for i, c in enumerate(concepts) if c.family == fam]
        pred = np.array(idx)[sims[:, idx].argmax(1).numpy()]
        truth = np.array([[c.name for c in concepts].index(scene_value(s, fam)) for s in scenes])
        out[fam] = {"accuracy": float((pred == truth).mean()), "chance": 1.0 / len(idx)}
    return out
