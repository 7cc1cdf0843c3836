"""Self-distillation data: the target answers training prompts, and we keep what adapter training needs.

For every sequence (prompt + the target's own greedy answer) we store the hidden states after
the exit layers (Kangaroo's adapter input, fp16) and, when asked, the target's final-norm
features (what a Jakiro/EAGLE head reads and predicts) for every position, and the target's
top-k next-token distribution at every answer position (the soft label). All come out of the
generation itself: no second pass over the data. Batches are saved as shards as they finish, so
an interrupted run resumes where it stopped, and a time budget can stop it between shards.
Under a launcher (``torchrun``) the batches are shared out by number: rank r answers batches n with
n % world == r, and every rank sees every shard once all are done.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from joey.batching import causal_mask
from joey.errors import InvalidArgumentError
from joey.models.llama import LlamaModel
from joey.training import distributed


@dataclass(frozen=True)
class DistillSettings:
    exit_layers: tuple[int, ...] = (1, 2, 3, 4)  # hidden states kept after these layers
    max_new_tokens: int = 128
    max_prompt_tokens: int = 512  # longer prompts are skipped
    batch_size: int = 32
    batch_tokens: int = 0  # with fixed answers: at most this many padded positions per forward (0: no limit)
    top_k: int = 16  # soft labels: the target's top-k probabilities at each answer position
    features: bool = False  # also keep the final-norm feature of every position (key "feature")
    weights: str = "fp32"  # the target's weight format while answering (joey.load's ``weights``)


FEATURE = "feature"  # key of the final-norm features among the kept states


def run_kept(
    model: LlamaModel, x: torch.Tensor, positions, cache, slots, kv_len, mask, s: DistillSettings
) -> tuple[dict, torch.Tensor]:
    """All layers, keeping the hidden states after each exit layer (and the final-norm feature when
    ``s.features``); returns ({layer or FEATURE: [B,T,h] fp16}, final-norm features [B,T,h]). The LM
    head is the caller's to run where it needs logits: over a whole prefill of a 152 k vocabulary it
    would cost gigabytes."""
    kept = {}
    prev = 0
    for end in [*s.exit_layers, model.cfg.num_layers]:
        x = model.run_layers(x, positions, cache, slots, kv_len, mask, start=prev, end=end)
        if end in s.exit_layers:
            kept[end] = x.to(torch.float16)
        prev = end
    feature = model.model.norm(x)
    if s.features:
        kept[FEATURE] = feature.to(torch.float16)
    return kept, feature


def top_k_labels(
    model: LlamaModel, features: torch.Tensor, k: int, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's top-k next-token probabilities for final-norm ``features`` [N, h] → (ids int32,
    p fp16), each [N, k]. In chunks of rows: the whole vocabulary's probabilities are never held."""
    ids, probs = [], []
    for part in features.split(chunk):
        logits = model.head(part)  # fp32 [chunk, vocab]
        top, at = logits.topk(k, dim=-1)
        probs.append((top - logits.logsumexp(-1, keepdim=True)).exp().to(torch.float16))
        ids.append(at.to(torch.int32))
    if not ids:
        return torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k, dtype=torch.float16)
    return torch.cat(ids), torch.cat(probs)


@torch.inference_mode()
def answer_batch(
    model: LlamaModel, prompts: Sequence[list[int]], eos_ids: frozenset[int], s: DistillSettings
) -> list[dict]:
    """Greedy answers for a batch of tokenized prompts, with hidden states and top-k soft labels."""
    dev = model.device
    b = len(prompts)
    lengths = [len(p) for p in prompts]
    t = max(lengths)
    cache = model.new_cache(b, t + s.max_new_tokens + 1)
    tokens, positions = right_padded(prompts, dev)
    kept, feature = run_kept(model, model.embed(tokens), positions, cache, 0, t, None, s)
    keys = list(kept)
    cache.advance(lengths)
    rows = [
        {"ids": list(p), "prompt_len": len(p), "hidden": {e: [kept[e][i, : len(p)]] for e in keys},
         "top_ids": [], "top_p": []}
        for i, p in enumerate(prompts)
    ]
    last = model.head(feature[torch.arange(b), torch.tensor(lengths) - 1])  # [B, vocab]
    active = list(range(b))
    for step in range(s.max_new_tokens):
        probs = torch.softmax(last, dim=-1)
        top_p, top_ids = probs.topk(s.top_k, dim=-1)
        nxt = last.argmax(-1).tolist()
        still = []
        for j, r in enumerate(active):
            row = rows[r]
            row["top_ids"].append(top_ids[j].to(torch.int32))
            row["top_p"].append(top_p[j].to(torch.float16))
            row["ids"].append(nxt[j])
            if nxt[j] not in eos_ids and step + 1 < s.max_new_tokens:
                still.append(j)
        if not still:
            break
        if len(still) < len(active):
            cache.keep_rows(still)
            active = [active[j] for j in still]
            nxt = [nxt[j] for j in still]
        lens = cache.lengths
        pos = torch.tensor(lens, device=dev)[:, None]
        mask = causal_mask(lens, 1, max(lens) + 1, dev)
        kept, feature = run_kept(
            model, model.embed(torch.tensor(nxt, device=dev)[:, None]), pos, cache, pos, max(lens) + 1, mask, s
        )
        cache.advance([1] * len(active))
        for j, r in enumerate(active):
            for e in keys:
                rows[r]["hidden"][e].append(kept[e][j])
        last = model.head(feature[:, 0])
    return [shard_row(row) for row in rows]


def shard_row(row: dict) -> dict:
    """One answered sequence as stored in a shard, from the lists gathered while answering."""
    return {
        "ids": torch.tensor(row["ids"], dtype=torch.int32),
        "prompt_len": row["prompt_len"],
        # hidden states of positions 0 .. len(ids) - 2: the last token is never an input
        "hidden": {e: torch.cat(row["hidden"][e])[: len(row["ids"]) - 1].clone() for e in row["hidden"]},
        "top_ids": torch.stack(row["top_ids"]),  # [answer_len, k]: distribution of answer token i
        "top_p": torch.stack(row["top_p"]),
    }


def shard_sequences(paths: Iterable[Path]) -> Iterator[tuple[list[int], int]]:
    """(token ids, prompt length) of every sequence stored in the shards ``paths``. Mapped, not read:
    only the ids are looked at, not the features beside them."""
    for path in paths:
        for row in torch.load(path, weights_only=True, mmap=True):
            yield row["ids"].tolist(), int(row["prompt_len"])


@dataclass(frozen=True)
class Item:
    """One sequence to distill: chat-templated prompt ids, followed (teacher forcing) by a fixed answer's."""

    ids: tuple[int, ...]
    prompt_len: int


def prompt_items(encode: Callable[[str], list[int]], prompts: Sequence[str], max_prompt_tokens: int) -> list[Item]:
    """Prompts for the target to answer (``encode``: prompt → chat-templated ids); longer ones are skipped."""
    items = [tuple(ids) for ids in map(encode, prompts)]
    return [Item(ids, len(ids)) for ids in items if len(ids) <= max_prompt_tokens]


def generated(answer: Callable[..., list[dict]]) -> Callable[..., list[dict]]:
    """An answering function of prompt id lists (``answer_batch``, ``answer_batch_hf``) as one of items."""

    def on_items(model, items: Sequence[Item], eos_ids: frozenset[int], s: DistillSettings) -> list[dict]:
        return answer(model, [list(it.ids) for it in items], eos_ids, s)

    return on_items


def padded_batches(lengths: Sequence[int], max_tokens: int = 0, max_count: int = 0) -> list[list[int]]:
    """Indices of ``lengths`` grouped shortest first, so that each batch holds similar lengths (less
    padding): a batch closes before its padded size (count × its longest) would pass ``max_tokens``
    or its count ``max_count`` (0: no bound). A sequence longer than ``max_tokens`` is a batch alone."""
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        padded = lengths[i] * (len(cur) + 1)  # sorted: this one is the longest so far
        if cur and ((max_count and len(cur) >= max_count) or (max_tokens and padded > max_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def right_padded(
    seqs: Sequence[Sequence[int] | torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences right-padded with 0 → (tokens [B, T], positions [B, T]). Causal attention
    needs no mask then: a row's real positions never see the padding after them."""
    t = max(len(x) for x in seqs)
    tokens = torch.zeros(len(seqs), t, dtype=torch.long, device=device)
    for i, x in enumerate(seqs):
        tokens[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
    return tokens, torch.arange(t, device=device).expand(len(seqs), t)


def batches_of(items: Sequence[Item], s: DistillSettings) -> list[list[int]]:
    """Item indices in batches (``padded_batches``): at most ``s.batch_size`` items and, when
    ``s.batch_tokens``, at most that many padded positions; in a seeded shuffled order, so that a
    run stopped by its time budget holds a mix of lengths."""
    batches = padded_batches([len(it.ids) for it in items], s.batch_tokens, s.batch_size)
    random.Random(len(batches)).shuffle(batches)
    return batches


def collect(
    model: LlamaModel,
    items: Sequence[Item],
    eos_ids: frozenset[int],
    out_dir: Path,
    s: DistillSettings,
    progress: bool = True,
    time_budget: float | None = None,
    answer: Callable[..., list[dict]] | None = None,
) -> list[Path]:
    """Distill every item, writing a shard per batch (``batches_of``) to ``out_dir``.

    Shards that already exist are kept (resume). With ``time_budget`` (seconds) no new shard starts
    once it is spent (at least one does); a later call continues. ``answer(model, items, eos_ids, s)``
    makes a batch's rows: by default the target's greedy answers (:func:`answer_batch`); teacher
    forcing over fixed answers (``joey.training.teacher_forced``) or the device-mapped transformers
    target of :mod:`joey.training.hf_target` (through :func:`generated`) instead. Returns the paths of
    the shards that exist.
    """
    answer = answer or generated(answer_batch)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Shards are matched to batches by number: refuse to resume data made from other items/settings.
    digest = hashlib.sha256(json.dumps([asdict(s), [[list(it.ids), it.prompt_len] for it in items]]).encode())
    digest = digest.hexdigest()
    manifest = out_dir / "manifest.json"
    if distributed.is_main() and not manifest.exists():
        manifest.write_text(json.dumps({"digest": digest, "settings": asdict(s), "sequences": len(items)}))
    distributed.barrier()  # the manifest exists for every rank; each refuses (together) if it differs
    if json.loads(manifest.read_text()).get("digest") != digest:
        raise InvalidArgumentError(
            f"{out_dir} holds data distilled from other prompts or settings; use another --out folder"
        )
    batches = batches_of(items, s)
    rank, world = distributed.rank(), distributed.world_size()
    start = time.monotonic()
    spent = False  # checked after each new shard, so every run makes progress
    # rank 0's bar counts its own batches' sequences times the world: about the whole distillation's
    # progress (sequences, not tokens: an answer's length is not known before it is written)
    total = len(items)
    bar = tqdm(total=total, desc="distilling", unit="seq", disable=not (progress and rank == 0))
    for n in range(rank, len(batches), world):  # shard names are global batch numbers: ranks never collide
        batch = batches[n]
        path = out_dir / f"shard_{n:05d}.pt"
        if not path.exists():
            if spent:
                break
            rows = answer(model, [items[i] for i in batch], eos_ids, s)
            tmp = path.with_suffix(".tmp")
            torch.save(rows, tmp)
            tmp.replace(path)  # a shard appears whole or not at all
            spent = time_budget is not None and time.monotonic() - start > time_budget
        bar.update(min(total - bar.n, len(batch) * world))
    bar.close()
    distributed.barrier()  # every rank's shards are written before anyone lists them
    # in batch order; with a time budget the ranks may have stopped at different points
    paths = [out_dir / f"shard_{n:05d}.pt" for n in range(len(batches))]
    return [p for p in paths if p.exists()]
