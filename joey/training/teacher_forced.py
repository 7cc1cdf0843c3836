"""Teacher-forced distillation: the target reads fixed answers instead of writing its own.

The instruction sets' own answers (alpaca outputs, gsm8k solutions, gpteacher responses) follow
their prompts; one batched prefill over prompt + answer gives the target's final-norm features at
every position and its top-k distribution at every answer position, the same shard rows as
self-distillation (``joey.training.distill``) at prefill speed: no token-by-token generation.
EAGLE-1, HASS and Jakiro trained their heads on fixed answers like these; the target's own
answers (``joey.training.distill.answer_batch``) usually match it better, and both can be mixed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from joey.errors import InvalidArgumentError
from joey.models.llama import LlamaModel
from joey.training.distill import DistillSettings, Item, right_padded, run_kept, top_k_labels
from joey.training.prompts import _record_prompt, _record_text, read_records


def read_examples(paths: Sequence[str | Path], limit: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of the records that carry both, one per distinct prompt, in a seeded
    random order, at most ``limit``. Deterministic for the same arguments, so runs can resume."""
    pairs: dict[str, str] = {}
    for path in paths:
        for rec in read_records(path):
            prompt, answer = _record_prompt(rec), _record_text(rec)
            if prompt and prompt.strip() and answer and answer.strip():
                pairs.setdefault(prompt.strip(), answer.strip())
    if not pairs:
        raise InvalidArgumentError(
            "no records with both a prompt and an answer in " + ", ".join(str(p) for p in paths)
            + " (teacher forcing needs the answers: alpaca 'output', gsm8k 'answer', gpteacher 'response')"
        )
    examples = list(pairs.items())
    random.Random(seed).shuffle(examples)
    return examples[:limit] if limit is not None else examples


def forced_items(
    encode: Callable[[str], list[int]],  # prompt → chat-templated ids, ending where the answer starts
    tokenize: Callable[[str], list[int]],  # answer text → its token ids, no special tokens
    examples: Sequence[tuple[str, str]],
    end_id: int | None,  # the end-of-turn token after a whole answer (the target learns to stop)
    s: DistillSettings,
) -> list[Item]:
    """Prompt + answer token sequences; prompts longer than ``s.max_prompt_tokens`` are skipped and
    answers cut at ``s.max_new_tokens`` (a cut answer gets no end token)."""
    items = []
    for prompt, answer in examples:
        p = encode(prompt)
        if len(p) > s.max_prompt_tokens:
            continue
        a = tokenize(answer)
        if not a:
            continue
        if len(a) >= s.max_new_tokens or end_id is None:
            a = a[: s.max_new_tokens]
        else:
            a = [*a, end_id]
        items.append(Item(tuple(p + a), len(p)))
    return items


@torch.inference_mode()
def forced_batch(model: LlamaModel, items: Sequence[Item], eos_ids: frozenset[int], s: DistillSettings) -> list[dict]:
    """One right-padded prefill over a batch of prompt + fixed answer sequences → shard rows (the
    format of ``joey.training.distill.shard_row``). ``eos_ids`` is unused: the answers are given."""
    dev = model.device
    tokens, positions = right_padded([it.ids for it in items], dev)
    b, t = tokens.shape
    kept, feature = run_kept(model, model.embed(tokens), positions, model.new_cache(b, t), 0, t, None, s)
    # the distribution of answer token a is the target's output at position prompt_len - 1 + a
    rows = torch.cat([torch.full((len(it.ids) - it.prompt_len,), i) for i, it in enumerate(items)])
    cols = torch.cat([torch.arange(it.prompt_len - 1, len(it.ids) - 1) for it in items])
    top_ids, top_p = top_k_labels(model, feature[rows.to(dev), cols.to(dev)], s.top_k)
    out, at = [], 0
    for i, it in enumerate(items):
        n, a = len(it.ids), len(it.ids) - it.prompt_len
        out.append({
            "ids": torch.tensor(it.ids, dtype=torch.int32),
            "prompt_len": it.prompt_len,
            # positions 0 .. n - 2, as self-distillation stores them (the last token is never an input)
            "hidden": {e: kept[e][i, : n - 1].cpu().clone() for e in kept},
            "top_ids": top_ids[at : at + a].cpu(),
            "top_p": top_p[at : at + a].cpu(),
        })
        at += a
    return out
