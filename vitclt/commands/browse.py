"""`vitclt browse`: a static feature browser for trained transcoders (see docs/browser.md).

The config module imports no torch: `--help` and bad flags stay fast; `run` loads the library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from tyro.conf import OmitArgPrefixes, Positional

from vitclt.runtime import RuntimeConfig


@dataclass
class BrowseConfig:
    """`vitclt browse RUN_DIR`: a static site of every feature's top images, heatmaps, decoder profile and CLIP text labels."""

    run_dir: Positional[Path]
    """A transcoder directory (config.json + model.safetensors) or a run directory holding several."""
    dataset: str = "demo"
    """Dataset spec to browse on (any `--dataset` spec); it may differ from the training set, and the pages say so."""
    split: str = "test"
    """Split of the dataset: test (held out), train, or all (the whole of a folder: dataset without split folders)."""
    transcoders: tuple[str, ...] = ()
    """Names of the transcoders in RUN_DIR to include (default: all); names as `vitclt eval` lists them."""
    backbone: str | None = None
    """Backbone spec; default: the one the transcoders were trained on."""
    max_images: int | None = None
    """Browse a class-stratified subset of this many images (default: the whole split)."""
    top_k: int = 16
    """Top images kept per feature, by max-over-tokens and by CLS activation."""
    samples: int = 16
    """Images sampled uniformly per feature among those where it fires (the moderate-strength rows)."""
    vocab_size: int = 3000
    """Words to label features with: CLIP BPE words for the direct-path labels, common English words for the sees/writes
    labels on a dataset other than the demo world (0: class names only)."""
    label_samples: int = 128
    """Images sampled uniformly per feature among those where it fires, for its sees labels (not shown on the pages)."""
    templates: str | None = None
    """Prompt templates for the class-name labels: a shipped set (cifar100, imagenet, imagenet7, coco) or a file with one
    template per line, each with '{}' (default: the dataset's own)."""
    concepts: Path | None = None
    """A file of extra concept words or phrases for the sees/writes labels, one per line."""
    writes: bool = True
    """Compute the writes-labels (the embedding's Jacobian at every feature's top images: a few backward passes per image)."""
    thumb_size: int = 128
    """Largest side of the stored image thumbnails, in pixels (smaller images keep their size)."""
    exports: bool = True
    """Also write circuit-tracer `features/` files and Neuronpedia/SAEDashboard batches."""
    out: Path | None = None
    """Output directory (default: RUN_DIR/browser); an earlier browser there is replaced."""
    runtime: Annotated[RuntimeConfig, OmitArgPrefixes] = field(default_factory=lambda: RuntimeConfig(workers=0))
    """Device, threads, image decoding, seed (of the subset, the uniform samples and the label check), progress bars."""


def run(cfg: BrowseConfig) -> Path:
    """Build the browser and print where to open it."""
    from vitclt.browser import build_browser
    from vitclt.runtime import setup

    device = setup(cfg.runtime)
    out = build_browser(
        cfg.run_dir, cfg.dataset, cfg.out, backbone=cfg.backbone, transcoders=list(cfg.transcoders) or None,
        split=cfg.split, max_images=cfg.max_images, top_k=cfg.top_k, samples=cfg.samples, vocab_size=cfg.vocab_size,
        label_samples=cfg.label_samples, templates=cfg.templates, concepts=cfg.concepts, writes=cfg.writes,
        images_per_forward=cfg.runtime.images_per_forward, thumb_size=cfg.thumb_size, exports=cfg.exports, device=device,
        workers=cfg.runtime.workers, fast_decode=cfg.runtime.fast_decode, seed=cfg.runtime.seed, progress=cfg.runtime.progress,
    )
    print(f"open the browser: {out / 'index.html'}")
    return out
