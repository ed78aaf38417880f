"""Influence-based pruning of an attribution graph (after circuit-tracer's rule, stated exactly here).

1. **Influence.** Â is |adjacency| with each row divided by its sum (rows summing to 0 stay 0), so a
   node's incoming weights are shares of what reaches it. The influence of node j on the target is
   I_j = Σ_{k≥1} (w Âᵏ)_j with w the target's indicator: the share of the target flowing from j
   along all paths. (The sum over nodes may exceed 1: every path counts at every node on it.)
2. **Nodes.** Sort the non-target nodes by influence, largest first, and keep the shortest prefix
   whose influence reaches `node_fraction` of the total; the target is always kept. The kept
   fraction is therefore at least `node_fraction`, and dropping the weakest kept node would fall
   below it.
3. **Edges.** Among kept nodes, renormalise Â's rows and recompute the influence I' on this pruned
   graph; an edge j→i scores Â'[i, j]·(I'_i + w_i), i.e. the share of the target's influence it
   carries. Keep the shortest prefix of edges by score whose sum reaches `edge_fraction` of the total,
   plus, for every kept node that has one, its strongest outgoing edge into a kept node (so that no kept
   node is drawn without a way towards the target). No node is removed after edge pruning, so the
   node guarantee of step 2 holds for the final graph.

circuit-tracer (safety-research/circuit-tracer, `prune_graph`) uses the same normalisation, influence
and cumulative thresholds, always keeps tokens and logits, and then drops nodes left without edges;
here embeddings and biases compete like every other node and nothing is dropped afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vitclt.circuits.errors import CircuitError


@dataclass
class Pruned:
    """Which nodes and edges of a graph to keep, and how much influence they carry."""

    node_mask: Tensor
    """(n,) bool: kept nodes (the target included)."""
    edge_mask: Tensor
    """(n, n) bool over the adjacency: kept edges (both ends kept)."""
    influence: Tensor
    """(n,) influence of every node on the target (step 1), the target's own set to 1."""
    node_fraction: float
    """Share of the total influence carried by the kept nodes."""
    edge_fraction: float
    """Share of the pruned graph's total edge score carried by the kept edges."""


def normalize_rows(A: Tensor) -> Tensor:
    """|A| with every row divided by its sum (zero rows stay zero)."""
    absA = A.abs()
    return absA / absA.sum(1, keepdim=True).clamp_min(torch.finfo(absA.dtype).tiny)


def influence(A: Tensor, target: int) -> Tensor:
    """I_j = Σ_{k≥1} (w Âᵏ)_j: every node's share of the target along all paths (Â = `normalize_rows(A)`)."""
    An = normalize_rows(A)
    current = torch.zeros(A.shape[0], dtype=An.dtype)
    current[target] = 1
    total = torch.zeros_like(current)
    for _ in range(A.shape[0] + 1):
        current = current @ An
        if not bool(current.any()):
            return total
        total += current
    raise CircuitError("the graph has a cycle, so influence is undefined: it was not built by vitclt's attribution")


def _prefix_mask(scores: Tensor, fraction: float) -> tuple[Tensor, float]:
    """The shortest set of largest scores whose sum reaches `fraction` of the total, and the share it carries."""
    order = torch.argsort(scores, descending=True, stable=True)
    cum = torch.cumsum(scores[order], 0)
    mask = torch.zeros(len(scores), dtype=torch.bool)
    if len(scores) == 0 or float(cum[-1]) <= 0:
        return mask, 1.0
    total = float(cum[-1])
    need = int(torch.searchsorted(cum, fraction * total)) + 1
    # The share is reported as the cumulative sum that chose the prefix; step past rounding if it fell short.
    while need < len(cum) and float(cum[need - 1]) / total < fraction:
        need += 1
    need = min(need, len(cum))
    mask[order[:need]] = True
    return mask, float(cum[need - 1]) / total


def prune(A: Tensor, target: int, node_fraction: float = 0.8, edge_fraction: float = 0.98) -> Pruned:
    """Prune the graph with adjacency `A` towards node `target` (see the module docstring)."""
    for name, f in (("node_fraction", node_fraction), ("edge_fraction", edge_fraction)):
        if not 0 <= f <= 1:
            raise CircuitError(f"{name} must be between 0 and 1, got {f}")
    A = A.double()
    n = A.shape[0]
    infl = influence(A, target)
    others = torch.ones(n, dtype=torch.bool)
    others[target] = False
    node_mask = torch.zeros(n, dtype=torch.bool)
    chosen, kept_nodes = _prefix_mask(infl[others], node_fraction)
    node_mask[others.nonzero().flatten()[chosen]] = True
    node_mask[target] = True

    pruned = A * node_mask[:, None] * node_mask[None, :]
    An = normalize_rows(pruned)
    infl_p = influence(pruned, target)
    infl_p[target] += 1
    scores = An * infl_p[:, None]
    chosen, kept_edges = _prefix_mask(scores.flatten(), edge_fraction)
    edge_mask = chosen.view(n, n) & (scores > 0)
    # Every kept node keeps its strongest outgoing edge into a kept node.
    best_score, best_row = scores.max(0)
    has = (best_score > 0) & node_mask
    extra = torch.zeros_like(edge_mask)
    extra[best_row[has], has.nonzero().flatten()] = True
    extra &= ~edge_mask
    total_score = float(scores.sum())
    if total_score > 0:
        kept_edges += float(scores[extra].sum()) / total_score
    edge_mask |= extra
    infl[target] = 1
    return Pruned(node_mask, edge_mask, infl, kept_nodes, kept_edges)
