"""The bench loop: validate everything, load, warm up, answer each question with every method
(interleaved, rotating order), store each finished question, then write the results.

All input errors are raised before the model is loaded or anything is timed; a run stopped with
Ctrl-C (or killed) resumes from ``DIR/progress.jsonl`` when started again with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from joey.bench import batched, plots, report
from joey.bench.questions import Question, load_questions, select
from joey.bench.runners import (
    EXTERNAL,
    Runner,
    TurnResult,
    all_methods,
    check_available,
    llamacpp_installed,
    make_runner,
)
from joey.bench.store import MethodRun, QuestionRecord, Store, question_key
from joey.config import DEFAULT_MAX_DRAFT, DEFAULT_THRESHOLD, MAX_DRAFT_LIMIT, SamplingParams, SpecConfig
from joey.engine import METHODS, Engine, Message
from joey.errors import InvalidArgumentError, PromptError

WARMUP_TOKENS = 16


@dataclass(frozen=True)
class BenchSettings:
    """Everything a run depends on; all but ``out``, ``fresh`` and ``progress`` must match to resume."""

    questions: Path
    out: Path
    methods: tuple[str, ...] | None = None  # None: default_methods()
    categories: tuple[str, ...] = ()
    limit: int | None = None  # questions per reported category
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    repeats: int = 1
    max_draft: int = DEFAULT_MAX_DRAFT
    threshold: float = DEFAULT_THRESHOLD  # Kangaroo's η
    tree_nodes: int | None = None  # draft tree size (0 = chain, None = the budget's choice)
    tree_topk: int = 0  # children per tree node (0 = joey's choice)
    adaptive: bool = True  # per-step draft depth from the row's acceptance and the measured costs
    adapter: str | None = None  # Kangaroo adapter file (None: the one shipped for the model)
    head: str | None = None  # Jakiro head file (None: the one shipped for the model)
    model: str | None = None
    draft_model: str | None = None
    device: str | None = None
    dtype: str | None = None
    weights: str = "auto"  # the linear layers' format (joey.load)
    threads: int | None = None  # CPU threads for torch and llama.cpp (None: torch's default)
    batch_sizes: tuple[int, ...] = ()  # non-empty: first turns answered in batches (joey.bench.batched)
    batch_modes: tuple[str, ...] = ("packed", "padded")  # for batches: joey's packed rows and the padded baseline
    fresh: bool = False
    progress: bool = True  # tqdm bar on stderr


def default_methods(draft_model: bool) -> tuple[str, ...]:
    """Every joey method that needs no extra input, then every baseline installed here."""
    joey_methods = [m for m in METHODS if m != "sps" or draft_model]
    baselines = [m for m in EXTERNAL if m != "llamacpp" or llamacpp_installed()]
    return (*joey_methods, *baselines)


def _methods(requested: Sequence[str] | None, draft_model: bool) -> tuple[str, ...]:
    """The run's methods, AR first: every speedup and the lossless check are relative to it."""
    methods = list(dict.fromkeys(requested)) if requested else list(default_methods(draft_model))
    if not methods:
        raise InvalidArgumentError(f"no method given; choose from {', '.join(all_methods())}")
    return ("ar", *[m for m in methods if m != "ar"])


def _validate(s: BenchSettings, has_draft: bool) -> tuple[SamplingParams, tuple[str, ...], list[Question]]:
    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, seed=s.seed)
    if isinstance(s.repeats, bool) or not isinstance(s.repeats, int) or s.repeats < 1:
        raise InvalidArgumentError(f"--repeats must be an integer >= 1, got {s.repeats!r}")
    if not 0.0 <= s.threshold <= 1.0:
        raise InvalidArgumentError(f"--threshold must be in [0, 1], got {s.threshold}")
    if not 1 <= s.max_draft <= MAX_DRAFT_LIMIT:
        raise InvalidArgumentError(f"--max-draft must be in [1, {MAX_DRAFT_LIMIT}], got {s.max_draft}")
    methods = _methods(s.methods, has_draft)
    check_available(methods, has_draft)
    questions = select(load_questions(s.questions), s.categories, s.limit)
    if s.methods and "ar" not in s.methods:  # told only once the arguments are known to be good
        print("joey bench: adding method 'ar' (speedups are measured against it)", file=sys.stderr)
    return params, methods, questions


def _settings_record(s: BenchSettings, methods: Sequence[str], questions: Sequence[Question],
                     model: str | None) -> dict[str, Any]:
    """The exact settings, stored with the results and compared on resume."""
    path = Path(s.questions)
    return {
        "questions_file": str(path.resolve()),
        "questions_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "categories": list(s.categories),
        "limit": s.limit,
        "question_ids": [q.question_id for q in questions],
        "methods": list(methods),
        "max_new_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "seed": s.seed,
        "repeats": s.repeats,
        "max_draft": s.max_draft,
        "threshold": s.threshold,
        "tree_nodes": s.tree_nodes,
        "tree_topk": s.tree_topk,
        "adaptive": s.adaptive,
        "adapter": s.adapter,
        "head": s.head,
        "model": model,
        "draft_model": s.draft_model,
        "device": s.device,
        "dtype": s.dtype,
        "weights": s.weights,
        "threads": s.threads,
        **({"batch_sizes": list(s.batch_sizes), "batch_modes": list(s.batch_modes)} if s.batch_sizes else {}),
    }


def _check_lengths(engine: Engine, questions: Sequence[Question], max_new_tokens: int) -> None:
    """Fail before timing anything if a conversation cannot fit the context (an estimate that
    counts every turn's template once and every earlier answer at full length)."""
    too_long = []
    for q in questions:
        need = sum(len(engine.encode(t)) for t in q.turns) + max_new_tokens * (len(q.turns) - 1)
        if need >= engine.context_length:
            too_long.append(str(q.question_id))
    if too_long:
        raise PromptError(
            f"question(s) {', '.join(too_long[:10])}{' …' if len(too_long) > 10 else ''} may not fit the model's "
            f"context of {engine.context_length} tokens with {max_new_tokens} new tokens per turn; "
            "leave them out (--categories/--limit) or lower --max-new-tokens"
        )


def answer_question(runner: Runner, question: Question, params: SamplingParams) -> tuple[TurnResult, ...]:
    """All turns of a question in one conversation: turn k's prompt holds the runner's own answers
    to the earlier turns (through the chat template, applied by the engine's tokenizer)."""
    messages: list[Message] = []
    results = []
    for turn in question.turns:
        messages.append({"role": "user", "content": turn})
        result = runner.answer(messages, params)
        messages.append({"role": "assistant", "content": result.text})
        results.append(result)
    return tuple(results)


def run_bench(s: BenchSettings, engine: Engine | None = None) -> dict[str, Any]:
    """Run (or resume) a benchmark and write its files into ``s.out``; returns results.json's content.

    ``engine`` reuses an already loaded engine (its model then replaces ``s.model``).
    """
    import torch

    if s.threads is not None and (isinstance(s.threads, bool) or not isinstance(s.threads, int) or s.threads < 1):
        raise InvalidArgumentError(f"--threads must be an integer >= 1, got {s.threads!r}")
    threads = torch.get_num_threads()
    try:
        if s.threads is not None:
            torch.set_num_threads(s.threads)
        return _run(s, engine)
    finally:  # the caller's process keeps its own setting
        torch.set_num_threads(threads)


def _run(s: BenchSettings, engine: Engine | None) -> dict[str, Any]:
    started = time.time()
    has_draft = bool(s.draft_model) if engine is None else engine.draft_model is not None
    if s.batch_sizes:
        batched.validate(s.batch_sizes, s.batch_modes, _methods(s.methods, has_draft) if s.methods else ())
    params, methods, questions = _validate(s, has_draft)
    model_name = engine.name if engine is not None else s.model
    if s.batch_sizes:
        if not s.methods:  # the default list names baselines that do not run batches
            methods = tuple(m for m in methods if m in METHODS)
        batched.check_enough(questions, s.batch_sizes)
        settings = _settings_record(s, methods, questions, model_name)
        return batched.run_batched(s, engine, settings, params, methods, questions)
    settings = _settings_record(s, methods, questions, model_name)
    store = Store(Path(s.out))
    done = store.open(settings, fresh=s.fresh)
    if not plots.available():
        print(f"joey bench: {plots.MISSING_NOTE}", file=sys.stderr)

    if engine is None:
        import joey

        engine = joey.load(s.model, device=s.device, dtype=s.dtype, draft_model=s.draft_model, weights=s.weights,
                           adapter=s.adapter, head=s.head, progress=s.progress)
    todo = [q for q in questions if question_key(q.question_id) not in done]
    runners: dict[str, Runner] = {}
    if todo:  # a finished run only rewrites its outputs: no baseline model to load, nothing to warm up
        _check_lengths(engine, todo, s.max_new_tokens)
        spec = SpecConfig(s.max_draft, s.threshold, s.tree_nodes, s.tree_topk, s.adaptive)
        runners = {m: make_runner(m, engine, spec) for m in methods}
        # Warm-up (untimed): first calls pay for lazy initialisation, kernel selection, allocations.
        warm = replace(params, max_new_tokens=min(WARMUP_TOKENS, params.max_new_tokens))
        for runner in runners.values():
            runner.answer([{"role": "user", "content": todo[0].turns[0]}], warm)
    try:
        _loop(questions, done, runners, methods, params, s, store)
    except KeyboardInterrupt:
        print(f"\njoey bench: interrupted; {len(done)}/{len(questions)} questions are saved in {store.progress_path}."
              " Run the same command again to resume.", file=sys.stderr)
        raise

    records = [done[question_key(q.question_id)] for q in questions]
    return _write_outputs(Path(s.out), records, methods, settings, engine, params, started, len(todo))


def _loop(questions: Sequence[Question], done: dict[str, QuestionRecord], runners: dict[str, Runner],
          methods: tuple[str, ...], params: SamplingParams, s: BenchSettings, store: Store) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(questions), initial=len(done), unit="q", desc="joey bench", disable=not s.progress,
               dynamic_ncols=True, file=sys.stderr)
    try:
        for qi, q in enumerate(questions):
            if question_key(q.question_id) in done:
                continue
            runs = []
            for r in range(s.repeats):
                # Rotate the order per question and repeat, so slow drift on the machine and
                # cache effects of the previous method fall on every method alike.
                k = (qi + r) % len(methods)
                for pos, m in enumerate(methods[k:] + methods[:k]):
                    bar.set_postfix_str(f"{q.group} #{q.question_id} {m}", refresh=False)
                    runs.append(MethodRun(m, r, pos, answer_question(runners[m], q, params)))
            record = QuestionRecord(q.question_id, q.category, q.group, tuple(runs))
            store.append(record)
            done[question_key(q.question_id)] = record
            bar.update()
    finally:
        bar.close()


def _write_outputs(out: Path, records: list[QuestionRecord], methods: tuple[str, ...], settings: dict[str, Any],
                   engine: Engine, params: SamplingParams, started: float, new: int) -> dict[str, Any]:
    repeats = settings["repeats"]
    summary = report.summarize(records, methods, repeats)
    results: dict[str, Any] = {
        "schema": report.SCHEMA,
        "settings": settings,
        "environment": report.environment(engine),
        "methods": list(methods),
        "categories": list(next(iter(summary.values()))),
        "summary": {m: {c: asdict(cell) for c, cell in cells.items()} for m, cells in summary.items()},
        "lossless": {m: asdict(c) for m, c in report.lossless(records, methods, repeats, params.exact).items()},
        "per_question": report.per_question(records),
        "timing": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                   "elapsed_s": time.time() - started, "questions_this_session": new,
                   "questions": len(records)},
    }
    answer_files = report.write_answers(out / "answers", records, methods, engine.name, repeats)
    names = plots.write_plots(out, results)
    results["files"] = {"report": "report.md", "progress": "progress.jsonl", "plots": names,
                        "answers": [str(p.relative_to(out)) for p in answer_files]}
    results = json.loads(json.dumps(results))  # tuples become lists: the caller gets exactly the file's content
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    note = None if names or plots.available() else plots.MISSING_NOTE
    (out / "report.md").write_text(report.render_markdown(results, names, note), encoding="utf-8")
    print(f"joey bench: wrote {out / 'report.md'}, results.json, answers/ and {len(names)} plot(s)", file=sys.stderr)
    return results
