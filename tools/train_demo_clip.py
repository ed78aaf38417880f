"""Train the embedded demo model: a small CLIP-architecture model on the demo world's captions.

    python tools/train_demo_clip.py --seed 0 --out vitclt/assets/demo_clip

The model is a real `transformers` CLIPModel with CLIP's own tokenizer (49408 ids), trained
contrastively on captions of `vitclt.data.world` images rendered on the fly. It is saved in
float16 (safetensors) with its image processor, then reloaded through the ordinary loader and
measured: zero-shot top-1 on the held-out `test` split and on the `unseen` colour × shape
combinations, and the same with every MLP output replaced by zeros (how much the MLPs matter).
The numbers go into `training.json` and `TRAINING.md` next to the weights.

A tool of the source checkout, not part of the installed package: the package ships only the
weights (`vitclt/assets/demo_clip/`) and the world (`vitclt/data/world.py`).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vitclt.backbones.base import Backbone
from vitclt.backbones.hf_clip import HFClipBackbone
from vitclt.backbones.tiny import tiny_clip_config
from vitclt.backbones.tokenizer import clip_tokenizer
from vitclt.data.world import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    UNSEEN_LABELS,
    DemoWorld,
    Scene,
)


@dataclass
class TrainClipConfig:
    """How to train the demo CLIP."""

    seed: int = 0
    """Seed of the model's initialisation, the caption choices, and the world's training images."""
    out: Path = Path("vitclt/assets/demo_clip")
    """Directory to write the weights, image processor config and training record into."""
    layers: int = 6
    """Vision transformer blocks."""
    width: int = 64
    """Vision transformer width (the MLP hidden size is 4× this)."""
    patch_size: int = 8
    """Patch side in pixels; images are 32 px, so 8 gives 16 patches + CLS = 17 tokens."""
    heads: int = 4
    """Attention heads in the vision tower."""
    text_layers: int = 2
    """Text transformer blocks."""
    text_width: int = 64
    """Text transformer width."""
    text_heads: int = 2
    """Attention heads in the text tower."""
    projection_dim: int = 64
    """Width of the joint image-text embedding."""
    steps: int = 3400
    """Optimisation steps."""
    batch_size: int = 128
    """Image-caption pairs per step."""
    lr: float = 2e-3
    """Peak learning rate (AdamW), reached after warm-up and decayed to zero by a cosine."""
    warmup: int = 150
    """Linear warm-up steps."""
    weight_decay: float = 0.05
    """AdamW weight decay on weight matrices (not on embeddings, biases, norms or the logit scale)."""
    mention_prob: float = 0.5
    """Probability that a training caption mentions each of size, position and background."""
    eval_images: int = 2000
    """Held-out images for the final zero-shot measurements (per split; `unseen` uses at most 800)."""
    threads: int = 1
    """Torch threads; on a few shared cores one thread is often much faster than several."""
    log_every: int = 50
    """Print the loss every this many steps."""


def build_model(cfg: TrainClipConfig) -> CLIPModel:
    """A freshly initialised CLIPModel of the configured shape (seeded by the caller)."""
    config = tiny_clip_config(
        n_layers=cfg.layers, width=cfg.width, image_size=IMAGE_SIZE, patch_size=cfg.patch_size,
        text_layers=cfg.text_layers, text_width=cfg.text_width, projection_dim=cfg.projection_dim, heads=cfg.heads,
        text_heads=cfg.text_heads,
    )
    return CLIPModel(config)


_ATTRS = ("colour", "shape", "size", "position", "background")
_VOCAB = {
    "colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES),
    "position": [p for row in POSITIONS for p in row], "background": list(BACKGROUNDS),
}


def scene_codes(scenes: Sequence[Scene]) -> Tensor:
    """Each scene's attributes as integer codes: (B, 5) for colour, shape, size, position, background."""
    return torch.tensor([[_VOCAB[a].index(getattr(s, a)) for a in _ATTRS] for s in scenes], dtype=torch.long)


def positives(codes: Tensor, mentioned_optional: Tensor) -> Tensor:
    """(B, B) bool: caption j is true of image i (every attribute it mentions matches image i's).

    `codes` is (B, 5), one code per attribute. Colour and shape are always mentioned; size, position
    and background only where `mentioned_optional` (B, 3) says so. The diagonal is always true. This
    is the multi-positive target: a plain CLIP loss would push apart images and captions that
    describe each other.
    """
    same = codes[:, None, :] == codes[None, :, :]
    mentioned = torch.cat([torch.ones_like(mentioned_optional[:, :2]), mentioned_optional], dim=1)
    return (same | ~mentioned[None, :, :]).all(dim=-1)


def multi_positive_clip_loss(image_BP: Tensor, text_BP: Tensor, logit_scale: Tensor, pos_BB: Tensor) -> Tensor:
    """Symmetric contrastive loss whose targets spread evenly over all true pairs of a row/column."""
    logits_BB = logit_scale.exp().clamp(max=100) * image_BP @ text_BP.T
    target_i2t = pos_BB.float() / pos_BB.sum(dim=1, keepdim=True)
    target_t2i = pos_BB.T.float() / pos_BB.sum(dim=0)[:, None]
    return 0.5 * (F.cross_entropy(logits_BB, target_i2t) + F.cross_entropy(logits_BB.T, target_t2i))


def class_text_embeds(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """(C, P) zero-shot classifier: per class, the renormalised mean of its normalised template embeddings."""
    prompts = [t.format(c) for c in classnames for t in templates]
    text_CTP = backbone.text_embeds(prompts).reshape(len(classnames), len(templates), -1)
    return F.normalize(text_CTP.mean(dim=1), dim=-1)


@torch.inference_mode()
def zero_shot_top1(
    backbone: Backbone, world: DemoWorld, n_images: int, classes: Sequence[int] | None = None,
    ablate_mlps: bool = False, batch_size: int = 500,
) -> float:
    """Zero-shot top-1 accuracy over the first `n_images` of `world`.

    `classes` restricts the classifier to those labels (default: all of `world.classnames`).
    `ablate_mlps` replaces every vision MLP's output by zeros.
    """
    classes = list(range(len(world.classnames))) if classes is None else list(classes)
    text_CP = class_text_embeds(backbone, [world.classnames[c] for c in classes], world.templates)
    class_ids = torch.tensor(classes)
    correct = 0
    n = min(n_images, len(world))
    for start in range(0, n, batch_size):
        items = [world[i] for i in range(start, min(start + batch_size, n))]
        pixels = backbone.preprocess([im for im, _ in items])
        if ablate_mlps:
            with backbone.replace(lambda layer, x, y: torch.zeros_like(y), layers=range(backbone.n_layers)):
                image_BP = backbone.image_embeds(pixels)
        else:
            image_BP = backbone.image_embeds(pixels)
        pred = class_ids[(image_BP @ text_CP.T).argmax(dim=1)]
        correct += int((pred == torch.tensor([lab for _, lab in items])).sum())
    return correct / n


def measure(backbone: Backbone, seed: int, n_images: int) -> dict[str, float]:
    """Zero-shot top-1 on held-out seen classes and on unseen combinations, with and without MLPs."""
    test = DemoWorld("test", size=n_images, seed=seed)
    unseen = DemoWorld("unseen", size=min(n_images, 800), seed=seed)
    return {
        "test_top1_48way": zero_shot_top1(backbone, test, n_images),
        "unseen_top1_48way": zero_shot_top1(backbone, unseen, len(unseen)),
        "unseen_top1_among_unseen_8way": zero_shot_top1(backbone, unseen, len(unseen), classes=UNSEEN_LABELS),
        "test_top1_48way_mlps_zeroed": zero_shot_top1(backbone, test, n_images, ablate_mlps=True),
        "unseen_top1_48way_mlps_zeroed": zero_shot_top1(backbone, unseen, len(unseen), ablate_mlps=True),
    }


def _lr_factor(step: int, cfg: TrainClipConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * t))


def _optimizer(model: CLIPModel, cfg: TrainClipConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def train(cfg: TrainClipConfig) -> CLIPModel:
    """Train the demo CLIP from scratch and return it (float32, eval mode)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_model(cfg).train()
    processor = _processor(IMAGE_SIZE)
    tokenizer = clip_tokenizer(model.config.text_config.max_position_embeddings)
    world = DemoWorld("train", size=cfg.steps * cfg.batch_size, seed=cfg.seed)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    token_cache: dict[str, list[int]] = {}
    start = time.time()
    for step in range(cfg.steps):
        items = [world.item(i) for i in range(step * cfg.batch_size, (step + 1) * cfg.batch_size)]
        scenes = [s for _, s in items]
        pixels = processor(images=[im for im, _ in items], return_tensors="pt")["pixel_values"]
        mentioned_B3 = torch.from_numpy(rng.random((cfg.batch_size, 3)) < cfg.mention_prob)
        captions = [s.caption(*map(bool, m)) for s, m in zip(scenes, mentioned_B3.tolist(), strict=True)]
        for c in captions:
            if c not in token_cache:
                token_cache[c] = tokenizer(c)["input_ids"]
        tok = tokenizer.pad({"input_ids": [token_cache[c] for c in captions]}, return_tensors="pt")
        image_BP = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text_BP = F.normalize(
            model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output, dim=-1
        )
        loss = multi_positive_clip_loss(image_BP, text_BP, model.logit_scale, positives(scene_codes(scenes), mentioned_B3))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  scale {model.logit_scale.exp().item():6.2f}  "
                  f"{time.time() - start:7.1f}s", flush=True)
    return model.eval()


def _processor(size: int) -> CLIPImageProcessorPil:
    """CLIP's image processor at `size` px: CLIP's mean/std; resize and crop are no-ops on world images."""
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def save(model: CLIPModel, out: Path) -> None:
    """Write the weights in float16 (safetensors) and the image processor config into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out)
    _processor(model.config.vision_config.image_size).save_pretrained(out)


def write_record(
    cfg: TrainClipConfig, out: Path, train_s: float, wall_s: float, metrics: dict[str, float], command: str
) -> None:
    """Write `training.json` (machine-readable) and `TRAINING.md` (for people) into `out`."""
    record = {
        "command": command,
        "seed": cfg.seed,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "train_time_s": round(train_s, 1),
        "wall_time_s": round(wall_s, 1),
        "torch": torch.__version__,
        "metrics": {k: round(v, 4) for k, v in metrics.items()},
        "chance_48way": round(1 / 48, 4),
        "chance_8way": round(1 / 8, 4),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {100 * v:.1f}% |" for k, v in metrics.items())
    cfg_rows = "\n".join(f"| {k} | {v} |" for k, v in record["config"].items())
    (out / "TRAINING.md").write_text(
        "# The embedded demo CLIP\n\n"
        "Trained by vitclt's own script on the procedurally generated demo world (`vitclt/data/world.py`).\n\n"
        f"Command:\n\n```\n{command}\n```\n\n"
        f"Seed {cfg.seed}; training took {train_s / 60:.1f} min and the whole command {wall_s / 60:.1f} min "
        f"on {cfg.threads} CPU thread(s) of a shared machine; torch {torch.__version__}.\n\n"
        "## Zero-shot top-1\n\n"
        f"Measured after the float16 round-trip, through `load_backbone`, on {cfg.eval_images} held-out `test` "
        "images (the 40 seen classes) and 800 `unseen` images (the 8 held-out colour × shape combinations). "
        "48-way: the classifier spans all 48 classes (chance 2.1%); 8-way: only the 8 unseen ones (chance 12.5%). "
        "`mlps_zeroed`: every vision MLP output replaced by zeros.\n\n"
        f"| measurement | top-1 |\n|---|---|\n{rows}\n\n"
        f"## Config\n\n| field | value |\n|---|---|\n{cfg_rows}\n"
    )


def run(cfg: TrainClipConfig) -> dict[str, float]:
    """Train, save in float16, reload through the ordinary loader, measure, and record."""
    torch.set_num_threads(cfg.threads)
    start = time.time()
    model = train(cfg)
    train_s = time.time() - start
    save(model, cfg.out)
    backbone = HFClipBackbone.from_pretrained(cfg.out)
    metrics = measure(backbone, seed=cfg.seed, n_images=cfg.eval_images)
    wall_s = time.time() - start
    command = "python tools/train_demo_clip.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_record(cfg, cfg.out, train_s, wall_s, metrics, command)
    for k, v in metrics.items():
        print(f"{k:34s} {100 * v:5.1f}%")
    print(f"weights, training.json and TRAINING.md written to {cfg.out}")
    return metrics


def main() -> None:
    """Command-line entry point."""
    import tyro

    run(tyro.cli(TrainClipConfig))


if __name__ == "__main__":
    main()
