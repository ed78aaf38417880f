"""`vitclt demo`: the main job end to end on the embedded default, with no network and no GPU.

A preset of `vitclt reproduce`: the small CLIP shipped in `vitclt/assets/demo_clip`, its generated
world, the paper's three CLTs and the PLT and SAE baselines trained on one stream, the whole
evaluation, the report, sized to finish in a few minutes on 2 CPU cores. Every `reproduce` flag
works here with these defaults; `--quick` is the CI size (400 training images, 100 steps, 160
evaluation images, 2 seeds).
"""

from __future__ import annotations

from pathlib import Path

from vitclt.commands.reproduce import PAPER_MODELS, ReproduceConfig
from vitclt.eval.options import EvalOptions
from vitclt.nn.config import TranscoderConfig
from vitclt.runtime import RuntimeConfig
from vitclt.training.config import OptimConfig, SweepConfig

DEMO = ReproduceConfig(
    max_images=2000,
    eval_images=800,
    sweep=SweepConfig(models=PAPER_MODELS, k=(16,)),
    transcoder=TranscoderConfig(expansion=8),
    optim=OptimConfig(steps=400, batch_size=1024, warmup_steps=None),
    evaluation=EvalOptions(seeds=5),
    runtime=RuntimeConfig(threads=1, workers=1),
    out=Path("runs/demo"),
    overwrite=True,
    command="demo",
)
"""The demo's settings: `vitclt demo` is `vitclt reproduce` with these defaults."""

DESCRIPTION = ("train and evaluate CLTs on the embedded CLIP and its world, then print the headline table and write the "
               "report (a preset of reproduce; --quick: the CI size)")
"""The subcommand's one-line help."""
