"""Feature interventions on one image, carried forward two ways, and the graph's prediction of their effect.

An `Intervention` sets feature f of layer i, at some tokens, to a value or to a multiple of its clean
activation (its activation in the unmodified forward; 0 where it is inactive). Then:

- **CLT replacement** (`replacement`): every MLP output becomes the transcoder's reconstruction from
  the codes of the forward in progress plus the error term of the clean forward, err_ℓ = y_ℓ − ŷ_ℓ
  (held fixed). Attention, LayerNorms and later features respond to the change (re-encoded, so a TopK
  may pick other features); the intervened feature is clamped at its layer and tokens. With no change
  this reproduces the clean model.
- **Original model** (`original`): the true MLPs run, and the change's decoder write is added to the MLP
  outputs, Δy_j[t] = Σ (new − clean)·W^{i→j}_f for every target layer j of the feature
  (`Backbone.replace`). Nothing else about the transcoder enters.

Several interventions apply in order; where two set the same feature at the same token, the later one
holds (in both ways and in the prediction).

Both report the cosine of the image embedding with every class vector, top-k before and after, and the
target score the graph explains (`targets.TargetScore`; default the target's cosine). The graph's
prediction (`predict`) is the linear one: Σ Δa × the node's total effect per unit
(`Graph.total_effect`), with attention, LayerNorm scales and the embedding norm frozen; it matches a
measurement when the change is small and those frozen quantities barely move.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from vitclt.circuits.errors import CircuitError
from vitclt.circuits.targets import TargetScore, target_score
from vitclt.nn.sparse import LayerCodes

_SPEC = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*(?:@\s*([A-Za-z0-9,\s-]+?))?\s*([=*])\s*([-+0-9.eE]+)\s*$")


@dataclass
class Intervention:
    """Set feature `feature` of layer `layer` at `tokens` to `value`, or to `scale` × its clean activation."""

    layer: int
    """Source layer of the feature."""
    feature: int
    """Feature index within the layer."""
    tokens: str | Sequence[int] = "all"
    """Token positions: "all", "cls", "patches" or indices (0 is CLS)."""
    value: float | None = None
    """New activation (exactly one of value and scale)."""
    scale: float | None = None
    """Multiple of the clean activation."""

    def __post_init__(self):
        if (self.value is None) == (self.scale is None):
            raise CircuitError(f"intervention on layer {self.layer} feature {self.feature} needs exactly one of a value "
                               "(L:F=V) and a scale (L:F*S)")


def parse_intervention(spec: str) -> Intervention:
    """Read `LAYER:FEATURE[@TOKENS]=VALUE` or `LAYER:FEATURE[@TOKENS]*SCALE` (TOKENS: all, cls, patches or 0,5,7)."""
    m = _SPEC.match(spec)
    if not m:
        raise CircuitError(f"cannot read intervention {spec!r}: write LAYER:FEATURE[@TOKENS]=VALUE or "
                           "LAYER:FEATURE[@TOKENS]*SCALE, e.g. 3:120=0, 5:7@cls*2 or 2:44@0,9,10=1.5")
    layer, feature, tokens, op, number = m.groups()
    tok: str | list[int] = "all"
    if tokens:
        tokens = tokens.strip()
        if tokens in ("all", "cls", "patches"):
            tok = tokens
        else:
            try:
                tok = [int(t) for t in tokens.split(",")]
            except ValueError:
                raise CircuitError(f"cannot read tokens {tokens!r} in {spec!r}: use all, cls, patches or indices "
                                   "such as 0,5,7") from None
    try:
        x = float(number)
    except ValueError:
        raise CircuitError(f"cannot read the number {number!r} in {spec!r}") from None
    return Intervention(int(layer), int(feature), tok, value=x if op == "=" else None, scale=x if op == "*" else None)


def check_interventions(interventions: Sequence[Intervention], transcoder, backbone) -> None:
    """Raise `CircuitError` for a layer, feature or token out of range."""
    for iv in interventions:
        if not 0 <= iv.layer < transcoder.n_layers:
            raise CircuitError(f"layer {iv.layer} is out of range: the transcoder has layers 0-{transcoder.n_layers - 1}")
        if not 0 <= iv.feature < transcoder.n_features:
            raise CircuitError(f"feature {iv.feature} of layer {iv.layer} is out of range: the transcoder has features "
                               f"0-{transcoder.n_features - 1} per layer")
        try:
            backbone.token_index(iv.tokens)
        except ValueError as e:
            raise CircuitError(f"{e} (the image has tokens 0-{backbone.n_tokens - 1}, 0 is CLS)") from None


@dataclass
class Ranking:
    """Cosines of an image embedding with every class: the top classes and the target."""

    top: list[tuple[str, float]]
    """(class name, cosine) of the top-k classes, best first."""
    target: float
    """Cosine with the target class."""
    score: float
    """The target score (targets.py) the graph explains, from these cosines."""


@dataclass
class InterventionReport:
    """Before and after, by both ways of running the change, and the graph's prediction."""

    target: str
    """Target class name."""
    clean: Ranking
    """The unmodified model."""
    replacement: Ranking
    """After the change, carried through the CLT replacement with frozen errors."""
    original: Ranking
    """After the change, added as a decoder write to the original model's MLP outputs."""
    predicted: float | None = None
    """The graph's linear prediction of the change in the target's score (None without a graph, or
    when a changed (layer, token, feature) is not a node: inactive there)."""
    changes: list[dict] = field(default_factory=list)
    """Per intervention: layer, feature, tokens, clean and new activations."""


@dataclass
class CleanPass:
    """What both ways of intervening need from the clean forward of one image."""

    pixels_B3HW: Tensor
    codes: list[LayerCodes]
    """Per layer, the codes of every token (rows = tokens)."""
    err_LTD: list[Tensor]
    """Per layer, y − ŷ of the clean forward (raw units)."""
    embed_P: Tensor
    """Normalised clean image embedding."""


@torch.no_grad()
def clean_pass(backbone, transcoder, pixels_B3HW: Tensor) -> CleanPass:
    """Capture the clean forward of one image, encode every layer and keep the error terms."""
    if pixels_B3HW.shape[0] != 1:
        raise CircuitError("interventions run on one image at a time")
    with backbone.capture() as cap:
        emb = backbone.image_embeds(pixels_B3HW)[0]
    codes, errs = [], []
    for i in range(transcoder.n_layers):
        codes.append(transcoder.encode_layer(i, cap.inputs[i][0]))
    for j in range(transcoder.n_layers):
        errs.append(cap.outputs[j][0].float() - transcoder.decode_layer(j, codes[: j + 1]))
    return CleanPass(pixels_B3HW, codes, errs, emb)


def _new_values(iv: Intervention, clean_T: Tensor, index) -> Tensor:
    """The intervened activations at the chosen tokens."""
    chosen = clean_T[index]
    return torch.full_like(chosen, iv.value) if iv.value is not None else chosen * iv.scale


def _set_feature(codes: LayerCodes, feature: int, index, values: Tensor) -> LayerCodes:
    """Codes with `feature` set to `values` at rows `index` (its other slots there zeroed)."""
    vals, idx = codes.values_NK.clone(), codes.indices_NK
    rows = torch.zeros(vals.shape[0], dtype=torch.bool, device=vals.device)
    rows[index] = True
    vals[rows[:, None] & (idx == feature)] = 0
    extra_v = torch.zeros(vals.shape[0], 1, dtype=vals.dtype, device=vals.device)
    extra_v[index, 0] = values.to(vals.dtype)
    extra_i = torch.full_like(idx[:, :1], feature)
    return LayerCodes(torch.cat([vals, extra_v], 1), torch.cat([idx, extra_i], 1))


class _ClampedReplacement:
    """ReplaceFn: the transcoder's cascaded reconstruction plus frozen errors, with features clamped."""

    def __init__(self, transcoder, clean: CleanPass, sets: list[tuple[Intervention, object, Tensor]]):
        self.tc, self.clean, self.sets = transcoder, clean, sets
        self.codes: list[LayerCodes] = []

    def __call__(self, layer: int, x_BTD: Tensor, y_BTD: Tensor) -> Tensor:
        if layer == 0:
            self.codes = []
        c = self.tc.encode_layer(layer, x_BTD[0])
        for iv, index, values in self.sets:
            if iv.layer == layer:
                c = _set_feature(c, iv.feature, index, values)
        self.codes.append(c)
        out = self.tc.decode_layer(layer, self.codes) + self.clean.err_LTD[layer]
        return out[None].to(y_BTD.dtype)


class _DecoderDelta:
    """ReplaceFn: the true MLP output plus a fixed decoder write per layer."""

    def __init__(self, delta_LTD: Tensor):
        self.delta_LTD = delta_LTD

    def __call__(self, layer: int, x_BTD: Tensor, y_BTD: Tensor) -> Tensor:
        return y_BTD + self.delta_LTD[layer][None].to(y_BTD.dtype)


def _ranking(embed_P: Tensor, classifier_CP: Tensor, classnames: Sequence[str], score: TargetScore, k: int) -> Ranking:
    cos_C = F.normalize(embed_P.float(), dim=-1) @ classifier_CP.float().T
    top = cos_C.topk(min(k, len(classnames)))
    return Ranking([(classnames[int(i)], float(v)) for v, i in zip(top.values, top.indices)], float(cos_C[score.target]),
                   score.of(cos_C.double()))


@torch.no_grad()
def intervene(backbone, transcoder, pixels_B3HW: Tensor, interventions: Sequence[Intervention], classifier_CP: Tensor,
              classnames: Sequence[str], target: int, *, graph=None, top: int = 5, clean: CleanPass | None = None,
              score: TargetScore | None = None) -> InterventionReport:
    """Run `interventions` on one image both ways and report the top-`top` classes before and after.

    `target` indexes `classnames` (rows of `classifier_CP`); `score` is the target score reported and predicted
    (default: the target's cosine), and must be the one `graph` (optional, built for this image) explains, whose
    linear prediction it adds. `clean` reuses an earlier `clean_pass` of the same image.
    """
    check_interventions(interventions, transcoder, backbone)
    clean = clean or clean_pass(backbone, transcoder, pixels_B3HW)
    score = score or target_score("cosine", torch.zeros(len(classnames)), target)
    L, T = transcoder.n_layers, backbone.n_tokens
    sets, changes = [], []
    # Per (layer, feature): clean and final activations, and the tokens set. Interventions that set the same
    # feature at the same token override each other in order (as the clamps do), so their writes are not summed.
    final: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}
    for iv in interventions:
        index = backbone.token_index(iv.tokens)
        clean_T = clean.codes[iv.layer].to_dense(transcoder.n_features)[:, iv.feature]
        new = _new_values(iv, clean_T, index)
        sets.append((iv, index, new))
        unset = (clean_T, clean_T.clone(), torch.zeros_like(clean_T, dtype=torch.bool))
        _, now_T, set_T = final.setdefault((iv.layer, iv.feature), unset)
        now_T[index], set_T[index] = new, True
        tokens = torch.arange(T, device=clean_T.device)[index].tolist()
        changes.append({"layer": iv.layer, "feature": iv.feature, "tokens": tokens,
                        "clean": [float(v) for v in clean_T[index]], "new": [float(v) for v in new]})
    delta_LTD = torch.zeros(L, T, transcoder.d_model, device=clean.err_LTD[0].device)
    net = []
    for (layer, feature), (clean_T, now_T, set_T) in final.items():
        for j in transcoder.targets(layer):
            W_D = transcoder.decoder(layer, j)[feature] * transcoder.y_scale_L[j]
            delta_LTD[j] += (now_T - clean_T)[:, None] * W_D
        net.append({"layer": layer, "feature": feature, "tokens": set_T.nonzero().flatten().tolist(),
                    "clean": [float(v) for v in clean_T[set_T]], "new": [float(v) for v in now_T[set_T]]})
    first = min(iv.layer for iv in interventions) if interventions else 0
    with backbone.replace(_ClampedReplacement(transcoder, clean, sets), layers=range(L)):
        emb_a = backbone.image_embeds(pixels_B3HW)[0]
    with backbone.replace(_DecoderDelta(delta_LTD), layers=range(first, L)):
        emb_b = backbone.image_embeds(pixels_B3HW)[0]
    rank = lambda e: _ranking(e, classifier_CP, classnames, score, top)  # noqa: E731
    return InterventionReport(classnames[target], rank(clean.embed_P), rank(emb_a), rank(emb_b),
                              predict(graph, net) if graph is not None else None, changes)


def predict(graph, changes: Sequence[dict]) -> float | None:
    """The graph's linear prediction Σ Δa·(total effect per unit) of the target's change (None if a changed
    (layer, token, feature) is not a node of the graph)."""
    total = graph.total_effect()
    out = 0.0
    for ch in changes:
        for t, old, new in zip(ch["tokens"], ch["clean"], ch["new"]):
            if new == old:
                continue
            node = graph.find(ch["layer"], t, ch["feature"])
            if node is None:
                return None
            out += (new - old) * float(total[node])
    return out
