"""Distributed training on CPU/gloo: step time, bytes per step (planned and counted) and peak memory per rank.

For 1, 2 and 4 processes (feature parallel S = N, and data parallel S = 1), spawns the ranks, trains a
`ShardedTranscoder` slice for a few Adam steps on random rows, and prints per grid shape: the median step time
(rank 0), the bytes `vitclt plan` computes from the shapes, the bytes counted on rank 0 (the payload of every
collective, converted by the same ring costs: all-reduce 2·b·(g−1)/g, all-gather b·(g−1)), the parameter bytes
per rank and the peak RSS of each rank (ru_maxrss; includes torch itself, about 0.3-0.4 GB).

    PYTHONPATH=. python bench/distributed.py [--features 4096] [--steps 5]

On a machine with fewer cores than processes the step times measure contention, not scaling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vitclt.nn import Transcoder, TranscoderConfig
from vitclt.nn.sharded import Grid, ShardedTranscoder
from vitclt.training.plan import Shape, rank_plan

L, D, K, B = 4, 128, 16, 1024


def _count(sent: list[int]):
    """Wrap the collectives so that each adds its ring cost to ``sent``."""
    reduce, gather = dist.all_reduce, dist.all_gather

    def all_reduce(t, *args, group=None, **kwargs):
        g = dist.get_world_size(group)
        sent[0] += 2 * t.numel() * t.element_size() * (g - 1) // g
        return reduce(t, *args, group=group, **kwargs)

    def all_gather(parts, t, *args, group=None, **kwargs):
        sent[0] += t.numel() * t.element_size() * (dist.get_world_size(group) - 1)
        return gather(parts, t, *args, group=group, **kwargs)

    dist.all_reduce, dist.all_gather = all_reduce, all_gather


def _worker(rank: int, world: int, shards: int, features: int, steps: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    grid = Grid.create(shards)
    torch.manual_seed(0)
    cfg = TranscoderConfig(n_layers=L, d_model=D, n_features=features, k=K)
    model = ShardedTranscoder.from_transcoder(Transcoder(cfg), grid)
    opt = torch.optim.Adam(model.parameters(), fused=True)
    rows = grid.batch_slice(B)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(B, L, D, generator=gen), torch.randn(B, L, D, generator=gen)
    sent, times = [0], []
    _count(sent)
    for step in range(steps + 1):
        if step == 1:
            sent[0] = 0  # the first step is a warm-up
        dist.barrier()
        start = time.perf_counter()
        out = model(x[rows], y[rows])
        out.objective.backward()
        model.sync_gradients()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    result = {"step_s": statistics.median(times), "sent": sent[0] / steps,
              "params": sum(p.numel() * p.element_size() for p in model.parameters()),
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"CLT relu-topk, {L} layers x width {D}, {args.features} features, k {K}, global batch {B}; CPU/gloo, "
          f"{os.cpu_count()} cores")
    print("   N  S x R   step s   planned MiB/step   counted MiB/step   params MiB/rank   peak RSS MiB per rank")
    for world, shards in ((1, 1), (2, 2), (2, 1), (4, 4), (4, 1)):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(world, shards, args.features, args.steps, tmp), nprocs=world)
            ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)]
        plan = rank_plan(Shape(L, D, args.features, "clt", "relu-topk", K, B, 0), world, shards)
        mib = 2.0**20
        print(f"  {world:2d}  {shards} x {world // shards}  {ranks[0]['step_s']:7.3f}  {plan.sent_per_step / mib:16.2f}  "
              f"{ranks[0]['sent'] / mib:17.2f}  {ranks[0]['params'] / mib:16.1f}   "
              + " ".join(f"{r['peak_rss'] / mib:.0f}" for r in ranks))


if __name__ == "__main__":
    main()
