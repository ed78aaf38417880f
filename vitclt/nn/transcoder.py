"""The transcoder: cross-layer (CLT), per-layer (PLT) and SAE topologies from one code path.

Layer ℓ's encoder reads x_ℓ (the LN2 output, i.e. the MLP input; the MLP output y_ℓ for an
SAE) and writes a sparse code z_ℓ. Each decoder W^{i→j} maps source layer i's code into
target layer j's MLP output:

    ŷ_j = Σ_{i ∈ sources(j)} z_i W^{i→j} + b_dec_j,

with sources(j) = {0..j} for a CLT and {j} for a PLT or SAE. Decoders are stored one (F, D)
matrix per (i → j) pair, ``W_dec[i][j - first_target(i)]`` (`decoder(i, j)`). (One tensor per
pair keeps every gradient a small, reusable allocation: with a per-source tensor the step spends
more time page-faulting fresh gradients than computing them, see bench/train_throughput.py.)

Inputs and targets are normalised per layer (mean per dimension, one scale per layer) inside
the model; checkpoints are always written with the statistics folded into the weights, so a
saved transcoder maps raw activations to raw activations. Folding, the checkpoint format and
circuit-tracer's export live in `vitclt.nn.formats`; the methods here call them.

Running statistics (a TopK sparsifier's threshold) change only inside a training step: a
``forward(x, y)`` in train mode with gradients enabled. ``encode``, ``decode`` and an eval-mode
or no-grad forward never change the model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitclt.nn import formats
from vitclt.nn.config import TranscoderConfig
from vitclt.nn.formats import CheckpointError
from vitclt.nn.sparse import (
    Codes,
    LayerCodes,
    bag,
    dense_decode,
    gathered_linear,
    prefer_dense_decode,
    sparse_decode,
    stack_codes,
)
from vitclt.nn.sparsifiers import SPARSIFIERS, JumpReLU, Sparsifier, TopKSparsifier


class ForwardOutput(NamedTuple):
    """What one training forward returns; ``loss`` is what to backpropagate."""

    codes: Codes
    """Sparse codes of every layer (indices also serve dead-feature tracking)."""
    recon_NLD: Tensor
    """Reconstruction of the MLP outputs, in raw activation units."""
    fvu_L: Tensor
    """Fraction of variance unexplained per target layer."""
    fvu: Tensor
    """Sum of fvu_L over layers."""
    sparsity_loss: Tensor
    """JumpReLU L0 penalty, already scaled by its coefficient (0 otherwise)."""
    auxk_loss: Tensor
    """AuxK loss on dead features, already scaled by auxk_alpha (0 when none are dead)."""
    l0_L: Tensor
    """Mean number of nonzero features per row, per layer."""
    loss: Tensor
    """fvu + sparsity_loss + auxk_loss."""


class Transcoder(nn.Module):
    """A sparse transcoder over all MLP blocks of a transformer; see the module docstring."""

    def __init__(
        self,
        cfg: TranscoderConfig,
        device: torch.device | str | None = None,
        *,
        initialize: bool = True,
    ) -> None:
        """Build from a config; ``initialize=False`` leaves the weights unset (for loading)."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        L, D, n_feat = cfg.n_layers, cfg.d_model, cfg.features
        self.pairs: list[tuple[int, int]] = [(i, j) for i in range(L) for j in self.targets(i)]
        self.W_enc = nn.ParameterList(
            [nn.Parameter(torch.empty(n_feat, D, device=device)) for _ in range(L)]
        )
        self.b_enc = nn.Parameter(torch.zeros(L, n_feat, device=device))
        self.W_dec = nn.ModuleList(
            nn.ParameterList(
                [nn.Parameter(torch.empty(n_feat, D, device=device)) for _ in self.targets(i)]
            )
            for i in range(L)
        )
        self.b_dec = nn.Parameter(torch.zeros(L, D, device=device))
        self.register_buffer("x_mean_LD", torch.zeros(L, D, device=device))
        self.register_buffer("x_scale_L", torch.ones(L, device=device))
        self.register_buffer("y_mean_LD", torch.zeros(L, D, device=device))
        self.register_buffer("y_scale_L", torch.ones(L, device=device))
        self.sparsifier = self._make_sparsifier().to(device)
        if initialize:
            self.reset_parameters()

    def _make_sparsifier(self) -> Sparsifier:
        cfg = self.cfg
        if cfg.sparsifier == "jumprelu":
            return JumpReLU(
                cfg.n_layers,
                cfg.features,
                bandwidth=cfg.jumprelu_bandwidth,
                init_threshold=cfg.jumprelu_init_threshold,
                sparsity_coefficient=cfg.sparsity_coefficient,
            )
        return SPARSIFIERS[cfg.sparsifier](
            cfg.n_layers, cfg.features, cfg.k_layers, threshold_ema=cfg.threshold_ema
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Small uniform decoders; each encoder row is its diagonal decoder row at unit norm.

        The decoder scale keeps the initial reconstruction of a CLT target, summed over up to
        n_layers sources, well below the (unit per dimension) target variance; unit encoder
        rows make the initial pre-activations about standard normal on normalised inputs.
        """
        n_sources = self.cfg.n_layers if self.cfg.topology == "clt" else 1
        bound = 1.0 / math.sqrt(n_sources * self.cfg.d_model)
        for decoders in self.W_dec:
            for W in decoders:
                W.uniform_(-bound, bound)
        for i, W in enumerate(self.W_enc):
            W.copy_(F.normalize(self.W_dec[i][0], dim=1))
        self.b_enc.zero_()
        self.b_dec.zero_()

    # Structure -------------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        """Number of layers L."""
        return self.cfg.n_layers

    @property
    def d_model(self) -> int:
        """Activation width D."""
        return self.cfg.d_model

    @property
    def n_features(self) -> int:
        """Features per layer F."""
        return self.cfg.features

    def targets(self, source: int) -> list[int]:
        """Layers that source layer ``source`` writes to."""
        if self.cfg.topology == "clt":
            return list(range(source, self.cfg.n_layers))
        return [source]

    def sources(self, target: int) -> list[int]:
        """Layers that write into target layer ``target``, in order."""
        if self.cfg.topology == "clt":
            return list(range(target + 1))
        return [target]

    def decoder(self, source: int, target: int) -> Tensor:
        """The (F, D) decoder W^{source→target} in normalised units."""
        if target not in self.targets(source):
            raise ValueError(
                f"a {self.cfg.topology} has no decoder from layer {source} to layer {target}"
            )
        return self.W_dec[source][target - source if self.cfg.topology == "clt" else 0]

    def decoder_weights(self) -> list[Tensor]:
        """All (F, D) decoders in ``self.pairs`` order."""
        return [W for decoders in self.W_dec for W in decoders]

    @property
    def sparsity_coefficient(self) -> float | Tensor:
        """JumpReLU L0 penalty coefficient λ, one number or one per layer (the trainer schedules it; unused by TopK)."""
        return self.sparsifier.sparsity_coefficient

    @sparsity_coefficient.setter
    def sparsity_coefficient(self, value: float | Tensor) -> None:
        # A per-layer tensor stays on the device: the trainer's controller updates it without a sync.
        self.sparsifier.sparsity_coefficient = value if isinstance(value, Tensor) else float(value)

    # Normalisation ---------------------------------------------------------------------

    @staticmethod
    def normalization_stats(a_NLD: Tensor) -> tuple[Tensor, Tensor]:
        """Per-layer (mean_LD, scale_L) of a sample: scale = RMS per dimension after centring."""
        a = a_NLD.float()
        mean_LD = a.mean(0)
        scale_L = (a - mean_LD).pow(2).mean((0, 2)).sqrt().clamp_min(1e-8)
        return mean_LD, scale_L

    @torch.no_grad()
    def set_normalization(
        self,
        x_mean_LD: Tensor | None,
        x_scale_L: Tensor | None,
        y_mean_LD: Tensor,
        y_scale_L: Tensor,
    ) -> None:
        """Set input and target statistics (an SAE's input is its target: x stats are ignored)."""
        if self.cfg.topology == "sae":
            x_mean_LD, x_scale_L = y_mean_LD, y_scale_L
        if x_mean_LD is None or x_scale_L is None:
            raise ValueError("input statistics are required for clt and plt transcoders")
        L, D = self.n_layers, self.d_model
        for name, t, shape in (
            ("x_mean_LD", x_mean_LD, (L, D)),
            ("x_scale_L", x_scale_L, (L,)),
            ("y_mean_LD", y_mean_LD, (L, D)),
            ("y_scale_L", y_scale_L, (L,)),
        ):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
            getattr(self, name).copy_(t)

    def _normalize_input(self, a_NLD: Tensor) -> Tensor:
        return (a_NLD.float() - self.x_mean_LD) / self.x_scale_L[:, None]

    def _normalize_target(self, y_NLD: Tensor) -> Tensor:
        return (y_NLD.float() - self.y_mean_LD) / self.y_scale_L[:, None]

    def folded_state(self) -> dict[str, Tensor]:
        """The state dict with the normalisation folded into the weights (new tensors, no grad).

        Encoder: pre = ((x − μ_x)/s_x)·Wᵀ + b = x·(W/s_x)ᵀ + (b − W·μ_x/s_x), so thresholds on the
        pre-activations stay valid. Decoder: ŷ_raw = s_y·(Σ z W + b) + μ_y.
        """
        with torch.no_grad():
            state = {k: v.detach() for k, v in self.state_dict().items()}
            sx, mx = self.x_scale_L, self.x_mean_LD
            sy, my = self.y_scale_L, self.y_mean_LD
            W_enc = [W.detach() for W in self.W_enc]
            for i, W_FD in enumerate(W_enc):
                state[f"W_enc.{i}"] = W_FD / sx[i]
            state["b_enc"] = self.b_enc.detach() - torch.stack([W_FD @ mx[i] for i, W_FD in enumerate(W_enc)]) / sx[:, None]
            for i, decoders in enumerate(self.W_dec):
                for t, j in enumerate(self.targets(i)):
                    state[f"W_dec.{i}.{t}"] = decoders[t].detach() * sy[j]
            state["b_dec"] = self.b_dec.detach() * sy[:, None] + my
            state["x_mean_LD"] = torch.zeros_like(mx)
            state["x_scale_L"] = torch.ones_like(sx)
            state["y_mean_LD"] = torch.zeros_like(my)
            state["y_scale_L"] = torch.ones_like(sy)
        return state

    def fold_normalization(self) -> None:
        """Fold the statistics into W_enc, b_enc, W_dec, b_dec and reset them to identity.

        Changes no output. Do it when training is over (optimiser moments refer to the
        unfolded scale); ``save_pretrained`` saves a folded copy without touching the model.
        """
        folded = self.folded_state()
        with torch.no_grad():
            for name, tensor in self.state_dict().items():
                tensor.copy_(folded[name])

    @property
    def b_dec_LD(self) -> Tensor:
        """Decoder bias in raw activation units (equals b_dec once normalisation is folded)."""
        return self.b_dec * self.y_scale_L[:, None] + self.y_mean_LD

    @torch.no_grad()
    def init_thresholds(self, x_NLD: Tensor, y_NLD: Tensor) -> None:
        """JumpReLU: start at about k active features per row and layer on this sample of raw rows.

        Per-feature thresholds are quantiles of the initial encoder's pre-activations on the
        sample (`JumpReLU.fit_threshold`), with the config's k (per layer) as the target L0;
        a fixed threshold would keep a fixed fraction of F instead (16% at θ = 1, which made
        the first steps of a wide JumpReLU CLT decode hundreds of features per row). Call it
        after `set_normalization`, before training, with a few thousand rows (an SAE reads
        y_NLD, like `forward`). Other sparsifiers are left unchanged.
        """
        if not isinstance(self.sparsifier, JumpReLU):
            return
        if self.cfg.topology == "sae":
            x_NLD = y_NLD
        self._check_shape("x", x_NLD)
        xn_NLD = self._normalize_input(x_NLD)
        for layer, k in enumerate(self.cfg.k_layers):
            pre_NF = F.linear(xn_NLD[:, layer], self.W_enc[layer], self.b_enc[layer])
            self.sparsifier.fit_threshold(layer, pre_NF, k)

    @torch.no_grad()
    def match_l0(self, x_NLD: Tensor, y_NLD: Tensor) -> list[float]:
        """JumpReLU: scale each layer's thresholds by one factor so this sample of raw rows has L0 = k per layer.

        The end of a run steered to L0 = k (`vitclt.training.sparsity`) trims the controller's last
        error this way (`JumpReLU.scale_threshold`). Returns the factor per layer; other sparsifiers
        are left unchanged (an empty list).
        """
        if not isinstance(self.sparsifier, JumpReLU):
            return []
        if self.cfg.topology == "sae":
            x_NLD = y_NLD
        self._check_shape("x", x_NLD)
        xn_NLD = self._normalize_input(x_NLD)
        return [self.sparsifier.scale_threshold(layer, F.linear(xn_NLD[:, layer], self.W_enc[layer], self.b_enc[layer]), k)
                for layer, k in enumerate(self.cfg.k_layers)]

    # Encoding --------------------------------------------------------------------------

    def _encode_layer(
        self, layer: int, x_ND: Tensor, dead_F: Tensor | None = None, update_stats: bool = False
    ) -> tuple[LayerCodes, LayerCodes | None, Tensor]:
        """Codes, AuxK codes (or None) and sparsity penalty of one layer from normalised input.

        ``dead_F``: the layer's dead features, for AuxK (None: no AuxK; the caller passes None for a
        layer without dead features, and for a sparsifier other than the TopK family).
        ``update_stats``: let the sparsifier update its running statistics (training steps only).
        """
        W_FD, b_F = self.W_enc[layer], self.b_enc[layer]
        sparse = self.cfg.sparse_encoder and torch.is_grad_enabled()
        if sparse:
            with torch.no_grad():
                pre_NF = F.linear(x_ND, W_FD, b_F)
        else:
            pre_NF = F.linear(x_ND, W_FD, b_F)
        selection = self.sparsifier.select(pre_NF.detach(), layer, update_stats)
        indices_NK = selection.indices_NK
        aux = None
        if dead_F is not None:
            aux = self.sparsifier.select_aux(pre_NF.detach(), dead_F, self.cfg.auxk_k or self.d_model // 2)
            indices_NK = torch.cat([indices_NK, aux.indices_NK], 1)
        if sparse:
            pre_NK = gathered_linear(x_ND, W_FD, b_F, indices_NK, pre_NF)
        else:
            pre_NK = pre_NF.gather(1, indices_NK)
        n_main = selection.indices_NK.shape[1]
        main_NK = pre_NK[:, :n_main]
        codes = LayerCodes(self.sparsifier.activate(main_NK, selection, layer), selection.indices_NK)
        penalty = self.sparsifier.penalty(main_NK, selection, layer)
        aux_codes = None
        if aux is not None:
            aux_codes = LayerCodes(
                self.sparsifier.activate(pre_NK[:, n_main:], aux, layer), aux.indices_NK
            )
        return codes, aux_codes, penalty

    def encode_layer(self, layer: int, x_ND: Tensor) -> LayerCodes:
        """Codes of one layer from its raw input (LN2 output; MLP output for an SAE)."""
        x_ND = (x_ND.float() - self.x_mean_LD[layer]) / self.x_scale_L[layer]
        return self._encode_layer(layer, x_ND)[0]

    def encode(self, x_NLD: Tensor) -> Codes:
        """Codes of every layer from raw inputs (LN2 outputs; MLP outputs for an SAE)."""
        self._check_shape("input", x_NLD)
        x_NLD = self._normalize_input(x_NLD)
        return stack_codes([self._encode_layer(i, x_NLD[:, i])[0] for i in range(self.n_layers)])

    def feature_activations(self, x_NLD: Tensor) -> Tensor:
        """acts_NLF: every feature's activation on every row and layer (dense; zeros where inactive).

        The dense form of ``encode(x_NLD)``: N·L·F floats, so for a few rows at a time.
        """
        return self.encode(x_NLD).to_dense(self.n_features)

    # Decoding --------------------------------------------------------------------------

    def _decoder(self, codes: Codes, dense: bool = False):
        """The decode for these codes: sparse unless asked, configured, or cheaper densely.

        The codes' width decides (`prefer_dense_decode`): both paths give the same result, so a
        wide code (JumpReLU with a large L0, AuxK) takes the dense matmul instead of a slow gather.
        """
        width = codes.values_NLK.shape[-1]
        if dense or not self.cfg.sparse_decode or prefer_dense_decode(width, self.n_features, self.b_dec.device):
            return dense_decode
        return functools.partial(sparse_decode, zero_values_have_gradients=self.sparsifier.zero_values_have_gradients)

    def _decode_normalized(self, codes: Codes, dense: bool = False) -> Tensor:
        """Σ_i z_i W^{i→j} + b_dec_j in normalised units."""
        out_NLD = self._decoder(codes, dense)(codes, self.decoder_weights(), self.pairs, self.n_layers)
        return out_NLD + self.b_dec

    def decode(self, codes: Codes, dense: bool = False) -> Tensor:
        """Reconstruction of every layer's MLP output in raw units; dense=True is the reference path."""
        return self._decode_normalized(codes, dense) * self.y_scale_L[:, None] + self.y_mean_LD

    def contributions(self, codes: Codes) -> Tensor:
        """c_NIJD[:, i, j] = z_i W^{i→j} in raw units: source layer i's term in target layer j (zero where
        there is no decoder).

        ``c_NIJD.sum(1) + b_dec_LD == decode(codes)``. N·L·L·D floats: for a few rows at a time.
        """
        n, L = codes.values_NLK.shape[0], self.n_layers
        c_NIJD = codes.values_NLK.new_zeros(n, L, L, self.d_model, dtype=self.b_dec.dtype)
        for (i, j), W_FD in zip(self.pairs, self.decoder_weights()):
            c_NIJD[:, i, j] = bag(codes.values_NLK[:, i], codes.indices_NLK[:, i], W_FD) * self.y_scale_L[j]
        return c_NIJD

    def _check_sources(self, target: int, sources: Sequence[int]) -> None:
        valid = self.sources(target)
        bad = [s for s in sources if s not in valid]
        if bad:
            raise ValueError(
                f"layers {bad} do not write into layer {target} of this {self.cfg.topology}; "
                f"valid sources are {valid}"
            )

    def decode_layer(
        self,
        target: int,
        codes_per_source: Sequence[LayerCodes | None],
        sources: Sequence[int] | None = None,
        bias: bool = True,
    ) -> Tensor:
        """Raw MLP-output reconstruction of one target layer from chosen sources' codes.

        ``codes_per_source[i]`` holds source layer i's codes (None: skip it). ``sources``
        defaults to every layer that writes into ``target``; ``bias`` adds b_dec_LD[target].
        """
        chosen = self.sources(target) if sources is None else list(sources)
        self._check_sources(target, chosen)
        out_ND = None
        for i in chosen:
            c = codes_per_source[i] if i < len(codes_per_source) else None
            if c is None:
                continue
            term = bag(c.values_NK, c.indices_NK, self.decoder(i, target))
            out_ND = term if out_ND is None else out_ND + term
        if out_ND is None:
            raise ValueError(f"no codes given for any chosen source {chosen} of layer {target}")
        out_ND = out_ND * self.y_scale_L[target]
        return out_ND + self.b_dec_LD[target] if bias else out_ND

    def contributions_layer(
        self, target: int, codes_per_source: Sequence[LayerCodes | None]
    ) -> Tensor:
        """c_NID: each source's raw term into ``target``, for the sources ``sources(target)`` in order (zeros for None)."""
        sources = self.sources(target)
        given = [codes_per_source[i] for i in sources if i < len(codes_per_source)]
        given = [c for c in given if c is not None]
        if not given:
            raise ValueError(f"no codes given for any source {sources} of layer {target}")
        n = given[0].values_NK.shape[0]
        c_NID = given[0].values_NK.new_zeros(n, len(sources), self.d_model, dtype=self.b_dec.dtype)
        for s, i in enumerate(sources):
            c = codes_per_source[i] if i < len(codes_per_source) else None
            if c is not None:
                c_NID[:, s] = bag(c.values_NK, c.indices_NK, self.decoder(i, target)) * self.y_scale_L[target]
        return c_NID

    # Training --------------------------------------------------------------------------

    def forward(
        self, x_NLD: Tensor, y_NLD: Tensor, dead_mask_LF: Tensor | None = None
    ) -> ForwardOutput:
        """Encode, decode and compute the losses.

        x_NLD are the LN2 outputs and y_NLD the MLP outputs (raw units); an SAE ignores x_NLD
        and reads y_NLD. ``dead_mask_LF`` marks dead features for AuxK (TopK family only). In train
        mode with gradients enabled this is a training step: the sparsifier's running statistics
        update; otherwise the model is left unchanged.
        """
        self._check_shape("y", y_NLD)
        if self.cfg.topology == "sae":
            x_NLD = y_NLD
        self._check_shape("x", x_NLD)
        xn_NLD = self._normalize_input(x_NLD)
        yn_NLD = self._normalize_target(y_NLD)

        # A training step (train mode, gradients on) is the one place running statistics move.
        update_stats = self.training and torch.is_grad_enabled()
        # One read of the dead counts for the whole step (a device sync on CUDA), not one per layer, and
        # none for a sparsifier without AuxK.
        auxk = dead_mask_LF is not None and isinstance(self.sparsifier, TopKSparsifier)
        dead_L = dead_mask_LF.sum(1).tolist() if auxk else [0] * self.n_layers
        main, aux, penalties = [], [], []
        for i in range(self.n_layers):
            dead_F = dead_mask_LF[i] if dead_L[i] else None
            codes_i, aux_i, penalty_i = self._encode_layer(i, xn_NLD[:, i], dead_F, update_stats)
            main.append(codes_i)
            aux.append(aux_i)
            penalties.append(penalty_i)
        codes = stack_codes(main)
        recon_NLD = self._decode_normalized(codes)

        total_var_L = (yn_NLD - yn_NLD.mean(0)).pow(2).sum((0, 2)).clamp_min(1e-12)
        fvu_L = (recon_NLD - yn_NLD).pow(2).sum((0, 2)) / total_var_L
        fvu = fvu_L.sum()
        sparsity_loss = torch.stack(penalties).sum()
        auxk_loss = self._auxk_loss(aux, dead_L, yn_NLD - recon_NLD.detach(), total_var_L)
        l0_L = (codes.values_NLK != 0).sum(-1).float().mean(0)
        return ForwardOutput(
            codes=codes,
            recon_NLD=recon_NLD * self.y_scale_L[:, None] + self.y_mean_LD,
            fvu_L=fvu_L,
            fvu=fvu,
            sparsity_loss=sparsity_loss,
            auxk_loss=auxk_loss,
            l0_L=l0_L,
            loss=fvu + sparsity_loss + auxk_loss,
        )

    def _auxk_loss(
        self,
        aux: list[LayerCodes | None],
        dead_L: list[int],
        residual_NLD: Tensor,
        total_var_L: Tensor,
    ) -> Tensor:
        """AuxK (Gao et al., 2024): the dead features' top-k_aux codes should model the residual.

        Only sources with dead features are decoded, into the targets they reach. As in the
        paper and sparsify, the loss is scaled by min(dead / k_aux, 1), here with dead and
        k_aux counted over the layers that have dead features.
        """
        zero = total_var_L.new_zeros(())
        sources = [i for i, a in enumerate(aux) if a is not None]
        if not sources:
            return zero
        pairs = [(i, j) for (i, j) in self.pairs if i in sources]
        weights = [self.decoder(i, j) for (i, j) in pairs]
        template = aux[sources[0]]
        idle = LayerCodes(
            torch.zeros_like(template.values_NK[:, :1]), torch.zeros_like(template.indices_NK[:, :1])
        )
        aux_codes = stack_codes([idle if a is None else a for a in aux])
        ehat_NLD = self._decoder(aux_codes)(aux_codes, weights, pairs, self.n_layers)
        err_L = (ehat_NLD - residual_NLD).pow(2).sum((0, 2)) / total_var_L
        k_aux = self.cfg.auxk_k or self.d_model // 2
        n_dead = float(sum(dead_L[i] for i in sources))
        scale = min(n_dead / (k_aux * len(sources)), 1.0)
        # The reached targets by Python index: a mask or index tensor would cost a host read or a copy to the device.
        err_J = torch.stack([err_L[j] for j in sorted({j for _, j in pairs})])
        return self.cfg.auxk_alpha * scale * err_J.sum()

    def to_jumprelu(self) -> Transcoder:
        """Replace a TopK-family sparsifier by the JumpReLU with its running thresholds (in place)."""
        jump = self.sparsifier.to_jumprelu(self.cfg.jumprelu_bandwidth)
        jump.sparsity_coefficient = self.cfg.sparsity_coefficient
        self.sparsifier = jump
        self.cfg = dataclasses.replace(self.cfg, sparsifier="jumprelu")
        return self

    # Checks and checkpoints ------------------------------------------------------------

    def _check_shape(self, name: str, a_NLD: Tensor) -> None:
        if a_NLD.dim() != 3 or tuple(a_NLD.shape[1:]) != (self.n_layers, self.d_model):
            raise ValueError(
                f"{name} must have shape (rows, {self.n_layers}, {self.d_model}), got {tuple(a_NLD.shape)}"
            )

    def check_compatible(self, n_layers: int, d_model: int) -> None:
        """Raise `CheckpointError` unless a backbone with these dimensions fits this transcoder."""
        if (n_layers, d_model) != (self.n_layers, self.d_model):
            trained = f" (trained on {self.cfg.backbone!r})" if self.cfg.backbone else ""
            raise CheckpointError(
                f"transcoder expects {self.n_layers} layers × d_model {self.d_model}{trained}, "
                f"but the backbone has {n_layers} layers × d_model {d_model}; load a transcoder "
                "trained on this backbone or train one for it"
            )

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json and model.safetensors (normalisation folded) atomically; returns the directory."""
        return formats.save_pretrained(self, directory)

    @classmethod
    def state_shapes(cls, cfg: TranscoderConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every state-dict entry a model of `cfg` has: name → (shape, dtype); built on the meta device (allocates nothing)."""
        with torch.device("meta"):
            model = cls(cfg, initialize=False)
        return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: torch.device | str | None = None) -> Transcoder:
        """Load a directory written by ``save_pretrained`` (safetensors only, no pickle), ready for inference.

        The model comes back in eval mode with ``requires_grad`` off on every parameter (call
        ``.train().requires_grad_(True)`` to fine-tune it). A missing, empty, truncated or
        mismatched file raises `CheckpointError` naming it.
        """
        directory = formats.resolve_directory(directory)  # once: a hub id would otherwise be looked up twice
        cfg = formats.read_config(directory)
        # Before anything is allocated: a config that disagrees with its weights (e.g. 200M features over 512) is refused.
        formats.check_weights_header(directory, cls.state_shapes(cfg), cfg)
        # Uninitialised weights are never touched before load_weights replaces them.
        model = cls(cfg, device=device, initialize=False)
        formats.load_weights(model, directory, device)
        return model.eval().requires_grad_(False)

    def export_circuit_tracer(self, directory: str | os.PathLike, calibration_x_NLD: Tensor | None = None,
                              calibration_y_NLD: Tensor | None = None) -> Path:
        """Write circuit-tracer's per-layer files (W_enc_{i}, W_dec_{i}.safetensors); see `vitclt.nn.formats`.

        With a calibration sample of raw inputs, a TopK model's per-feature JumpReLU thresholds are fitted on it.
        """
        return formats.export_circuit_tracer(self, directory, calibration_x_NLD, calibration_y_NLD)
