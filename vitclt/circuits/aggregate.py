"""Class-level circuits: the graphs of many images of one class, merged and averaged.

Token positions hold different content in different images, so per image the nodes are first grouped
by what they are, keeping the paper's CLS/patch distinction:

- a feature by (layer, feature, CLS or patches),
- an error by (layer, CLS or patches), the embeddings by (CLS or patches),
- biases and the target as they are.

A group's edges are the sums of its members' edges (S A Sᵀ with S the 0/1 membership matrix), so a
grouped row still sums exactly to the group's value (the sum of its members' values) and the target's
row to the image's score. The class-level adjacency is the mean of the grouped adjacencies over images
(a group absent from an image counts as zero there), so its target row sums to the mean score; values
are means the same way, and `fraction` records in how many images each group occurs. It is pruned
with the same rule as one image's graph.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vitclt.circuits.errors import CircuitError
from vitclt.circuits.graph import BIAS, EMBEDDING, ERROR, FEATURE, TARGET, Graph

PATCHES = -2
"""`token_N` of a group that spans the patch tokens (CLS groups have token 0)."""


def group_keys(graph: Graph) -> list[tuple[int, int, int, int]]:
    """(kind, layer, feature, token group) of every node; the token group is 0 (CLS) or PATCHES."""
    n_prefix = int(graph.meta.get("n_prefix", 1))
    keys = []
    for k, layer, tok, f in zip(graph.kind_N.tolist(), graph.layer_N.tolist(), graph.token_N.tolist(), graph.feature_N.tolist()):
        group = -1 if tok < 0 else (0 if tok < n_prefix else PATCHES)
        keys.append((k, layer, f, group))
    return keys


def aggregate(graphs: Iterable[Graph]) -> Graph:
    """The class-level graph: grouped adjacencies averaged over `graphs` (see the module docstring)."""
    graphs = list(graphs)
    if not graphs:
        raise CircuitError("no graphs to aggregate: the class has no images in the chosen split")
    per_image = [group_keys(g) for g in graphs]
    order = {TARGET: 5, BIAS: 4, EMBEDDING: 3, ERROR: 2, FEATURE: 1}
    keys = sorted({k for ks in per_image for k in ks}, key=lambda k: (order[k[0]], k[1], k[2], -k[3]))
    pos = {k: i for i, k in enumerate(keys)}
    n = len(keys)
    A = torch.zeros(n, n, dtype=graphs[0].adjacency.dtype)
    value = torch.zeros(n, dtype=A.dtype)
    norm = torch.zeros(n, dtype=A.dtype)
    present = torch.zeros(n, dtype=A.dtype)
    for g, ks in zip(graphs, per_image):
        idx = torch.tensor([pos[k] for k in ks])
        S = torch.zeros(n, g.n, dtype=A.dtype)
        S[idx, torch.arange(g.n)] = 1
        A += S @ g.adjacency.to(A.dtype) @ S.T
        # Biases are shared by every token: their value stays 1 (they are one node per image).
        value += torch.where(g.kind_N == BIAS, 0.0, 1.0).to(A.dtype).mul(g.value_N.to(A.dtype)) @ S.T
        norm += g.norm_N.to(A.dtype) @ S.T
        present += S.any(1).to(A.dtype)
    m = len(graphs)
    kind = torch.tensor([k[0] for k in keys])
    value = torch.where(kind == BIAS, torch.ones_like(value), value / m)
    meta = dict(graphs[0].meta)
    meta.update(n_images=m, fraction=(present / m).tolist())
    return Graph(A / m, kind, torch.tensor([k[1] for k in keys]), torch.tensor([k[3] for k in keys]),
                 torch.tensor([k[2] for k in keys]), value, norm / m, meta)
