"""Concept vocabularies for "sees" and "writes" labels: names and their text vectors from the backbone's text tower.

* The demo world's vocabulary (`world_vocabulary`): its attribute words and classes
  (`vitclt.eval.ground_truth.world_concepts`). Each concept's text vector is the mean normalised
  embedding of captions the world writes for random scenes that have it: the demo CLIP learned
  its words from those captions, and averaging over scenes cancels the other attributes.
* Any other dataset (`word_vocabulary`): its class names (the zero-shot class vectors, templates
  averaged) and a list of common English words (`vitclt/assets/words/common.txt`, see its
  LICENSE note), each embedded as "a photo of a {word}.".
* Either can be extended with the words of a file (`read_words`), one per line.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from vitclt.backbones import Backbone
from vitclt.errors import VitcltError

WORD_TEMPLATE = "a photo of a {}."
"""How a vocabulary word is embedded."""


class VocabularyError(VitcltError, ValueError):
    """A concept word list cannot be read; the message says what is expected."""


@dataclass
class ConceptVocabulary:
    """Concept names and their normalised text vectors."""

    names: list[str]
    """Concept names, e.g. "red", "red circle", "striped"."""
    kinds: list[str]
    """Where each comes from: a demo-world family, "class" or "word"."""
    text_VP: Tensor
    """Normalised text vectors (C, P)."""

    def extend(self, other: ConceptVocabulary) -> ConceptVocabulary:
        """This vocabulary followed by the entries of `other` whose names are new."""
        keep = [i for i, n in enumerate(other.names) if n not in set(self.names)]
        return ConceptVocabulary(self.names + [other.names[i] for i in keep], self.kinds + [other.kinds[i] for i in keep],
                                 torch.cat([self.text_VP, other.text_VP[keep]]))


def _embed(backbone: Backbone, prompts: list[str], batch_size: int = 256) -> Tensor:
    chunks = [backbone.text_embeds(prompts[i : i + batch_size]).float().cpu() for i in range(0, len(prompts), batch_size)]
    return F.normalize(torch.cat(chunks), dim=-1)


@torch.no_grad()
def world_vocabulary(backbone: Backbone, captions: int = 32, seed: int = 0) -> ConceptVocabulary:
    """The demo world's concepts, each embedded as the mean of `captions` captions of scenes that have it."""
    from vitclt.eval.ground_truth import scenes_with, world_concepts

    concepts = world_concepts()
    prompts = [scene.caption() for c in concepts for scene, _ in scenes_with(c, captions, seed)]
    emb = _embed(backbone, prompts).view(len(concepts), captions, -1).mean(1)
    return ConceptVocabulary([c.name for c in concepts], [c.family for c in concepts], F.normalize(emb, dim=-1))


def common_words(limit: int | None = None) -> list[str]:
    """The shipped common-English word list (most frequent first), or its first `limit` words."""
    text = resources.files("vitclt").joinpath("assets", "words", "common.txt").read_text(encoding="utf-8")
    words = [w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#")]
    return words if limit is None else words[:limit]


def read_words(path: str | Path) -> list[str]:
    """Words or short phrases from a UTF-8 file, one per line (blank lines and '#' comments skipped)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise VocabularyError(f"cannot read concept words from {path} ({e}): give a UTF-8 text file, one word per line") from None
    words = [w.strip() for w in text.splitlines() if w.strip() and not w.lstrip().startswith("#")]
    if not words:
        raise VocabularyError(f"{path} holds no words: give one word or short phrase per line")
    return list(dict.fromkeys(words))


@torch.no_grad()
def word_vocabulary(backbone: Backbone, words: list[str], classnames: list[str] = (),
                    templates: list[str] = ()) -> ConceptVocabulary:
    """Class names (zero-shot vectors from `templates`) and `words` (each as "a photo of a {word}.")."""
    names, kinds, parts = [], [], []
    if classnames and templates:
        from vitclt.eval.zeroshot import build_classifier

        parts.append(F.normalize(build_classifier(backbone, list(classnames), list(templates)).float().cpu(), dim=-1))
        names += list(classnames)
        kinds += ["class"] * len(classnames)
    new = [w for w in dict.fromkeys(words) if w not in set(names)]
    if new:
        parts.append(_embed(backbone, [WORD_TEMPLATE.format(w) for w in new]))
        names += new
        kinds += ["word"] * len(new)
    text = torch.cat(parts) if parts else torch.zeros(0, 1)
    return ConceptVocabulary(names, kinds, text)


@dataclass
class ConceptLabels:
    """Each feature's best concepts under one labelling method (sees.py, writes.py), with what each scores by chance."""

    index_LFK: Tensor
    """Concept indices, best first."""
    score_LFK: Tensor
    """Their scores: SoftWPMI of the top images (sees), cosine of the write with the centred text vector (writes)."""
    baseline_LFK: Tensor
    """The same concept's mean score by chance: random top sets of the same size (sees), the label shuffled among the
    layer's features (writes)."""
    threshold_LFK: Tensor
    """The chance score's 99th percentile (writes: against random isotropic directions): a label scoring at or below
    it is not told apart from noise."""

    @property
    def shown_LFK(self) -> Tensor:
        """Labels that beat their threshold (the ones the pages show)."""
        return self.score_LFK > self.threshold_LFK

