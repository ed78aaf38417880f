""""Sees" labels (SoftWPMI of top images) and "writes" labels (embedding Jacobian through every later layer)."""

import math

import numpy as np
import torch

from tests.test_browser import make_transcoder
from vitclt.browser.collect import FeatureCollector
from vitclt.browser.sees import P_END, P_START, concept_probs, log_p_given_top, sees_labels, soft_wpmi
from vitclt.browser.writes import centred, differentiable_embedding, jacobian_writes, writes_labels


def test_soft_wpmi_equals_a_hand_computation_on_a_small_matrix():
    P_NV = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]], dtype=torch.float64)
    top_FK = torch.tensor([[0, 3], [1, 2]])
    score_FV, _ = soft_wpmi(log_p_given_top(P_NV, top_FK))
    p = [P_START, P_START - 0.5 * (P_START - P_END)]  # soft membership of ranks 1 and 2 of K = 2

    def log_p(u, c):
        return sum(math.log(1 + p[k] * (float(P_NV[int(top_FK[u, k]), c]) - 1) + 1e-7) for k in range(2))

    for u in range(2):
        for c in range(3):
            prior = math.log((math.exp(log_p(0, c)) + math.exp(log_p(1, c))) / 2)
            assert abs(float(score_FV[u, c]) - (log_p(u, c) - prior)) < 1e-12


def test_sees_labels_name_the_concept_of_the_top_images_and_beat_their_shuffled_baseline():
    rng = np.random.default_rng(0)
    concept_N = rng.integers(0, 4, 400)
    text_VP = torch.eye(4, 8, dtype=torch.float64)
    image_NP = torch.from_numpy(np.eye(4, 8)[concept_N] + 0.3 * rng.normal(size=(400, 8)))
    probs = concept_probs(image_NP, text_VP)
    # Feature f's top images are 8 images of concept f % 4.
    top = torch.stack([torch.from_numpy(np.flatnonzero(concept_N == f % 4)[:8]) for f in range(6)])[None]
    valid = torch.ones_like(top, dtype=torch.bool)
    value = torch.arange(8, 0, -1).float().expand_as(top)
    labels = sees_labels(probs, top, valid, value, k=2)
    assert labels.index_LFK[0, :, 0].tolist() == [f % 4 for f in range(6)]
    assert bool(labels.shown_LFK[0, :, 0].all())
    assert bool((labels.score_LFK[0, :, 0] > labels.baseline_LFK[0, :, 0]).all())
    # A feature with one image is compared with one random image, not with eight.
    valid[0, 5, 1:] = False
    few = sees_labels(probs, top, valid, value, k=4)
    assert int(few.index_LFK[0, 5, 0]) == int(few.index_LFK[0, 1, 0]) == 1  # features 1 and 5 both see concept 1
    assert abs(float(few.baseline_LFK[0, 5, 0])) < 0.3 * abs(float(few.baseline_LFK[0, 1, 0]))


def test_write_jacobian_equals_finite_differences_of_the_embedding(tiny_backbone, images):
    bb = tiny_backbone
    tc = make_transcoder(bb, images).double()
    bb.model.double()
    try:
        col = FeatureCollector(tc, bb.n_tokens, top_k=2, n_samples=1)
        with torch.no_grad(), bb.capture() as cap:
            bb.image_embeds(bb.preprocess(images))
        col.update(cap.x_BTLD().double(), 0)
        top = col.result().top_max
        data = [(im, 0) for im in images]
        w_LFP = jacobian_writes(bb, tc, data, top, batch_size=3, progress=False)
        embed = differentiable_embedding(bb)
        # The decoders in raw units, built here rather than by the code under test: W[i, j] = W^{i→j} · y_scale_j, j ≥ i.
        W = torch.zeros(bb.n_layers, bb.n_layers, tc.n_features, bb.d_model, dtype=torch.float64)
        for i in range(bb.n_layers):
            for j in range(i, bb.n_layers):
                W[i, j] = tc.decoder(i, j).detach().double() * tc.y_scale_L[j]
        checked = 0
        for layer, f in [(0, 1), (1, 3), (bb.n_layers - 1, 2)]:
            ok = torch.isfinite(top.score_LFK[layer, f])
            if not ok.any():
                continue
            num, mass = 0.0, 0.0
            for k in torch.nonzero(ok).flatten().tolist():
                i = int(top.image_LFK[layer, f, k])
                a_T = top.tokens_LFKT[layer, f, k].double().clamp_min(0)
                pixels = bb.preprocess([images[i]]).double()
                eps = 1e-6

                def shifted(s):
                    def add(j, x, y):
                        return y + s * a_T[None, :, None] * W[layer, j, f][None, None, :]

                    with torch.no_grad(), bb.replace(add, range(bb.n_layers)):
                        return embed(pixels)[0].double()

                num = num + (shifted(eps) - shifted(-eps)) / (2 * eps)
                mass += float(a_T.sum())
            expected = num / mass
            assert torch.allclose(w_LFP[layer, f].double(), expected, atol=1e-6 * float(expected.norm()) + 1e-9)
            checked += 1
        assert checked >= 2
    finally:
        bb.model.float()


def test_writes_labels_rank_centred_text_by_cosine():
    text_VP = torch.tensor([[1.0, 0.1, 0.0], [0.9, -0.2, 0.1], [0.8, 0.0, 0.5]])
    t = centred(text_VP)
    w_LFP = t[[1, 2, 0]][None].clone()
    labels = writes_labels(w_LFP, text_VP, torch.ones(1, 3, dtype=torch.bool), k=1)
    assert labels.index_LFK[0, :, 0].tolist() == [1, 2, 0]
    assert torch.allclose(labels.score_LFK[0, :, 0], torch.ones(3))
    # Centring removes the shared direction: raw cosines are all above 0.7, centred ones are not.
    assert float((t @ t.T).min()) < 0
