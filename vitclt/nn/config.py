"""`TranscoderConfig`: everything needed to rebuild a transcoder, saved as its config.json.

It is also the dictionary part of `vitclt train`'s command line: the training config nests it,
and the fields a run fills in itself (the backbone's shape and identity, the tokens, and the
topology, sparsifier and k that the run sweeps) are hidden from the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

from tyro.conf import Suppress

from vitclt.errors import ConfigError

Topology = Literal["clt", "plt", "sae"]
"""clt: layer i writes to every layer j ≥ i; plt: layer i writes only to i; sae: rebuilds each MLP output from itself."""
TOPOLOGIES: tuple[str, ...] = get_args(Topology)

SparsifierName = Literal["jumprelu", "relu-topk", "abs-topk", "batch-topk"]
"""The nonlinearities that make codes sparse (classes in `vitclt.nn.sparsifiers`)."""
SPARSIFIER_NAMES: tuple[str, ...] = get_args(SparsifierName)

TokenSet = Literal["cls", "patches", "all"]
"""Which tokens of an image: the CLS token, the patch tokens, or all of them."""


@dataclass
class TranscoderConfig:
    """The transcoder: its shape, topology, sparsifier and training-time loss settings."""

    n_layers: Suppress[int] = 12
    """Transformer blocks covered: one encoder and one target per block."""
    d_model: Suppress[int] = 768
    """Width of the MLP input and output (the residual stream)."""
    n_features: int = 0
    """Features per layer (0: expansion × the backbone width)."""
    expansion: int = 8
    """Features per layer as a multiple of the backbone width, used when --n-features is 0."""
    topology: Suppress[Topology] = "clt"
    """clt: layer i writes to every layer j ≥ i; plt: layer i writes only to i; sae: rebuilds the MLP output from itself."""
    sparsifier: Suppress[SparsifierName] = "relu-topk"
    """Nonlinearity that makes the codes sparse."""
    k: Suppress[int] = 32
    """Active features per row and layer for the TopK sparsifiers (the batch average for batch-topk)."""
    k_per_layer: Suppress[tuple[int, ...]] = ()
    """Per-layer k overriding k (empty: k for every layer)."""
    jumprelu_bandwidth: float = 0.1
    """JumpReLU straight-through kernel width ε, in normalised pre-activation units."""
    jumprelu_init_threshold: Suppress[float] = 1.0
    """JumpReLU threshold of a transcoder built directly; training replaces it by per-feature thresholds that keep about k."""
    sparsity_coefficient: float = 1e-3
    """JumpReLU L0 penalty λ (loss += λ Σ_layers mean L0), reached at the end of the trainer's ramp."""
    threshold_ema: float = 0.99
    """EMA decay of the TopK running threshold (BatchTopK eval threshold, JumpReLU export)."""
    auxk_k: int = 0
    """Dead features per row and layer that AuxK uses to model the residual (0: width // 2)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss on dead features (TopK sparsifiers)."""
    dead_tokens: int = 10_000_000
    """A feature that has not fired for this many training rows counts as dead (for AuxK)."""
    sparse_decode: Suppress[bool] = True
    """Decode by reading only the active features' decoder rows (False: dense reference)."""
    sparse_encoder: Suppress[bool] = True
    """Encoder backward through the selected features only (False: plain autograd)."""
    backbone: Suppress[str] = ""
    """Backbone spec (hub id, path or alias) whose activations the transcoder was trained on."""
    backbone_fingerprint: Suppress[str] = ""
    """Fingerprint of that backbone's weights (`Backbone.fingerprint`); empty if unknown."""
    tokens: Suppress[TokenSet] = "all"
    """Tokens it was trained on: cls, patches or all."""

    @property
    def features(self) -> int:
        """Features per layer after resolving n_features = 0."""
        return self.n_features or self.expansion * self.d_model

    @property
    def k_layers(self) -> list[int]:
        """k for every layer."""
        return list(self.k_per_layer) if self.k_per_layer else [self.k] * self.n_layers

    def validate(self) -> None:
        """Raise `ConfigError` naming the first setting this transcoder cannot be built with."""
        if self.topology not in TOPOLOGIES:
            raise ConfigError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {self.topology!r}")
        if self.sparsifier not in SPARSIFIER_NAMES:
            raise ConfigError(f"sparsifier must be one of {', '.join(SPARSIFIER_NAMES)}, got {self.sparsifier!r}")
        if self.n_layers < 1 or self.d_model < 1:
            raise ConfigError(f"n_layers and d_model must be positive, got {self.n_layers} and {self.d_model}")
        if self.n_features < 0 or self.expansion < 1 or self.dead_tokens < 1:
            raise ConfigError("--n-features cannot be negative, and --expansion and --dead-tokens must be at least 1")
        if self.k_per_layer and len(self.k_per_layer) != self.n_layers:
            raise ConfigError(f"k_per_layer lists {len(self.k_per_layer)} values for {self.n_layers} layers")
        if self.sparsifier != "jumprelu":
            for k in self.k_layers:
                if not 1 <= k <= self.features:
                    raise ConfigError(f"k {k} must be between 1 and the {self.features} features per layer: "
                                      "change --k, or raise --expansion")

    @classmethod
    def from_dict(cls, raw: dict) -> TranscoderConfig:
        """Build from a config.json dict, refusing unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        # vitclt 0.1 wrote two constant keys that nothing read; accept and drop them.
        raw = {k: v for k, v in raw.items() if k not in ("input_hook", "target_hook")}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(
                f"unknown transcoder config keys {unknown}; the checkpoint was written by a "
                "different vitclt version, upgrade vitclt or remove these keys"
            )
        raw = dict(raw)
        if "k_per_layer" in raw:
            raw["k_per_layer"] = tuple(raw["k_per_layer"])
        return cls(**raw)
