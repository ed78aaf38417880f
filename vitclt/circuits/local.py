"""The local replacement model of one image: MLPs → transcoder + error, attention and LayerNorms frozen.

For an image and a target direction d (targets.py: Σ_C w_C c_C over class vectors; one unit class
vector for the cosine), the clean forward (`tower.clean_forward`) fixes
every attention pattern A_ℓ, every LayerNorm scale σ (LN1, LN2 per token, LN_post of the CLS token) and
the norm |e₀| of the image embedding. Each MLP output is replaced by the transcoder's reconstruction
from the active features plus an error term,

    y_ℓ[t] = Σ_{i ∈ sources(ℓ)} Σ_{f active at (i, t)} a_{i,t,f} W^{i→ℓ}_f + b_dec_ℓ + err_ℓ[t],

so with the errors the model reproduces the clean forward exactly. Given the frozen quantities the
model is affine in the residual stream, and the target

    s = d · P(LN_post(h_L[CLS])) / |e₀|

is affine too; at this image s equals the target score Σ_C w_C cos(e₀, c_C) exactly. (Linearising the cosine
itself would not do: its gradient is orthogonal to e₀, so the linear terms would sum to zero.)

A feature's activation equals its pre-activation W_enc·(x − x_mean)/x_scale + b_enc whenever it is
active, for every sparsifier vitclt has (JumpReLU, ReLU-/Abs-/Batch-TopK), so holding the active set
fixed makes the features linear units too ("linear" mode below).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vitclt.circuits.errors import CircuitError
from vitclt.circuits.tower import CleanState, VisionWeights, clean_forward, frozen_attention, vision_weights


@dataclass
class ForwardResult:
    """What a forward of the local replacement model gives."""

    score: Tensor
    """The target s = d · e / |e₀| (the frozen-norm target score)."""
    embed_P: Tensor
    """The unnormalised image embedding e."""
    acts_LTK: Tensor
    """Feature activations in the padded slot layout (0 where inactive)."""


class LocalReplacement:
    """One image's local replacement model and the quantities attribution needs.

    `acts_LTK` / `index_LTK` / `active_LTK` are the transcoder's codes of every token, padded to K
    slots per (layer, token); activations are recomputed in `dtype` from the clean MLP inputs so that
    everything below is consistent to that precision.
    """

    def __init__(self, backbone, transcoder, pixels_3HW: Tensor, class_P: Tensor, dtype: torch.dtype = torch.float32):
        if transcoder.cfg.topology == "sae":
            raise CircuitError("an SAE reads the MLP output it rebuilds, so it cannot replace the MLP: "
                               "explain a clt or plt transcoder")
        self.dtype = dtype
        self.w: VisionWeights = vision_weights(backbone, dtype)
        self.tc = transcoder
        self.n_prefix = int(backbone.n_prefix_tokens)
        dev = self.w.W_proj_PD.device
        self.state: CleanState = clean_forward(self.w, pixels_3HW.to(dev))
        st = self.state
        L, T, D = st.x_LTD.shape
        self.L, self.T, self.D = L, T, D
        if (L, D) != (transcoder.n_layers, transcoder.d_model):
            raise CircuitError(f"transcoder expects {transcoder.n_layers} layers × width {transcoder.d_model}, the backbone "
                               f"has {L} × {D}: use a transcoder trained on this backbone")
        self.class_P = class_P.to(dev, dtype)
        self.norm0 = st.embed_P.norm()
        with torch.no_grad():
            codes = [transcoder.encode_layer(i, st.x_LTD[i].float()) for i in range(L)]
        K = max(c.indices_NK.shape[1] for c in codes)
        self.K = K
        self.index_LTK = torch.zeros(L, T, K, dtype=torch.long, device=dev)
        self.active_LTK = torch.zeros(L, T, K, dtype=torch.bool, device=dev)
        for i, c in enumerate(codes):
            k = c.indices_NK.shape[1]
            self.index_LTK[i, :, :k] = c.indices_NK
            self.active_LTK[i, :, :k] = c.values_NK != 0
        # Encoder and decoder in raw units and `dtype`: pre = x·W_encᵀ/x_scale + b_pre; write = a·W^{i→j}·y_scale_j.
        self.W_enc = [(transcoder.W_enc[i].detach().to(dtype) / transcoder.x_scale_L[i].to(dtype)) for i in range(L)]
        self.b_enc_LF = (transcoder.b_enc.detach().to(dtype)
                         - torch.stack([self.W_enc[i] @ transcoder.x_mean_LD[i].to(dtype) for i in range(L)]))
        self.b_dec_LD = transcoder.b_dec_LD.detach().to(dtype)
        self.acts_LTK = torch.stack([self.preactivation(i, st.x_LTD[i]) for i in range(L)]) * self.active_LTK
        self.err_LTD = st.y_LTD - self.reconstruction(self.acts_LTK)

    # The transcoder, in raw units -----------------------------------------------------------

    def decoder_rows(self, source: int, target: int) -> Tensor:
        """W_TKD: the raw decoder rows W^{source→target}·y_scale of the features in source's slots."""
        W = self.tc.decoder(source, target).detach().to(self.dtype) * self.tc.y_scale_L[target].to(self.dtype)
        return W[self.index_LTK[source]]

    def encoder_rows(self, layer: int) -> Tensor:
        """W_TKD: the raw encoder rows of the features in layer's slots (pre = x · row + bias)."""
        return self.W_enc[layer][self.index_LTK[layer]]

    def preactivation(self, layer: int, x_TD: Tensor) -> Tensor:
        """pre_TK: the slot features' pre-activations from raw MLP inputs."""
        bias_TK = self.b_enc_LF[layer][self.index_LTK[layer]]
        return torch.einsum("td,tkd->tk", x_TD, self.encoder_rows(layer)) + bias_TK

    def reconstruction(self, acts_LTK: Tensor) -> Tensor:
        """ŷ_LTD: the transcoder's reconstruction of every MLP output from slot activations (with b_dec)."""
        out = self.b_dec_LD[:, None].expand(self.L, self.T, self.D).clone()
        for j in range(self.L):
            for i in self.tc.sources(j):
                out[j] += torch.einsum("tk,tkd->td", acts_LTK[i], self.decoder_rows(i, j))
        return out

    def attention_bias(self, layer: int) -> Tensor:
        """k_D: what frozen attention adds at every token regardless of the stream (rows of A sum to 1)."""
        b = self.w.blocks[layer]
        return (b.W_v @ b.ln1.beta_D + b.b_v) @ b.W_o.T + b.b_o

    def target_vector(self) -> Tensor:
        """u_D: ∂s/∂h_L[CLS] with LN_post's σ and |e₀| frozen."""
        read_D = self.class_P @ self.w.W_proj_PD
        return self.w.post_ln.frozen_transposed(read_D[None], self.state.sigma_post[None])[0] / self.norm0

    def target_constant(self) -> Tensor:
        """The part of s that no node writes: d · (P β_post + b_proj) / |e₀|."""
        e = self.w.W_proj_PD @ self.w.post_ln.beta_D
        if self.w.b_proj_P is not None:
            e = e + self.w.b_proj_P
        return self.class_P @ e / self.norm0

    # Forward ------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, errors: bool = True, features: str = "frozen", override_LTK: Tensor | None = None) -> ForwardResult:
        """Run the local replacement model.

        `features`: "frozen" keeps every activation at its clean value; "linear" recomputes the active
        features from their pre-activations (the active set fixed). `override_LTK` (NaN = no override)
        clamps slots to given values. `errors=False` drops the error terms.
        """
        if features not in ("frozen", "linear"):
            raise CircuitError(f"features must be 'frozen' or 'linear', got {features!r}")
        st, w = self.state, self.w
        h = st.h0_TD.clone()
        acts = torch.zeros_like(self.acts_LTK)
        for ell, b in enumerate(w.blocks):
            h = h + frozen_attention(b, b.ln1.frozen(h, st.sigma1_LT[ell]), st.pattern_LATT[ell])
            if features == "linear":
                acts[ell] = self.preactivation(ell, b.ln2.frozen(h, st.sigma2_LT[ell])) * self.active_LTK[ell]
            else:
                acts[ell] = self.acts_LTK[ell]
            if override_LTK is not None:
                acts[ell] = torch.where(override_LTK[ell].isnan(), acts[ell], override_LTK[ell].to(acts))
            y = self.b_dec_LD[ell].expand(self.T, self.D).clone()
            for i in self.tc.sources(ell):
                y += torch.einsum("tk,tkd->td", acts[i], self.decoder_rows(i, ell))
            if errors:
                y = y + self.err_LTD[ell]
            h = h + y
        cls = h[0]
        e = w.post_ln.frozen(cls, st.sigma_post) @ w.W_proj_PD.T
        if w.b_proj_P is not None:
            e = e + w.b_proj_P
        return ForwardResult(self.class_P @ e / self.norm0, e, acts)
