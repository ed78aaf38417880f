"""The CLIP vision tower as explicit tensors: weights in one dtype, and a clean forward that records what gets frozen.

A HF `CLIPVisionTransformer` computes, for pixels of one image,

    h_0 = LN_pre(embed(pixels))                                  (T, D), CLS first
    block ℓ:  a = LN1(h);  h ← h + W_o·(A_ℓ (W_v a + b_v)) + b_o   (A_ℓ: softmax(q kᵀ/√d) per head)
              x_ℓ = LN2(h);  y_ℓ = mlp(x_ℓ);  h ← h + y_ℓ
    e = P · LN_post(h_L[CLS])                                    (P), the unnormalised image embedding

with LN(h) = γ ⊙ (h − mean h)/σ(h) + β, σ(h) = sqrt(var h + eps). `clean_forward` runs exactly this
(re-implemented so that the attention patterns A_ℓ and every σ can be read and later held fixed) and
`VisionWeights` holds the parameters it needs. The accessor reads `backbone.model.vision_model` of an
`HFClipBackbone`; other families would need the same parts (see docs/circuits.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitclt.circuits.errors import CircuitError


@dataclass
class Norm:
    """A LayerNorm's affine parameters and eps."""

    gamma_D: Tensor
    beta_D: Tensor
    eps: float

    def sigma(self, h_TD: Tensor) -> Tensor:
        """σ_T: the per-token scale this LayerNorm divides by."""
        return (h_TD.var(-1, unbiased=False) + self.eps).sqrt()

    def frozen(self, h_TD: Tensor, sigma_T: Tensor) -> Tensor:
        """LN with σ held at `sigma_T`: affine in h (equal to the true LN when sigma_T = σ(h))."""
        return (h_TD - h_TD.mean(-1, keepdim=True)) / sigma_T[..., None] * self.gamma_D + self.beta_D

    def frozen_transposed(self, g_TD: Tensor, sigma_T: Tensor) -> Tensor:
        """The transpose of the frozen LN's linear part applied to adjoints g (…, T, D): centre(γ ⊙ g / σ)."""
        out = g_TD * self.gamma_D / sigma_T[:, None]
        return out - out.mean(-1, keepdim=True)


@dataclass
class Block:
    """One encoder layer: LN1, attention projections, LN2 and the MLP module."""

    ln1: Norm
    W_q: Tensor
    b_q: Tensor
    W_k: Tensor
    b_k: Tensor
    W_v: Tensor
    b_v: Tensor
    W_o: Tensor
    b_o: Tensor
    n_heads: int
    ln2: Norm
    mlp: nn.Module


@dataclass
class VisionWeights:
    """The parameters of the vision path in one dtype (copies; the backbone is not touched)."""

    embeddings: nn.Module
    pre_ln: Norm
    blocks: list[Block]
    post_ln: Norm
    W_proj_PD: Tensor
    b_proj_P: Tensor | None
    dtype: torch.dtype

    @property
    def n_layers(self) -> int:
        """Number of blocks L."""
        return len(self.blocks)


def _norm(ln: nn.LayerNorm, dtype: torch.dtype) -> Norm:
    return Norm(ln.weight.detach().to(dtype), ln.bias.detach().to(dtype), float(ln.eps))


def vision_weights(backbone, dtype: torch.dtype = torch.float32) -> VisionWeights:
    """The vision tower's parts of a transformers CLIP backbone, cast to `dtype`.

    Raises `CircuitError` for a backbone without them (attribution needs the attention and LayerNorm
    weights, which only the CLIP adapter exposes so far).
    """
    model = getattr(backbone, "model", None)
    vm = getattr(model, "vision_model", None)
    if vm is None or not hasattr(vm, "pre_layrnorm") or not hasattr(model, "visual_projection"):
        raise CircuitError(f"backbone {getattr(backbone, 'name', backbone)!r} is not a transformers CLIP model; "
                           "attribution graphs need its attention and LayerNorm weights: use a CLIP backbone "
                           "(a hub id such as openai/clip-vit-base-patch32, a CLIPModel directory, or demo)")
    cast = lambda t: t.detach().to(dtype)  # noqa: E731
    blocks = []
    for layer in vm.encoder.layers:
        att = layer.self_attn
        blocks.append(Block(
            ln1=_norm(layer.layer_norm1, dtype),
            W_q=cast(att.q_proj.weight), b_q=cast(att.q_proj.bias), W_k=cast(att.k_proj.weight), b_k=cast(att.k_proj.bias),
            W_v=cast(att.v_proj.weight), b_v=cast(att.v_proj.bias), W_o=cast(att.out_proj.weight), b_o=cast(att.out_proj.bias),
            n_heads=int(att.num_heads), ln2=_norm(layer.layer_norm2, dtype), mlp=layer.mlp,
        ))
    proj = model.visual_projection
    return VisionWeights(
        embeddings=vm.embeddings, pre_ln=_norm(vm.pre_layrnorm, dtype), blocks=blocks, post_ln=_norm(vm.post_layernorm, dtype),
        W_proj_PD=cast(proj.weight), b_proj_P=None if proj.bias is None else cast(proj.bias), dtype=dtype,
    )


def attention_pattern(block: Block, a_TD: Tensor) -> Tensor:
    """pattern_ATT: softmax(q kᵀ / √d_head) per head (row t: where token t reads from)."""
    T, D = a_TD.shape
    A = block.n_heads
    q_ATE = (a_TD @ block.W_q.T + block.b_q).view(T, A, -1).transpose(0, 1)
    k_ATE = (a_TD @ block.W_k.T + block.b_k).view(T, A, -1).transpose(0, 1)
    return torch.softmax(q_ATE @ k_ATE.transpose(1, 2) * (D // A) ** -0.5, dim=-1)


def frozen_attention(block: Block, a_TD: Tensor, pattern_ATT: Tensor) -> Tensor:
    """Attention output with the pattern held at pattern_ATT: affine in the LN1 output a."""
    T, D = a_TD.shape
    v = (a_TD @ block.W_v.T + block.b_v).view(T, block.n_heads, -1).transpose(0, 1)
    return (pattern_ATT @ v).transpose(0, 1).reshape(T, D) @ block.W_o.T + block.b_o


def frozen_attention_transposed(block: Block, g_BTD: Tensor, pattern_ATT: Tensor) -> Tensor:
    """The transpose of the frozen attention's linear part (value → output path) applied to adjoints g."""
    B, T, D = g_BTD.shape
    A = block.n_heads
    go_BTAE = (g_BTD @ block.W_o).view(B, T, A, D // A)
    gv_BTD = torch.einsum("ats,btae->bsae", pattern_ATT, go_BTAE).reshape(B, T, D)
    return gv_BTD @ block.W_v


def mlp(block: Block, x_TD: Tensor, dtype: torch.dtype) -> Tensor:
    """The block's true MLP output in `dtype` (fc1 → activation → fc2, the HF CLIPMLP)."""
    m = block.mlp
    hidden = m.activation_fn(x_TD @ m.fc1.weight.to(dtype).T + m.fc1.bias.to(dtype))
    return hidden @ m.fc2.weight.to(dtype).T + m.fc2.bias.to(dtype)


@dataclass
class CleanState:
    """One image's clean forward: the inputs and frozen quantities of its local replacement model."""

    h0_TD: Tensor
    """Residual stream entering block 0 (after LN_pre): the token embeddings."""
    pattern_LATT: Tensor
    """Attention pattern of every layer and head."""
    sigma1_LT: Tensor
    """LN1 scale per layer and token."""
    sigma2_LT: Tensor
    """LN2 scale per layer and token."""
    x_LTD: Tensor
    """MLP inputs (LN2 outputs)."""
    y_LTD: Tensor
    """True MLP outputs."""
    sigma_post: Tensor
    """LN_post scale of the final CLS residual (a scalar)."""
    embed_P: Tensor
    """The unnormalised image embedding e."""


@torch.no_grad()
def clean_forward(w: VisionWeights, pixels_3HW: Tensor) -> CleanState:
    """Run the vision tower on one image in w.dtype, recording patterns, scales, MLP inputs and outputs."""
    emb = w.embeddings(pixels_3HW[None].to(w.embeddings.patch_embedding.weight.dtype))[0].to(w.dtype)
    h = w.pre_ln.frozen(emb, w.pre_ln.sigma(emb))
    h0 = h
    patterns, s1, s2, xs, ys = [], [], [], [], []
    for b in w.blocks:
        sig1 = b.ln1.sigma(h)
        a = b.ln1.frozen(h, sig1)
        pattern = attention_pattern(b, a)
        h = h + frozen_attention(b, a, pattern)
        sig2 = b.ln2.sigma(h)
        x = b.ln2.frozen(h, sig2)
        y = mlp(b, x, w.dtype)
        h = h + y
        patterns.append(pattern), s1.append(sig1), s2.append(sig2), xs.append(x), ys.append(y)
    cls = h[0]
    sig_post = w.post_ln.sigma(cls)
    e = w.post_ln.frozen(cls, sig_post) @ w.W_proj_PD.T
    if w.b_proj_P is not None:
        e = e + w.b_proj_P
    return CleanState(h0, torch.stack(patterns), torch.stack(s1), torch.stack(s2), torch.stack(xs), torch.stack(ys), sig_post, e)
