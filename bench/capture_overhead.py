"""Time the backbone forward plain, with capture, and with an identity replacement, per model family.

Each family at base size with random weights: CLIP ViT-B/32 and open_clip ViT-B/32 (224 px, 50
tokens), SigLIP B/16 (224 px, 196 tokens, attention-pool head), DINOv2 ViT-B/14 (224-px crop, 257
tokens, layer scale: capture reads two modules per block), timm vit_base_patch16_224 (197 tokens).
The three variants are interleaved over several rounds and the median of each is reported, so
background load on a shared machine hits them alike.

    python bench/capture_overhead.py --family all --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from vitclt.backbones import Backbone


def clip_b32() -> Backbone:
    """CLIP ViT-B/32 vision tower with a minimal text tower."""
    from transformers import CLIPModel

    from vitclt.backbones import HFClipBackbone
    from vitclt.backbones.tiny import tiny_clip_config

    cfg = tiny_clip_config(n_layers=12, width=768, image_size=224, patch_size=32, heads=12, projection_dim=512)
    return HFClipBackbone(CLIPModel(cfg), name="CLIP ViT-B/32")


def open_clip_b32() -> Backbone:
    """open_clip ViT-B-32 (GELU, as the LAION-2B weights), mapped onto CLIPModel as its checkpoints are."""
    from transformers import CLIPModel

    from vitclt.backbones.open_clip import OpenClipBackbone, eval_transform, hf_config

    cfg = hf_config({"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                     "text_cfg": {"layers": 1, "width": 64, "heads": 1}})
    bb = OpenClipBackbone(CLIPModel(cfg), name="open_clip ViT-B-32")
    bb.transform = eval_transform(cfg, {})
    return bb


def siglip_b16() -> Backbone:
    """SigLIP B/16 vision tower with a minimal text tower."""
    from transformers import SiglipConfig, SiglipModel

    from vitclt.backbones import SiglipBackbone

    cfg = SiglipConfig(vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                          image_size=224, patch_size=16),
                       text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                                        vocab_size=1000, projection_size=768, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    return SiglipBackbone(SiglipModel(cfg), name="SigLIP B/16")


def dinov2_b14() -> Backbone:
    """DINOv2 ViT-B/14 with its released preprocessing (224-px crop of a 518-px model)."""
    from transformers import Dinov2Config, Dinov2Model

    from vitclt.backbones import Dinov2Backbone

    cfg = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14, image_size=518)
    return Dinov2Backbone(Dinov2Model(cfg), name="DINOv2 ViT-B/14")


def timm_b16() -> Backbone:
    """timm vit_base_patch16_224 with its 1000-class head."""
    from vitclt.backbones.timm_vit import TimmViT, TimmViTBackbone, TimmViTConfig, eval_transform

    cfg = TimmViTConfig(width=768, depth=12, heads=12, patch_size=16, grid=14, mlp_width=3072, num_classes=1000)
    return TimmViTBackbone(TimmViT(cfg), eval_transform({}, 224), name="timm vit_base_patch16_224")


FAMILIES: dict[str, Callable[[], Backbone]] = {
    "clip": clip_b32, "openclip": open_clip_b32, "siglip": siglip_b16, "dinov2": dinov2_b14, "timm": timm_b16,
}


def bench(bb: Backbone, batch: int, rounds: int, device: str) -> dict[str, list[float]]:
    """Seconds per forward for each variant, `rounds` times each, interleaved."""
    px = torch.randn(batch, 3, bb.image_size, bb.image_size, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

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
    for _ in range(rounds):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    """Parse flags, time each family's variants, print a table of medians and ratios per family."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=[*FAMILIES, "all"], default="clip")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for family in FAMILIES if args.family == "all" else [args.family]:
        torch.manual_seed(0)
        bb = FAMILIES[family]()
        bb.model.to(args.device)
        times = bench(bb, args.batch, args.rounds, args.device)
        base = statistics.median(times["plain forward"])
        print(f"{bb.name} (random weights), batch {args.batch}, {bb.n_tokens} tokens/image, device {args.device}, "
              f"threads {args.threads}, {args.rounds} rounds")
        print(f"{'variant':<22}{'median s':>10}{'images/s':>10}{'ratio':>8}")
        for name, ts in times.items():
            m = statistics.median(ts)
            print(f"{name:<22}{m:>10.3f}{args.batch / m:>10.1f}{m / base:>8.3f}")
        print()


if __name__ == "__main__":
    main()
