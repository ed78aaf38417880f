"""Time each cascaded-replacement setting against plain zero-shot evaluation, per image batch.

The default shape is CLIP ViT-B/32's vision tower (12 layers, width 768, patch 32, 224 px) with
random weights, and a random ReLU-TopK CLT (expansion 8, k 32): speed does not depend on the
weights. For each batch the bench times what `vitclt eval` does: the plain forward (what zero-shot
evaluation costs), the clean forward with capture plus encoding every layer once (shared by all
settings of the batch), and one forward per (window × tokens) setting, with the zero-ablation
control as the cost of the hooks alone. It prints each setting's time relative to the plain forward.

    OMP_NUM_THREADS=1 python bench/replacement_overhead.py                 # ViT-B/32 shape, CPU
    python bench/replacement_overhead.py --layers 4 --width 256 --images 8 # a smaller shape
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel

from vitclt.backbones.hf_clip import HFClipBackbone
from vitclt.backbones.tiny import tiny_clip_config
from vitclt.eval.replacement import default_windows, encode_rows, transcoder_setting, zero_setting
from vitclt.eval.zeroshot import embed_images
from vitclt.nn import Transcoder, TranscoderConfig


def parse_args() -> argparse.Namespace:
    """The benchmark's shape and run options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--images", type=int, default=16, help="images per batch")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (the fastest is reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args()


def timed(fns, repeats: int, sync) -> list[float]:
    """Fastest seconds of each function over `repeats` rounds (after a warm-up round).

    The functions run in turn within each round, so a slow moment of a shared machine hits all of
    them alike, and the minimum is the least disturbed estimate of each.
    """
    times = [[] for _ in fns]
    for r in range(repeats + 1):
        for fn, t in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r:
                t.append(time.perf_counter() - t0)
    return [min(t) for t in times]


@torch.inference_mode()
def main() -> None:
    """Build the model and transcoder, time every setting, print the table."""
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    heads = max(1, args.width // 64)
    config = tiny_clip_config(n_layers=args.layers, width=args.width, image_size=args.image_size, patch_size=args.patch,
                              heads=heads, projection_dim=min(512, args.width))
    backbone = HFClipBackbone(CLIPModel(config).eval().to(device), name=f"random-vit-L{args.layers}-D{args.width}-P{args.patch}")
    tc_cfg = TranscoderConfig(n_layers=args.layers, d_model=args.width, expansion=args.expansion, k=args.k)
    tc = Transcoder(tc_cfg, device=device).eval()
    rng = np.random.default_rng(0)
    shape = (args.image_size, args.image_size, 3)
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(args.images)]
    pixels = backbone.preprocess(images)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    L = backbone.n_layers

    def plain():
        embed_images(backbone, pixels)

    def clean_with_codes():
        with backbone.capture() as cap:
            backbone.image_embeds(pixels)
        return [encode_rows(tc, layer, cap.inputs[layer], cap.outputs[layer]) for layer in range(L)]

    t_plain, t_shared = timed([plain, clean_with_codes], args.repeats, sync)
    codes = clean_with_codes()
    print(f"backbone {backbone.name} ({backbone.n_tokens} tokens), CLT relu-topk F={tc.n_features} k={args.k}, "
          f"{args.images} images/batch, device {device}, threads {torch.get_num_threads()}")
    print(f"plain zero-shot forward: {1000 * t_plain:.1f} ms/batch")
    print(f"clean forward + capture + encode all layers (once per batch, shared by every setting): "
          f"{1000 * t_shared:.1f} ms ({t_shared / t_plain:.2f}x)")
    print(f"{'setting':<18}{'plain ms':>10}{'CLT ms':>10}{'CLT/plain':>11}{'zero ms':>10}{'zero/plain':>11}")
    ratios, plains = [], []
    for w in default_windows(L):
        for tokens in ("cls", "patches", "all"):
            clt = transcoder_setting("clt", tc, backbone, w, tokens)
            zero = zero_setting("zero", w, tokens)
            p, c, z = timed([plain, lambda: embed_images(backbone, pixels, clt.make(codes)),
                             lambda: embed_images(backbone, pixels, zero.make(None))], args.repeats, sync)
            ratios.append(c / p)
            plains.append(p)
            print(f"{w.start}→{w.end} {tokens:<12}{1000 * p:10.1f}{1000 * c:10.1f}{c / p:10.2f}x{1000 * z:10.1f}{z / p:10.2f}x")
    grid = (t_shared / t_plain + sum(ratios)) / (len(ratios) + 1)
    print(f"replaced vs plain, per setting: mean {statistics.fmean(ratios):.2f}x, max {max(ratios):.2f}x; "
          f"whole grid including the shared clean pass: {grid:.2f}x a plain forward per setting")


if __name__ == "__main__":
    main()
