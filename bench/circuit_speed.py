"""Seconds per attribution graph (one image, one target), and for pruning it.

    python bench/circuit_speed.py RUN_DIR --backbone demo --images 5 --threads 2
    python bench/circuit_speed.py --synthetic vit-b-32 --device cuda     # random ViT-B/32-shaped CLIP and CLT

RUN_DIR holds a trained transcoder (its first one is used); images come from the demo world. The
synthetic case builds a randomly initialised CLIPModel of ViT-B/32's vision shape (12 layers, width 768,
224 px, patch 32: 50 tokens) and a random CLT of 6144 features per layer with k = 32 (about 19,200
active features), which is the issue's speed target on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def synthetic(device: str):
    from transformers import CLIPConfig, CLIPModel

    from vitclt.backbones.hf_clip import HFClipBackbone
    from vitclt.nn.config import TranscoderConfig
    from vitclt.nn.transcoder import Transcoder

    torch.manual_seed(0)
    cfg = CLIPConfig(vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                        image_size=224, patch_size=32),
                     text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=49408), projection_dim=512)
    backbone = HFClipBackbone(CLIPModel(cfg).eval().to(device), name="random-vit-b-32")
    tc = Transcoder(TranscoderConfig(n_layers=12, d_model=768, n_features=6144, k=32), device=device).eval()
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(3)]
    return backbone, tc, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", help="a trained transcoder or run directory")
    ap.add_argument("--backbone", default=None, help="backbone spec (default: the transcoder's)")
    ap.add_argument("--synthetic", choices=["vit-b-32"], default=None, help="random model of this shape instead of RUN_DIR")
    ap.add_argument("--images", type=int, default=5, help="graphs to time (one per image)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["float32", "float64"], default="float32")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from vitclt.circuits.graph import FEATURE
    from vitclt.circuits.pipeline import image_graph
    from vitclt.circuits.prune import prune

    if args.synthetic:
        backbone, tc, images = synthetic(args.device)
        classifier = F.normalize(torch.randn(3, 512, device=args.device), dim=-1)
    else:
        from vitclt.backbones import load_backbone
        from vitclt.circuits.inputs import find_transcoder
        from vitclt.data.datasets import load_dataset
        from vitclt.eval.suite import backbone_spec
        from vitclt.eval.zeroshot import build_classifier, dataset_templates
        from vitclt.nn.transcoder import Transcoder

        tc_name, tc_dir = find_transcoder(args.run_dir)
        backbone = load_backbone(backbone_spec({tc_name: tc_dir}, args.backbone), device=args.device)
        tc = Transcoder.from_pretrained(tc_dir, device=backbone.device)
        data = load_dataset("demo")
        images = [data[i][0] for i in range(args.images)]
        classifier = build_classifier(backbone, data.classnames, dataset_templates(data))
    dtype = torch.float64 if args.precision == "float64" else torch.float32
    times, prune_times = [], []
    for i in range(args.images):
        image = images[i % len(images)]
        pixels = backbone.preprocess([image])
        sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        g = image_graph(backbone, tc, pixels, classifier, 0, dtype, args.batch_size)
        sync()
        t1 = time.perf_counter()
        prune(g.adjacency, g.target)
        t2 = time.perf_counter()
        times.append(t1 - t0)
        prune_times.append(t2 - t1)
        n_feat = int((g.kind_N == FEATURE).sum())
        print(f"image {i}: {g.n} nodes ({n_feat} active features): graph {t1 - t0:.2f} s, pruning {t2 - t1:.2f} s; "
              f"|score − Σ direct effects| = {abs(g.score - float(g.adjacency[g.target].sum())):.1e}")
    print(f"device {args.device}, threads {args.threads}, {args.precision}: median {statistics.median(times):.2f} s per graph, "
          f"{statistics.median(prune_times):.2f} s per pruning")


if __name__ == "__main__":
    main()
