"""Cascaded replacement: zero-shot accuracy with MLP outputs replaced by a transcoder's reconstruction.

A window of layers `start→end` and a token subset (`cls`, `patches`, `all`) are replaced. Inside the
window the transcoder encodes the *replaced* model's own LN2 outputs as the forward proceeds, so
reconstruction errors cascade into later layers; sources before the window read the clean model,
because the forward is clean up to the window's first MLP output. `CascadedReplacement` is that
stateful replacement function; `ReplacementGrid` runs many settings on each image batch, so a batch
is decoded and preprocessed once and each setting costs one backbone forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from torch import Tensor

from vitclt.backbones import Backbone, Replacement
from vitclt.eval.zeroshot import embed_images, topk_correct, zero_mlp
from vitclt.nn import LayerCodes, Transcoder

TOKEN_SETS = ("cls", "patches", "all")
"""The token subsets the paper replaces and attributes separately."""


class Window(NamedTuple):
    """A contiguous window of layers, both ends included."""

    start: int
    end: int

    @property
    def layers(self) -> list[int]:
        """The layers in the window, in order."""
        return list(range(self.start, self.end + 1))

    @property
    def label(self) -> str:
        """`"3-11"`: the key used in metrics.json."""
        return f"{self.start}-{self.end}"


def default_windows(n_layers: int) -> list[Window]:
    """The paper's windows ending at the last layer: 0→11, 3→11, 7→11, 10→11 for 12 layers.

    Other depths scale the starts proportionally (0, L/4, 7L/12, L−2, rounded), dropping duplicates.
    """
    last = n_layers - 1
    starts = {0, round(n_layers / 4), round(7 * n_layers / 12), n_layers - 2}
    return [Window(s, last) for s in sorted(min(max(s, 0), last) for s in starts)]


def parse_windows(spec: str, n_layers: int) -> list[Window]:
    """Windows from `"0-11,3-11"` (or `"3→11"`); an empty spec gives `default_windows`."""
    if not spec.strip():
        return default_windows(n_layers)
    windows = []
    for part in spec.replace("→", "-").split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            w = Window(int(lo), int(hi) if sep else int(lo))
        except ValueError:
            raise ValueError(f"cannot read window {part!r}: use START-END, e.g. 3-11, separated by commas") from None
        if not 0 <= w.start <= w.end < n_layers:
            raise ValueError(f"window {part!r} out of range: this backbone has layers 0-{n_layers - 1}")
        windows.append(w)
    return windows


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
    """One zero-shot run of the grid: a name and how it builds its replacement for a batch.

    `make(clean_codes)` gets the clean forward's codes of the batch for `transcoder` (None when
    the setting uses no transcoder) and returns the `Replacement` (None: the clean model).
    """

    name: str
    make: MakeReplacement
    transcoder: Transcoder | None = None


def clean_setting(name: str = "clean") -> Setting:
    """The unmodified model."""
    return Setting(name, lambda codes: None)


def zero_setting(name: str, window: Window, tokens: str) -> Setting:
    """The zero-ablation control: the MLP outputs of `window` at `tokens` set to zero."""
    return Setting(name, lambda codes: Replacement(zero_mlp, window.layers, tokens))


def transcoder_setting(name: str, transcoder: Transcoder, backbone: Backbone, window: Window, tokens: str,
                       keep_sources: dict[int, Sequence[int]] | None = None) -> Setting:
    """The transcoder's cascaded replacement of `window` at `tokens` (optionally with edited sources)."""
    index = backbone.token_index(tokens)

    def make(clean_codes):
        fn = CascadedReplacement(transcoder, window.layers, index, backbone.n_tokens, clean_codes, keep_sources)
        return Replacement(fn, window.layers, tokens)

    return Setting(name, make, transcoder)


class GridBatch(NamedTuple):
    """What a batch's settings share: the preprocessed pixels and the clean codes per transcoder."""

    pixels_BCHW: Tensor
    labels_B: Tensor
    clean_codes: dict[int, list[LayerCodes]]
    """`id(transcoder)` → codes of every token at every layer from the clean forward."""


class ReplacementGrid:
    """Top-1 counts of many settings, accumulated batch by batch (one forward per setting)."""

    def __init__(self, backbone: Backbone, classifier_CP: Tensor, settings: Sequence[Setting]):
        names = [s.name for s in settings]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate setting names in the replacement grid: {sorted(names)}")
        self.backbone = backbone
        self.classifier_CP = classifier_CP
        self.settings = list(settings)
        self.correct = dict.fromkeys(names, 0)
        self.n = 0

    def update(self, batch: GridBatch) -> None:
        """Run every setting on one batch."""
        for s in self.settings:
            codes = batch.clean_codes.get(id(s.transcoder)) if s.transcoder is not None else None
            emb_BP = embed_images(self.backbone, batch.pixels_BCHW, s.make(codes))
            hit1, _ = topk_correct(emb_BP, self.classifier_CP, batch.labels_B, k=1)
            self.correct[s.name] += int(hit1.sum())
        self.n += len(batch.labels_B)

    def top1(self) -> dict[str, float]:
        """Top-1 accuracy in percent per setting."""
        if self.n == 0:
            raise ValueError("the replacement grid saw no images")
        return {name: 100 * c / self.n for name, c in self.correct.items()}
