"""Throughput of `vitclt browse`: images/s of the streaming pass and the wall time of the whole build.

Default: the demo's 2,000 test images and a 6 × 512-feature CLT (train one first, e.g.
`vitclt train --dataset demo --max-images 2000 --steps 400 --k 16 --out /tmp/br/train400`).

    python bench/browse_throughput.py /tmp/br/train400 --threads 2
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="transcoder directory or run directory")
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--images-per-forward", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-exports", action="store_true", help="skip the circuit-tracer and Neuronpedia files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from vitclt.browser import build_browser

    with tempfile.TemporaryDirectory() as tmp:
        log = StringIO()
        start = time.perf_counter()
        with redirect_stdout(log):
            out = build_browser(args.run_dir, args.dataset, Path(tmp) / "site", max_images=args.max_images,
                                images_per_forward=args.images_per_forward, device=args.device, exports=not args.no_exports,
                                progress=False)
        wall = time.perf_counter() - start
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    text = log.getvalue()
    n, pass_s = (float(x) for x in re.search(r"browsed (\d+) images in [\d.]+ s \(streaming pass ([\d.]+) s\)", text).groups())
    print(f"threads {args.threads}, device {args.device}, {int(n)} images")
    print(f"streaming pass: {pass_s:.1f} s, {n / pass_s:.0f} images/s")
    print(f"whole build (labels, pages{'' if args.no_exports else ', exports'}): {wall:.1f} s wall; site {size / 1e6:.1f} MB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
