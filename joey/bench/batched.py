"""``joey bench --batch-size B [B ...]``: questions answered in batches (EMS-SD's measurement).

The first turn of each selected question is a row; for every batch size B the questions are cut
into consecutive batches of B (a remainder smaller than B is left out at that size) and every
batch is answered by each method in each batch mode (``packed``: joey's ragged rows; ``padded``:
the lock-step baseline, ``joey.batching.Lockstep``), interleaved in a rotating order that is
reversed in every other repeat (so no method is always the first at a batch size: on a Zen 4 the
first 16-row batch after smaller ones took ~1 s longer, charged to whichever method ran it). Speed
is a batch size's total new tokens ÷ its total wall time; the speedup of a (method, mode) is that ÷
AR in packed mode at the same size, in the same repeat. The same is also given for decoding alone,
from the batch's first tokens on: a batch's prefill is the same work in every method, yet at 16
rows it is half the batch's time and varies by ±6 % between runs, more than the differences the
run is after. Every row's tokens are compared with AR's
(greedy or seeded sampling: both must be equal). Each answered batch is one progress line, so an
interrupted run resumes.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from joey.bench import plots, report
from joey.bench.metrics import spread
from joey.bench.questions import Question
from joey.bench.store import Store
from joey.config import SamplingParams, SpecConfig
from joey.engine import BATCH_MODES, METHODS, Engine
from joey.errors import InvalidArgumentError, PromptError

SCHEMA = "joey-bench-batched/1"
REFERENCE = ("ar", "packed")  # what every speedup divides by


@dataclass(frozen=True)
class BatchRun:
    """One batch of first turns answered by one method in one batch mode."""

    method: str
    mode: str
    batch_size: int
    repeat: int
    chunk: int  # which batch of this size (0 = the first B questions)
    question_ids: tuple[int | str, ...]
    token_ids: tuple[tuple[int, ...], ...]  # per row
    steps: tuple[int, ...]  # per row
    wall_time_s: float  # prefill to the last row's last token
    first_token_s: float = 0.0  # prefill to the rows' first tokens (all rows are admitted in one step)

    @property
    def key(self) -> str:
        return run_key(self.method, self.mode, self.batch_size, self.repeat, self.chunk)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def decoded_tokens(self) -> int:
        """New tokens after each row's first (which the prefill chose)."""
        return sum(max(0, len(t) - 1) for t in self.token_ids)


def run_key(method: str, mode: str, batch_size: int, repeat: int, chunk: int) -> str:
    """The progress file's key of one answered batch."""
    return f"{method}|{mode}|{batch_size}|{repeat}|{chunk}"


def run_order(pairs: Sequence[tuple[str, str]], n: int, repeat: int) -> list[tuple[str, str]]:
    """The order in which the ``n``-th batch of a run's plan is answered: rotated by one per batch,
    so drift on the machine falls on every pair alike, and reversed in odd repeats, so that a batch
    size's first batch (its dearest: new shapes, the allocator growing) does not fall on the same
    pair in every repeat, as it did with two pairs and an even count of batches per repeat."""
    k = n % len(pairs)
    order = list(pairs[k:]) + list(pairs[:k])
    return order[::-1] if repeat % 2 else order


def batch_run_from(d: dict[str, Any]) -> BatchRun:
    d = dict(d)
    d["question_ids"] = tuple(d["question_ids"])
    d["token_ids"] = tuple(tuple(t) for t in d["token_ids"])
    d["steps"] = tuple(d["steps"])
    return BatchRun(**d)


def validate(sizes: Sequence[int], modes: Sequence[str], methods: Sequence[str]) -> None:
    """One-line errors for the batched options, before anything is loaded."""
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise InvalidArgumentError(f"--batch-size must be integers >= 1, got {' '.join(map(str, sizes))}")
    unknown = [m for m in modes if m not in BATCH_MODES]
    if unknown or not modes:
        raise InvalidArgumentError(f"unknown batch mode {', '.join(unknown) or '(none)'}; choose from "
                                   f"{', '.join(BATCH_MODES)}")
    external = [m for m in methods if m not in METHODS]
    if external:
        raise InvalidArgumentError(f"--batch-size runs joey's own methods only; leave out {', '.join(external)}")


def check_enough(questions: Sequence[Question], sizes: Sequence[int]) -> None:
    """The run's questions (selected as in the per-question bench) must fill the largest batch."""
    if len(questions) < max(sizes):
        raise InvalidArgumentError(f"batch size {max(sizes)} needs at least that many questions; "
                                   f"the selection has {len(questions)} (raise --limit or add --categories)")


def run_batched(s: Any, engine: Engine | None, settings: dict[str, Any], params: SamplingParams,
                methods: tuple[str, ...], questions: list[Question]) -> dict[str, Any]:
    """Answer the batches (resuming from ``s.out``), then write results.json, report.md and the plot."""
    started = time.time()
    store = Store(Path(s.out), parse=batch_run_from, key=lambda run: run.key)
    done: dict[str, BatchRun] = store.open(settings, fresh=s.fresh)
    if engine is None:
        import joey

        engine = joey.load(s.model, device=s.device, dtype=s.dtype, draft_model=s.draft_model, weights=s.weights,
                           adapter=s.adapter, head=s.head, progress=s.progress)
    for q in questions:
        if len(engine.encode(q.turns[0])) + s.max_new_tokens >= engine.context_length:
            raise PromptError(f"question {q.question_id} does not fit the model's context of "
                              f"{engine.context_length} tokens with {s.max_new_tokens} new tokens")
    spec = SpecConfig(s.max_draft, s.threshold, s.tree_nodes, s.tree_topk, s.adaptive)
    pairs = [(m, mode) for m in methods for mode in s.batch_modes]
    if REFERENCE not in pairs:
        pairs.insert(0, REFERENCE)
    plan = [(r, b, c) for r in range(s.repeats) for b in s.batch_sizes for c in range(len(questions) // b)]
    if any(run_key(m, mode, b, r, c) not in done for r, b, c in plan for m, mode in pairs):
        warm = replace(params, max_new_tokens=min(16, params.max_new_tokens))
        for m, mode in pairs:  # untimed: lazy initialisation, kernel selection, the cost curve
            engine.generate([q.turns[0] for q in questions[:2]], warm, method=m, batch_mode=mode, **asdict(spec))
    _loop(engine, plan, pairs, questions, params, spec, done, store, s.progress)
    runs = [done[run_key(m, mode, b, r, c)] for r, b, c in plan for m, mode in pairs]
    return _write(Path(s.out), runs, pairs, settings, engine, params, started)


def _loop(engine: Engine, plan: list[tuple[int, int, int]], pairs: list[tuple[str, str]], questions: list[Question],
          params: SamplingParams, spec: SpecConfig, done: dict[str, BatchRun], store: Store, progress: bool) -> None:
    from tqdm.auto import tqdm

    total = len(plan) * len(pairs)
    bar = tqdm(total=total, initial=len(done), unit="batch", desc="joey bench (batched)", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    try:
        for n, (r, b, c) in enumerate(plan):
            rows = questions[c * b : (c + 1) * b]
            for m, mode in run_order(pairs, n, r):
                key = run_key(m, mode, b, r, c)
                if key in done:
                    continue
                bar.set_postfix_str(f"batch {b} #{c} {m} {mode}", refresh=False)
                gens = engine.generate([q.turns[0] for q in rows], params, method=m, batch_mode=mode,
                                       **asdict(spec))
                run = BatchRun(m, mode, b, r, c, tuple(q.question_id for q in rows),
                               tuple(g.token_ids for g in gens), tuple(g.stats.steps for g in gens),
                               max(g.wall_time_s for g in gens), max(g.first_token_s for g in gens))
                store.append(run)
                done[key] = run
                bar.update()
    finally:
        bar.close()


def summarize(runs: Sequence[BatchRun], pairs: Sequence[tuple[str, str]], sizes: Sequence[int], repeats: int,
              exact: bool) -> list[dict[str, Any]]:
    """One row per (method, mode, batch size): tokens/s (median over repeats), speedup over packed
    AR (median and spread over repeats), the same for decoding alone (``decode_*``: from the first
    tokens on), τ, and the identical-token check against AR."""
    by: dict[tuple[str, str, int, int], list[BatchRun]] = {}
    for run in runs:
        by.setdefault((run.method, run.mode, run.batch_size, run.repeat), []).append(run)

    def speed(key: tuple[str, str, int, int], decode: bool = False) -> float:
        group = by[key]
        if decode:
            seconds = sum(x.wall_time_s - x.first_token_s for x in group)
            return sum(x.decoded_tokens for x in group) / seconds if seconds > 0 else 0.0
        seconds = sum(x.wall_time_s for x in group)
        return sum(x.new_tokens for x in group) / seconds if seconds > 0 else 0.0

    def speeds(m: str, mode: str, b: int, decode: bool) -> list[float]:
        return [speed((m, mode, b, r), decode) for r in range(repeats)]

    def ratios(own: list[float], ref: list[float]) -> list[float]:
        return [v / w if w > 0 else 0.0 for v, w in zip(own, ref)]

    reference = {(x.question_ids, x.repeat): x.token_ids for x in runs if (x.method, x.mode) == REFERENCE}
    rows = []
    for m, mode in pairs:
        for b in sizes:
            whole, decoding = speeds(m, mode, b, False), speeds(m, mode, b, True)
            ratio = ratios(whole, speeds(*REFERENCE, b, False))
            decode = ratios(decoding, speeds(*REFERENCE, b, True))
            group = [x for r in range(repeats) for x in by[(m, mode, b, r)]]
            same = sum(a == want for x in group for a, want in zip(x.token_ids, reference[(x.question_ids, x.repeat)]))
            rows.append({
                "method": m, "mode": mode, "batch_size": b,
                "tokens_per_s": statistics.median(whole),
                "speedup": statistics.median(ratio), "speedup_spread": asdict(spread(ratio)),
                "decode_tokens_per_s": statistics.median(decoding),
                "decode_speedup": statistics.median(decode), "decode_speedup_spread": asdict(spread(decode)),
                "mean_accepted_tokens": sum(x.new_tokens for x in group) / max(1, sum(sum(x.steps) for x in group)),
                "rows": sum(len(x.token_ids) for x in group),
                "identical_rows": same if exact else None,
            })
    return rows


def _write(out: Path, runs: list[BatchRun], pairs: list[tuple[str, str]], settings: dict[str, Any], engine: Engine,
           params: SamplingParams, started: float) -> dict[str, Any]:
    import json

    sizes = settings["batch_sizes"]
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "settings": settings,
        "environment": report.environment(engine),
        "table": summarize(runs, pairs, sizes, settings["repeats"], params.exact),
        "per_batch": [asdict(r) | {"new_tokens": r.new_tokens} for r in runs],
        "timing": {"elapsed_s": time.time() - started},
    }
    names = plots.write_batch_plot(out, results)
    results["files"] = {"report": "report.md", "progress": "progress.jsonl", "plots": names}
    results = json.loads(json.dumps(results))  # tuples become lists: the caller gets exactly the file's content
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(results, names), encoding="utf-8")
    print(f"joey bench: wrote {out / 'report.md'}, results.json and {len(names)} plot(s)", file=sys.stderr)
    return results


def render_markdown(results: dict[str, Any], plots_written: Sequence[str]) -> str:
    s, env, table = results["settings"], results["environment"], results["table"]
    sizes = s["batch_sizes"]
    lines = [
        "# joey bench: batches",
        "",
        f"Model **{env['model']}** ({env['device']}, weights {env['weights']}) on {env['gpu'] or env['cpu']}; "
        f"torch {env['torch']} (threads: {env['torch_threads']}).",
        f"First turns of {len(s['question_ids'])} questions from {s['questions_file']}, in batches of "
        f"{', '.join(map(str, sizes))}; {s['max_new_tokens']} new tokens at most, temperature {s['temperature']}, "
        f"{s['repeats']} repeat(s); methods and batch modes interleaved per batch in a rotating order, "
        "reversed every other repeat.",
        "",
        "## Speedup over batched AR (packed)",
        "A batch size's total new tokens ÷ its total wall time, ÷ the same for AR in packed mode, same run"
        + (" (median; in brackets min–max over repeats)." if s["repeats"] > 1 else "."),
        "",
    ]
    cells = {(r["method"], r["mode"], r["batch_size"]): r for r in table}
    pairs = list(dict.fromkeys((r["method"], r["mode"]) for r in table))

    def speedups(key: str) -> list[str]:
        out = ["| method | mode | " + " | ".join(f"B={b}" for b in sizes) + " |", "|---|---|" + "---:|" * len(sizes)]
        for m, mode in pairs:
            row = []
            for b in sizes:
                c = cells[(m, mode, b)]
                text = f"{c[key]:.2f}×"
                if s["repeats"] > 1:
                    text += f" [{c[key + '_spread']['min']:.2f}–{c[key + '_spread']['max']:.2f}]"
                row.append(text)
            out.append(f"| {m} | {mode} | " + " | ".join(row) + " |")
        return out

    lines += speedups("speedup")
    lines += ["", "## Decoding alone",
              "The same from each batch's first tokens on: its prefill (the same work in every method, yet at "
              "16 rows about half its time, and noisy) left out.", ""]
    lines += speedups("decode_speedup")
    lines += ["", "## Tokens/s, τ and identical rows", "",
              "| method | mode | " + " | ".join(f"B={b}" for b in sizes) + " |", "|---|---|" + "---:|" * len(sizes)]
    for m, mode in pairs:
        row = []
        for b in sizes:
            c = cells[(m, mode, b)]
            same = "–" if c["identical_rows"] is None else f"{c['identical_rows']}/{c['rows']}"
            row.append(f"{c['tokens_per_s']:.1f} tok/s, τ {c['mean_accepted_tokens']:.2f}, {same}")
        lines.append(f"| {m} | {mode} | " + " | ".join(row) + " |")
    lines += ["", "Identical rows: rows whose tokens equal packed AR's (greedy or seeded sampling; "
              "– with rejection sampling).", ""]
    lines += [f"![{Path(p).stem}]({p})" for p in plots_written] or [plots.MISSING_NOTE]
    lines += ["", f"Machine-readable: results.json. Run took {results['timing']['elapsed_s']:.0f} s in this session.",
              ""]
    return "\n".join(lines)
