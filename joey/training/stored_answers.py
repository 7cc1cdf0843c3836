"""The target's own greedy answers, stored compactly so that the slow part of distillation survives.

Answering token by token (``--answers target``) is the slowest part of self-distillation: ~3x the
time per token of reading fixed answers in one prefill. Its shards hold hundreds of bytes of
features per token and live in a cache that a new machine does not have. What cannot be recomputed
cheaply is only which tokens the target chose, so :func:`export_answers` keeps those: one JSON line
per answer, keyed by a digest of its prompt's token ids, gzipped (~2-3 bytes a token). A later run
re-reads the same prompt files, matches each prompt by its digest and teacher-forces the stored
answer (``joey.training.teacher_forced.forced_batch``): on greedy answers that gives the rows answering
gave, at prefill speed. The prompts themselves are not stored: they stay in the instruction sets,
under those sets' own licences.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from joey.errors import InvalidArgumentError
from joey.training.distill import Item

FORMAT = "joey-answers/1"


def prompt_key(ids: Sequence[int]) -> str:
    """A short digest of a prompt's token ids (chat template included): what an answer is filed under."""
    return hashlib.sha256(json.dumps(list(map(int, ids))).encode()).hexdigest()[:20]


def export_answers(shards: Iterable[Path], out: Path, model: str, target: str) -> dict:
    """Write the answers held in self-distillation ``shards`` to ``out`` (gzipped JSON lines: a header,
    then ``{"key": prompt_key, "answer": [ids]}`` per sequence). ``model`` names the target for people,
    ``target`` identifies it for the check on reading (``joey.models.draft_files.model_cache_key``).
    Returns the header."""
    answers: dict[str, list[int]] = {}
    for path in shards:
        # mapped, not read: only the token ids are looked at, not the features beside them
        for row in torch.load(path, weights_only=True, mmap=True):
            ids, n = row["ids"].tolist(), int(row["prompt_len"])
            answers.setdefault(prompt_key(ids[:n]), ids[n:])
    if not answers:
        raise InvalidArgumentError("no distilled sequences in the shards given")
    head = {"format": FORMAT, "model": model, "target": target, "answers": len(answers),
            "answer_tokens": sum(map(len, answers.values()))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with gzip.open(tmp, "wt") as f:
        f.write(json.dumps(head) + "\n")
        for key, answer in sorted(answers.items()):  # sorted: the same answers give the same bytes
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


def stored_items(prompts: Sequence[Item], answers: dict[str, tuple[int, ...]]) -> list[Item]:
    """The prompts whose answer is stored, each followed by it (teacher forcing's items); prompts
    without one are left out."""
    out = []
    for it in prompts:
        answer = answers.get(prompt_key(it.ids[: it.prompt_len]))
        if answer:
            out.append(Item(tuple(it.ids[: it.prompt_len]) + answer, it.prompt_len))
    return out
