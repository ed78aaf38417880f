"""Attribution graphs: the direct linear effect of every node on every later node and on the target.

Nodes, in this order (the target last, as in circuit-tracer):

- **features**: every active (layer i, token t, feature f); value a = its activation. It writes
  a·W^{i→j}_f into the MLP output of every target layer j of the transcoder, at token t.
- **errors**: every (layer ℓ, token t); value 1, writing err_ℓ[t] = y_ℓ[t] − ŷ_ℓ[t] into MLP output ℓ.
- **embeddings**: every token t; value 1, writing h_0[t] (the residual stream entering block 0).
- **biases**: one per layer ℓ (value 1: the frozen attention's constant k_ℓ at every token, the
  decoder bias b_dec_ℓ at every token, and the constant part of layer ℓ's feature pre-activations:
  encoder bias, LN2's β and the input mean), plus one for the target's constant (LN_post's β).
- **target**: the class score s of `local.LocalReplacement`.

`adjacency[r, c]` is the direct effect of source c (its value included) on target r's pre-activation
(feature rows, and the last row for the target): the linear map from c's write to r's read along the
residual stream and the frozen attention's value→output paths, with no other node in between (paths
through MLPs go through the feature and error nodes, which are nodes themselves). Error, embedding
and bias rows are zero. Because the local replacement model is affine and every constant is a node,
each row sums exactly to its node's value: Σ_c adjacency[target, c] = s, and Σ_c adjacency[f, c] = a_f.

The rows are computed in batches by one backward sweep through the frozen layers: the adjoint of a
batch of reads is carried from the top layer down (MLPs are skipped, attention is transposed with its
frozen pattern, LayerNorms with their frozen σ) and dotted with every write it passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from vitclt.circuits.local import LocalReplacement
from vitclt.circuits.tower import frozen_attention_transposed

KINDS = ("feature", "error", "embedding", "bias", "target")
"""Node kinds; `Graph.kind_N` holds indices into this tuple."""
FEATURE, ERROR, EMBEDDING, BIAS, TARGET = range(5)


@dataclass
class Graph:
    """An attribution graph (see the module docstring for nodes and edges)."""

    adjacency: Tensor
    """(n, n): rows are targets (read), columns sources (write); direct effects, values included."""
    kind_N: Tensor
    """Node kind (index into KINDS)."""
    layer_N: Tensor
    """Layer (features, errors, biases; L for the target and its bias; −1 for embeddings)."""
    token_N: Tensor
    """Token position (−1 where the node spans all tokens)."""
    feature_N: Tensor
    """Feature index (−1 for other kinds)."""
    value_N: Tensor
    """Activation for features, 1 for errors, embeddings and biases, the score for the target."""
    norm_N: Tensor
    """Norm of the vector a node writes (a feature's decoder write summed over targets; an error's err)."""
    meta: dict = field(default_factory=dict)
    """Everything else the viewer shows: sizes, the target class, the image, the transcoder."""

    @property
    def n(self) -> int:
        """Number of nodes."""
        return int(self.kind_N.numel())

    @property
    def target(self) -> int:
        """Index of the target node (the last)."""
        return self.n - 1

    @property
    def score(self) -> float:
        """The target's value."""
        return float(self.value_N[-1])

    def per_unit(self) -> Tensor:
        """The adjacency per unit of each source's value (the linear map the features' values multiply)."""
        scale = torch.where(self.value_N != 0, self.value_N, torch.ones_like(self.value_N))
        scale = torch.where(self.kind_N == FEATURE, scale, torch.ones_like(scale))
        return self.adjacency / scale[None, :]

    def total_effect(self) -> Tensor:
        """Per unit of each node's value, its total effect on the target through every path of the linear graph.

        The row vector w (I − A')⁻¹ with w the target's indicator and A' = `per_unit()`: the graph's
        prediction of how much the target moves when a node's value moves by one and the features
        downstream respond linearly (active set fixed). The graph is a DAG, so the series ends.
        """
        Ap = self.per_unit()
        total = torch.zeros(self.n, dtype=Ap.dtype, device=Ap.device)
        current = torch.zeros_like(total)
        current[self.target] = 1
        for _ in range(self.n + 1):
            total += current
            current = current @ Ap
            if not bool(current.any()):
                return total
        raise RuntimeError("the adjacency is not acyclic")

    def node_id(self, i: int) -> str:
        """A stable text id: F<layer>_<feature>_<token>, E<layer>_<token>, T<token>, B<layer>, Y."""
        k, layer, tok = int(self.kind_N[i]), int(self.layer_N[i]), int(self.token_N[i])
        if k == FEATURE:
            return f"F{layer}_{int(self.feature_N[i])}_{tok}"
        if k == ERROR:
            return f"E{layer}_{tok}"
        if k == EMBEDDING:
            return f"T{tok}"
        if k == BIAS:
            return f"B{layer}"
        return "Y"

    def find(self, layer: int, token: int, feature: int) -> int | None:
        """Index of the feature node (layer, token, feature), None if that feature is not active there."""
        hit = ((self.kind_N == FEATURE) & (self.layer_N == layer) & (self.token_N == token) & (self.feature_N == feature))
        idx = torch.nonzero(hit).flatten()
        return int(idx[0]) if len(idx) else None


@torch.no_grad()
def attribute(model: LocalReplacement, batch_size: int = 256) -> Graph:
    """The attribution graph of a local replacement model (one backward sweep per batch of reads)."""
    L, T, K, D = model.L, model.T, model.K, model.D
    dev, dt = model.acts_LTK.device, model.dtype
    feat = torch.nonzero(model.active_LTK)  # (n_f, 3): layer, token, slot, ordered
    n_f = feat.shape[0]
    slot_col = torch.full((L, T, K), -1, dtype=torch.long, device=dev)
    slot_col[feat[:, 0], feat[:, 1], feat[:, 2]] = torch.arange(n_f, device=dev)
    err0, emb0, bias0 = n_f, n_f + L * T, n_f + L * T + T
    n = bias0 + L + 1 + 1
    A = torch.zeros(n, n, dtype=dt, device=dev)

    # Reads: every active feature's pre-activation at (layer, token), then the target at the top.
    read_layer = torch.cat([feat[:, 0], torch.tensor([L], device=dev)])
    read_token = torch.cat([feat[:, 1], torch.tensor([0], device=dev)])
    read_vec = torch.empty(n_f + 1, D, dtype=dt, device=dev)
    # Constants of each read go to its layer's bias node (the target's to the last bias).
    const = torch.empty(n_f + 1, dtype=dt, device=dev)
    for i in range(L):
        sel = feat[:, 0] == i
        rows = model.encoder_rows(i)[feat[sel, 1], feat[sel, 2]]
        read_vec[:n_f][sel] = model.w.blocks[i].ln2.frozen_transposed(rows, model.state.sigma2_LT[i, feat[sel, 1]])
        const[:n_f][sel] = rows @ model.w.blocks[i].ln2.beta_D + model.b_enc_LF[i, model.index_LTK[i, feat[sel, 1], feat[sel, 2]]]
    read_vec[-1] = model.target_vector()
    row_index = torch.cat([torch.arange(n_f, device=dev), torch.tensor([n - 1], device=dev)])
    const[-1] = model.target_constant()
    A[row_index, bias0 + read_layer] += const

    attn_bias = torch.stack([model.attention_bias(i) for i in range(L)])
    dec = {(i, j): model.decoder_rows(i, j) for j in range(L) for i in model.tc.sources(j)}
    acts = model.acts_LTK
    # Larger layers first, so that each batch's sweep starts at about its own layer.
    order = torch.argsort(read_layer, descending=True, stable=True)
    for start in range(0, n_f + 1, batch_size):
        idx = order[start : start + batch_size]
        B = len(idx)
        lay, tok, vec = read_layer[idx], read_token[idx], read_vec[idx]
        g = torch.zeros(B, T, D, dtype=dt, device=dev)
        feat_edges = torch.zeros(B, L, T, K, dtype=dt, device=dev)
        out = torch.zeros(B, n, dtype=dt, device=dev)
        arange = torch.arange(B, device=dev)
        top = int(lay.max())
        if top == L:
            m = lay == L
            g[arange[m], tok[m]] += vec[m]
        for ell in range(min(top, L - 1), -1, -1):
            # Writes into MLP output ℓ: features of every source layer, the errors, the decoder bias.
            for i in model.tc.sources(ell):
                feat_edges[:, i] += torch.einsum("btd,tkd->btk", g, dec[(i, ell)]) * acts[i]
            out[:, err0 + ell * T : err0 + (ell + 1) * T] = torch.einsum("btd,td->bt", g, model.err_LTD[ell])
            g_sum = g.sum(1)
            out[:, bias0 + ell] += g_sum @ model.b_dec_LD[ell]
            # Reads of layer ℓ's features start here (they see attention ℓ but not MLP ℓ).
            m = lay == ell
            if bool(m.any()):
                g[arange[m], tok[m]] += vec[m]
                g_sum = g.sum(1)
            out[:, bias0 + ell] += g_sum @ attn_bias[ell]
            b = model.w.blocks[ell]
            g_attn = frozen_attention_transposed(b, g, model.state.pattern_LATT[ell])
            g = g + b.ln1.frozen_transposed(g_attn, model.state.sigma1_LT[ell])
        out[:, emb0 : emb0 + T] = torch.einsum("btd,td->bt", g, model.state.h0_TD)
        out[:, :n_f] = feat_edges[:, feat[:, 0], feat[:, 1], feat[:, 2]]
        A[row_index[idx]] += out

    kind = torch.cat([torch.full((n_f,), FEATURE), torch.full((L * T,), ERROR), torch.full((T,), EMBEDDING),
                      torch.full((L + 1,), BIAS), torch.tensor([TARGET])])
    layer = torch.cat([feat[:, 0].cpu(), torch.arange(L).repeat_interleave(T), torch.full((T,), -1), torch.arange(L + 1),
                       torch.tensor([L])])
    token = torch.cat([feat[:, 1].cpu(), torch.arange(T).repeat(L), torch.arange(T), torch.full((L + 2,), -1)])
    feature = torch.cat([model.index_LTK[feat[:, 0], feat[:, 1], feat[:, 2]].cpu(), torch.full((L * T + T + L + 2,), -1)])
    score = model.forward().score
    value = torch.cat([acts[feat[:, 0], feat[:, 1], feat[:, 2]].cpu(), torch.ones(L * T + T + L + 1, dtype=dt),
                       score[None].cpu()])
    write_norm = torch.zeros(n_f, dtype=dt, device=dev)
    for (i, j), rows in dec.items():
        sel = feat[:, 0] == i
        write_norm[sel] += rows[feat[sel, 1], feat[sel, 2]].norm(dim=-1) ** 2
    norm = torch.cat([(write_norm.sqrt() * acts[feat[:, 0], feat[:, 1], feat[:, 2]].abs()).cpu(),
                      model.err_LTD.norm(dim=-1).flatten().cpu(), model.state.h0_TD.norm(dim=-1).cpu(),
                      torch.zeros(L + 2, dtype=dt)])
    return Graph(A.cpu(), kind, layer, token, feature, value, norm,
                 meta={"n_layers": L, "n_tokens": T, "n_prefix": model.n_prefix})
