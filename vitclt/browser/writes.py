"""What a feature writes: its effect on the image embedding through every later layer, read by the text tower.

A feature f of source layer i that fires with activation a at token t adds a·W_f^{i→j} to the MLP
output of every target layer j ≥ i at that token. Through all later layers (attention, MLPs,
LayerNorms, the final norm, the projection and the embedding's own normalisation) the normalised
image embedding ê moves, to first order, by

    a · Σ_{j≥i} J_j(x, t) W_f^{i→j},        J_j(x, t) = ∂ê / ∂y_j[t]  (P × D),

at the feature's own images. `jacobian_writes` averages that over the feature's top images and
the tokens where it fires, weighted by its activation there: w_f = Σ_{x,t} a·J W / Σ_{x,t} a, one
unit of the feature. The Jacobians come from P backward passes per batch of images, with a zero
perturbation added to every MLP output (`Backbone.replace`), contracted with the decoder rows of
the features whose top images are in the batch.

Labels are the concepts whose text vectors, normalised and then centred on their mean (so the
direction every caption shares does not dominate), have the largest cosine with w_f. Each label's
shuffled baseline is the mean cosine of the same concept over the features of the same layer; a
label is shown when its cosine beats the 99th percentile of the cosines of random isotropic
directions with that concept (what noise would score).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from vitclt.backbones import Backbone
from vitclt.browser.collect import TopList
from vitclt.browser.concepts import ConceptLabels
from vitclt.nn.transcoder import Transcoder


def differentiable_embedding(backbone: Backbone) -> Callable[[Tensor], Tensor] | None:
    """pixels_B3HW → the normalised image embedding, with gradients, for an HF CLIP backbone; else None.

    `Backbone.image_embeds` runs under inference mode; this calls the same modules outside it.
    """
    model = getattr(backbone, "model", None)
    vision, proj = getattr(model, "vision_model", None), getattr(model, "visual_projection", None)
    if vision is None or proj is None:
        return None

    def embed(pixels_B3HW: Tensor) -> Tensor:
        out = vision(pixel_values=pixels_B3HW.to(backbone.device, model.dtype))
        pooled = out if isinstance(out, Tensor) else out.pooler_output
        return F.normalize(_upcast(proj(pooled)), dim=-1)

    return embed


def _upcast(t: Tensor) -> Tensor:
    """Half precision → float32; float32 and float64 stay (so float64 checks stay exact)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def raw_decoders(transcoder: Transcoder) -> Tensor:
    """W_LLFD: W^{i→j} in raw units at [i, j] (zero where i does not write to j)."""
    tc = transcoder
    out = torch.zeros(tc.n_layers, tc.n_layers, tc.n_features, tc.d_model, dtype=_upcast(tc.decoder(0, 0)).dtype)
    for i in range(tc.n_layers):
        for j in tc.targets(i):
            out[i, j] = (_upcast(tc.decoder(i, j).detach()) * tc.y_scale_L[j]).cpu()
    return out


def embedding_jacobians(backbone: Backbone, embed: Callable[[Tensor], Tensor], pixels_B3HW: Tensor) -> Tensor:
    """J_BPTLD: ∂ê_p / ∂y_ℓ[t], the normalised embedding's derivative w.r.t. every MLP output at every token."""
    L = backbone.n_layers
    B, T, D = pixels_B3HW.shape[0], backbone.n_tokens, backbone.d_model
    deltas = [torch.zeros(B, T, D, device=backbone.device, requires_grad=True) for _ in range(L)]

    def add(layer: int, x_BTD: Tensor, y_BTD: Tensor) -> Tensor:
        return y_BTD + deltas[layer].to(y_BTD.dtype)

    with torch.enable_grad(), backbone.replace(add, range(L)):
        e_BP = embed(pixels_B3HW)
        P = e_BP.shape[1]
        rows = []
        # One backward per embedding coordinate (a vmapped backward is slower here); images are independent, so
        # the gradient of the batch sum is each image's own.
        for p in range(P):
            grads = torch.autograd.grad(e_BP[:, p].sum(), deltas, retain_graph=p < P - 1)
            rows.append(torch.stack([_upcast(g.detach()).cpu() for g in grads], 2))  # (B, T, L, D)
    return torch.stack(rows, 1)


@torch.no_grad()
def _accumulate(J_BPTLD: Tensor, W_LLFD: Tensor, top: TopList, batch_ids: Tensor, w_LFP: Tensor, mass_LF: Tensor) -> None:
    """Add Σ_t a·J W of every (feature, top image) entry whose image is in this batch."""
    in_batch = torch.isin(top.image_LFK, batch_ids) & torch.isfinite(top.score_LFK)
    layer_N, feat_N, slot_N = torch.nonzero(in_batch, as_tuple=True)
    if len(layer_N) == 0:
        return
    pos = {int(i): b for b, i in enumerate(batch_ids.tolist())}
    b_N = torch.tensor([pos[int(i)] for i in top.image_LFK[layer_N, feat_N, slot_N].tolist()])
    a_NT = top.tokens_LFKT[layer_N, feat_N, slot_N].to(J_BPTLD.dtype).clamp_min(0)
    B, P, T, L, D = J_BPTLD.shape
    for b in b_N.unique().tolist():
        sel = b_N == b
        # J(x, t) times the decoder rows of each entry's feature to every target layer (one GEMM), then Σ_t a_t.
        W_NLD = W_LLFD[layer_N[sel], :, feat_N[sel]].to(J_BPTLD.dtype)
        JW_PTN = (J_BPTLD[b].reshape(P * T, L * D) @ W_NLD.reshape(-1, L * D).T).view(P, T, -1)
        w_NP = torch.einsum("et,pte->ep", a_NT[sel], JW_PTN)
        w_LFP.index_put_((layer_N[sel], feat_N[sel]), w_NP, accumulate=True)
        mass_LF.index_put_((layer_N[sel], feat_N[sel]), a_NT[sel].sum(1), accumulate=True)


def jacobian_writes(backbone: Backbone, transcoder: Transcoder, data, top: TopList, batch_size: int = 32,
                    progress: bool = True) -> Tensor | None:
    """w_LFP: each feature's activation-weighted effect per unit on the normalised image embedding, at its top images.

    `data[i]` gives image i as `(PIL image, label)` for the indices in `top.image_LFK`; None when the
    backbone has no differentiable embedding (no text tower to read the write with).
    """
    embed = differentiable_embedding(backbone)
    if embed is None:
        return None
    W_LLFD = raw_decoders(transcoder)
    L, F_ = transcoder.n_layers, transcoder.n_features
    valid = torch.isfinite(top.score_LFK)
    ids = top.image_LFK[valid].unique()
    w_LFP = mass_LF = None
    for start in tqdm(range(0, len(ids), batch_size), desc="write Jacobians", unit="batch", disable=not progress):
        batch = ids[start : start + batch_size]
        pixels = backbone.preprocess([data[int(i)][0] for i in batch])
        J = embedding_jacobians(backbone, embed, pixels)
        if w_LFP is None:
            w_LFP, mass_LF = torch.zeros(L, F_, J.shape[1], dtype=J.dtype), torch.zeros(L, F_, dtype=J.dtype)
        _accumulate(J, W_LLFD, top, batch, w_LFP, mass_LF)
    if w_LFP is None:
        return None
    return w_LFP / mass_LF.clamp_min(1e-12)[..., None]


def centred(text_VP: Tensor) -> Tensor:
    """Text vectors normalised, centred on their mean, and normalised again."""
    t = F.normalize(text_VP.float(), dim=-1)
    return F.normalize(t - t.mean(0, keepdim=True), dim=-1)


def writes_labels(w_LFP: Tensor, text_VP: Tensor, alive_LF: Tensor, k: int = 5, draws: int = 1000,
                  seed: int = 0) -> ConceptLabels:
    """Top-k concepts of every feature by cosine of its write `w_LFP` with centred text vectors."""
    t_VP = centred(text_VP)
    cos_LFV = F.normalize(w_LFP.float(), dim=-1) @ t_VP.T
    k = min(k, t_VP.shape[0])
    score, index = cos_LFV.topk(k, dim=-1)
    alive = alive_LF.float()[..., None]
    base_LV = (cos_LFV * alive).sum(1) / alive.sum(1).clamp_min(1)
    g = torch.Generator().manual_seed(seed)
    noise_RV = F.normalize(torch.randn(draws, t_VP.shape[1], generator=g), dim=-1) @ t_VP.T
    thr_V = noise_RV.quantile(0.99, dim=0)
    return ConceptLabels(index, score, base_LV.gather(1, index.flatten(1)).view_as(score), thr_V[index])
