"""Explanations scored against the demo world's ground truth: prints tables and writes JSON.

Sections (each a function returning a JSON-able dict and printing its table):

* labels: every feature's ground-truth concept is measured on --test-images demo test images that
  the labellers never see; the labellers see the first --label-images images of the demo *train*
  split. Methods scored: today's direct-path write labels (class name, BPE word), the same direct
  path read with the world's concept vocabulary, the "sees" labels (SoftWPMI of the top images) and
  the "writes" labels (embedding Jacobian through every later layer, centred text). Then the
  CoSy-style AUC of the new labels and the demo CLIP's zero-shot ceiling per attribute family.
* circuits: over --circuit-images demo test images, each graph's top features zeroed one at a time, the graph's
  predicted change of its target against the measured one (original model and CLT replacement), at CLS and at
  patch tokens, for each target score (bench/circuit_fidelity.py, vitclt/circuits/fidelity.py).

    python bench/explanations.py runs/demo/train --transcoder clt-relu-topk --out /tmp/expl.json
    python bench/explanations.py runs/demo/train --transcoder clt-relu-topk --circuit-images 0   # labels only
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch


def _pct(x: float) -> str:
    return "   –  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}%"


def _row(name: str, s: dict) -> str:
    return f"{name:<28} {_pct(s['named'])} ({_pct(s['shuffled'])})  n={s['n']}"


def print_label_table(result: dict) -> None:
    """The labels section as text tables."""
    gt = result["ground_truth"]
    print(f"\nground truth on {gt['n_images']} test images: {gt['scored']} of {gt['alive']} live features scored "
          f"(coverage {_pct(gt['coverage'])}); by family: "
          + ", ".join(f"{k} {v}" for k, v in gt["family_counts"].items()))
    print(f"  by layer: {gt['scored_by_layer']} scored; patch-level truths: {gt['patch_level']}")
    methods = result["methods"]
    print("\nshare of scored features whose top label names the ground-truth concept (labels shuffled among them)")
    print(f"{'method':<28} {'overall':>17}   " + "  ".join(f"{f:>15}" for f in methods[next(iter(methods))]["family"]))
    for name, m in methods.items():
        fams = "  ".join(f"{_pct(v['named'])} ({_pct(v['shuffled'])})" if v["n"] else f"{'–':>15}" for v in m["family"].values())
        print(f"{name:<28} {_pct(m['overall']['named'])} ({_pct(m['overall']['shuffled'])})   {fams}")
    n_layers = len(methods[next(iter(methods))]["layer"])
    print("\nby layer: " + "  ".join(f"{'L' + str(i):>15}" for i in range(n_layers)))
    for name, m in methods.items():
        print(f"{name:<28} " + "  ".join(f"{_pct(v['named'])} ({_pct(v['shuffled'])})" for v in m["layer"]))
    if result.get("shown"):
        print("\nshare of scored features whose top label is shown (beats its shuffled baseline's 99th percentile): "
              + ", ".join(f"{k} {_pct(v)}" for k, v in result["shown"].items()))
    if result.get("cosy"):
        print("\nCoSy-style AUC (feature's max activation: scenes with the label's concept vs random scenes)")
        for name, c in result["cosy"].items():
            print(f"{name:<28} mean {c['mean_auc']:.3f} over {c['renderable']} features ({c['unrenderable']} labels not "
                  f"renderable); by layer " + " ".join(f"{a:.3f}" for a in c["layer"]))
    print("\nzero-shot ceiling of the backbone per family (argmax over the family's concept text vectors)")
    print("  " + ", ".join(f"{k} {_pct(v['accuracy'])} (chance {_pct(v['chance'])})" for k, v in result["ceiling"].items()))


def label_section(run_dir: Path, transcoder: str, label_images: int, test_images: int, top_k: int, label_samples: int,
                  cosy_images: int, permutations: int, seed: int, progress: bool) -> dict:
    """Ground truth, label scores of every method, CoSy AUCs and the zero-shot ceiling."""
    from vitclt.backbones import load_backbone
    from vitclt.browser.collect import FeatureCollector
    from vitclt.browser.concepts import world_vocabulary
    from vitclt.browser.labels import build_vocabulary, final_projection, label_features, write_directions
    from vitclt.browser.sees import concept_probs, sees_labels
    from vitclt.browser.writes import jacobian_writes, writes_labels
    from vitclt.data.world import DemoWorld
    from vitclt.eval.explanations import cosy_auc, ground_truth, score_labels, world_pass, zero_shot_ceiling
    from vitclt.eval.ground_truth import world_concepts
    from vitclt.eval.suite import find_transcoders
    from vitclt.nn.transcoder import Transcoder

    t0 = time.perf_counter()
    path = find_transcoders(run_dir)[transcoder]
    bb = load_backbone("demo")
    tc = Transcoder.from_pretrained(path).eval()
    train = DemoWorld("train", size=label_images)
    test = DemoWorld("test", size=test_images)

    # The labellers' pass: top images per feature and the images' embeddings, on train images only.
    collector = FeatureCollector(tc, bb.n_tokens, top_k, 1, seed, label_samples)
    embeds = []
    for start in range(0, label_images, 64):
        ids = range(start, min(start + 64, label_images))
        pixels = bb.preprocess([train[i][0] for i in ids])
        with bb.capture() as cap:
            embeds.append(bb.image_embeds(pixels).float().cpu())
        collector.update(cap.y_BTLD() if tc.cfg.topology == "sae" else cap.x_BTLD(), start)
    st = collector.result()
    embed_NP = torch.cat(embeds)
    alive_LF = ~st.dead_LF
    vocab = world_vocabulary(bb, seed=seed)
    concepts = world_concepts()

    # Today's labels: the direct-path write read against class names and CLIP BPE words (as `vitclt browse` did).
    ln, proj = final_projection(bb)
    old_vocab = build_vocabulary(bb, list(train.classnames), list(train.templates), 3000)
    w_direct = write_directions(tc, ln, proj, 1.0)
    old = label_features(w_direct, old_vocab, k=1)
    L, F_ = alive_LF.shape
    labels: dict[str, list[list[str | None]]] = {
        "today: class name": [[old_vocab.classnames[i] for i in old.class_LFK[ly, :, 0].tolist()] for ly in range(L)],
        "today: BPE word": [[old_vocab.words[i] for i in old.word_LFK[ly, :, 0].tolist()] for ly in range(L)],
    }
    direct_world = label_features(w_direct, type(old_vocab)([], old_vocab.class_CP[:0], vocab.names, vocab.text_VP), k=1)
    labels["direct path, world words"] = [[vocab.names[i] for i in direct_world.word_LFK[ly, :, 0].tolist()] for ly in range(L)]

    probs = concept_probs(embed_NP, vocab.text_VP, groups=vocab.kinds)
    sees = sees_labels(probs, st.label_sample.image_LFK, torch.isfinite(st.label_sample.score_LFK), st.label_sample.value_LFK,
                       seed=seed)
    top_sees = sees_labels(probs, st.top_max.image_LFK, torch.isfinite(st.top_max.score_LFK), st.top_max.value_LFK, seed=seed)
    labels["sees (SoftWPMI)"] = [[vocab.names[i] if shown else None for i, shown in
                                  zip(sees.index_LFK[ly, :, 0].tolist(), sees.shown_LFK[ly, :, 0].tolist())] for ly in range(L)]
    labels["sees, unfiltered"] = [[vocab.names[i] for i in sees.index_LFK[ly, :, 0].tolist()] for ly in range(L)]
    labels[f"sees, top {top_k} images"] = [[vocab.names[i] if shown else None for i, shown in
                                           zip(top_sees.index_LFK[ly, :, 0].tolist(), top_sees.shown_LFK[ly, :, 0].tolist())]
                                          for ly in range(L)]
    w_jac = jacobian_writes(bb, tc, train, st.top_max, progress=progress)
    writes = writes_labels(w_jac, vocab.text_VP, alive_LF, seed=seed)
    labels["writes (Jacobian)"] = [[vocab.names[i] if shown else None for i, shown in
                                    zip(writes.index_LFK[ly, :, 0].tolist(), writes.shown_LFK[ly, :, 0].tolist())]
                                   for ly in range(L)]
    labels["writes, unfiltered"] = [[vocab.names[i] for i in writes.index_LFK[ly, :, 0].tolist()] for ly in range(L)]

    # Ground truth on held-out test images.
    wp = world_pass(bb, tc, [test.item(i) for i in range(test_images)], progress=progress)
    gt = ground_truth(wp, concepts)
    oracle = [[concepts[c].name if c >= 0 else None for c in gt.concept_LF[ly]] for ly in range(L)]
    methods = {name: score_labels(lab, gt, permutations, seed) for name, lab in labels.items()}
    methods["oracle (truth as label)"] = score_labels(oracle, gt, permutations, seed)
    scored = gt.scored_LF
    fam = [concepts[c].family for c in gt.concept_LF[scored]]
    result = {
        "run": str(path), "transcoder": transcoder, "label_images": label_images, "top_k": top_k,
        "label_samples": label_samples,
        "ground_truth": {
            "n_images": test_images, "alive": int((gt.concept_LF >= 0).sum()), "scored": int(scored.sum()),
            "coverage": gt.coverage, "scored_by_layer": scored.sum(1).tolist(),
            "family_counts": {f: fam.count(f) for f in dict.fromkeys(c.family for c in concepts)},
            "patch_level": int(gt.level_LF[scored].sum()),
        },
        "methods": methods,
        "shown": {"sees (SoftWPMI)": float(sees.shown_LFK[..., 0].numpy()[scored].mean()),
                  "writes (Jacobian)": float(writes.shown_LFK[..., 0].numpy()[scored].mean())},
    }
    if cosy_images > 0:
        result["cosy"] = {name: cosy_auc(bb, tc, labels[name], gt, cosy_images, seed, progress=progress)
                          for name in ("sees, unfiltered", "writes, unfiltered", "direct path, world words")}
    result["ceiling"] = zero_shot_ceiling(wp.embed_NP, wp.scenes, vocab.text_VP, concepts)
    result["seconds"] = time.perf_counter() - t0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory holding the transcoder (e.g. runs/demo/train)")
    parser.add_argument("--transcoder", default="clt-relu-topk", help="its name in the run directory")
    parser.add_argument("--label-images", type=int, default=2000, help="demo train images the labellers see")
    parser.add_argument("--test-images", type=int, default=2000, help="demo test images the ground truth is measured on")
    parser.add_argument("--top-k", type=int, default=16, help="top images per feature (as vitclt browse --top-k)")
    parser.add_argument("--label-samples", type=int, default=128,
                        help="images sampled per feature where it fires, for the sees labels (as vitclt browse --label-samples)")
    parser.add_argument("--cosy-images", type=int, default=64, help="rendered scenes per concept for the CoSy AUC (0: skip)")
    parser.add_argument("--permutations", type=int, default=200, help="label shuffles for the shuffled control")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument("--circuit-images", type=int, default=50, help="demo test images for circuit fidelity (0: skip)")
    parser.add_argument("--scores", nargs="+", default=["logit-diff", "cosine"], help="circuit target scores to measure")
    parser.add_argument("--out", type=Path, default=Path("explanations.json"), help="where the JSON goes")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    np.random.seed(args.seed)
    result = {"labels": label_section(args.run_dir, args.transcoder, args.label_images, args.test_images, args.top_k,
                                      args.label_samples, args.cosy_images, args.permutations, args.seed, not args.no_progress)}
    print_label_table(result["labels"])
    if args.circuit_images > 0:
        from circuit_fidelity import circuit_section  # bench/ is this script's directory, first on sys.path

        print()
        result["circuits"] = circuit_section(args.run_dir, args.transcoder, args.circuit_images, scores=tuple(args.scores),
                                             variants=False, threads=args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
