"""Acceptance under sampling: position-keyed draws (joey's default) against rejection sampling (``rejection=True``).

Spec-Bench first turns (``--limit`` per category), each method drafting at full depth (``adaptive=False``, so τ
measures the drafts, not the budget), at ``--temperature``: τ (committed tokens per step) for both verification
rules, and whether the keyed run gave AR's tokens for the same seed (it must; rejection sampling need not).
SpS needs a draft model: ``--model qwen2.5-coder-1.5b-instruct --draft-model qwen2.5-coder-0.5b-instruct``.

    python benchmarks/sampled_tau.py [--methods pld kangaroo jakiro] [--limit 3] [--temperature 0.7]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import joey
from joey.config import SamplingParams
from joey.measurements import cpu_name

QUESTIONS = Path(joey.__file__).parent / "bench" / "data" / "spec_bench" / "question.jsonl"


def first_turns(limit: int) -> list[str]:
    seen: dict[str, int] = {}
    turns = []
    for line in QUESTIONS.read_text().splitlines():
        q = json.loads(line)
        if seen.get(q["category"], 0) < limit:
            seen[q["category"]] = seen.get(q["category"], 0) + 1
            turns.append(q["turns"][0])
    return turns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--draft-model", default=None)
    ap.add_argument("--methods", nargs="+", default=["pld", "kangaroo", "jakiro"])
    ap.add_argument("--limit", type=int, default=3, help="questions per category")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--no-ar", action="store_true", help="skip AR (no token check; for a slow target)")
    args = ap.parse_args()
    engine = joey.load(args.model, draft_model=args.draft_model, progress=False)
    prompts = first_turns(args.limit)
    print(f"{args.model}, {len(prompts)} Spec-Bench first turns, T={args.temperature}, {args.max_new_tokens} tokens, "
          f"CPU: {cpu_name()}, {torch.get_num_threads()} threads\n")
    print("| method | τ keyed | τ rejection | keyed tokens = AR |")
    print("|---|---:|---:|---|")
    for method in args.methods:
        tau: dict[bool, tuple[int, int]] = {}
        same = 0
        for i, prompt in enumerate(prompts):
            base = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=1000 + i)
            ref = None if args.no_ar else engine.generate(prompt, base, method="ar").token_ids
            for rejection in (False, True):
                g = engine.generate(prompt, SamplingParams.with_overrides(base, {"rejection": rejection}),
                                    method=method, adaptive=False)
                tokens, steps = tau.get(rejection, (0, 0))
                tau[rejection] = (tokens + g.new_tokens, steps + g.stats.steps)
                if not rejection and ref is not None:
                    same += g.token_ids == ref
        rate = {r: t / s for r, (t, s) in tau.items()}
        check = "–" if args.no_ar else f"{same}/{len(prompts)}"
        print(f"| {method} | {rate[False]:.2f} | {rate[True]:.2f} | {check} |", flush=True)


if __name__ == "__main__":
    main()
