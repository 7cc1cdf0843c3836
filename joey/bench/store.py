"""Incremental results on disk, so an interrupted run resumes where it stopped.

``DIR/settings.json`` holds the exact settings of the run; ``DIR/progress.jsonl`` gets one line per
question once every method and repeat has answered it (flushed and fsynced, so a kill loses at most
the question in flight). A restart with the same settings skips the questions already there; with
different settings it stops with a clear error unless ``--fresh`` discards the old results.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from joey.bench.runners import TurnResult
from joey.errors import InvalidArgumentError

SETTINGS_FILE = "settings.json"
PROGRESS_FILE = "progress.jsonl"


@dataclass(frozen=True)
class MethodRun:
    """One method's answer to all turns of one question, in one repeat."""

    method: str
    repeat: int
    position: int  # where the method ran in this question's rotated order (0 = first)
    turns: tuple[TurnResult, ...]


@dataclass(frozen=True)
class QuestionRecord:
    question_id: int | str
    category: str
    group: str
    runs: tuple[MethodRun, ...]

    def run(self, method: str, repeat: int) -> MethodRun:
        return next(r for r in self.runs if r.method == method and r.repeat == repeat)


def question_key(question_id: int | str) -> str:
    """A key that keeps 1 and "1" apart (both occur in question files)."""
    return json.dumps(question_id)


def _turn_from(d: dict[str, Any]) -> TurnResult:
    d = dict(d)
    for name in ("token_ids", "drafted_by_depth", "accepted_by_depth"):
        d[name] = tuple(d[name])
    if d["accept_lengths"] is not None:
        d["accept_lengths"] = tuple(d["accept_lengths"])
    return TurnResult(**d)


def record_from(d: dict[str, Any]) -> QuestionRecord:
    runs = tuple(
        MethodRun(r["method"], r["repeat"], r["position"], tuple(_turn_from(t) for t in r["turns"])) for r in d["runs"]
    )
    return QuestionRecord(d["question_id"], d["category"], d["group"], runs)


class Store:
    """The run's folder: settings, finished records, and appending new ones. Records are
    ``QuestionRecord``s unless ``parse`` (a progress line's object → record) and ``key`` (record →
    its key) say otherwise (the batched bench stores one record per answered batch)."""

    def __init__(
        self,
        out: Path,
        parse: Callable[[dict[str, Any]], Any] | None = None,
        key: Callable[[Any], str] | None = None,
    ) -> None:
        self.out = Path(out)
        self.settings_path = self.out / SETTINGS_FILE
        self.progress_path = self.out / PROGRESS_FILE
        self.parse = parse or record_from
        self.key = key or (lambda rec: question_key(rec.question_id))

    def open(self, settings: dict[str, Any], fresh: bool = False) -> dict[str, Any]:
        """Prepare the folder for ``settings``; returns the finished records by key (for questions:
        by ``question_key``)."""
        if self.out.exists() and not self.out.is_dir():
            raise InvalidArgumentError(f"--out {self.out} is a file, not a folder")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidArgumentError(f"cannot create output folder {self.out}: {exc.strerror or exc}")
        settings = json.loads(json.dumps(settings))  # compare as they will read back
        done: dict[str, QuestionRecord] = {}
        if self.progress_path.exists() and not fresh:
            try:
                old = json.loads(self.settings_path.read_text())
            except (OSError, ValueError):
                old = None
            if old != settings:
                changed = sorted(k for k in set(settings) | set(old or {}) if (old or {}).get(k) != settings.get(k))
                raise InvalidArgumentError(
                    f"{self.out} holds results of a run with different settings ({', '.join(changed)}); "
                    "use another --out, or --fresh to discard them"
                )
            done = self._read_progress()
            if done:
                print(f"joey bench: resuming: {len(done)} record(s) already done in {self.progress_path}",
                      file=sys.stderr)
        elif fresh and self.progress_path.exists():
            print(f"joey bench: --fresh: discarding the results in {self.progress_path}", file=sys.stderr)
            self.progress_path.unlink()
        self.settings_path.write_text(json.dumps(settings, indent=2) + "\n")
        return done

    def _read_progress(self) -> dict[str, Any]:
        done: dict[str, Any] = {}
        good: list[str] = []
        lines = self.progress_path.read_text(encoding="utf-8").splitlines()
        for line in lines:
            try:
                rec = self.parse(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill: that question runs again
            done[self.key(rec)] = rec
            good.append(line)
        if len(good) != len(lines):  # drop the broken line so the next append starts on a fresh line
            self.progress_path.write_text("".join(g + "\n" for g in good), encoding="utf-8")
        return done

    def append(self, record: Any) -> None:
        with open(self.progress_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())
