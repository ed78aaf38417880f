"""Tokens per second and peak memory of one CLT training step, sparse vs dense paths.

One step is forward + backward + optimiser step on random activations. Every configuration
runs in a fresh subprocess, so its peak resident memory (ru_maxrss) is its own; the forward,
backward and optimiser times are reported separately because at the paper's shapes the Adam
update over 425M parameters is a sizeable, memory-bound share of the step. On CUDA it also
counts the device syncs of one more step (``torch.cuda.set_sync_debug_mode("warn")``): each is
a point where the host waits for the device instead of queuing the next kernels.

    python bench/train_throughput.py                              # small shape, quick
    python bench/train_throughput.py --shape paper --batch 1024 --threads 1 --steps 3
    python bench/train_throughput.py --shape paper --variants sparse dense --batch 1024 4096
    python bench/train_throughput.py --device cuda --bf16 --shape paper --batch 4096
    python bench/train_throughput.py --shape paper --sparsifier jumprelu batch-topk --topology clt plt

Variants: sparse (sparse decode + sparse encoder backward), dense-decode, dense-encoder,
dense (both plain autograd). Sparsifiers and topologies are swept with --sparsifier and
--topology; a JumpReLU starts from thresholds fitted to k active features on the step's own
rows (`Transcoder.init_thresholds`), as a run does. The decode then follows the code's width
(dense when wide: `prefer_dense_decode`); the "width" column is the widest code per row.
On CPU the children run with glibc malloc tuned so freed gradients are reused rather than
returned to the kernel and page-faulted back every step (MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_); --no-malloc-tuning shows the default.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SHAPES = {
    "paper": dict(n_layers=12, d_model=768, expansion=8, k=32),
    "small": dict(n_layers=4, d_model=128, expansion=8, k=16),
}
VARIANTS = {
    "sparse": dict(sparse_decode=True, sparse_encoder=True),
    "dense-decode": dict(sparse_decode=False, sparse_encoder=True),
    "dense-encoder": dict(sparse_decode=True, sparse_encoder=False),
    "dense": dict(sparse_decode=False, sparse_encoder=False),
}
MALLOC_TUNING = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 1024 * 1024 * 1024),
}


def child(spec: dict) -> dict:
    """Run one configuration in this process and return its measurements."""
    import resource
    import statistics
    import time

    import torch

    from vitclt.nn import Transcoder, TranscoderConfig

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    cfg = TranscoderConfig(**spec["shape"], **VARIANTS[spec["variant"]], sparsifier=spec["sparsifier"],
                           topology=spec["topology"])
    model = Transcoder(cfg, device=device)
    params = list(model.parameters())
    if spec["adam"] == "fused":
        opt = torch.optim.Adam(params, lr=1e-4, fused=True)
    else:
        opt = torch.optim.Adam(params, lr=1e-4, foreach=True)
    n, L, D = spec["batch"], cfg.n_layers, cfg.d_model
    x = torch.randn(n, L, D, device=device)
    y = torch.randn(n, L, D, device=device)
    model.set_normalization(*Transcoder.normalization_stats(x), *Transcoder.normalization_stats(y))
    model.init_thresholds(x, y)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def clocks():
        sync()
        return time.perf_counter(), time.process_time()

    rows = []
    for step in range(spec["warmup"] + spec["steps"]):
        t0 = clocks()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"]):
            out = model(x, y)
        t1 = clocks()
        out.loss.backward()
        t2 = clocks()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = clocks()
        if step >= spec["warmup"]:
            rows.append([b[0] - a[0] for a, b in ((t0, t1), (t1, t2), (t2, t3), (t0, t3))]
                        + [t3[1] - t0[1]])
    fwd, bwd, adam, total, cpu = (statistics.median(col) for col in zip(*rows))
    syncs = None
    if device.type == "cuda":
        # One more step under CUDA's sync debugging: every operation that makes the host wait for the
        # device warns (a step that never waits lets the host queue kernels ahead of the device).
        import warnings

        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"]):
                    step_out = model(x, y)
                step_out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    result = dict(
        spec,
        params_M=sum(p.numel() for p in params) / 1e6,
        fwd_s=fwd, bwd_s=bwd, adam_s=adam, step_s=total, step_cpu_s=cpu,
        tokens_per_s=n / total,
        tokens_per_cpu_s=n / cpu,
        fvu=float(out.fvu),
        l0=float(out.l0_L.mean()),
        width=int(out.codes.values_NLK.shape[-1]),
        peak_rss_GB=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        peak_rss_delta_GB=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1e6,
    )
    if device.type == "cuda":
        result["peak_cuda_GB"] = torch.cuda.max_memory_allocated() / 1e9
        result["syncs_per_step"] = syncs
    return result


def main() -> None:
    """Parse arguments and run every requested configuration in a fresh subprocess."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small", help="preset shape")
    ap.add_argument("--layers", type=int, help="override n_layers")
    ap.add_argument("--d-model", type=int, help="override d_model")
    ap.add_argument("--expansion", type=int, help="override expansion")
    ap.add_argument("--k", type=int, help="override k")
    ap.add_argument("--batch", type=int, nargs="+", default=[1024], help="rows per step")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["sparse", "dense"])
    ap.add_argument("--sparsifier", nargs="+", default=["relu-topk"],
                    choices=["relu-topk", "jumprelu", "batch-topk", "abs-topk"], help="sparsifiers to sweep")
    ap.add_argument("--topology", nargs="+", default=["clt"], choices=["clt", "plt", "sae"], help="topologies to sweep")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads (CPU)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps (Adam state, allocator)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast around the forward")
    ap.add_argument("--adam", choices=["fused", "foreach"], default="fused", help="Adam implementation")
    ap.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc at its defaults")
    ap.add_argument("--json", help="also append results as JSON lines to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return

    shape = dict(SHAPES[args.shape])
    for key, value in (("n_layers", args.layers), ("d_model", args.d_model),
                       ("expansion", args.expansion), ("k", args.k)):
        if value is not None:
            shape[key] = value
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.device == "cpu" and not args.no_malloc_tuning:
        env.update(MALLOC_TUNING)
    features = shape["expansion"] * shape["d_model"]
    print(f"shape {shape} -> {features} features/layer; device {args.device}"
          f"{' bf16 autocast' if args.bf16 else ' float32'}; threads {args.threads}; "
          f"adam {args.adam}; malloc tuning {'off' if args.no_malloc_tuning or args.device != 'cpu' else 'on'}")
    header = (f"{'batch':>6} {'model':>14} {'variant':>14} {'L0':>6} {'width':>5} {'tok/s':>8} {'tok/cpu-s':>9} {'step s':>7} "
              f"{'fwd s':>6} {'bwd s':>6} {'adam s':>6} {'peak RSS GB':>11} {'Δ RSS GB':>8}")
    print(header, flush=True)
    runs = [(b, t, s, v) for b in args.batch for t in args.topology for s in args.sparsifier for v in args.variants]
    for batch, topology, sparsifier, variant in runs:
        model = f"{topology}:{sparsifier}"
        spec = dict(shape=shape, variant=variant, batch=batch, threads=args.threads,
                    steps=args.steps, warmup=args.warmup, device=args.device,
                    bf16=args.bf16, adam=args.adam, sparsifier=sparsifier, topology=topology)
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                              env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            print(f"{batch:>6} {model:>14} {variant:>14}  failed (exit {proc.returncode}): {' | '.join(tail)}")
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        extra = f"  cuda peak {r['peak_cuda_GB']:.2f} GB  syncs/step {r['syncs_per_step']}" if "peak_cuda_GB" in r else ""
        print(f"{batch:>6} {model:>14} {variant:>14} {r['l0']:>6.1f} {r['width']:>5} "
              f"{r['tokens_per_s']:>8.0f} {r['tokens_per_cpu_s']:>9.0f} {r['step_s']:>7.2f} "
              f"{r['fwd_s']:>6.2f} {r['bwd_s']:>6.2f} {r['adam_s']:>6.2f} "
              f"{r['peak_rss_GB']:>11.2f} {r['peak_rss_delta_GB']:>8.2f}{extra}", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(r) + "\n")
    print("tok/s = rows per wall-clock second of a full step (median); tok/cpu-s = per second of "
          "process CPU time, which is what the wall clock would read on an otherwise idle machine "
          "when threads=1.")


if __name__ == "__main__":
    main()
