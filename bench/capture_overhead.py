"""Time the backbone forward plain, with capture, and with an identity replacement.

A full-size ViT-B/32 vision tower (12 layers, width 768, 224 px, patch 32) with random weights, at
batch 32 by default. The three variants are interleaved over several rounds and the median of each
is reported, so background load on a shared machine hits them alike.

    python bench/capture_overhead.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPModel

from vitclt.backbones import HFClipBackbone
from vitclt.backbones.tiny import tiny_clip_config


def vit_b(patch: int) -> HFClipBackbone:
    """CLIP ViT-B/`patch` vision tower (random weights) with a minimal text tower."""
    cfg = tiny_clip_config(n_layers=12, width=768, image_size=224, patch_size=patch, heads=12, projection_dim=512)
    return HFClipBackbone(CLIPModel(cfg), name=f"ViT-B/{patch} (random)")


def main() -> None:
    """Parse flags, time each variant, print a table of medians and ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bb = vit_b(args.patch)
    bb.model.to(args.device)
    px = torch.randn(args.batch, 3, 224, 224, device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def plain():
        bb.image_embeds(px)

    def captured():
        with bb.capture() as cap:
            bb.image_embeds(px)
        return cap

    def replaced():
        with bb.replace(lambda layer, x, y: y, range(bb.n_layers), "all"):
            bb.image_embeds(px)

    variants = {"plain forward": plain, "with capture": captured, "identity replacement": replaced}
    plain()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain forward"])
    print(f"{bb.name}, batch {args.batch}, {bb.n_tokens} tokens/image, device {args.device}, threads {args.threads}, "
          f"{args.rounds} rounds")
    print(f"{'variant':<22}{'median s':>10}{'images/s':>10}{'ratio':>8}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<22}{m:>10.3f}{args.batch / m:>10.1f}{m / base:>8.3f}")


if __name__ == "__main__":
    main()
