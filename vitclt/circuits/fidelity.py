"""Circuit fidelity: does a graph's predicted effect of zeroing a feature match what the models do?

For each image, the graph towards the predicted class's target score (targets.py) is built and pruned
as `vitclt explain` does; for its `top` kept features of largest influence, the feature is zeroed at its
token and the target's change is

- **predicted** by the graph: −a × the node's total effect per unit (`Graph.total_effect`);
- **measured** in the CLT replacement and in the original model (`intervene`);
- **measured in the local replacement model with parts made live** (`live_forward`), to say why the
  prediction fails: with everything frozen the local model is the graph's own model, so it gives the
  prediction exactly; unfreezing one part at a time (the TopK's choice of features, the attention
  patterns, the LayerNorm scales, the embedding norm), or freezing one part of the otherwise live
  model, shows how much of the gap each part makes. All live is the CLT replacement.

`summarise` reduces cases to sign agreement, the median and quartiles of measured/predicted and the share
within a factor of 2, at the CLS token and at patch tokens separately.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vitclt.circuits.graph import FEATURE, Graph, attribute
from vitclt.circuits.intervene import Intervention, clean_pass, intervene
from vitclt.circuits.local import LocalReplacement
from vitclt.circuits.prune import prune
from vitclt.circuits.targets import TargetScore, target_score
from vitclt.circuits.tower import attention_pattern, frozen_attention

PARTS = ("topk", "attention", "layernorm", "norm")
"""What the graph freezes and `live_forward` can recompute: the active feature set (a TopK may switch
features), attention patterns, LayerNorm scales σ (LN1, LN2, LN_post), the embedding norm |e|."""

VARIANTS: dict[str, frozenset[str]] = {
    "frozen": frozenset(),
    **{f"live {p}": frozenset({p}) for p in PARTS},
    **{f"frozen {p}": frozenset(PARTS) - {p} for p in PARTS},
    "all live": frozenset(PARTS),
}
"""Local-model variants measured per case: name → the parts made live."""
LINEARISED = frozenset({"attention", "layernorm", "norm"})
"""What `LiveModel.gradient` linearises by default: everything the graph freezes but the active feature set."""


class LiveModel:
    """A local replacement model whose frozen parts can be made live again, with dense activations.

    Errors stay at their clean values throughout (so with every part live this is the CLT replacement
    of `intervene`, and with none the graph's linear model, features linear on their clean active set).
    """

    def __init__(self, model: LocalReplacement):
        self.m = model
        tc, dt = model.tc, model.dtype
        F = tc.n_features
        self.F = F
        self.W_dec = {(i, j): (tc.decoder(i, j).detach().to(dt) * tc.y_scale_L[j].to(dt))
                      for j in range(model.L) for i in tc.sources(j)}
        mask = torch.zeros(model.L, model.T, F, dtype=torch.bool, device=model.acts_LTK.device)
        mask.scatter_(2, model.index_LTK, model.active_LTK)
        self.active_LTF = mask

    def forward(self, live: frozenset[str], zero: tuple[int, int, int] | None = None, delta_LTF: Tensor | None = None) -> Tensor:
        """The target score with the parts in `live` recomputed, feature `zero` = (layer, token, feature) set to 0, and
        `delta_LTF` added to the activations (after the zeroing)."""
        m, st, w = self.m, self.m.state, self.m.w
        h = st.h0_TD.clone()
        acts: list[Tensor] = []
        for ell, b in enumerate(w.blocks):
            s1 = b.ln1.sigma(h) if "layernorm" in live else st.sigma1_LT[ell]
            a = b.ln1.frozen(h, s1)
            pattern = attention_pattern(b, a) if "attention" in live else st.pattern_LATT[ell]
            h = h + frozen_attention(b, a, pattern)
            x = b.ln2.frozen(h, b.ln2.sigma(h) if "layernorm" in live else st.sigma2_LT[ell])
            if "topk" in live:
                z = m.tc.encode_layer(ell, x.float()).to_dense(self.F).to(m.dtype)
            else:
                z = (x @ m.W_enc[ell].T + m.b_enc_LF[ell]) * self.active_LTF[ell]
            if zero is not None and zero[0] == ell:
                z = z.index_put((torch.tensor(zero[1]), torch.tensor(zero[2])), z.new_zeros(()))
            if delta_LTF is not None:
                z = z + delta_LTF[ell]
            acts.append(z)
            y = m.b_dec_LD[ell] + m.err_LTD[ell]
            for i in m.tc.sources(ell):
                y = y + acts[i] @ self.W_dec[(i, ell)]
            h = h + y
        cls = h[0]
        e = w.post_ln.frozen(cls, w.post_ln.sigma(cls) if "layernorm" in live else st.sigma_post) @ w.W_proj_PD.T
        if w.b_proj_P is not None:
            e = e + w.b_proj_P
        return m.class_P @ e / (e.norm() if "norm" in live else m.norm0)

    @torch.no_grad()
    def score(self, live: Iterable[str] = (), zero: tuple[int, int, int] | None = None) -> float:
        """The target score with the parts in `live` recomputed, and feature `zero` = (layer, token, feature) set to 0."""
        return float(self.forward(frozenset(live), zero))

    def gradient(self, live: Iterable[str] = LINEARISED) -> Tensor:
        """∂s/∂a_LTF: every feature's total effect per unit with the parts in `live` linearised around the clean image
        rather than frozen (the active set fixed, so "topk" is ignored). With none live it is `Graph.total_effect`."""
        m = self.m
        with torch.enable_grad():
            delta = torch.zeros(m.L, m.T, self.F, dtype=m.dtype, device=m.acts_LTK.device, requires_grad=True)
            self.forward(frozenset(live) - {"topk"}, delta_LTF=delta).backward()
        return delta.grad


@dataclass
class Case:
    """One zeroed feature of one image's graph."""

    image: int
    node: str
    """Node id F<layer>_<feature>_<token>."""
    layer: int
    cls: bool
    """At the CLS token (else a patch token)."""
    activation: float
    predicted: float
    """The graph's prediction of the target's change."""
    linearised: float | None
    """−a × ∂s/∂a with attention patterns, LayerNorm scales and the norm linearised (`LiveModel.gradient`)."""
    measured: dict[str, float] = field(default_factory=dict)
    """"replacement", "original", and each of VARIANTS: the measured change."""


@dataclass
class ImageResult:
    """The cases of one image, with timings."""

    cases: list[Case]
    seconds_graph: float
    """Wall time of the attribution graph."""
    seconds_prune: float
    score: float
    """The target score at the image."""


def image_cases(backbone, transcoder, pixels_B3HW: Tensor, classifier_CP: Tensor, classnames: Sequence[str], score: TargetScore,
                *, top: int = 10, dtype: torch.dtype = torch.float32, image: int = 0, variants: bool = True) -> ImageResult:
    """Zero each of the `top` most influential kept features of the image's graph towards `score`; predicted vs measured."""
    t0 = time.perf_counter()
    model = LocalReplacement(backbone, transcoder, pixels_B3HW[0], score.direction(classifier_CP), dtype=dtype)
    graph: Graph = attribute(model)
    t1 = time.perf_counter()
    pruned = prune(graph.adjacency, graph.target)
    t2 = time.perf_counter()
    feats = torch.nonzero(pruned.node_mask & (graph.kind_N == FEATURE)).flatten()
    feats = feats[pruned.influence[feats].argsort(descending=True)[:top]]
    total = graph.total_effect()
    clean = clean_pass(backbone, transcoder, pixels_B3HW)
    live = LiveModel(model) if variants else None
    base = {name: live.score(parts) for name, parts in VARIANTS.items()} if live else {}
    grad_LTF = live.gradient() if live else None
    n_prefix = int(backbone.n_prefix_tokens)
    cases = []
    for node in feats.tolist():
        layer, tok, f = int(graph.layer_N[node]), int(graph.token_N[node]), int(graph.feature_N[node])
        a = float(graph.value_N[node])
        rep = intervene(backbone, transcoder, pixels_B3HW, [Intervention(layer, f, [tok], value=0.0)], classifier_CP, classnames,
                        score.target, clean=clean, score=score)
        measured = {"replacement": rep.replacement.score - rep.clean.score, "original": rep.original.score - rep.clean.score}
        if live:
            for name, parts in VARIANTS.items():
                measured[name] = live.score(parts, (layer, tok, f)) - base[name]
        lin = -a * float(grad_LTF[layer, tok, f]) if live else None
        cases.append(Case(image, graph.node_id(node), layer, tok < n_prefix, a, -a * float(total[node]), lin, measured))
    return ImageResult(cases, t1 - t0, t2 - t1, graph.score)


def run_fidelity(backbone, transcoder, images, classifier_CP: Tensor, classnames: Sequence[str], kind: str, *, top: int = 10,
                 dtype: torch.dtype = torch.float32, variants: bool = True, progress=None) -> list[ImageResult]:
    """`image_cases` for each image towards its predicted class, with the target score of `kind` (targets.SCORES)."""
    out = []
    for i, image in enumerate(images):
        pixels = backbone.preprocess([image])
        with torch.no_grad():
            cos_C = backbone.image_embeds(pixels).float()[0] @ classifier_CP.float().T
        score = target_score(kind, cos_C, int(cos_C.argmax()))
        out.append(image_cases(backbone, transcoder, pixels, classifier_CP, classnames, score, top=top, dtype=dtype, image=i,
                               variants=variants))
        if progress is not None:
            progress.update(1)
    return out


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def agreement(predicted: Sequence[float], measured: Sequence[float]) -> dict:
    """Sign agreement, median and quartiles of measured/predicted, share within a factor of 2, over pairs whose
    prediction is not 0."""
    pairs = [(p, m) for p, m in zip(predicted, measured) if p != 0]
    if not pairs:
        return {"n": 0}
    ratio = [m / p for p, m in pairs]
    return {"n": len(pairs), "sign": sum(r > 0 for r in ratio) / len(ratio), "median": statistics.median(ratio),
            "q25": _quantile(ratio, 0.25), "q75": _quantile(ratio, 0.75),
            "within2": sum(0.5 <= r <= 2 for r in ratio) / len(ratio)}


def summarise(results: Sequence[ImageResult]) -> dict:
    """Per token kind ("cls", "patch", "all") and per measurement, `agreement` of measured with predicted; per token kind
    and source layer, that of the original model ("by_layer"); and timings."""
    cases = [c for r in results for c in r.cases]
    keys = list(cases[0].measured) if cases else []
    out: dict = {"images": len(results), "cases": len(cases)}
    for where, sel in (("cls", lambda c: c.cls), ("patch", lambda c: not c.cls), ("all", lambda c: True)):
        chosen = [c for c in cases if sel(c)]
        out[where] = {k: agreement([c.predicted for c in chosen], [c.measured[k] for c in chosen]) for k in keys}
        if chosen and chosen[0].linearised is not None:
            for k in ("original", "replacement", "all live"):
                out[where][f"{k} vs linearised"] = agreement([c.linearised for c in chosen], [c.measured[k] for c in chosen])
    out["by_layer"] = {}
    for where in ("cls", "patch"):
        chosen = [c for c in cases if c.cls == (where == "cls")]
        out["by_layer"][where] = {layer: agreement([c.predicted for c in chosen if c.layer == layer],
                                                   [c.measured["original"] for c in chosen if c.layer == layer])
                                  for layer in sorted({c.layer for c in chosen})}
    secs = [r.seconds_graph for r in results]
    out["seconds_per_graph"] = {"median": statistics.median(secs), "max": max(secs)} if secs else {}
    out["seconds_per_pruning"] = statistics.median([r.seconds_prune for r in results]) if results else None
    return out
