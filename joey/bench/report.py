"""Turn finished questions into results: the summary tables, results.json, report.md, answer files.

Everything here is computed from the stored ``QuestionRecord``s, so a resumed run reports exactly
what a run in one go would have. The numbers come from ``joey.bench.metrics``.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from joey.bench import metrics
from joey.bench.runners import EXTERNAL, TurnResult
from joey.bench.store import MethodRun, QuestionRecord
from joey.measurements import cpu_name

OVERALL = "overall"
SCHEMA = "joey-bench/1"


# -- per-question numbers -------------------------------------------------------------------------
def run_speed(run: MethodRun) -> float:
    return metrics.tokens_per_s([t.new_tokens for t in run.turns], [t.wall_time_s for t in run.turns])


def _turns(records: Sequence[QuestionRecord], method: str) -> list[TurnResult]:
    return [t for rec in records for run in rec.runs if run.method == method for t in run.turns]


# -- summaries -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellSummary:
    """One method on one reported category (or overall)."""

    questions: int
    tokens_per_s: float  # mean over questions of the per-question tokens/s (each averaged over repeats)
    speedup: float  # vs joey AR, from those per-question speeds
    speedup_spread: metrics.Spread  # over the per-repeat speedups
    speedup_per_repeat: tuple[float, ...]
    mean_accepted_tokens: float | None  # None where the runner cannot see its steps
    acceptance_by_position: tuple[float, ...]
    new_tokens: int
    wall_time_s: float


@dataclass(frozen=True)
class LosslessCheck:
    """A method's token ids against AR's over all questions and repeats."""

    kind: str  # "lossless" (joey: greedy or seeded), "agreement" (external baselines), "not checked (sampling)"
    lossless: bool | None  # None unless kind == "lossless"
    identical: int  # (question, repeat) pairs with all turns identical
    compared: int
    token_agreement: float
    mismatches: tuple[dict[str, Any], ...]  # question_id, category, repeat, turn (1-based), first_difference


def summarize(records: Sequence[QuestionRecord], methods: Sequence[str],
              repeats: int) -> dict[str, dict[str, CellSummary]]:
    """Per method, per reported category and overall: tokens/s, speedup (and its spread over
    repeats), τ and acceptance by draft position."""
    groups = _groups(records)
    out: dict[str, dict[str, CellSummary]] = {}
    for method in methods:
        out[method] = {}
        for group in [*groups, OVERALL]:
            recs = [r for r in records if group in (OVERALL, r.group)]
            out[method][group] = _cell(recs, method, repeats)
    return out


def _cell(recs: Sequence[QuestionRecord], method: str, repeats: int) -> CellSummary:
    # Per question, the speed averaged over repeats; the headline speedup uses these, and the
    # spread comes from one speedup per repeat.
    mine = [statistics.fmean(run_speed(r.run(method, k)) for k in range(repeats)) for r in recs]
    ar = [statistics.fmean(run_speed(r.run("ar", k)) for k in range(repeats)) for r in recs]
    per_repeat = [
        metrics.speedup([run_speed(r.run(method, k)) for r in recs], [run_speed(r.run("ar", k)) for r in recs])
        for k in range(repeats)
    ]
    turns = _turns(recs, method)
    tau = None
    if turns and all(t.steps is not None and t.accept_lengths is not None for t in turns):
        tau = metrics.mean_accepted_tokens([sum(t.accept_lengths or ()) for t in turns], [t.steps or 0 for t in turns])
    acceptance = metrics.acceptance_by_position(
        [t.drafted_by_depth for t in turns], [t.accepted_by_depth for t in turns]
    )
    return CellSummary(
        questions=len(recs),
        tokens_per_s=statistics.fmean(mine),
        speedup=metrics.speedup(mine, ar),
        speedup_spread=metrics.spread(per_repeat),
        speedup_per_repeat=tuple(per_repeat),
        mean_accepted_tokens=tau,
        acceptance_by_position=acceptance,
        new_tokens=sum(t.new_tokens for t in turns),
        wall_time_s=sum(t.wall_time_s for t in turns),
    )


def lossless(records: Sequence[QuestionRecord], methods: Sequence[str], repeats: int,
             exact: bool) -> dict[str, LosslessCheck]:
    """Every method's token ids against AR's, per question and repeat.

    ``exact``: joey's methods must match exactly (greedy decoding, or seeded sampling whose draws
    are keyed by position: ``joey.sampling``); any mismatch is listed. The external baselines only
    report agreement, since quantized weights or other kernels may change a token. With rejection
    sampling (``exact`` False) equal ids are not expected: the test suite checks the distribution.
    """
    out: dict[str, LosslessCheck] = {}
    for method in methods:
        if method == "ar":
            continue
        pairs_all: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        identical = 0
        mismatches = []
        for rec in records:
            for k in range(repeats):
                ref, run = rec.run("ar", k).turns, rec.run(method, k).turns
                pairs = [(a.token_ids, b.token_ids) for a, b in zip(ref, run)]
                pairs_all.extend(pairs)
                diffs = [(i, metrics.first_difference(a, b)) for i, (a, b) in enumerate(pairs)]
                diffs = [(i, pos) for i, pos in diffs if pos is not None]
                if not diffs:
                    identical += 1
                else:
                    turn, pos = diffs[0]
                    mismatches.append({"question_id": rec.question_id, "category": rec.category, "repeat": k,
                                       "turn": turn + 1, "first_difference": pos})
        kind = "agreement" if method in EXTERNAL else "lossless" if exact else "not checked (sampling)"
        out[method] = LosslessCheck(
            kind=kind,
            lossless=(not mismatches) if kind == "lossless" else None,
            identical=identical,
            compared=len(records) * repeats,
            token_agreement=metrics.token_agreement(pairs_all),
            mismatches=tuple(mismatches),
        )
    return out


def _groups(records: Sequence[QuestionRecord]) -> list[str]:
    return list(dict.fromkeys(r.group for r in records))


# -- environment ----------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def environment(engine: Any) -> dict[str, Any]:
    import joey

    src = engine.source
    return {
        "joey": joey.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": _version("transformers"),
        "llama_cpp_python": _version("llama-cpp-python"),
        "matplotlib": _version("matplotlib"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": str(engine.device),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "weights": engine.model.weight_format,
        "model": engine.name,
        "model_folder": str(src.folder) if src else None,
        "model_gguf": str(src.gguf) if src and src.gguf else None,
        "draft_model": engine.draft_model is not None,
    }


# -- files ----------------------------------------------------------------------------------------
def per_question(records: Sequence[QuestionRecord]) -> list[dict[str, Any]]:
    return [
        {"question_id": rec.question_id, "category": rec.category, "group": rec.group, "method": run.method,
         "repeat": run.repeat, "position": run.position, "tokens_per_s": run_speed(run),
         "new_tokens": [t.new_tokens for t in run.turns], "wall_time_s": [t.wall_time_s for t in run.turns],
         "steps": [t.steps for t in run.turns], "finish_reason": [t.finish_reason for t in run.turns]}
        for rec in records for run in rec.runs
    ]


def write_answers(folder: Path, records: Sequence[QuestionRecord], methods: Sequence[str], model_name: str,
                  repeats: int) -> list[Path]:
    """One Spec-Bench answer file per method (one choice per repeat); ids are stable across reruns."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for method in methods:
        path = folder / f"{method}.jsonl"
        model_id = f"{model_name}-{method}"
        with open(path, "w", encoding="utf-8") as f:
            for rec in records:
                choices = []
                for k in range(repeats):
                    turns = rec.run(method, k).turns
                    choices.append({
                        "index": k,
                        "turns": [t.text for t in turns],
                        "decoding_steps": [t.steps for t in turns],
                        "new_tokens": [t.new_tokens for t in turns],
                        "wall_time": [t.wall_time_s for t in turns],
                        "accept_lengths": [n for t in turns for n in (t.accept_lengths or ())],
                    })
                answer_id = uuid.uuid5(uuid.NAMESPACE_URL, f"joey-bench/{model_id}/{rec.question_id}").hex
                f.write(json.dumps({"question_id": rec.question_id, "answer_id": answer_id, "model_id": model_id,
                                    "choices": choices, "tstamp": time.time()}) + "\n")
        paths.append(path)
    return paths


# -- report.md ------------------------------------------------------------------------------------
def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def render_markdown(results: dict[str, Any], plots: Sequence[str], plot_note: str | None) -> str:
    s, env, summary = results["settings"], results["environment"], results["summary"]
    methods, cats = results["methods"], results["categories"]
    repeats = s["repeats"]
    counts = ", ".join(f"{c} {results['summary'][methods[0]][c]['questions']}" for c in cats if c != OVERALL)
    hw = env["gpu"] or env["cpu"]
    lines = [
        "# joey bench",
        "",
        f"Model **{env['model']}** ({env['device']}, {env['dtype']}, weights {env.get('weights', env['dtype'])}) "
        f"on {hw}; torch {env['torch']} "
        f"(threads: {env['torch_threads']}), transformers {env['transformers']}, "
        f"llama-cpp-python {env['llama_cpp_python'] or 'not installed'}.",
        f"Questions: {s['questions_file']} — {counts}. "
        f"{s['max_new_tokens']} new tokens at most, temperature {s['temperature']}, {repeats} repeat(s), "
        f"max draft {s['max_draft']}; methods interleaved per question in a rotating order, after a warm-up.",
        "",
        "## Speedup vs joey AR",
        "Spec-Bench's definition: mean of per-question tokens/s (new tokens ÷ wall time, summed over turns) "
        "÷ the same for joey AR, same questions, same run."
        + (" In brackets: min · median · max of the speedup of each repeat." if repeats > 1 else ""),
        "",
    ]

    def table(fmt) -> list[str]:
        rows = ["| Method | " + " | ".join(cats) + " |", "|---|" + "---:|" * len(cats)]
        for m in methods:
            rows.append(f"| {m} | " + " | ".join(fmt(summary[m][c]) for c in cats) + " |")
        return rows

    def speed_cell(cell: dict[str, Any]) -> str:
        text = _x(cell["speedup"])
        if repeats > 1:
            sp = cell["speedup_spread"]
            text += f" [{sp['min']:.2f} · {sp['median']:.2f} · {sp['max']:.2f}]"
        return text

    lines += table(speed_cell)
    lines += ["", "## Tokens/s (mean per question)", ""]
    lines += table(lambda c: f"{c['tokens_per_s']:.1f}")
    lines += ["", "## Mean accepted tokens τ", "Committed tokens ÷ steps, the bonus token included (AR = 1.00); "
              "– where the runner cannot see its steps.", ""]
    lines += table(lambda c: "–" if c["mean_accepted_tokens"] is None else f"{c['mean_accepted_tokens']:.2f}")
    depth = max((len(summary[m][OVERALL]["acceptance_by_position"]) for m in methods), default=0)
    if depth:
        lines += ["", "## Acceptance rate by draft position (all questions)", "",
                  "| Method | " + " | ".join(str(i + 1) for i in range(depth)) + " |",
                  "|---|" + "---:|" * depth]
        for m in methods:
            acc = summary[m][OVERALL]["acceptance_by_position"]
            if acc:  # methods without drafts (AR, the baselines) have no row
                cells = [f"{a:.2f}" for a in acc] + ["–"] * (depth - len(acc))
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Lossless: token ids vs joey AR", "joey's methods must give AR's exact tokens under "
              "greedy decoding and seeded sampling alike; the external baselines report agreement only "
              "(different kernels or quantized weights).",
              "", "| Method | check | identical (question × repeat) | token agreement | mismatches |",
              "|---|---|---|---:|---|"]
    for m, c in results["lossless"].items():
        verdict = {True: "lossless ✓", False: "MISMATCH", None: c["kind"]}[c["lossless"]]
        shown = c["mismatches"] if c["kind"] != "not checked (sampling)" else []  # sampled ids may differ
        mism = ", ".join(f"q{x['question_id']} r{x['repeat']} t{x['turn']}@{x['first_difference']}"
                         for x in shown[:20])
        if len(shown) > 20:
            mism += f", … ({len(c['mismatches'])} in all, see results.json)"
        lines.append(f"| {m} | {verdict} | {c['identical']}/{c['compared']} | {c['token_agreement']:.1%} | "
                     f"{mism or '–'} |")
    lines += ["", "## Plots", ""]
    if plots:
        lines += [f"![{Path(p).stem}]({p})" for p in plots]
    else:
        lines.append(plot_note or "no plots")
    lines += ["", f"Machine-readable: results.json (settings, versions, per-question numbers); answers in "
              f"Spec-Bench's format: answers/<method>.jsonl. Run took {results['timing']['elapsed_s']:.0f} s "
              f"in this session.", ""]
    return "\n".join(lines)
