"""The whole pipeline, timed by phase: `vitclt reproduce` on a random full-size ViT-B/32 and synthetic JPEGs.

Builds a randomly initialised CLIPModel from transformers' default CLIPConfig (ViT-B/32: 12
layers, width 768, 224 px, patch 32), saves it (safetensors) and loads it through
`load_backbone` like any checkpoint; writes synthetic JPEGs into an ImageFolder (train/ and
test/); then runs `vitclt.commands.reproduce.run` (what `vitclt reproduce` runs) with its
phases timed by wrapping the functions that do them:

    normalisation   estimate_normalization (the runner's statistics pass)
    thresholds      JumpReLU's threshold fit on a sample of rows (runner._init_thresholds)
    harvest         the time training waited for blocks (ActivationStream._load_block): the backbone
                    forward, whatever decoding the workers had not done ahead, the copy to the device
    train <model>   each transcoder's forward, backward and Adam step (Transcoder.forward → Adam.step)
    feature browser the browser of the ReLU-TopK CLT that reproduce builds (one pass over the eval images)
    evaluation      `vitclt eval` on every trained model

and prints tokens/s, images/s and peak memory (CUDA max_memory_allocated on GPU; peak RSS on
CPU). With workers, each block after the first is decoded while the previous one trains, so
that decoding is in no phase and the harvest's images/s is per second training waited; with 0
workers (and for the first block) the harvest includes the decoding. The phases add up to about
the wall time.

    python bench/pipeline.py                       # full size: 12 x 768, 5 transcoders (GPU)
    python bench/pipeline.py --small               # tiny ViT, a few images and steps: seconds on CPU
    python bench/pipeline.py --images 50000 --eval-images 10000 --steps 10000   # the paper's defaults
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_jpegs(root: Path, n_train: int, n_test: int, size: int, classes: int, seed: int = 0) -> None:
    """An ImageFolder of smooth random JPEGs (so they compress like photos) in train/ and test/."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            folder = root / split / f"class {i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
            image.save(folder / f"{i:06d}.jpg", quality=90)


class PhaseClock:
    """Wall time per phase from wrapped functions, synchronising CUDA at each boundary."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.active: list[str] = []

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str, count: int = 0):
        self.active.append(name)
        start = self.now()
        try:
            yield
        finally:
            self.seconds[name] += self.now() - start
            self.counts[name] += count
            self.active.pop()

    def wrap(self, owner, attr: str, name, count=lambda *a, **k: 0) -> None:
        """Time every call of owner.attr as phase `name` (a string, or a function of the call's arguments)."""
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            phase = name(*args, **kwargs) if callable(name) else name
            if phase is None:
                return inner(*args, **kwargs)
            with self.phase(phase, count(*args, **kwargs)):
                return inner(*args, **kwargs)

        setattr(owner, attr, timed)


def instrument(clock: PhaseClock) -> None:
    """Wrap the functions whose time makes up each phase (see the module docstring)."""
    from vitclt.commands import eval as eval_command
    from vitclt.commands import reproduce
    from vitclt.data import stream
    from vitclt.nn import Transcoder
    from vitclt.training import runner

    clock.wrap(runner, "estimate_normalization", "normalisation")
    clock.wrap(runner, "_init_thresholds", "thresholds")
    clock.wrap(reproduce, "build_study_browser", "feature browser")
    clock.wrap(eval_command, "run", "evaluation")
    # Only the training stream's block loads are harvest: the other phases' loads belong to them.
    clock.wrap(stream.ActivationStream, "_load_block", "harvest",
               count=lambda self, epoch, block: len(self.block_image_indices(epoch, block)))

    # A training step runs each model's forward, backward and Adam step in turn: time from its
    # forward to its optimiser step.
    started: dict[str, float] = {}
    forward, adam_step = Transcoder.forward, torch.optim.Adam.step

    def timed_forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            started["model"] = f"train {self.cfg.topology}:{self.cfg.sparsifier}"
            started["t"] = clock.now()
        return forward(self, *args, **kwargs)

    def timed_step(self, *args, **kwargs):
        out = adam_step(self, *args, **kwargs)
        if "model" in started:
            clock.seconds[started["model"]] += clock.now() - started.pop("t")
            clock.counts[started.pop("model")] += 1
        return out

    Transcoder.forward = timed_forward
    torch.optim.Adam.step = timed_step


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak CUDA memory allocated {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB"


def main() -> None:
    """Parse arguments, build the model and images, run reproduce with timed phases, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny ViT (3 x 32, 32 px), few images and steps: seconds on CPU")
    ap.add_argument("--images", type=int, help="training images (default 2048; small: 32)")
    ap.add_argument("--eval-images", type=int, help="evaluation images (default 512; small: 16)")
    ap.add_argument("--image-size", type=int, help="side of the synthetic JPEGs in px (default 448; small: 40)")
    ap.add_argument("--steps", type=int, help="training steps per transcoder (default 200; small: 3)")
    ap.add_argument("--batch", type=int, help="tokens per step (default 4096; small: 64)")
    ap.add_argument("--k", type=int, help="active features per row and layer (default 32; small: 4)")
    ap.add_argument("--expansion", type=int, help="features per layer / width (default 8; small: 4)")
    ap.add_argument("--workers", type=int, default=6, help="image decoding workers")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--dir", type=Path, help="work directory (default: a temporary one, removed after)")
    args = ap.parse_args()

    from transformers import CLIPConfig

    from vitclt.backbones.tiny import build_tiny_clip, tiny_clip_config
    from vitclt.commands import reproduce
    from vitclt.eval.options import EvalOptions
    from vitclt.nn.config import TranscoderConfig
    from vitclt.runtime import RuntimeConfig, setup
    from vitclt.training.config import OptimConfig, SweepConfig

    small = args.small
    pick = lambda value, full, tiny: value if value is not None else (tiny if small else full)  # noqa: E731
    n_images, n_eval = pick(args.images, 2048, 32), pick(args.eval_images, 512, 16)
    size, steps, batch = pick(args.image_size, 448, 40), pick(args.steps, 200, 3), pick(args.batch, 4096, 64)
    k, expansion = pick(args.k, 32, 4), pick(args.expansion, 8, 4)
    runtime = RuntimeConfig(device=args.device, threads=args.threads, workers=args.workers, progress=False)
    device = setup(runtime)

    with contextlib.ExitStack() as stack:
        work = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vitclt-pipeline-")))
        t0 = time.perf_counter()
        config = tiny_clip_config() if small else CLIPConfig()
        model_dir = build_tiny_clip(work / "model", seed=0, config=config)
        write_jpegs(work / "images", n_images, n_eval, size, classes=10)
        vision = config.vision_config
        print(f"setup {time.perf_counter() - t0:.1f} s: random CLIP (vision {vision.num_hidden_layers} layers x "
              f"{vision.hidden_size}, {vision.image_size} px, patch {vision.patch_size}) in {model_dir}; "
              f"{n_images} + {n_eval} synthetic {size} px JPEGs; device {device}", flush=True)

        clock = PhaseClock(device)
        instrument(clock)
        cfg = reproduce.ReproduceConfig(
            backbone=str(model_dir), dataset=f"folder:{work / 'images'}", out=work / "out",
            sweep=SweepConfig(models=reproduce.PAPER_MODELS, k=(k,)), transcoder=TranscoderConfig(expansion=expansion),
            optim=OptimConfig(steps=steps, batch_size=batch, warmup_steps=None), evaluation=EvalOptions(seeds=1),
            runtime=RuntimeConfig(device=str(device), threads=args.threads, workers=args.workers, progress=False),
            overwrite=True,
        )
        start = clock.now()
        report = reproduce.run(cfg)
        wall = clock.now() - start

    tokens = steps * batch
    print(f"\nvitclt reproduce: {wall:.2f} s wall; report {report.name}")
    print(f"{'phase':<24} {'seconds':>9} {'share':>6}  rate")
    for name, seconds in clock.seconds.items():
        n = clock.counts[name]
        if name == "harvest":
            rate = f"{n / seconds:,.0f} images/s ({n} images) over the seconds training waited for blocks"
        elif name.startswith("train "):
            rate = f"{tokens / seconds:,.0f} tokens/s ({n} steps)"
        else:
            rate = ""
        print(f"{name:<24} {seconds:>9.2f} {100 * seconds / wall:>5.1f}%  {rate}")
    trained = sum(s for name, s in clock.seconds.items() if name.startswith("train ") or name == "harvest")
    print(f"{'training (all models)':<24} {trained:>9.2f} {100 * trained / wall:>5.1f}%  "
          f"{tokens / trained:,.0f} tokens/s end to end (harvest included)")
    print(peak_memory(device))


if __name__ == "__main__":
    main()
