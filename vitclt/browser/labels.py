"""Text labels from CLIP itself: a feature's write direction into the image embedding, read by the text tower.

A feature of source layer i adds a·W^{i→j} to the MLP output of every target layer j when it fires
with activation a. Along the residual stream's direct path (ignoring what later attention and MLP
blocks make of it), the CLS token's final residual h moves by a·u with u = Σ_j W^{i→j}. The image
embedding is e = P·LN(h) (CLIP's ``post_layernorm`` and ``visual_projection``), and
LN(h) = γ ⊙ (h − mean(h)) / σ(h) + β. Linearised with σ held at σ̄, the mean of σ(h) over the
eval set's CLS tokens, a unit of the feature moves the embedding by

    w = P · (γ ⊙ (u − mean(u))) / σ̄,

dropping the term from σ's own change (a rank-one correction along the normalised h, small when
|a·u| ≪ |h|). σ̄ scales every w alike, so it sets the reported write norm (embedding units per unit
activation) and leaves the cosines, hence the labels, unchanged.

Labels are the vocabulary entries whose normalised text embeddings have the largest cosine with w:
the dataset's class names (CLIP's zero-shot class vectors: prompt templates averaged) and a
general vocabulary of English words, the whole-word entries of CLIP's own BPE merge list in merge
order (roughly frequency order), each embedded as "a photo of a {word}.".
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitclt.backbones import Backbone
from vitclt.browser.geometry import residual_writes
from vitclt.nn.transcoder import Transcoder

WORD_TEMPLATE = "a photo of a {}."
"""How a vocabulary word is embedded."""
N_BPE_MERGES = 49152 - 256 - 2
"""Merges CLIP keeps from its vocabulary file (see backbones/tokenizer.py)."""


def final_projection(backbone: Backbone) -> tuple[nn.LayerNorm, Tensor] | None:
    """The final LayerNorm module and the (P, D) visual projection of an HF CLIP backbone, else None.

    Read from the transformers model's public attributes; a backbone without them gets no text labels.
    """
    model = getattr(backbone, "model", None)
    vision = getattr(model, "vision_model", None)
    ln = getattr(vision, "post_layernorm", None)
    proj = getattr(model, "visual_projection", None)
    if not isinstance(ln, nn.LayerNorm) or proj is None:
        return None
    return ln, proj.weight


def bpe_words(limit: int) -> list[str]:
    """The first `limit` whole-word entries of CLIP's BPE merges that are ASCII words of ≥ 3 letters.

    Merge order is roughly frequency order. Some entries are word endings that also stand alone
    as tokens (e.g. "ing"); they are kept, since no rule separates them from short words.
    """
    path = resources.files("vitclt").joinpath("assets", "bpe_simple_vocab_16e6.txt.gz")
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : N_BPE_MERGES + 1]
    words, seen = [], set()
    for line in merges:
        token = "".join(line.split())
        if not token.endswith("</w>"):
            continue
        word = token[: -len("</w>")]
        if len(word) >= 3 and word.isascii() and word.isalpha() and word not in seen:
            seen.add(word)
            words.append(word)
            if len(words) == limit:
                break
    return words


@torch.no_grad()
def write_directions(transcoder: Transcoder, ln: nn.LayerNorm, proj_PD: Tensor, sigma: float) -> Tensor:
    """w_LFP: every feature's linearised write into the (unnormalised) image embedding per unit activation."""
    u_LFD = residual_writes(transcoder)
    centred = u_LFD - u_LFD.mean(-1, keepdim=True)
    gamma_D = ln.weight.detach().float().to(u_LFD.device) if ln.weight is not None else 1.0
    return (centred * gamma_D / sigma) @ proj_PD.detach().float().to(u_LFD.device).T


@dataclass
class Vocabulary:
    """Text embeddings to label features with: class names and general words."""

    classnames: list[str]
    """The dataset's class names, in label order."""
    class_CP: Tensor
    """CLIP's zero-shot class vectors (normalised)."""
    words: list[str]
    """General vocabulary words."""
    word_VP: Tensor
    """Their normalised text embeddings."""


@torch.no_grad()
def build_vocabulary(backbone: Backbone, classnames: list[str], templates: list[str], n_words: int,
                     batch_size: int = 256) -> Vocabulary:
    """Embed the class names (with `templates`) and the first `n_words` BPE words with the backbone's text tower."""
    from vitclt.eval.zeroshot import build_classifier

    class_CP = build_classifier(backbone, classnames, templates, batch_size).float().cpu()
    words = bpe_words(n_words) if n_words > 0 else []
    prompts = [WORD_TEMPLATE.format(w) for w in words]
    chunks = [backbone.text_embeds(prompts[i : i + batch_size]).float().cpu() for i in range(0, len(prompts), batch_size)]
    word_VP = F.normalize(torch.cat(chunks), dim=-1) if chunks else torch.zeros(0, class_CP.shape[1])
    return Vocabulary(list(classnames), class_CP, words, word_VP)


@dataclass
class Labels:
    """Top text labels of every feature."""

    class_LFK: Tensor
    """Indices of the best class names."""
    class_score_LFK: Tensor
    """Their cosines with the feature's write direction."""
    word_LFK: Tensor
    """Indices of the best vocabulary words."""
    word_score_LFK: Tensor
    """Their cosines."""
    word_bottom_LFK: Tensor
    """Indices of the words with the lowest cosines (what the feature writes against)."""
    word_bottom_score_LFK: Tensor
    """Their cosines."""
    write_norm_LF: Tensor
    """‖w‖: how far one unit of the feature moves the unnormalised image embedding."""


@torch.no_grad()
def label_features(w_LFP: Tensor, vocab: Vocabulary, k: int = 5) -> Labels:
    """The k best class names and words of every feature by cosine with its write direction."""
    w = F.normalize(w_LFP.float().cpu(), dim=-1)

    def best(text_emb: Tensor, sign: float = 1.0) -> tuple[Tensor, Tensor]:
        n = min(k, text_emb.shape[0])
        if n == 0:
            empty = torch.zeros(*w.shape[:2], 0)
            return empty.long(), empty
        scores, index = (sign * (w @ text_emb.T)).topk(n, dim=-1)
        return index, sign * scores

    ci, cs = best(vocab.class_CP)
    wi, ws = best(vocab.word_VP)
    bi, bs = best(vocab.word_VP, -1.0)
    return Labels(ci, cs, wi, ws, bi, bs, w_LFP.norm(dim=-1).cpu())


@dataclass
class LabelCheck:
    """How often a feature's top class label is the majority class of its top images, against chance."""

    n_features: int
    """Features checked: alive, with at least `min_images` top images."""
    agreement: float
    """Fraction whose top class label is the majority class of their top images."""
    shuffled: float
    """The same fraction with top labels shuffled among those features (mean over permutations)."""
    word_agreement: float
    """Fraction whose top class label shares a word with the majority class (e.g. the colour)."""
    word_shuffled: float
    """Its shuffled baseline."""


def label_check(top_class_N: np.ndarray, majority_N: np.ndarray, classnames: list[str], permutations: int = 200,
                seed: int = 0) -> LabelCheck:
    """Compare each feature's top class label with the majority class of its top images, and with shuffled labels."""
    n = len(top_class_N)
    if n == 0:
        return LabelCheck(0, float("nan"), float("nan"), float("nan"), float("nan"))
    words = [set(name.lower().split()) for name in classnames]
    share_CC = np.array([[bool(a & b) for b in words] for a in words])
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(n) for _ in range(permutations)]
    return LabelCheck(
        n_features=n,
        agreement=float(np.mean(top_class_N == majority_N)),
        shuffled=float(np.mean([np.mean(top_class_N[p] == majority_N) for p in perms])),
        word_agreement=float(np.mean(share_CC[top_class_N, majority_N])),
        word_shuffled=float(np.mean([np.mean(share_CC[top_class_N[p], majority_N]) for p in perms])),
    )
