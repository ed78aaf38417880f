"""Where each feature writes: decoder norms per target layer, its net residual write, and its nearest features."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vitclt.nn.transcoder import Transcoder


@torch.no_grad()
def residual_writes(transcoder: Transcoder) -> Tensor:
    """u_LFD = Σ_j W^{i→j} in raw units: what one unit of each feature adds to the residual stream.

    MLP outputs of every layer add into the same residual stream, so summing a feature's decoders
    over its target layers gives its net write there (to first order); it is comparable across
    source layers and topologies (for a PLT or SAE it is the one decoder row).
    """
    tc = transcoder
    u = torch.zeros(tc.n_layers, tc.n_features, tc.d_model, device=tc.b_dec.device)
    for i in range(tc.n_layers):
        for j in tc.targets(i):
            u[i] += tc.decoder(i, j).detach().float() * tc.y_scale_L[j]
    return u


@torch.no_grad()
def decoder_norms(transcoder: Transcoder) -> Tensor:
    """norms_LFJ: ‖W^{i→j}‖ of every feature in raw units (zero where layer i does not write to j)."""
    tc = transcoder
    out = torch.zeros(tc.n_layers, tc.n_features, tc.n_layers)
    for i in range(tc.n_layers):
        for j in tc.targets(i):
            out[i, :, j] = (tc.decoder(i, j).detach().float() * tc.y_scale_L[j]).norm(dim=-1).cpu()
    return out


def later_fraction(norms_LFJ: Tensor) -> Tensor:
    """later_LF: the share of a feature's decoder norm that goes to layers after its own."""
    L = norms_LFJ.shape[0]
    later_LJ = torch.arange(L)[None, :] > torch.arange(L)[:, None]
    total = norms_LFJ.sum(-1).clamp_min(1e-12)
    return (norms_LFJ * later_LJ[:, None, :]).sum(-1) / total


class Neighbours(NamedTuple):
    """Nearest features by cosine of their residual write directions; index −1 where there is none."""

    same_LFK: Tensor
    """Feature indices in the same layer."""
    same_cos_LFK: Tensor
    """Their cosines."""
    other_layer_LFK: Tensor
    """Layers of the nearest features in other layers."""
    other_LFK: Tensor
    """Their feature indices."""
    other_cos_LFK: Tensor
    """Their cosines."""


@torch.no_grad()
def nearest_features(u_LFD: Tensor, alive_LF: Tensor, n: int = 5, chunk: int = 4096) -> Neighbours:
    """The n nearest live features of every feature, in its own layer and in the others, by write direction.

    Cosines are computed in row chunks of the (L·F, L·F) similarity, so memory stays at chunk × L·F.
    """
    L, F_, D = u_LFD.shape
    flat = F.normalize(u_LFD.reshape(L * F_, D).float(), dim=-1)
    layer_of = torch.arange(L, device=flat.device).repeat_interleave(F_)
    alive = alive_LF.reshape(-1).to(flat.device)
    n_same, n_other = min(n, F_ - 1), min(n, (L - 1) * F_)
    same_i, same_c, other_i, other_c = [], [], [], []
    for start in range(0, L * F_, chunk):
        rows = torch.arange(start, min(start + chunk, L * F_), device=flat.device)
        sim = flat[rows] @ flat.T
        sim[:, ~alive] = -torch.inf
        sim[torch.arange(len(rows)), rows] = -torch.inf
        same = layer_of[rows][:, None] == layer_of[None, :]
        c, i = sim.masked_fill(~same, -torch.inf).topk(n_same, dim=1)
        same_c.append(c)
        same_i.append(i)
        if n_other > 0:
            c, i = sim.masked_fill(same, -torch.inf).topk(n_other, dim=1)
        else:
            c, i = sim.new_zeros(len(rows), 0), rows.new_zeros(len(rows), 0)
        other_c.append(c)
        other_i.append(i)
    same_i, same_c = torch.cat(same_i), torch.cat(same_c)
    other_i, other_c = torch.cat(other_i), torch.cat(other_c)
    same_i = torch.where(torch.isfinite(same_c), same_i % F_, -1)
    other_layer = torch.where(torch.isfinite(other_c), other_i // F_, -1)
    other_i = torch.where(torch.isfinite(other_c), other_i % F_, -1)
    return Neighbours(
        *(t.reshape(L, F_, -1).cpu() for t in (same_i, same_c, other_layer, other_i, other_c))
    )
