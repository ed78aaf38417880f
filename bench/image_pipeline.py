"""The image pipeline's throughput, and what reduced JPEG decoding costs in zero-shot accuracy.

Three parts, each printed as a table (pick with --parts):

    decode    host decode + preparation (resize, centre crop to uint8) of synthetic JPEGs, images/s,
              through `ImageLoader` with 0..N worker processes, exact and with --fast-decode (draft)
    harvest   end to end: `BackboneSource.load` (decode, prepare, copy, normalise on the device, forward
              with capture of every MLP) on a random ViT at 224 px, images/s, for the same settings
    zeroshot  the demo CLIP's zero-shot top-1/top-5 on JPEG copies of the demo test split, exact decode
              vs reduced decode: at the demo's 32 px (draft never triggers) and upscaled to 128 and 256 px

    python bench/image_pipeline.py                                   # CPU: all parts, small model for harvest
    python bench/image_pipeline.py --device cuda --model b32 --workers 0 4 8 16 --images 4096   # a GPU host
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitclt.backbones.transforms import HFImagePrep
from vitclt.data.batches import ImageLoader, chunked
from vitclt.data.images import open_image


class JpegFolder:
    """Image files with labels, decoded by `open_image` like the file datasets."""

    def __init__(self, paths: list[Path], labels: list[int], classnames: list[str] | None = None,
                 templates: list[str] | None = None):
        self.paths, self.label_list = paths, labels
        self.classnames, self.templates = classnames, templates

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return open_image(self.paths[index]), self.label_list[index]


def synthetic_jpegs(root: Path, n: int, size: int, seed: int = 0) -> JpegFolder:
    """`n` smooth random square JPEGs (so they compress like photos), as in issue 12's measurements."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        path = root / f"{i:06d}.jpg"
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    return JpegFolder(paths, [0] * n)


def rate(fn, n_images: int, repeats: int = 2) -> float:
    """Images per second of `fn()` (best of `repeats` after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n_images / best


def bench_decode(data: JpegFolder, prep, workers: list[int], batch: int) -> None:
    print(f"\n== host decode + prepare (resize, crop to uint8), {len(data)} JPEGs, batches of {batch}: images/s")
    print(f"{'workers':>8} {'exact':>10} {'draft':>10}")
    chunks = chunked(range(len(data)), batch)
    for w in workers:
        row = []
        for fast in (False, True):
            loader = ImageLoader(data, prep, w, fast_decode=fast)  # workers persist across the timed passes
            row.append(rate(lambda: sum(1 for _ in loader.batches(chunks)), len(data)))
        print(f"{w:>8} {row[0]:>10.1f} {row[1]:>10.1f}")


def random_vit(model: str, device: torch.device, dtype: torch.dtype):
    """A randomly initialised CLIP at 224 px / patch 32: transformers' default (ViT-B/32) or a 4-layer width-256 one."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from vitclt.backbones.hf_clip import HFClipBackbone

    vision = {} if model == "b32" else {"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 1024,
                                        "num_attention_heads": 4}
    text = {} if model == "b32" else {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128,
                                      "num_attention_heads": 2}
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text)).to(device, dtype)
    return HFClipBackbone(clip, CLIPImageProcessorPil())


def bench_harvest(data: JpegFolder, args) -> None:
    from vitclt.data.stream import BackboneSource

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    bb = random_vit(args.model, device, dtype)
    print(f"\n== harvest: BackboneSource.load of {len(data)} JPEGs, {args.model} ({bb.n_layers} layers, width "
          f"{bb.d_model}, {dtype}) on {device}, capture of every MLP, {args.batch} images per forward: images/s")
    print(f"{'workers':>8} {'exact':>10} {'draft':>10}")
    order = list(range(len(data)))
    for w in args.workers:
        row = []
        for fast in (False, True):
            source = BackboneSource(bb, data, "all", args.batch, workers=w, fast_decode=fast)

            def harvest():
                source.load(order)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

            row.append(rate(harvest, len(data), repeats=1))
        print(f"{w:>8} {row[0]:>10.1f} {row[1]:>10.1f}")
    pixels = bb.preprocess([data[0][0]] * args.batch)

    def forward():
        with bb.capture():
            bb.image_embeds(pixels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    print(f"   forward with capture alone (pixels already on the device): {rate(forward, args.batch):.1f} images/s")


def bench_zeroshot(root: Path, args) -> None:
    from vitclt.backbones import load_backbone
    from vitclt.data.batches import pixel_batches
    from vitclt.data.world import DemoWorld
    from vitclt.eval.zeroshot import build_classifier, topk_correct

    world = DemoWorld("test")
    bb = load_backbone("demo")
    classifier = build_classifier(bb, world.classnames, world.templates)
    print(f"\n== zero-shot on JPEG copies of the demo test split ({len(world)} images, 48 classes, demo CLIP, "
          "JPEG quality 90, bicubic upscale)")
    print(f"{'copy':>12} {'decode':>8} {'top-1 %':>8} {'top-5 %':>8}  pixels equal to exact")
    for fmt, size in (("png", 32), ("jpeg", 32), ("jpeg", 128), ("jpeg", 256)):
        folder = root / f"{fmt}{size}"
        folder.mkdir()
        paths, labels = [], []
        for i in range(len(world)):
            image, label = world[i]
            if size != image.width:
                image = image.resize((size, size), Image.BICUBIC)
            path = folder / f"{i:05d}.{fmt}"
            image.save(path, **({"quality": 90} if fmt == "jpeg" else {}))
            paths.append(path)
            labels.append(label)
        data = JpegFolder(paths, labels)
        pixels = {}
        for fast in (False, True):
            n1 = n5 = 0
            parts = []
            for px, labels_B in pixel_batches(bb, data, 256, workers=args.zeroshot_workers, fast_decode=fast):
                hit1, hit5 = topk_correct(bb.image_embeds(px), classifier, labels_B)
                n1, n5 = n1 + int(hit1.sum()), n5 + int(hit5.sum())
                parts.append(px.cpu())
            pixels[fast] = torch.cat(parts)
            same = "" if not fast else f"{bool(torch.equal(pixels[True], pixels[False]))}"
            print(f"{fmt + ' ' + str(size) + ' px':>12} {'draft' if fast else 'exact':>8} {100 * n1 / len(data):>8.2f} "
                  f"{100 * n5 / len(data):>8.2f}  {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["decode", "harvest", "zeroshot"],
                        choices=["decode", "harvest", "zeroshot"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="small", choices=["small", "b32"], help="ViT for the harvest part")
    parser.add_argument("--bf16", action="store_true", help="run the harvest's ViT in bfloat16")
    parser.add_argument("--images", type=int, default=256, help="synthetic JPEGs for decode and harvest")
    parser.add_argument("--size", type=int, default=448, help="side of the synthetic square JPEGs")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=64, help="images per batch (per forward)")
    parser.add_argument("--zeroshot-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs visible, device {args.device}, main-process threads "
          f"{args.threads}")
    with tempfile.TemporaryDirectory(prefix="vitclt-image-bench-") as tmp:
        root = Path(tmp)
        if {"decode", "harvest"} & set(args.parts):
            (root / "jpegs").mkdir()
            data = synthetic_jpegs(root / "jpegs", args.images, args.size)
            print(f"{args.images} synthetic JPEGs of {args.size} x {args.size} px → CLIP's 224 px preprocessing")
        if "decode" in args.parts:
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

            bench_decode(data, HFImagePrep(CLIPImageProcessorPil()), args.workers, args.batch)
        if "harvest" in args.parts:
            bench_harvest(data, args)
        if "zeroshot" in args.parts:
            bench_zeroshot(root, args)


if __name__ == "__main__":
    main()
