"""`vitclt demo`: the main job end to end on the embedded default, with no network and no GPU.

A preset of `vitclt reproduce`: the small CLIP shipped in `vitclt/assets/demo_clip`, its generated
world, a sparsity-fidelity frontier trained on one stream (CLT and per-layer transcoder, each with
ReLU-TopK and JumpReLU, at L0 8, 16 and 32: the paper's sparsifier question and the CLT-versus-PLT
question at matched L0, on three points each), the whole evaluation, the report, sized to finish in
a few minutes on 2 CPU cores. Every `reproduce` flag works here with these defaults (`--models` and
`--k` pick another study, e.g. the paper's five models: `--models clt:jumprelu clt:relu-topk
clt:abs-topk plt:relu-topk sae:relu-topk --k 16`); `--quick` is the CI size (400 training images,
100 steps, 160 evaluation images, 2 seeds).
"""

from __future__ import annotations

from pathlib import Path

from vitclt.commands.reproduce import ReproduceConfig
from vitclt.eval.options import EvalOptions
from vitclt.nn.config import TranscoderConfig
from vitclt.runtime import RuntimeConfig
from vitclt.training.config import OptimConfig, SweepConfig

FRONTIER_MODELS = ("clt:relu-topk", "clt:jumprelu", "plt:relu-topk", "plt:jumprelu")
"""The demo's curves: both topologies with the paper's replacement sparsifier and with the penalty-based one."""

DEMO = ReproduceConfig(
    max_images=2000,
    eval_images=400,
    sweep=SweepConfig(models=FRONTIER_MODELS, k=(8, 16, 32)),
    transcoder=TranscoderConfig(expansion=8),
    optim=OptimConfig(steps=200, batch_size=1024, warmup_steps=None),
    evaluation=EvalOptions(seeds=3),
    runtime=RuntimeConfig(threads=1, workers=1),
    out=Path("runs/demo"),
    overwrite=True,
    command="demo",
)
"""The demo's settings: `vitclt demo` is `vitclt reproduce` with these defaults."""

DESCRIPTION = ("train CLTs and per-layer transcoders at three L0s on the embedded CLIP and its world, evaluate them, then "
               "print the headline table and write the report with the frontiers (a preset of reproduce; --quick: the CI size)")
"""The subcommand's one-line help."""
