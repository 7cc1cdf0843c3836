"""Choose Kangaroo's defaults by measurement: speed and mean accepted tokens for a grid of the
confidence threshold η and the most drafts per step γ, against AR in the same run.

Prompts are held-out training-style prompts (never Spec-Bench, never the adapter's own training prompts).

    python benchmarks/kangaroo_sweep.py [--adapter FILE] [--prompts 6] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import glob
import statistics
import time

import joey
from joey.training.prompts import read_prompts

DATA = "../shared/data/"


def heldout_prompts(n: int) -> list[str]:
    files = [DATA + "alpaca_5000/alpaca_5000.json", DATA + "gsm8k/train.jsonl",
             DATA + "gpteacher/codegen-instruct.json", DATA + "self_instruct_seed/seed_tasks.jsonl",
             DATA + "gpteacher/roleplay-simple-deduped-roleplay-instruct.json",
             *sorted(glob.glob(DATA + "instructionwild_v2/user_*.jsonl"))]
    used = set(read_prompts(files, limit=960, derived=240, seed=0))  # the shipped adapter's training prompts
    pool = [p for p in read_prompts(files, derived=30, seed=1) if p not in used and len(p) < 1500]
    return pool[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--thresholds", default="0.0,0.2,0.4,0.6")
    ap.add_argument("--max-drafts", default="2,4,6")
    args = ap.parse_args()
    eng = joey.load(adapter=args.adapter, progress=False)
    prompts = heldout_prompts(args.prompts)
    configs = [("ar", 0.0, 1)] + [("kangaroo", float(t), int(g)) for t in args.thresholds.split(",")
                                  for g in args.max_drafts.split(",")]
    eng.generate(prompts[0], max_new_tokens=8, method="kangaroo")  # warm-up
    speed: dict[tuple, list[float]] = {c: [] for c in configs}
    tau: dict[tuple, list[float]] = {c: [] for c in configs}
    same: dict[tuple, int] = {c: 0 for c in configs}
    for p in prompts:
        ref = None
        for c in configs:
            method, th, g = c
            t0 = time.perf_counter()
            gen = eng.generate(p, max_new_tokens=args.max_new_tokens, method=method, threshold=th, max_draft=g)
            dt = time.perf_counter() - t0
            ref = gen.token_ids if method == "ar" else ref
            same[c] += gen.token_ids == ref
            speed[c].append(gen.new_tokens / dt)
            tau[c].append(gen.stats.mean_accepted_tokens)
    base = statistics.mean(speed[configs[0]])
    print(f"{len(prompts)} held-out prompts, {args.max_new_tokens} new tokens, greedy; AR {base:.1f} tok/s")
    print("| method | η | γ | tok/s | speedup | mean accepted | identical |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for c in configs:
        s = statistics.mean(speed[c])
        print(f"| {c[0]} | {c[1]} | {c[2]} | {s:.1f} | {s / base:.2f}× | {statistics.mean(tau[c]):.2f} | "
              f"{same[c]}/{len(prompts)} |")


if __name__ == "__main__":
    main()
