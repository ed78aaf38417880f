"""Cascaded replacement: accuracy under the task head with MLP outputs replaced by a transcoder's reconstruction.

A window of layers `start→end` and a token subset (`cls`, `patches`, `all`) are replaced. Inside the
window the transcoder encodes the *replaced* model's own LN2 outputs as the forward proceeds, so
reconstruction errors cascade into later layers; sources before the window read the clean model,
because the forward is clean up to the window's first MLP output. `CascadedReplacement` is that
stateful replacement function; `ReplacementGrid` runs many settings on each image batch, so a batch
is decoded and preprocessed once and each setting costs one backbone forward.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

from torch import Tensor

from vitclt.backbones import Backbone, Replacement
from vitclt.backbones.heads import TaskHead
from vitclt.eval.windows import Window, default_windows
from vitclt.eval.zeroshot import embed_images, zero_mlp
from vitclt.nn import LayerCodes, Transcoder

TOKEN_SETS = ("cls", "patches", "all")
"""The token subsets the paper replaces and attributes separately (no "cls" on a model without a CLS token)."""

__all__ = ["TOKEN_SETS", "CascadedReplacement", "GridBatch", "ReplacementGrid", "Setting", "Window", "clean_setting",
           "default_windows", "encode_rows", "reads_output", "select_rows", "transcoder_setting", "zero_setting"]


def reads_output(transcoder: Transcoder) -> bool:
    """Whether the transcoder reads the MLP output y (an SAE) rather than its input x."""
    return transcoder.cfg.topology == "sae"


def encode_rows(transcoder: Transcoder, layer: int, x_BTD: Tensor, y_BTD: Tensor) -> LayerCodes:
    """Codes of every token in the batch at `layer`, as B·T rows (image-major)."""
    inp_BTD = y_BTD if reads_output(transcoder) else x_BTD
    return transcoder.encode_layer(layer, inp_BTD.flatten(0, 1))


def select_rows(codes: LayerCodes, n_tokens: int, index: slice | Tensor) -> LayerCodes:
    """The codes of the tokens at `index` of each image, from codes over B·T image-major rows."""
    values_BTK = codes.values_NK.unflatten(0, (-1, n_tokens))[:, index]
    indices_BTK = codes.indices_NK.unflatten(0, (-1, n_tokens))[:, index]
    return LayerCodes(values_BTK.flatten(0, 1), indices_BTK.flatten(0, 1))


class CascadedReplacement:
    """A stateful `ReplaceFn` that replaces MLP outputs by a transcoder's cascaded reconstruction.

    Called by `Backbone.replace` at every layer up to the last replaced one, it encodes each
    layer's MLP input (for an SAE, its output) from the forward in progress and, at the replaced
    layers, returns the decoded reconstruction at the selected tokens. State resets at layer 0, so
    one instance serves any number of forwards.

    `clean_codes` (optional): codes of every token at every layer from a clean forward of the same
    batch (`encode_rows`). Layers up to the window's first one see clean inputs in the replaced
    forward too, so their codes are taken from there instead of being encoded again.
    `keep_sources` (optional): for each target layer, the only source layers whose terms are kept
    (the faithfulness edits); the decoder bias is always kept.
    """

    def __init__(self, transcoder: Transcoder, layers: Sequence[int], index: slice | Tensor, n_tokens: int,
                 clean_codes: Sequence[LayerCodes] | None = None, keep_sources: dict[int, Sequence[int]] | None = None):
        self.transcoder = transcoder
        self.layers = sorted(set(layers))
        self.index = index
        self.n_tokens = n_tokens
        self.clean_codes = clean_codes
        self.keep_sources = keep_sources or {}
        self.needed = sorted({s for t in self.layers for s in transcoder.sources(t)})
        self.codes: list[LayerCodes | None] = []

    def __call__(self, layer: int, x_BTD: Tensor, y_BTD: Tensor) -> Tensor | None:
        if layer == 0:
            self.codes = [None] * (self.layers[-1] + 1)
        if layer in self.needed:
            if self.clean_codes is not None and layer <= self.layers[0]:
                self.codes[layer] = select_rows(self.clean_codes[layer], self.n_tokens, self.index)
            else:
                self.codes[layer] = encode_rows(self.transcoder, layer, x_BTD[:, self.index], y_BTD[:, self.index])
        if layer not in self.layers:
            return None
        y_hat_ND = self.transcoder.decode_layer(layer, self.codes[: layer + 1], sources=self.keep_sources.get(layer))
        out_BTD = y_BTD.clone()
        out_BTD[:, self.index] = y_hat_ND.view(y_BTD.shape[0], -1, y_BTD.shape[-1]).to(y_BTD.dtype)
        return out_BTD


MakeReplacement = Callable[[list[LayerCodes] | None], Replacement | None]
"""Builds a setting's replacement for one batch from the transcoder's clean codes of it."""


class Setting(NamedTuple):
    """One accuracy run of the grid: its key and how it builds its replacement for a batch.

    `key` is any hashable value that names the setting in `ReplacementGrid.top1()`, e.g. a tuple
    (transcoder name, `Window`, tokens). `make(clean_codes)` gets the clean forward's codes of the
    batch for `transcoder` (None when the setting uses no transcoder) and returns the `Replacement`
    (None: the clean model).
    """

    key: Hashable
    make: MakeReplacement
    transcoder: Transcoder | None = None


def clean_setting(key: Hashable = "clean") -> Setting:
    """The unmodified model."""
    return Setting(key, lambda codes: None)


def zero_setting(key: Hashable, window: Window, tokens: str) -> Setting:
    """The zero-ablation control: the MLP outputs of `window` at `tokens` set to zero."""
    return Setting(key, lambda codes: Replacement(zero_mlp, window.layers, tokens))


def transcoder_setting(key: Hashable, transcoder: Transcoder, backbone: Backbone, window: Window, tokens: str,
                       keep_sources: dict[int, Sequence[int]] | None = None) -> Setting:
    """The transcoder's cascaded replacement of `window` at `tokens` (optionally with edited sources)."""
    index = backbone.token_index(tokens)

    def make(clean_codes):
        fn = CascadedReplacement(transcoder, window.layers, index, backbone.n_tokens, clean_codes, keep_sources)
        return Replacement(fn, window.layers, tokens)

    return Setting(key, make, transcoder)


class GridBatch(NamedTuple):
    """What a batch's settings share: the preprocessed pixels and the clean codes per transcoder."""

    pixels_B3HW: Tensor
    labels_B: Tensor
    clean_codes: dict[int, list[LayerCodes]]
    """`id(transcoder)` → codes of every token at every layer from the clean forward."""


class ReplacementGrid:
    """Top-1 counts of many settings under one task head, accumulated batch by batch (one forward per setting).

    The head is built from the clean model before the grid runs and stays fixed: only the image
    embeddings move under a setting's replacement.
    """

    def __init__(self, backbone: Backbone, head: TaskHead, settings: Sequence[Setting]):
        keys = [s.key for s in settings]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate setting keys in the replacement grid: {keys}")
        self.backbone = backbone
        self.head = head
        self.settings = list(settings)
        self.correct = dict.fromkeys(keys, 0)
        self.n = 0

    def update(self, batch: GridBatch) -> None:
        """Run every setting on one batch."""
        for s in self.settings:
            codes = batch.clean_codes.get(id(s.transcoder)) if s.transcoder is not None else None
            emb_BP = embed_images(self.backbone, batch.pixels_B3HW, s.make(codes))
            hit1, _ = self.head.correct(emb_BP, batch.labels_B, k=1)
            self.correct[s.key] += int(hit1.sum())
        self.n += len(batch.labels_B)

    def top1(self) -> dict[Hashable, float]:
        """Top-1 accuracy in percent per setting, by its key."""
        if self.n == 0:
            raise ValueError("the replacement grid saw no images")
        return {key: 100 * c / self.n for key, c in self.correct.items()}
