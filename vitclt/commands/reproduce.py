"""`vitclt reproduce`: the paper's study in one command, from training to the combined report.

Trains the paper's three sparsifiers as CLTs (JumpReLU, ReLU-TopK, Abs-TopK) and, as baselines, a
per-layer transcoder (PLT) and an SAE with ReLU-TopK (the paper's replacement sparsifier), all at
the same k (so matched L0 for the TopK family), in ONE training run on a single activation stream,
so the backbone runs once per training image for every model; `--models` picks other pairs. Then
the evaluation suite runs on all of them and writes the combined report.

    OUT/train/clt-{jumprelu,relu-topk,abs-topk}/, OUT/train/{plt,sae}-relu-topk/   config.json, model.safetensors, training.json
    OUT/eval/metrics.json, OUT/eval/figures/*.png, OUT/eval/report.html
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from tyro.conf import OmitArgPrefixes, Suppress

from vitclt.eval.options import EvalOptions
from vitclt.nn.config import TokenSet, TranscoderConfig
from vitclt.runtime import RuntimeConfig
from vitclt.training.config import OptimConfig, StreamConfig, SweepConfig, TrainConfig

PAPER_MODELS = ("clt:jumprelu", "clt:relu-topk", "clt:abs-topk", "plt:relu-topk", "sae:relu-topk")
"""The study: the paper's three sparsifiers as CLTs, and the PLT and SAE baselines with ReLU-TopK."""

QUICK = {"max_images": 400, "steps": 100, "eval_images": 160, "seeds": 2}
"""The caps `--quick` applies: training images, steps, evaluation images, faithfulness seeds."""


@dataclass
class ReproduceConfig:
    """`vitclt reproduce`: train JumpReLU / ReLU-TopK / Abs-TopK CLTs plus PLT and SAE baselines, evaluate all, report."""

    backbone: str = "demo"
    """Backbone: a hub id (openai/clip-vit-base-patch32), a local model directory or checkpoint, or `demo`."""
    dataset: str = "demo"
    """Dataset spec for training and evaluation, e.g. cifar100:/data/cifar-100-python."""
    train_split: str = "train"
    """Split the transcoders are trained on."""
    eval_split: str = "test"
    """Held-out split they are evaluated on."""
    max_images: int | None = None
    """Train on a class-stratified subset of this many images (quick runs)."""
    eval_images: int | None = None
    """Evaluate on a class-stratified subset of this many images (quick runs)."""
    tokens: TokenSet = "all"
    """Tokens the transcoders are trained on."""
    # Groups: on the command line their flags are flat (--k, --expansion, --lr, --windows, --device).
    sweep: Annotated[SweepConfig, OmitArgPrefixes] = field(default_factory=lambda: SweepConfig(models=PAPER_MODELS))
    """The models of the study (default: the paper's five) and their k."""
    transcoder: Annotated[TranscoderConfig, OmitArgPrefixes] = field(default_factory=TranscoderConfig)
    """Settings every trained transcoder shares."""
    optim: Annotated[OptimConfig, OmitArgPrefixes] = field(default_factory=lambda: OptimConfig(warmup_steps=None))
    """Optimiser and schedules."""
    stream: Annotated[StreamConfig, OmitArgPrefixes] = field(default_factory=StreamConfig)
    """Activation stream."""
    evaluation: Annotated[EvalOptions, OmitArgPrefixes] = field(default_factory=EvalOptions)
    """What the evaluation measures, and its task head (a probe fits on --probe-split, by default on at most --max-images)."""
    runtime: Annotated[RuntimeConfig, OmitArgPrefixes] = field(default_factory=RuntimeConfig)
    """Device, threads, image decoding, seed, progress bars."""
    out: Path = Path("runs/reproduce")
    """Output directory (OUT/train, OUT/eval)."""
    resume: bool = False
    """Resume an unfinished training run in OUT/train."""
    overwrite: bool = False
    """Replace an earlier run of this command in OUT/train (never a run another command made)."""
    browse: bool = True
    """Also build the feature browser of the ReLU-TopK CLT (else the first CLT) on the evaluation images, in
    OUT/train/browser, and link it from the report (`vitclt browse` makes fuller ones, with exports)."""
    quick: bool = False
    """Smoke-test size: at most 400 training images, 100 steps, 160 evaluation images and 2 seeds."""
    command: Suppress[str] = "reproduce"
    """The subcommand this config belongs to (`reproduce`, or a preset such as `demo`), recorded in the run."""

    def sized(self) -> ReproduceConfig:
        """This config with the `--quick` caps applied (itself if not quick)."""
        if not self.quick:
            return self

        def cap(value: int | None, limit: int) -> int:
            return limit if value is None else min(value, limit)

        return dataclasses.replace(
            self, quick=False, max_images=cap(self.max_images, QUICK["max_images"]),
            eval_images=cap(self.eval_images, QUICK["eval_images"]),
            optim=dataclasses.replace(self.optim, steps=cap(self.optim.steps, QUICK["steps"])),
            evaluation=dataclasses.replace(self.evaluation, seeds=cap(self.evaluation.seeds, QUICK["seeds"])))

    def train_config(self) -> TrainConfig:
        """The one training run: every model of the study, on one activation stream, in OUT/train."""
        return TrainConfig(backbone=self.backbone, dataset=self.dataset, split=self.train_split, max_images=self.max_images,
                           tokens=self.tokens, sweep=self.sweep, transcoder=self.transcoder, optim=self.optim,
                           stream=self.stream, runtime=self.runtime, out=self.out / "train", resume=self.resume,
                           overwrite=self.overwrite)

    def eval_config(self):
        """The evaluation of every trained model on the held-out split, into OUT/eval (a linear probe, where the
        backbone needs one, on at most as many training images as the transcoders saw)."""
        from vitclt.commands.eval import EvalConfig

        task = self.evaluation.task
        if task.probe_images is None:
            task = dataclasses.replace(task, probe_images=self.max_images)
        return EvalConfig(run_dir=self.out / "train", dataset=self.dataset, split=self.eval_split, backbone=self.backbone,
                          eval_images=self.eval_images, options=dataclasses.replace(self.evaluation, task=task),
                          runtime=self.runtime, out=self.out / "eval")


def build_study_browser(cfg: ReproduceConfig, trained: list[str]) -> Path | None:
    """The feature browser of the study's ReLU-TopK CLT (else its first CLT) on the evaluation images; None without a CLT."""
    from vitclt.browser import build_browser
    from vitclt.eval.suite import featured_transcoder
    from vitclt.runtime import resolve_device

    chosen = featured_transcoder({name: cfg.out / "train" / name for name in trained})
    if chosen is None:
        return None
    rt = cfg.runtime
    site = build_browser(cfg.out / "train", cfg.dataset, transcoders=[chosen], backbone=cfg.backbone, split=cfg.eval_split,
                         max_images=cfg.eval_images, images_per_forward=rt.images_per_forward, exports=False,
                         device=resolve_device(rt.device), workers=rt.workers, fast_decode=rt.fast_decode, seed=rt.seed,
                         progress=rt.progress)
    print(f"feature browser of {chosen}: {site / 'index.html'}")
    return site


def run(cfg: ReproduceConfig) -> Path:
    """Run `vitclt reproduce` (or a preset of it): train, evaluate, write the combined report; return its path."""
    from vitclt.commands.eval import run as run_eval
    from vitclt.io import jsonable
    from vitclt.runtime import check_writable_dir
    from vitclt.training.checkpoint import check_owner
    from vitclt.training.runner import train

    start = time.perf_counter()
    cfg = cfg.sized()
    tcfg, ecfg = cfg.train_config(), cfg.eval_config()
    tcfg.validate()
    ecfg.options.validate()
    # Before any compute: the training run in OUT/train must be this command's, OUT/eval and OUT/train/browser writable.
    check_owner(tcfg.out, cfg.command)
    check_writable_dir(ecfg.out_dir)
    if cfg.browse:
        import shutil

        from vitclt.browser.build import prepare_output

        shutil.rmtree(prepare_output(tcfg.out / "browser"))  # the browser is built after training: check it now
    pairs = [f"{t}:{s}" for t, s in tcfg.sweep.pairs()]
    print(f"training {len(pairs) * len(tcfg.sweep.k)} models ({', '.join(pairs)}; k={', '.join(map(str, tcfg.sweep.k))}, "
          f"{tcfg.optim.steps} steps) on one activation stream")
    paths = train(tcfg, command=cfg.command)
    if int(os.environ.get("RANK", "0")) != 0:
        # Under torchrun every rank trains (docs/distributed.md); the evaluation is one process's, rank 0's.
        return tcfg.out
    if cfg.browse:
        build_study_browser(cfg, [p.name for p in paths])
    context = {"reproduce": jsonable(dataclasses.asdict(cfg)), "train": tcfg.to_json()}
    report = run_eval(ecfg, context=context)
    print(f"{cfg.command} finished in {time.perf_counter() - start:.0f} s; open the report: {report}")
    return report
