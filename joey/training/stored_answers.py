"""The target's own greedy answers, stored compactly so that the slow part of distillation survives.

Answering token by token (``--answers target``) is the slowest part of self-distillation: ~3x the
time per token of reading fixed answers in one prefill. Its shards hold kilobytes of features per
token and live in a cache that a new machine does not have. What cannot be recomputed cheaply is
only which tokens the target chose, so :func:`export_answers` keeps those: one JSON line per answer,
keyed by a digest of its prompt's token ids, gzipped (~1.6 bytes a token). A later run over the same
prompt files reads every stored answer instead of generating it (:func:`answer_or_read`: one
teacher-forced prefill, ``joey.training.teacher_forced.forced_batch``, which on a greedy answer gives
the rows answering gave) and answers the rest. The prompts themselves are not stored: they stay in
the instruction sets, under those sets' own licences.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from joey.errors import InvalidArgumentError
from joey.training.distill import Item, answer_batch, shard_sequences
from joey.training.teacher_forced import forced_batch

FORMAT = "joey-answers/1"


def prompt_key(ids: Sequence[int]) -> str:
    """A short digest of a prompt's token ids (chat template included): what an answer is filed under."""
    return hashlib.sha256(json.dumps(list(map(int, ids))).encode()).hexdigest()[:20]


def export_answers(shards: Iterable[Path], out: Path, model: str, target: str) -> dict:
    """Write the answers held in self-distillation ``shards`` to ``out`` (gzipped JSON lines: a header,
    then ``{"key": prompt_key, "answer": [ids]}`` per sequence), keeping those already in ``out``.
    ``model`` names the target for people, ``target`` identifies it for the check on reading
    (``joey.models.draft_files.model_cache_key``). Returns the header."""
    answers: dict[str, list[int]] = {}
    if out.exists():  # a file being extended: its answers stay (they may come from another machine)
        head, old = read_answers(out)
        if head.get("target") != target:
            raise InvalidArgumentError(f"{out} holds answers of {head.get('model')}, not of {model}")
        answers.update((k, list(v)) for k, v in old.items())
    for ids, n in shard_sequences(shards):
        answers.setdefault(prompt_key(ids[:n]), ids[n:])
    if not answers:
        raise InvalidArgumentError("no distilled sequences in the shards given")
    head = {"format": FORMAT, "model": model, "target": target, "answers": len(answers),
            "answer_tokens": sum(map(len, answers.values()))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    # mtime 0: the same answers give the same bytes, so a rewritten file shows no change in git
    with io.TextIOWrapper(gzip.GzipFile(tmp, "wb", mtime=0), encoding="utf-8") as f:
        f.write(json.dumps(head) + "\n")
        for key, answer in sorted(answers.items()):
            f.write(json.dumps({"key": key, "answer": answer}, separators=(",", ":")) + "\n")
    tmp.replace(out)
    return head


def read_answers(path: str | Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(the file's header, which names the target that answered, and the answers by prompt key) stored
    in ``path``; a one-line error if it is not such a file."""
    try:
        with gzip.open(path, "rt") as f:
            head = json.loads(f.readline())
            if head.get("format") != FORMAT:
                raise ValueError("no joey answers header")
            answers = {}
            for line in f:
                rec = json.loads(line)
                answers[rec["key"]] = tuple(rec["answer"])
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidArgumentError(f"{path} is not a file of stored answers ({e})") from None
    return head, answers


def answer_or_read(answers: dict[str, tuple[int, ...]]) -> Callable[..., list[dict]]:
    """An answering function for ``joey.training.distill.collect`` over prompt items: a prompt whose
    answer is in ``answers`` is read (teacher forcing), the others are answered by the target."""

    def on_items(model, items: Sequence[Item], eos_ids: frozenset[int], s) -> list[dict]:
        known = [answers.get(prompt_key(it.ids)) for it in items]
        rows: list[dict | None] = [None] * len(items)
        read = [i for i, a in enumerate(known) if a]
        new = [i for i, a in enumerate(known) if not a]
        if read:
            forced = [Item(items[i].ids + known[i], len(items[i].ids)) for i in read]  # type: ignore[operator]
            for i, row in zip(read, forced_batch(model, forced, eos_ids, s), strict=True):
                rows[i] = row
        if new:
            for i, row in zip(new, answer_batch(model, [list(items[i].ids) for i in new], eos_ids, s), strict=True):
                rows[i] = row
        return rows  # type: ignore[return-value]

    return on_items
