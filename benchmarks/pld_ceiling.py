"""How fast prompt lookup (PLD) can be on this machine at one row: its steps replayed on AR's own outputs.

At temperature 0 a lossless method's output is AR's, so PLD's every step can be replayed offline from a
batched ``joey bench`` run's AR answers (batch size 1): at each position the lookup proposes what it
would (``PromptLookupDrafter``), the accepted prefix is what AR's answer continues with, and the next
step starts after it. A step that verifies k tokens is priced by this machine's cached verify curve
(``Engine.cost_curve``); a plain step by the curve at one token. This prices the target's forward
alone: real steps also pay what the curve leaves out (on a Zen 4 ~1 ms of a 4 ms plain step: the LM
head, choosing tokens, bookkeeping; more in drafted steps: the head over every verified token, masks),
so a measured speed-up can land a little either side of its policy's modelled one. Policies:

* ``depth d``: draft the match's first d tokens whenever there is one;
* ``by n-gram a/b/c``: depth a, b or c by the length (1, 2, 3) of the matched n-gram (the lookup is free,
  so a policy knows it before choosing a depth; joey's lookup caps 1-grams at 1 and 2-grams at 2, and
  the depth policy chooses the rest);
* ``oracle``: the depth that pays most knowing the answer (0 where nothing would be accepted): what no
  policy of this lookup can beat on this curve.

The end-to-end figure adds the run's measured prefill time (AR's time to its first tokens) unchanged,
since PLD's prefill is AR's.

    joey bench --limit 3 -n 128 --batch-size 1 --batch-modes packed --methods ar,pld --out bench_out/b1
    python benchmarks/pld_ceiling.py bench_out/b1
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import joey
from joey.bench.questions import load_questions
from joey.budget import CostCurve
from joey.drafters.prompt_lookup import PromptLookupDrafter
from joey.measurements import cpu_name

MAX_NGRAM = PromptLookupDrafter().max_ngram


def first_match(context: list[int], depth: int) -> tuple[int, list[int]] | None:
    """(the matched n-gram's length, its continuation) of the lookup PLD drafts from, or None."""
    for n in range(MAX_NGRAM, 0, -1):
        follow = next(PromptLookupDrafter(n, n, depth_by_ngram=())._continuations(context, depth), None)
        if follow:
            return n, follow
    return None


def accepted(draft: Sequence[int], answer: Sequence[int], at: int) -> int:
    """How many of ``draft``'s tokens equal the answer's from position ``at`` on."""
    a = 0
    while a < len(draft) and at + a < len(answer) and draft[a] == answer[at + a]:
        a += 1
    return a


def replay(answers: Sequence[tuple[list[int], list[int]]], curve: CostCurve,
           depth: Callable[[int, list[int], int], int], longest: int = 16) -> tuple[float, float]:
    """(τ, modelled decoding speed-up over AR) of PLD drafting ``depth(n, continuation, accepted)``
    tokens at each step. Each answer's first token comes from the prefill, as in the engine."""
    steps = tokens = 0
    ms = ar_ms = 0.0
    for prompt, answer in answers:
        at = 1
        while at < len(answer):
            match = first_match(prompt + answer[:at], longest)
            d = a = 0
            if match is not None:
                n, follow = match
                right = accepted(follow, answer, at)
                d = min(depth(n, follow, right), len(follow), len(answer) - at - 1)
                a = min(d, right)  # a draft of d tokens is a prefix of the continuation
            steps, tokens, ms = steps + 1, tokens + a + 1, ms + curve.cost(1 + d)
            at += a + 1
        ar_ms += (len(answer) - 1) * curve.cost(1)
    return tokens / max(1, steps), ar_ms / ms if ms else 1.0


def best_known(curve: CostCurve) -> Callable[[int, list[int], int], int]:
    """The oracle: drafting exactly the tokens that will be accepted, where that beats a plain step."""
    return lambda n, follow, a: a if a and (a + 1) / curve.cost(1 + a) > 1 / curve.cost(1) else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a batched joey bench run folder with AR at batch size 1")
    ap.add_argument("--out", type=Path, default=None, help="write pld_ceiling.md here (default: the run folder)")
    args = ap.parse_args()
    try:
        res = json.loads((args.run / "results.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        sys.exit(f"pld_ceiling.py: error: cannot read {args.run / 'results.json'}: {exc}")
    ar = [b for b in res.get("per_batch", []) if b["method"] == "ar" and b["batch_size"] == 1 and b["repeat"] == 0]
    if not ar:
        sys.exit(f"pld_ceiling.py: error: {args.run} has no AR batch of size 1 (run joey bench --batch-size 1 ...)")
    settings = res["settings"]
    engine = joey.load(settings["model"], weights=settings["weights"], progress=False)
    questions = {q.question_id: q for q in load_questions(settings["questions_file"])}
    answers = [(engine.encode(questions[b["question_ids"][0]].turns[0]), list(b["token_ids"][0])) for b in ar]
    curve = engine.cost_curve()
    # the share of AR's time that is prefill, all repeats: what no drafting changes
    ar_all = [b for b in res["per_batch"] if b["method"] == "ar" and b["batch_size"] == 1]
    prefill = sum(b["first_token_s"] for b in ar_all) / sum(b["wall_time_s"] for b in ar_all)

    policies: list[tuple[str, Callable[[int, list[int], int], int]]] = [
        (f"depth {d}", lambda n, f, a, d=d: d) for d in (1, 2, 3, 4, 6)]
    policies += [(f"by n-gram {x}/{y}/{z}", lambda n, f, a, p=(x, y, z): p[n - 1])
                 for x, y, z in ((0, 2, 4), (1, 1, 3), (1, 2, 4))]
    policies.append(("oracle", best_known(curve)))
    lines = [f"# PLD's ceiling at one row ({res['environment']['model']}, {cpu_name()})", "",
             f"{len(answers)} AR answers from {args.run}; verify curve (ratio to one token) at 2/4/8 tokens: "
             f"{curve.ratio(2):.2f} / {curve.ratio(4):.2f} / {curve.ratio(8):.2f}; prefill {100 * prefill:.0f} % "
             "of AR's time.", "",
             "| policy | τ | decoding speed-up (modelled) | end to end (modelled) |", "|---|---:|---:|---:|"]
    for name, policy in policies:
        tau, speedup = replay(answers, curve, policy)
        whole = 1 / (prefill + (1 - prefill) / speedup)
        lines.append(f"| {name} | {tau:.2f} | {speedup:.2f}× | {whole:.2f}× |")
    text = "\n".join(lines) + "\n"
    out = args.out or args.run
    out.mkdir(parents=True, exist_ok=True)
    (out / "pld_ceiling.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
