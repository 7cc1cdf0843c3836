"""Training prompts for self-distillation, read from common instruction-data formats.

Self-distillation needs prompts only: the target writes the answers. Spec-Bench's eval set covers
translation, news summarization and retrieval-augmented QA, which the public instruction sets
barely contain, so ``derived_prompts`` writes prompts in those styles from other records' text
(never from Spec-Bench, which is evaluation data).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from joey.errors import InvalidArgumentError


def _record_prompt(rec: dict) -> str | None:
    """One prompt from a record of alpaca / gpteacher / gsm8k / self-instruct / instructionwild / plain form."""
    if isinstance(rec.get("prompt"), str):
        return rec["prompt"]
    if isinstance(rec.get("question"), str):
        return rec["question"]
    if isinstance(rec.get("turns"), list) and rec["turns"] and isinstance(rec["turns"][0], str):
        return rec["turns"][0]
    inst = rec.get("instruction")
    if not isinstance(inst, str):
        return None
    extra = rec.get("input")
    if not extra and isinstance(rec.get("instances"), list) and rec["instances"]:
        extra = rec["instances"][0].get("input")
    return f"{inst}\n\n{extra}" if isinstance(extra, str) and extra.strip() else inst


def _record_text(rec: dict) -> str | None:
    """A reference answer inside the record, if any: raw material for derived prompts."""
    for key in ("output", "response", "answer"):
        if isinstance(rec.get(key), str) and rec[key].strip():
            return rec[key]
    return None


def read_records(path: str | Path) -> list[dict]:
    """Records of a .json (a list) or .jsonl file; malformed lines of a JSONL are skipped."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"prompt file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"{p} is not valid JSON: {e.msg} (line {e.lineno})")
        if not isinstance(data, list):
            raise InvalidArgumentError(f"{p} must hold a JSON list of records")
        return [r for r in data if isinstance(r, dict)]
    records = []
    for line in text.splitlines():
        try:
            rec = json.loads(line, strict=False)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def derived_prompts(texts: list[str], count: int, rng: random.Random) -> list[str]:
    """Summarization, passage-QA and translation prompts written from other records' answers."""
    long = [t for t in texts if len(t) > 300]
    short = [t for t in texts if 30 < len(t) < 200 and "\n" not in t]
    out: list[str] = []
    langs = ["French", "Spanish", "German", "Italian", "Portuguese"]
    for i in range(count):
        kind = i % 3
        if kind == 0 and long:
            out.append(f"Summarize the following text in a few sentences.\n\n{rng.choice(long)}")
        elif kind == 1 and len(long) > 2:
            passages = rng.sample(long, 2)
            topic = passages[0].split(".")[0][:120]
            out.append(
                "Answer the question using the passages below.\n\n"
                + "\n\n".join(f"Passage {j + 1}: {p}" for j, p in enumerate(passages))
                + f"\n\nQuestion: What does the first passage say about \"{topic}\"?"
            )
        elif short:
            out.append(f"Translate English to {rng.choice(langs)}: {rng.choice(short)}")
    return out


def read_prompts(paths: list[str | Path], limit: int | None = None, derived: int = 0, seed: int = 0) -> list[str]:
    """Up to ``limit`` prompts: ``derived`` derived ones plus a seeded random choice of the files' own
    (deduplicated), shuffled together. Deterministic for the same arguments, so runs can resume."""
    rng = random.Random(seed)
    prompts: list[str] = []
    texts: list[str] = []
    for path in paths:
        for rec in read_records(path):
            p = _record_prompt(rec)
            if p and p.strip():
                prompts.append(p.strip())
            t = _record_text(rec)
            if t:
                texts.append(t.strip())
    if not prompts:
        raise InvalidArgumentError("no prompts found in " + ", ".join(str(p) for p in paths))
    prompts = list(dict.fromkeys(prompts))
    rng.shuffle(prompts)
    if limit is not None:
        prompts = prompts[: max(0, limit - derived)]
    prompts += derived_prompts(texts, derived, rng)
    rng.shuffle(prompts)
    return prompts
