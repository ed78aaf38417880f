"""Circuit fidelity on the demo world: a graph's predicted effect of zeroing each of its top features vs the measured one.

    python bench/circuit_fidelity.py RUN_DIR --images 50 --threads 2 --out fidelity.json
    python bench/circuit_fidelity.py RUN_DIR --scores logit-diff --no-variants      # the headline figures only

For each of the first --images test images of the demo world (which no transcoder or browser saw), the graph
towards the predicted class's target score (--scores, each in turn) is built and pruned as `vitclt explain`
does, and each of its --top kept features of largest influence is zeroed at its token. The table gives, at the
CLS token and at patch tokens, sign agreement of measured with predicted change, the median and quartiles of
measured/predicted and the share within a factor of 2: in the original model, in the CLT replacement, and in
the local replacement model with parts unfrozen or frozen (vitclt/circuits/fidelity.py). Seconds per graph are
wall time of the attribution alone, at --threads on whatever else the machine is running.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm


def table(name: str, summary: dict) -> str:
    lines = [f"== target {name}: {summary['images']} images, {summary['cases']} zeroed features; graph "
             f"{summary['seconds_per_graph']['median']:.2f} s median ({summary['seconds_per_graph']['max']:.2f} s max), "
             f"pruning {summary['seconds_per_pruning']:.2f} s"]
    for where in ("cls", "patch"):
        lines.append(f"  {where:<5} {'measured in':<26} {'n':>4} {'sign':>6} {'median':>7} {'q25..q75':>15} {'within 2x':>9}")
        for key, s in summary[where].items():
            if not s.get("n"):
                lines.append(f"        {key:<26} {0:>4}")
                continue
            lines.append(f"        {key:<26} {s['n']:>4} {s['sign']:>6.1%} {s['median']:>7.3f} "
                         f"{s['q25']:>7.3f}..{s['q75']:<7.3f} {s['within2']:>9.1%}")
    for where, per_layer in summary["by_layer"].items():
        lines.append(f"  {where:<5} original model by source layer: " + ", ".join(
            f"L{layer} {s['sign']:.0%} of {s['n']}" for layer, s in per_layer.items() if s.get("n")))
    return "\n".join(lines)


def circuit_section(run_dir, transcoder: str | None = None, n_images: int = 50, top: int = 10,
                    scores: tuple[str, ...] = ("cosine", "logit-diff", "logit-mean"), variants: bool = True,
                    threads: int = 2, precision: str = "float32") -> dict:
    """Measure circuit fidelity of the transcoder in `run_dir` on the first `n_images` demo test images, print a table
    per target score and return the summaries and every case (JSON-able)."""
    torch.set_num_threads(threads)
    from vitclt.backbones import load_backbone
    from vitclt.circuits.fidelity import run_fidelity, summarise
    from vitclt.circuits.inputs import find_transcoder
    from vitclt.data.datasets import load_dataset
    from vitclt.eval.suite import backbone_spec
    from vitclt.eval.zeroshot import build_classifier, dataset_templates
    from vitclt.nn.transcoder import Transcoder

    tc_name, tc_dir = find_transcoder(run_dir, transcoder)
    backbone = load_backbone(backbone_spec({tc_name: tc_dir}, None), device="cpu")
    tc = Transcoder.from_pretrained(tc_dir, device=backbone.device)
    data = load_dataset("demo", "test")
    images = [data[i][0] for i in range(min(n_images, len(data)))]
    classifier = build_classifier(backbone, data.classnames, dataset_templates(data))
    dtype = torch.float64 if precision == "float64" else torch.float32
    record = {"run": str(tc_dir), "images": len(images), "top": top, "threads": threads, "precision": precision, "scores": {}}
    for kind in scores:
        with tqdm(total=len(images), desc=f"fidelity {kind}") as bar:
            results = run_fidelity(backbone, tc, images, classifier, data.classnames, kind, top=top, dtype=dtype,
                                   variants=variants, progress=bar)
        summary = summarise(results)
        print(table(kind, summary), flush=True)
        record["scores"][kind] = {"summary": summary, "cases": [c.__dict__ for r in results for c in r.cases],
                                  "seconds_graph": [r.seconds_graph for r in results]}
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a trained transcoder or run directory (demo backbone)")
    ap.add_argument("--transcoder", default=None, help="name of the transcoder in RUN_DIR when it holds several")
    ap.add_argument("--images", type=int, default=50, help="test images of the demo world, one graph each")
    ap.add_argument("--top", type=int, default=10, help="features zeroed per graph (the most influential kept ones)")
    ap.add_argument("--scores", nargs="+", default=["cosine", "logit-diff", "logit-mean"], help="target scores to measure")
    ap.add_argument("--no-variants", action="store_true", help="skip the local-model variants (frozen vs live parts)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["float32", "float64"], default="float32")
    ap.add_argument("--out", type=Path, default=None, help="write the summaries and every case as JSON here")
    args = ap.parse_args()
    record = circuit_section(args.run_dir, args.transcoder, args.images, args.top, tuple(args.scores), not args.no_variants,
                             args.threads, args.precision)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
