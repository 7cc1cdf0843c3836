"""Continuous batching without the HTTP layer: Spec-Bench first turns pushed through one
``ContinuousBatch`` (``max_batch`` rows decoding, the rest waiting and joining as rows leave),
AR against PLD with and without the acceptance prior a joining request starts from
(``joey.budget.DepthPolicy.PRIOR_STEPS``), all in one process, repeated. Every PLD run's tokens are checked
against AR's.

    python benchmarks/continuous_levers.py --requests 32 --max-batch 16 --repeats 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import joey
from joey.budget import DepthPolicy
from joey.config import SamplingParams, SpecConfig
from joey.continuous import ContinuousBatch
from joey.measurements import cpu_name

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import load_prompts  # noqa: E402  (the same prompt order as the server benchmark)


def run(engine, ids: list[list[int]], method: str, prior: int, max_batch: int, max_tokens: int):
    """(tokens/s, draft tokens, accepted tokens, token ids per request) of one pass over the requests."""
    DepthPolicy.PRIOR_STEPS = prior
    batch = ContinuousBatch(engine, method, SpecConfig(), max_batch=max_batch)
    for key, x in enumerate(ids):
        batch.add(x, SamplingParams(max_new_tokens=max_tokens), key=key)
    tokens = drafted = accepted = 0
    out: dict[int, tuple[int, ...]] = {}
    start = time.perf_counter()
    while batch.busy:
        for ev in batch.step():
            tokens += len(ev.token_ids)
            drafted += ev.draft_tokens
            accepted += ev.accepted
            if ev.generation is not None:
                out[ev.row] = ev.generation.token_ids
    return tokens / (time.perf_counter() - start), drafted, accepted, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_questions = Path(__file__).parents[1] / "joey/bench/data/spec_bench/question.jsonl"
    p.add_argument("--questions", type=Path, default=default_questions)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if not args.questions.exists():
        raise SystemExit(f"continuous_levers: no question file at {args.questions}")
    engine = joey.load(progress=False)
    ids = [engine.encode(q) for q in load_prompts(args.questions)[: args.requests]]
    engine.generate("Hi", method="pld", max_new_tokens=8)  # warm-up, and the cost curve
    print(f"{cpu_name()}: {args.requests} requests, max_batch {args.max_batch}, {args.max_tokens} tokens")
    default_prior = DepthPolicy.PRIOR_STEPS
    for rep in range(args.repeats):
        reference = None
        for method, prior in (("ar", default_prior), ("pld", default_prior), ("pld", 0)):
            speed, drafted, accepted, out = run(engine, ids, method, prior, args.max_batch, args.max_tokens)
            reference = out if method == "ar" else reference
            print(f"repeat {rep} {method} prior={prior}: {speed:.1f} tok/s, draft tokens {drafted}, "
                  f"accepted {accepted}, tokens equal AR's: {out == reference}", flush=True)
    DepthPolicy.PRIOR_STEPS = default_prior


if __name__ == "__main__":
    main()
