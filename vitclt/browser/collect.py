"""One streaming pass: running top-k images per feature, kept on the device.

For every batch of images and every layer, the transcoder's codes are scattered into a dense
(B, T, F) block of *this batch only*; from it come the per-image maximum over tokens and the CLS
activation, and three running lists per feature are merged with one ``topk`` over (F, K + B):

* ``top_max``: the K images with the largest maximum-over-tokens activation,
* ``top_cls``: the K images with the largest CLS activation,
* ``sample``: K images drawn uniformly from those where the feature fires (a random key per
  (image, feature) and the K largest keys: reservoir sampling as a top-k), so the site can show
  the feature at moderate strength.

On request a fourth list, ``label_sample``, draws more images the same way, for the sees labels;
it keeps only the CLS activation, since the pages never draw those images.

Each list carries the per-token activations of its images (for the heatmaps), quantised to
uint8 relative to the feature's maximum at the end. Counts, sums and a log-binned histogram of
the nonzero activations are accumulated with ``bincount``. Nothing grows with the dataset
except the image-level counters; no Python loop runs over features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vitclt.nn.transcoder import Transcoder

HIST_LOG2_MIN = -12.0
"""Lower edge of the activation histogram, in log2 units (smaller activations go to bin 0)."""
HIST_BINS_PER_OCTAVE = 4
"""Histogram resolution: bins per factor of two."""
HIST_BINS = 24 * HIST_BINS_PER_OCTAVE
"""Number of histogram bins: 2^-12 … 2^12."""


@dataclass
class TopList:
    """Per layer and feature, K images ranked by a score: scores, activations, images, token activations."""

    score_LFK: Tensor
    """Ranking score (the activation itself, or a random key for the uniform sample); -inf when empty."""
    value_LFK: Tensor
    """The image's maximum-over-tokens (or CLS) activation."""
    image_LFK: Tensor
    """Dataset index of the image (long); -1 when empty."""
    tokens_LFKT: Tensor
    """The feature's activation at every token of that image."""

    @classmethod
    def empty(cls, L: int, F: int, K: int, T: int, device: torch.device) -> TopList:
        """A list with no entries."""
        return cls(
            torch.full((L, F, K), -torch.inf, device=device),
            torch.zeros(L, F, K, device=device),
            torch.full((L, F, K), -1, dtype=torch.long, device=device),
            torch.zeros(L, F, K, T, device=device),
        )

    def merge(self, layer: int, score_FB: Tensor, value_FB: Tensor, image_B: Tensor, act_BTF: Tensor) -> None:
        """Keep the K best of the current entries and this batch's B candidates, for every feature at once."""
        K = self.score_LFK.shape[2]
        F, B = score_FB.shape
        T = act_BTF.shape[1]
        # The K kept entries, then the B candidates: (F, K + B).
        scores = torch.cat([self.score_LFK[layer], score_FB], 1)
        best_FK, sel_FK = scores.topk(K, dim=1)
        old_FK = sel_FK < K
        self.score_LFK[layer] = best_FK
        self.value_LFK[layer] = torch.cat([self.value_LFK[layer], value_FB], 1).gather(1, sel_FK)
        self.image_LFK[layer] = torch.cat([self.image_LFK[layer], image_B.expand(F, B)], 1).gather(1, sel_FK)
        # Gather the token rows from where each winner came from, never copying all B candidates.
        old_FKT = self.tokens_LFKT[layer].gather(1, sel_FK.clamp(max=K - 1)[..., None].expand(F, K, T))
        new_FKT = act_BTF.permute(2, 0, 1).gather(1, (sel_FK - K).clamp(min=0)[..., None].expand(F, K, T))
        self.tokens_LFKT[layer] = torch.where(old_FK[..., None], old_FKT, new_FKT)

    def to_cpu(self) -> TopList:
        """A copy on the CPU."""
        return TopList(*(t.cpu() for t in (self.score_LFK, self.value_LFK, self.image_LFK, self.tokens_LFKT)))


@dataclass
class FeatureStats:
    """What one pass learned about every feature of one transcoder (CPU tensors)."""

    n_images: int
    """Images seen."""
    n_tokens: int
    """Tokens seen (images × tokens per image)."""
    fire_LF: Tensor
    """Tokens on which each feature was nonzero."""
    image_fire_LF: Tensor
    """Images on which each feature was nonzero on some token."""
    sum_LF: Tensor
    """Sum of the feature's activations over the tokens where it fired."""
    max_LF: Tensor
    """Largest activation over every token seen (0 for a dead feature)."""
    hist_LFG: Tensor
    """Counts of the nonzero activations' magnitudes in log2 bins (see HIST_*)."""
    top_max: TopList
    """Top images by maximum over tokens."""
    top_cls: TopList
    """Top images by CLS activation."""
    sample: TopList
    """A uniform sample of the images where the feature fires."""
    label_sample: TopList | None = None
    """A larger uniform sample of them for the sees labels, without per-token activations (CLS only); None if not asked."""

    @property
    def dead_LF(self) -> Tensor:
        """Features that never fired in the pass."""
        return self.fire_LF == 0

    @property
    def mean_LF(self) -> Tensor:
        """Mean activation over the tokens where the feature fired (0 for a dead feature)."""
        return self.sum_LF / self.fire_LF.clamp_min(1)


class FeatureCollector:
    """Accumulates `FeatureStats` for one transcoder, batch by batch, on the transcoder's device."""

    def __init__(self, transcoder: Transcoder, n_tokens: int, top_k: int = 16, n_samples: int = 16, seed: int = 0,
                 label_samples: int = 0):
        self.tc = transcoder
        L, F, dev = transcoder.n_layers, transcoder.n_features, transcoder.b_dec.device
        self.L, self.F, self.T = L, F, n_tokens
        self.device = dev
        self.n_images = 0
        self.fire_LF = torch.zeros(L, F, dtype=torch.long, device=dev)
        self.image_fire_LF = torch.zeros(L, F, dtype=torch.long, device=dev)
        self.sum_LF = torch.zeros(L, F, device=dev)
        self.max_LF = torch.zeros(L, F, device=dev)
        self.hist_LFG = torch.zeros(L, F * HIST_BINS, dtype=torch.long, device=dev)
        self.top_max = TopList.empty(L, F, top_k, n_tokens, dev)
        self.top_cls = TopList.empty(L, F, top_k, n_tokens, dev)
        self.sample = TopList.empty(L, F, n_samples, n_tokens, dev)
        self.generator = torch.Generator(device=dev).manual_seed(seed)
        # One token slot only: the pages never draw these images, so their heatmaps are not kept.
        self.label_sample = TopList.empty(L, F, label_samples, 1, dev) if label_samples > 0 else None

    @torch.no_grad()
    def update(self, a_BTLD: Tensor, first_image: int) -> None:
        """Add a batch: the transcoder's inputs (B, T, L, D) of images first_image … first_image + B − 1."""
        B, T, L, D = a_BTLD.shape
        F = self.F
        image_B = torch.arange(first_image, first_image + B, device=self.device)
        for layer in range(L):
            codes = self.tc.encode_layer(layer, a_BTLD[:, :, layer].reshape(B * T, D).to(self.device))
            v_NK, i_NK = codes.values_NK.float(), codes.indices_NK
            # Padding slots hold value 0, so adding them changes nothing.
            act_BTF = torch.zeros(B * T, F, device=self.device).scatter_add_(1, i_NK, v_NK).view(B, T, F)
            fired_NK = v_NK != 0
            idx = i_NK[fired_NK]
            vals = v_NK[fired_NK]
            self.fire_LF[layer] += torch.bincount(idx, minlength=F)
            self.sum_LF[layer] += torch.bincount(idx, weights=vals, minlength=F).float()
            bins = ((vals.abs().log2() - HIST_LOG2_MIN) * HIST_BINS_PER_OCTAVE).floor().clamp(0, HIST_BINS - 1).long()
            self.hist_LFG[layer] += torch.bincount(idx * HIST_BINS + bins, minlength=F * HIST_BINS)
            max_BF = act_BTF.amax(1)
            fires_BF = (act_BTF != 0).any(1)
            self.image_fire_LF[layer] += fires_BF.sum(0)
            self.max_LF[layer] = torch.maximum(self.max_LF[layer], max_BF.amax(0))
            max_FB, cls_FB = max_BF.T, act_BTF[:, 0].T
            self.top_max.merge(layer, torch.where(max_FB > 0, max_FB, -torch.inf), max_FB, image_B, act_BTF)
            self.top_cls.merge(layer, torch.where(cls_FB > 0, cls_FB, -torch.inf), cls_FB, image_B, act_BTF)
            key_FB = torch.rand(F, B, device=self.device, generator=self.generator)
            self.sample.merge(layer, torch.where(fires_BF.T, key_FB, -torch.inf), max_FB, image_B, act_BTF)
            if self.label_sample is not None:
                key_FB = torch.rand(F, B, device=self.device, generator=self.generator)
                self.label_sample.merge(layer, torch.where(fires_BF.T, key_FB, -torch.inf), max_FB, image_B, act_BTF[:, :1])
        self.n_images += B

    def result(self) -> FeatureStats:
        """The statistics so far, on the CPU."""
        return FeatureStats(
            n_images=self.n_images,
            n_tokens=self.n_images * self.T,
            fire_LF=self.fire_LF.cpu(),
            image_fire_LF=self.image_fire_LF.cpu(),
            sum_LF=self.sum_LF.cpu(),
            max_LF=self.max_LF.cpu(),
            hist_LFG=self.hist_LFG.view(self.L, self.F, HIST_BINS).cpu(),
            top_max=self.top_max.to_cpu(),
            top_cls=self.top_cls.to_cpu(),
            sample=self.sample.to_cpu(),
            label_sample=self.label_sample.to_cpu() if self.label_sample is not None else None,
        )
