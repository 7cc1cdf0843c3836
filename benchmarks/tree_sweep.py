"""Choose a tree drafter's defaults (Kangaroo, Jakiro) by measurement: speed and mean accepted tokens
for a grid of tree shapes (children per node k, node budget N; N = 0 is the chain), Kangaroo's
confidence threshold η and the depth γ, against AR in the same run, with the prompts' order of
methods rotating. A fifth field "nohybrid" turns off Jakiro's hybrid last level.

Prompts are held-out training-style prompts (never Spec-Bench, never the shipped adapter's or head's
own training prompts).

    python benchmarks/tree_sweep.py [--method jakiro] [--prompts 6] [--max-new-tokens 96] \
        [--configs 0:0:0.6:6,3:8:0.6:6,3:8:0:6:nohybrid,...]     # k:N:η:γ[:nohybrid]; N "auto" = the budget's
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys

import joey
from joey.measurements import cpu_name
from joey.training.prompts import read_prompts

# the training prompt files (not shipped with joey: DEVELOPERS.md names them); held-out prompts are those
# no shipped drafter was trained on
DATA = os.environ.get("JOEY_TRAIN_DATA", "../shared/data")


def heldout_prompts(n: int, data: str, model: str | None = None) -> list[str]:
    data = data.rstrip("/") + "/"
    files = [data + "alpaca_5000/alpaca_5000.json", data + "gsm8k/train.jsonl",
             data + "gpteacher/codegen-instruct.json", data + "self_instruct_seed/seed_tasks.jsonl",
             data + "gpteacher/roleplay-simple-deduped-roleplay-instruct.json",
             *sorted(glob.glob(data + "instructionwild_v2/user_*.jsonl"))]
    if not os.path.isfile(files[0]):
        sys.exit(f"tree_sweep.py: error: the training prompt files are not in {data} (--data DIR or "
                 "JOEY_TRAIN_DATA; DEVELOPERS.md names them)")
    # the Qwen2.5-Coder-1.5B's drafters read every example of the first four files with its answer
    # (teacher forcing: DEVELOPERS.md), so its held-out prompts come from the other two
    used = set(read_prompts(files[:3] + files[4:5])) if model else set()
    used |= set(read_prompts(files, limit=960, derived=240, seed=0))  # the shipped adapter's training prompts
    used |= set(read_prompts(files, limit=14000, derived=3000, seed=0))  # ... and the shipped Jakiro head's
    used |= set(read_prompts(files, limit=14000, derived=3000, seed=1))  # ... and its fine-tuning's
    pool = [p for p in read_prompts(files, derived=30, seed=1) if p not in used and len(p) < 1500]
    return pool[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="the target (default: joey's default model)")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--head", default=None)
    ap.add_argument("--method", default="kangaroo")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--configs", default="1:0:0.6:6,2:auto:0.6:6,3:auto:0.6:6,3:auto:0.4:6,4:auto:0.4:6,3:12:0.4:6")
    ap.add_argument("--fixed", action="store_true", help="turn off the per-step adaptive depth")
    ap.add_argument("--data", default=DATA, help="folder of the training prompt files (default $JOEY_TRAIN_DATA or "
                                                  "../shared/data)")
    args = ap.parse_args()
    eng = joey.load(args.model, adapter=args.adapter, head=args.head, progress=False)
    prompts = heldout_prompts(args.prompts, args.data, args.model)
    configs: list[tuple] = [("ar", 1, 0, 0.0, 1, True)]
    for c in args.configs.split(","):
        k, n, th, g, *rest = c.split(":")
        configs.append((args.method, int(k), None if n == "auto" else int(n), float(th), int(g), rest != ["nohybrid"]))
    eng.generate(prompts[0], max_new_tokens=8, method=args.method)  # warm-up (and the cost curve)
    speed: dict[tuple, list[float]] = {c: [] for c in configs}
    tau: dict[tuple, list[float]] = {c: [] for c in configs}
    same: dict[tuple, int] = {c: 0 for c in configs}
    for i, p in enumerate(prompts):
        ref = eng.generate(p, max_new_tokens=args.max_new_tokens, method="ar").token_ids
        order = configs[i % len(configs):] + configs[: i % len(configs)]
        for c in order:
            method, k, n, th, g, hybrid = c
            eng.jakiro_hybrid = hybrid
            gen = eng.generate(p, max_new_tokens=args.max_new_tokens, method=method, threshold=th, max_draft=g,
                               tree_topk=k, tree_nodes=n, adaptive=not args.fixed)
            same[c] += gen.token_ids == ref
            speed[c].append(gen.tokens_per_s)
            tau[c].append(gen.stats.mean_accepted_tokens)
    base = statistics.mean(speed[configs[0]])
    print(f"{eng.name}: {len(prompts)} held-out prompts, {args.max_new_tokens} new tokens, greedy; "
          f"AR {base:.1f} tok/s; {cpu_name()}; budget's tree size {eng.cost_curve().tree_nodes()}")
    print("| method | k | N | η | γ | hybrid | tok/s | speedup | τ | identical |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---|")
    for c in configs:
        s = statistics.mean(speed[c])
        n = "auto" if c[2] is None else c[2]
        print(f"| {c[0]} | {c[1]} | {n} | {c[3]} | {c[4]} | {'yes' if c[5] else 'no'} | {s:.1f} | {s / base:.2f}× | "
              f"{statistics.mean(tau[c]):.2f} | {same[c]}/{len(prompts)} |")


if __name__ == "__main__":
    main()
