"""What each EMS-SD lever gives at one batch size, switched off one at a time in the same process:
one attention call for all rows (vs a call per row, where joey's C attention runs), whole layers in
one C call (vs module by module), batched drafting (vs rows drafting one after another) and the
online step-cost correction (StepScale). Every variant's rows must equal AR's tokens.

Rows are first turns of Spec-Bench questions (evaluation data: measured, never trained on), taken
round-robin over the categories; EOS is ignored so every row asks for the same number of tokens.
Jakiro and Kangaroo draft at full depth here (no budget), so their drafting cost is visible.

    python benchmarks/batch_levers.py [--batch 8] [--max-new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import joey
import joey.continuous as continuous
import joey.drafters.base as drafter_base
from joey.budget import StepScale
from joey.measurements import cpu_name

QUESTIONS = Path(__file__).resolve().parents[1] / "joey" / "bench" / "data" / "spec_bench" / "question.jsonl"


class _NoScale(StepScale):
    """StepScale that never learns: the batch-1 curve as measured."""

    def observe(self, drafted: bool, predicted_ms: float, observed_ms: float) -> None:
        pass


def first_turns(path: Path, n: int) -> list[str]:
    by_cat: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        q = json.loads(line)
        by_cat.setdefault(q["category"], []).append(q["turns"][0])
    cats = sorted(by_cat)
    return [by_cat[cats[i % len(cats)]][i // len(cats)] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--questions", type=Path, default=QUESTIONS)
    args = ap.parse_args()
    eng = joey.load(progress=False)
    prompts = first_turns(args.questions, args.batch)
    kw = dict(max_new_tokens=args.max_new_tokens, ignore_eos=True)

    def run(method: str, **extra) -> tuple[float, list]:
        start = time.perf_counter()
        gens = eng.generate(prompts, method=method, **kw, **extra)
        return sum(g.new_tokens for g in gens) / (time.perf_counter() - start), [g.token_ids for g in gens]

    model_cls = type(eng.model)
    real = {(continuous, "drafts_together"): continuous.drafts_together,
            (drafter_base, "drafts_together"): drafter_base.drafts_together,
            (continuous, "StepScale"): continuous.StepScale,
            (model_cls, "ragged_attention"): model_cls.ragged_attention,
            (model_cls, "layer_plans"): model_cls.layer_plans}

    def switched(*changes: tuple[object, str, object]) -> Callable[[], None]:
        return lambda: [setattr(owner, name, value) for owner, name, value in changes]

    variants: dict[str, tuple[Callable[[], None] | None, str, dict]] = {
        "ar": (None, "ar", {}),
        "ar, attention row by row": (switched((model_cls, "ragged_attention", property(lambda self: False))), "ar", {}),
        "ar, layers module by module": (switched((model_cls, "layer_plans",
                                                  lambda self: [None] * self.cfg.num_layers)), "ar", {}),
        "jakiro full depth, batched drafting": (None, "jakiro", {"adaptive": False}),
        "jakiro full depth, rows draft one by one": (switched((continuous, "drafts_together", lambda d: False),
                                                              (drafter_base, "drafts_together", lambda d: False)),
                                                     "jakiro", {"adaptive": False}),
        "kangaroo full depth, batched drafting": (None, "kangaroo", {"adaptive": False}),
        "kangaroo full depth, rows draft one by one": (switched((continuous, "drafts_together", lambda d: False),
                                                                (drafter_base, "drafts_together", lambda d: False)),
                                                       "kangaroo", {"adaptive": False}),
        "pld": (None, "pld", {}),
        "pld, no StepScale": (switched((continuous, "StepScale", _NoScale)), "pld", {}),
    }
    for m in ("ar", "pld", "jakiro", "kangaroo"):  # warm-up, untimed
        eng.generate(prompts[:2], method=m, max_new_tokens=8)
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    reference = None
    for _ in range(args.repeats):
        for name, (switch, method, extra) in variants.items():
            if switch is not None:
                switch()
            try:
                speed, tokens = run(method, **extra)
            finally:
                for (owner, name), value in real.items():
                    setattr(owner, name, value)
            reference = reference or tokens
            if tokens != reference:
                raise SystemExit(f"{name}: tokens differ from AR's")
            speeds[name].append(speed)
    print(f"{cpu_name()}, weights {eng.model.weight_format}, batch {args.batch}, {args.max_new_tokens} new tokens, "
          f"{args.repeats} repeats; every variant's rows equal AR's\n")
    for name, v in speeds.items():
        print(f"{name:45s} {statistics.mean(v):6.1f} tok/s  ({min(v):.1f}–{max(v):.1f})")


if __name__ == "__main__":
    main()
