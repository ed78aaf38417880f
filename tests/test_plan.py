"""`vitclt plan`: its per-rank figures are what a sharded rank allocates, and its growth is the measured peak's."""

import subprocess
import sys

import pytest

from vitclt.commands.plan import PlanConfig, run
from vitclt.nn import TranscoderConfig
from vitclt.nn.sharded import Grid, ShardedTranscoder
from vitclt.training.plan import Shape, rank_plan

PEAK = """
import sys, torch
from pathlib import Path
from vitclt.nn import Transcoder, TranscoderConfig

def peak_rss():
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024

L, D, F, B = 4, 128, int(sys.argv[1]), 256
torch.set_num_threads(1)
x, y = torch.randn(B, L, D), torch.randn(B, L, D)
# This process's own peak from here: ru_maxrss would start at the forking parent's peak (pytest's, often larger).
Path("/proc/self/clear_refs").write_text("5")
before = peak_rss()
model = Transcoder(TranscoderConfig(n_layers=L, d_model=D, n_features=F, k=16))
opt = torch.optim.Adam(model.parameters(), fused=True)
for _ in range(2):
    model(x, y).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print(peak_rss() - before)
"""


@pytest.mark.parametrize("topology", ["clt", "plt", "sae"])
@pytest.mark.parametrize("sparsifier", ["relu-topk", "jumprelu"])
@pytest.mark.parametrize("shards", [1, 2, 4])
def test_plan_counts_the_parameters_a_sharded_rank_holds(topology, sparsifier, shards):
    cfg = TranscoderConfig(n_layers=3, d_model=8, n_features=32, k=4, topology=topology, sparsifier=sparsifier)
    rank = ShardedTranscoder(cfg, Grid(shards, 1, shard=shards - 1))
    held = sum(p.numel() * p.element_size() for p in rank.parameters())
    assert rank_plan(Shape(3, 8, 32, topology, sparsifier, 4, 8), shards, shards).parameters == held


def test_plan_memory_growth_matches_the_measured_peak():
    """Tripling the features adds what the plan says to the measured peak of a training step (parameters,
    gradients, Adam, activations); the fixed rest (libraries, allocator) is not planned."""
    measured = [int(subprocess.run([sys.executable, "-c", PEAK, str(f)], capture_output=True, text=True, check=True).stdout)
                for f in (8192, 24576)]
    planned = [rank_plan(Shape(4, 128, f, "clt", "relu-topk", 16, 256, buffer_rows=0), 1, 1).total for f in (8192, 24576)]
    growth, want = measured[1] - measured[0], planned[1] - planned[0]
    assert abs(growth - want) < 0.15 * want, f"peak grew by {growth / 2**20:.0f} MiB, the plan says {want / 2**20:.0f} MiB"


def test_plan_names_the_fewest_shards_that_fit(capsys):
    text = run(PlanConfig(backbone="vit-l/14", n_features=32768, processes=8, gpu_gib=80))
    assert "--feature-shards 4 is the fewest that fits" in text
    # The estimate for a ViT-L/14 CLT of 32,768 features with fp32 Adam: about 175 GB on one process.
    one = rank_plan(PlanConfig().shape(), 8, 1)
    assert 170 < (one.parameters + one.gradients + one.adam) / 1e9 < 180
