"""The ground-truth benchmark of labels: concept presence, IoU matching with its null, naming, and label scores."""

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitclt.data.world import DemoWorld
from vitclt.eval.explanations import GroundTruth, score_labels
from vitclt.eval.ground_truth import (
    hypergeom_tail_bound,
    image_presence,
    match_concepts,
    names,
    patch_presence,
    roc_auc,
    scene_value,
    scenes_with,
    world_concepts,
)

CONCEPTS = world_concepts()


def exact_tail(k, N, K, n):
    return sum(math.comb(K, i) * math.comb(N - K, n - i) for i in range(k, min(K, n) + 1)) / math.comb(N, n)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 60).flatmap(lambda N: st.tuples(st.just(N), st.integers(0, N), st.integers(0, N), st.integers(0, N))))
def test_hypergeometric_tail_bound_holds_and_is_tight_in_the_far_tail(args):
    N, K, n, k = args
    exact = exact_tail(k, N, K, n)
    bound = float(hypergeom_tail_bound(torch.tensor(float(k)), torch.tensor(float(N)), torch.tensor(float(K)),
                                       torch.tensor(float(n))))
    assert bound >= exact - 1e-12
    if exact < 1e-3:
        assert bound <= 3 * exact + 1e-15


def test_names_needs_every_word_and_the_most_specific_concept_of_the_family():
    by = {(c.family, c.name): c for c in CONCEPTS}
    assert names("red circle", by["class", "red circle"], CONCEPTS)
    assert names("red circle", by["colour", "red"], CONCEPTS)
    assert not names("red", by["class", "red circle"], CONCEPTS)
    assert names("top left", by["position", "top left"], CONCEPTS)
    assert not names("top left", by["position", "top"], CONCEPTS)
    assert not names("process", by["colour", "red"], CONCEPTS)


def test_presence_follows_the_scene_and_the_object_mask():
    world = DemoWorld("test", size=20)
    scenes = [world.scene(i) for i in range(20)]
    img = image_presence(scenes, CONCEPTS)
    assert (img.sum(1) == 6).all()  # one concept per family
    patch = patch_presence(scenes, CONCEPTS, grid=4)
    colour = [i for i, c in enumerate(CONCEPTS) if c.family == "colour"]
    background = [i for i, c in enumerate(CONCEPTS) if c.family == "background"]
    # A patch never shows both the object's colour and the bare background.
    assert not (patch[:, :, colour].any(-1) & patch[:, :, background].any(-1)).any()
    assert patch[:, :, colour].any(-1).any(-1).all() and (patch <= img[:, None, :]).all()


def test_scenes_with_a_concept_all_have_it():
    for c in [CONCEPTS[0], next(c for c in CONCEPTS if c.family == "position")]:
        assert all(scene_value(s, c.family) == c.name for s, _ in scenes_with(c, 5))


def test_match_finds_a_planted_concept_and_the_null_rejects_random_firing():
    rng = np.random.default_rng(0)
    world = DemoWorld("test", size=400)
    present = torch.from_numpy(image_presence([world.scene(i) for i in range(400)], CONCEPTS))
    red = next(i for i, c in enumerate(CONCEPTS) if c.name == "red")
    planted = present[:, red].clone()
    planted[torch.from_numpy(rng.random(400) < 0.05)] ^= True  # 5 % noise
    random = torch.from_numpy(rng.random(400) < 0.2)
    never = torch.zeros(400, dtype=torch.bool)
    m = match_concepts(torch.stack([planted, random, never], 1), present)
    assert m.concept[0] == red and m.p[0] < 1e-10
    assert m.p[1] > 0.01 and m.concept[2] == -1
    assert m.scored().tolist() == [True, False, False]


def synthetic_truth(n_layers: int = 3, n_features: int = 200, seed: int = 0) -> GroundTruth:
    rng = np.random.default_rng(seed)
    concept = rng.integers(0, len(CONCEPTS), (n_layers, n_features))
    scored = rng.random((n_layers, n_features)) < 0.7
    return GroundTruth(concept, np.zeros_like(concept), np.ones(concept.shape), np.zeros(concept.shape), scored, CONCEPTS)


def test_benchmark_gives_truth_labels_full_marks_and_shuffled_labels_the_shuffled_score():
    gt = synthetic_truth()
    truth = [[CONCEPTS[c].name for c in row] for row in gt.concept_LF]
    exact = score_labels(truth, gt, permutations=50)
    assert exact["overall"]["named"] == 1.0
    assert all(part["named"] == 1.0 for part in exact["layer"])
    assert exact["overall"]["shuffled"] < 0.2
    rng = np.random.default_rng(1)
    layer_N, feat_N = np.nonzero(gt.scored_LF)
    perm = rng.permutation(len(layer_N))
    shuffled = [row[:] for row in truth]
    for (ly, f), (ly2, f2) in zip(zip(layer_N, feat_N), zip(layer_N[perm], feat_N[perm])):
        shuffled[ly][f] = truth[ly2][f2]
    got = score_labels(shuffled, gt, permutations=50)
    assert abs(got["overall"]["named"] - exact["overall"]["shuffled"]) < 0.05
    assert abs(got["overall"]["shuffled"] - exact["overall"]["shuffled"]) < 0.02


def test_roc_auc_is_one_for_separated_scores_and_a_half_for_ties():
    assert roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert roc_auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert roc_auc(np.array([0.0]), np.array([1.0, 2.0])) == 0.0
