"""Batched greedy decoding: total tokens/s of each method at several batch sizes, one engine.

Rows are first turns of Spec-Bench questions (evaluation data: measured here, never trained on),
taken round-robin over the categories so every batch mixes prompt kinds and lengths. Every row
asks for exactly N new tokens (EOS ignored); each method's rows are checked token for token
against AR's. Methods and batch sizes are interleaved and repeated.

    python benchmarks/batch_speed.py [--weights auto] [--methods ar,pld] [--batches 1 2 4 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import joey
from joey.budget import cpu_name

QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


def first_turns(path: Path, n: int) -> list[str]:
    by_cat: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        q = json.loads(line)
        by_cat.setdefault(q["category"], []).append(q["turns"][0])
    cats = sorted(by_cat)
    return [by_cat[cats[i % len(cats)]][i // len(cats)] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--methods", default="ar,pld")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--questions", type=Path, default=QUESTIONS)
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    eng = joey.load(progress=False, weights=args.weights)
    prompts = first_turns(args.questions, max(args.batches))
    kw = dict(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    for m in methods:  # warm-up, untimed
        eng.generate(prompts[:2], method=m, max_new_tokens=8, ignore_eos=True)
    speed: dict[tuple[str, int], list[float]] = {}
    tokens: dict[tuple[str, int], list[list[tuple[int, ...]]]] = {}
    for rep in range(args.repeats):
        for b in args.batches:
            for m in methods[rep % len(methods):] + methods[: rep % len(methods)]:  # rotated order
                gens = eng.generate(prompts[:b], method=m, **kw)
                seconds = max(g.wall_time_s for g in gens)
                speed.setdefault((m, b), []).append(sum(g.new_tokens for g in gens) / seconds)
                tokens.setdefault((m, b), []).append([g.token_ids for g in gens])
    same = {k: all(run == tokens[("ar", k[1])][0] for run in v) for k, v in tokens.items() if ("ar", k[1]) in tokens}
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, weights {eng.model.weight_format}, "
          f"{args.max_new_tokens} new tokens per row, {args.repeats} repeats\n")
    print("| method | " + " | ".join(f"batch {b}" for b in args.batches) + " |")
    print("|---|" + "---:|" * len(args.batches))
    for m in methods:
        cells = []
        for b in args.batches:
            s = speed[(m, b)]
            ratio = statistics.mean(s) / statistics.mean(speed[("ar", b)]) if "ar" in methods else 1.0
            mark = "" if same.get((m, b), True) else " (tokens differ!)"
            cells.append(f"{statistics.mean(s):.1f} tok/s ({ratio:.2f}×){mark}")
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
