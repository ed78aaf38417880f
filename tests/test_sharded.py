"""Feature-parallel and data-parallel transcoders equal one process: codes, losses, gradients and Adam steps.

Each test spawns one group of gloo processes on the CPU; every rank runs all cases (topology × sparsifier ×
grid shape × tied or random pre-activations) against its own one-process reference and reports what differs.
"""

import datetime
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vitclt.nn import Transcoder, TranscoderConfig
from vitclt.nn.sharded import Grid, ShardedTranscoder, gather_state

TOPOLOGIES = ["clt", "plt", "sae"]
SPARSIFIERS = ["relu-topk", "abs-topk", "batch-topk", "jumprelu"]
L, D, F, K, B, STEPS = 3, 8, 16, 3, 12, 3


def _batch(step: int, ties: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step; with ``ties`` the first is small integers, so pre-activations tie exactly and often.

    Only the first: once Adam has moved the weights by multiples of about the learning rate, integer inputs put
    pre-activations within rounding of ReLU's kink at 0, where no two summation orders agree on the gradient.
    """
    gen = torch.Generator().manual_seed(100 + step)
    if ties and step == 0:
        return (torch.randint(-2, 3, (B, L, D), generator=gen).float(), torch.randint(-2, 3, (B, L, D), generator=gen).float())
    return torch.randn(B, L, D, generator=gen) * 2 + 1, torch.randn(B, L, D, generator=gen) - 3


def _reference(topology: str, sparsifier: str, ties: bool) -> Transcoder:
    torch.manual_seed(0)
    cfg = TranscoderConfig(n_layers=L, d_model=D, n_features=F, k=K, topology=topology, sparsifier=sparsifier,
                           jumprelu_bandwidth=0.5, sparsity_coefficient=0.05, auxk_k=4, dead_tokens=B)
    model = Transcoder(cfg)
    x, y = _batch(0, ties)
    if ties:
        # Encoder rows of -1, 0, 1 on integer inputs with identity normalisation: exact integer pre-activations.
        with torch.no_grad():
            for W in model.W_enc:
                W.copy_(torch.randint(-1, 2, W.shape, generator=torch.Generator().manual_seed(7)).float())
        zero, one = torch.zeros(L, D), torch.ones(L)
        model.set_normalization(zero, one, zero, one)
    else:
        model.set_normalization(*Transcoder.normalization_stats(x), *Transcoder.normalization_stats(y))
    model.init_thresholds(x, y)
    return model.train()


def _close(failures: list, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    try:
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=2e-5)
    except AssertionError as err:
        failures.append(f"{what}: {str(err).splitlines()[0:3]}")


def _run_case(grid: Grid, topology: str, sparsifier: str, ties: bool, failures: list) -> None:
    tag = f"S={grid.shards} R={grid.replicas} {topology}:{sparsifier}{' ties' if ties else ''}"
    ref = _reference(topology, sparsifier, ties)
    sharded = ShardedTranscoder.from_transcoder(ref, grid)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    sh_opt = torch.optim.Adam(sharded.parameters(), lr=1e-2)
    part, rows = grid.feature_slice(F), grid.batch_slice(B)
    since_ref = torch.zeros(L, F, dtype=torch.long)
    since_sh = torch.zeros(L, part.stop - part.start, dtype=torch.long)
    for step in range(STEPS):
        x, y = _batch(step, ties)
        dead_ref = since_ref >= B if step else None
        out = ref(x, y, dead_mask_LF=dead_ref)
        out.loss.backward()
        got = sharded(x[rows], y[rows], dead_mask_LF=since_sh >= B if step else None)
        got.objective.backward()
        sharded.sync_gradients()
        where = f"{tag} step {step}"
        codes = got.codes.to_dense(sharded.local_features)
        _close(failures, f"{where} codes", grid.gather_features(codes, 2), out.codes.to_dense(F)[rows])
        for name in ("loss", "fvu_L", "l0_L", "sparsity_loss", "auxk_loss"):
            _close(failures, f"{where} {name}", getattr(got, name), getattr(out, name))
        _close(failures, f"{where} recon", got.recon_NLD, out.recon_NLD[rows])
        grads = gather_state({n: p.grad for n, p in sharded.local.named_parameters()}, grid)
        for n, p in ref.named_parameters():
            _close(failures, f"{where} grad {n}", grads[n], p.grad)
        ref_opt.step()
        ref_opt.zero_grad()
        sh_opt.step()
        sh_opt.zero_grad()
        fired_ref = out.codes.to_dense(F).ne(0).any(0)
        since_ref = torch.where(fired_ref, 0, since_ref + B)
        since_sh = torch.where(sharded.fired_LF(got.codes), 0, since_sh + B)
        _close(failures, f"{where} dead counters", grid.gather_features(since_sh, 1), since_ref)
    final = gather_state(sharded.state_dict(), grid)
    for n, t in ref.state_dict().items():
        _close(failures, f"{tag} final {n}", final[n], t)
    names = dict(zip(map(id, ref.parameters()), (n for n, _ in ref.named_parameters())))
    sh_params = dict(sharded.local.named_parameters())
    for p in ref.parameters():
        n = names[id(p)]
        for key in ("exp_avg", "exp_avg_sq"):
            moment = gather_state({n: sh_opt.state[sh_params[n]][key]}, grid)[n]
            _close(failures, f"{tag} Adam {key} {n}", moment, ref_opt.state[p][key])


def _worker(rank: int, world: int, rdv: str, out: str, shard_counts: list[int]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    failures: list[str] = []
    try:
        for shards in shard_counts:
            grid = Grid.create(shards)
            for topology in TOPOLOGIES:
                for sparsifier in SPARSIFIERS:
                    # Ties are selected by the same code for every topology: the CLT's cases cover them.
                    for ties in (False, True) if topology == "clt" else (False,):
                        _run_case(grid, topology, sparsifier, ties, failures)
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(failures, f)
        dist.destroy_process_group()


def _spawn(tmp_path, world: int, shard_counts: list[int]) -> None:
    mp.spawn(_worker, args=(world, str(tmp_path / "rdv"), str(tmp_path), shard_counts), nprocs=world)
    failures = [f"rank {r}: {msg}" for r in range(world) for msg in json.loads((tmp_path / f"rank{r}.json").read_text())]
    assert not failures, "\n".join(failures[:20])


def test_two_processes_feature_parallel_and_data_parallel_equal_one_process(tmp_path):
    """S = 2 (feature parallel) and S = 1, R = 2 (data parallel, global batch B) against one process with B."""
    _spawn(tmp_path, 2, [2, 1])


def test_four_processes_feature_parallel_and_2x2_grid_equal_one_process(tmp_path):
    """S = 4 and the 2 × 2 grid (S = 2 shards × R = 2 replicas) against one process."""
    _spawn(tmp_path, 4, [4, 2])
