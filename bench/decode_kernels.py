"""The CLT decode alone, forward + backward: torch embedding bags vs fused Triton kernels vs dense, by code width.

Checks that the Triton decode equals the torch path at full size (max abs difference of the
output and of every gradient), then times each path at several code widths K, so the width
above which the dense decode wins (``sparse.DENSE_DECODE_FRACTION``) can be read off.

    python bench/decode_kernels.py --device cuda                       # paper shapes, batch 4096
    python bench/decode_kernels.py --device cpu --batch 256 --layers 2 --widths 32 256   # torch vs dense only
"""

from __future__ import annotations

import argparse
import time

import torch

from vitclt.nn import kernels
from vitclt.nn.sparse import Codes, dense_decode, sparse_decode


def codes(n: int, n_layers: int, n_features: int, k: int, device: torch.device) -> Codes:
    """Random codes of width k with distinct indices per row and positive values."""
    indices = torch.rand(n * n_layers, n_features, device=device).topk(k, dim=1).indices.view(n, n_layers, k)
    return Codes(torch.rand(n, n_layers, k, device=device) + 0.1, indices)


def step(decode, c: Codes, weights, pairs, n_layers):
    """One forward + backward through `decode`; returns the output and the gradients."""
    values = c.values_NLK.detach().requires_grad_(True)
    ws = [w.detach().requires_grad_(True) for w in weights]
    out = decode(Codes(values, c.indices_NLK), ws, pairs, n_layers)
    out.backward(torch.ones_like(out))
    return out.detach(), values.grad, [w.grad for w in ws]


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    """Parse arguments, check equality at full size, print the timing table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--features", type=int, default=6144)
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256, 384, 768])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    n, n_layers, n_features, d = args.batch, args.layers, args.features, args.d_model
    pairs = [(i, j) for i in range(n_layers) for j in range(i, n_layers)]
    weights = [torch.randn(n_features, d, device=device) / d**0.5 for _ in pairs]
    paths = {"torch": lambda *a: sparse_decode(*a, backend="torch"), "dense": dense_decode}
    if kernels.usable(device):
        paths["triton"] = lambda *a: sparse_decode(*a, backend="triton")
        c = codes(n, n_layers, n_features, args.widths[0], device)
        ref_out, ref_gv, ref_gw = step(paths["torch"], c, weights, pairs, n_layers)
        out, gv, gw = step(paths["triton"], c, weights, pairs, n_layers)
        gw_err = max(float((a - b).abs().max()) for a, b in zip(gw, ref_gw))
        print(f"triton vs torch at K={args.widths[0]}: max |Δ| output {float((out - ref_out).abs().max()):.2e}, "
              f"values grad {float((gv - ref_gv).abs().max()):.2e}, decoder grads {gw_err:.2e}", flush=True)
    print(f"CLT decode fwd+bwd, N={n}, L={n_layers}, F={n_features}, D={d}, {len(pairs)} decoders, {device}")
    print(f"{'K':>6} {'K/F':>7} " + " ".join(f"{name + ' ms':>10}" for name in paths))
    for k in args.widths:
        c = codes(n, n_layers, n_features, k, device)
        ms = [1e3 * timed(lambda p=p: step(p, c, weights, pairs, n_layers), device, args.repeats) for p in paths.values()]
        print(f"{k:>6} {k / n_features:>7.4f} " + " ".join(f"{m:>10.1f}" for m in ms), flush=True)


if __name__ == "__main__":
    main()
