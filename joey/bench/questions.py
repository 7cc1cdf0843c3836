"""Spec-Bench question files: parse and validate them, and choose the questions of a run.

A question file is JSONL, one object per line with ``question_id``, ``category`` and ``turns``
(a list of user messages; MT-bench questions have two) and an optional ``reference``. Spec-Bench
reports the eight MT-bench categories as one category, ``mt_bench``; so does joey.

joey ships Spec-Bench's own question file (``SPEC_BENCH_QUESTIONS``: 480 questions, Apache-2.0, see
``data/spec_bench/SOURCE.md``), the default of ``joey bench``. It is evaluation data: never train on it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from joey.errors import InvalidArgumentError

SPEC_BENCH_QUESTIONS = Path(__file__).resolve().parent / "data" / "spec_bench" / "question.jsonl"
MT_BENCH = "mt_bench"
MT_BENCH_CATEGORIES = frozenset(
    {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
)


@dataclass(frozen=True)
class Question:
    """One benchmark question: the user turns, asked one after another in the same conversation."""

    question_id: int | str
    category: str  # as in the file ("writing", "rag", ...)
    turns: tuple[str, ...]

    @property
    def group(self) -> str:
        """The category results are reported under (MT-bench's eight are one, as in Spec-Bench)."""
        return group_of(self.category)


def group_of(category: str) -> str:
    return MT_BENCH if category in MT_BENCH_CATEGORIES else category


def load_questions(path: str | Path) -> list[Question]:
    """Parse a Spec-Bench question file; any problem is one InvalidArgumentError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"question file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"cannot read question file {path}: {exc.__class__.__name__}")
    questions: list[Question] = []
    seen: set = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise InvalidArgumentError(f"{where}: not valid JSON ({exc.msg})")
        if not isinstance(obj, dict):
            raise InvalidArgumentError(f"{where}: expected a JSON object with question_id, category, turns")
        qid, category, turns = obj.get("question_id"), obj.get("category"), obj.get("turns")
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise InvalidArgumentError(f"{where}: 'question_id' must be an integer or a string")
        if not isinstance(category, str) or not category.strip():
            raise InvalidArgumentError(f"{where}: 'category' must be a non-empty string")
        if (
            not isinstance(turns, list)
            or not turns
            or not all(isinstance(t, str) and t.strip() for t in turns)
        ):
            raise InvalidArgumentError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
        if qid in seen:
            raise InvalidArgumentError(f"{where}: duplicate question_id {qid!r}")
        seen.add(qid)
        questions.append(Question(qid, category, tuple(turns)))
    if not questions:
        raise InvalidArgumentError(f"question file {path} has no questions")
    return questions


def select(questions: Sequence[Question], categories: Sequence[str] | None, limit: int | None) -> list[Question]:
    """The questions of a run, grouped by reported category in file order.

    ``categories`` may name file categories ("writing") or reported ones ("mt_bench"); ``limit``
    keeps at most that many questions per reported category. Within ``mt_bench`` the questions are
    taken round-robin over its sub-categories, so a small limit still samples all of them.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidArgumentError(f"--limit must be an integer >= 1, got {limit!r}")
    known = {q.category for q in questions} | {q.group for q in questions}
    wanted = None
    if categories:
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise InvalidArgumentError(
                f"unknown category {', '.join(map(repr, unknown))}; the file has: {', '.join(_ordered(questions))}"
            )
        wanted = set(categories)
    chosen = [q for q in questions if wanted is None or q.category in wanted or q.group in wanted]
    by_group: dict[str, dict[str, list[Question]]] = {}
    for q in chosen:
        by_group.setdefault(q.group, {}).setdefault(q.category, []).append(q)
    out: list[Question] = []
    for subs in by_group.values():
        mixed = _round_robin(list(subs.values()))
        out.extend(mixed[:limit] if limit is not None else mixed)
    return out


def _round_robin(lists: list[list[Question]]) -> list[Question]:
    out: list[Question] = []
    for i in range(max(len(x) for x in lists)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def _ordered(questions: Sequence[Question]) -> list[str]:
    """Reported categories then file categories, in file order, for error messages."""
    names: dict[str, None] = {}
    for q in questions:
        names.setdefault(q.group)
    for q in questions:
        names.setdefault(q.category)
    return list(names)
