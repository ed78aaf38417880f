"""Retrieval by codes: dense vectors, neighbours without the query, label precision@k."""

import pytest
import torch

from vitclt.eval.retrieval import CodeGallery, chance_precision, evaluate_retrieval, nearest, precision_at_k
from vitclt.nn import LayerCodes


def test_dense_codes_place_values_at_their_features():
    codes = LayerCodes(torch.tensor([[2.0, 0.0], [1.0, -3.0]]), torch.tensor([[1, 1], [0, 3]]))
    torch.testing.assert_close(codes.to_dense(4), torch.tensor([[0.0, 2.0, 0.0, 0.0], [1.0, 0.0, 0.0, -3.0]]))


def test_neighbours_exclude_the_query_and_precision_counts_labels():
    v = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=-1)
    labels = torch.tensor([0, 0, 1, 0])
    idx, sim = nearest(v, [0, 2], k=1)
    assert idx.tolist() == [[1], [3]]
    assert sim[0, 0] < 1
    # Nearest of 0→1 (same), 1→0 (same), 2→3 (differ), 3→2 (differ).
    assert precision_at_k(v, labels, 1) == pytest.approx(0.5)
    assert chance_precision(labels) == pytest.approx((3 * 2) / (4 * 3))


def test_gallery_pools_cls_or_patch_codes_and_ranks_layers():
    T, F = 3, 4
    # Layer 0: codes unrelated to the label; layer 1: CLS code is the label's feature.
    labels = torch.tensor([0, 1, 0, 1])
    n = len(labels)
    layer0 = LayerCodes(torch.ones(n * T, 1), torch.tensor([[0], [2], [3]] * n))
    cls_feature = torch.stack([labels, torch.full_like(labels, 2), torch.full_like(labels, 3)], 1).view(-1, 1)
    layer1 = LayerCodes(torch.ones(n * T, 1), cls_feature)
    gallery = CodeGallery(2, F, T, n_prefix=1, pool="cls")
    gallery.update([layer0, layer1], labels)
    result = evaluate_retrieval(gallery, k=1, n_queries=2, n_neighbours=2)
    assert result.precision_at_k[1] == 1.0
    assert len(result.neighbours) == 2 and len(result.neighbours[0]) == 2 and len(result.neighbours[0][1]) == 2
    patches = CodeGallery(2, F, T, n_prefix=1, pool="patches")
    patches.update([layer0, layer1], labels)
    torch.testing.assert_close(patches.vectors(0)[0], torch.nn.functional.normalize(torch.tensor([0.0, 0, 0.5, 0.5]), dim=0))
    with pytest.raises(ValueError, match="unknown retrieval pool"):
        CodeGallery(2, F, T, 1, pool="mean")
