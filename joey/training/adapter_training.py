"""Train a Kangaroo adapter by self-distillation (Kangaroo, arXiv 2404.18911, Sec. 3.2).

Only the adapter learns; the target is frozen. Loss = soft cross-entropy between the target's
next-token distribution (its top-k, stored by ``joey.training.distill``) and the draft's, over
answer positions only: −Σ_t Σ_v p_T(v|t) log p_D(v|t) / #t. The draft's distribution is over the
draft vocabulary, exactly as at inference, so training and drafting see the same head.

A held-out split reports the draft's top-1 agreement with the target and the mean accepted tokens
a greedy Kangaroo run would get on those answers (simulated from teacher-forced drafts, which is
exact for greedy decoding: along an accepted prefix the draft sees exactly the target's tokens).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from joey.models.adapter import KangarooAdapter
from joey.models.llama import LlamaModel
from joey.training import distributed
from joey.training.distill import padded_batches, right_padded
from joey.training.loop import fit


@dataclass(frozen=True)
class TrainSettings:
    exit_layer: int = 2
    mlp: bool = True  # a full decoder layer as the adapter; the paper's is attention only (mlp=False)
    draft_vocab: int = 8192
    epochs: int = 5
    lr: float = 2e-3
    weight_decay: float = 0.0
    clip: float = 0.5  # gradient-value clip, as in the paper
    batch_tokens: int = 4096  # padded positions per optimizer step
    holdout: float = 0.05
    bf16: bool = False  # bf16 autocast (fast on CPUs with AMX / AVX512-BF16)
    seed: int = 0


@dataclass(frozen=True)
class Sequence_:
    """One distilled sequence: layer-l states of positions 0..n-2 and soft labels of its answer."""

    hidden: torch.Tensor  # [n - 1, hidden] fp16
    ids: torch.Tensor  # [n] prompt + answer token ids
    prompt_len: int
    top_ids: torch.Tensor  # [answer_len, k]: the target's top-k for answer token i (position prompt_len-1+i)
    top_p: torch.Tensor  # [answer_len, k]


@dataclass(frozen=True)
class Evaluation:
    agreement: float  # draft argmax == target's greedy token, over held-out answer positions
    mean_accepted: dict[float, float]  # threshold η → simulated mean accepted tokens (γ = max_draft)
    max_draft: int
    positions: int


def load_sequences(paths: Sequence[Path], exit_layer: int | str, model: LlamaModel | None = None) -> list[Sequence_]:
    """The distilled sequences of ``paths`` with their states after ``exit_layer`` (or the final-norm
    features, ``FEATURE``). Shards distilled without that layer's states (e.g. a Jakiro head's data)
    get them computed from their tokens by ``model``'s first layers (``exit_states``), so one
    distillation serves both drafters and every exit layer. Shard by shard: what a shard holds
    beyond the chosen states (e.g. a 1.5B's features, 3 KB a token) is freed before the next loads.
    Shards are memory-mapped: the states stay file-backed pages the system may evict and read again,
    not process memory (the 1.5B's 9 GB of features plus training's own grew past 24 GB otherwise)."""
    out = []
    for path in paths:
        rows = torch.load(path, weights_only=True, mmap=True)
        missing = [i for i, row in enumerate(rows) if exit_layer not in row["hidden"]]
        if missing and (model is None or not isinstance(exit_layer, int)):
            raise ValueError(f"{path} has no hidden states for exit layer {exit_layer}")
        computed = dict(zip(missing, exit_states(model, [rows[i]["ids"] for i in missing], exit_layer))) \
            if missing else {}
        out += [Sequence_(computed[i] if i in computed else row["hidden"][exit_layer], row["ids"].long(),
                          int(row["prompt_len"]), row["top_ids"].long(), row["top_p"].float())
                for i, row in enumerate(rows)]
    return out


@torch.inference_mode()
def exit_states(
    model: LlamaModel, ids: Sequence[torch.Tensor], layer: int, batch_tokens: int = 8192
) -> list[torch.Tensor]:
    """Hidden states after ``layer`` of positions 0 .. n - 2 of each token sequence (fp16), as
    distillation would have kept them: the target's layers [0, layer) over right-padded batches of
    similar lengths."""
    out: list[torch.Tensor | None] = [None] * len(ids)
    for batch in padded_batches([len(x) - 1 for x in ids], batch_tokens):
        tokens, positions = right_padded([ids[k][:-1] for k in batch], model.device)
        b, t = tokens.shape
        x = model.run_layers(model.embed(tokens), positions, model.new_cache(b, t, layers=layer), 0, t, None,
                             end=layer)
        for r, k in enumerate(batch):
            out[k] = x[r, : len(ids[k]) - 1].to(torch.float16).cpu()
    return out  # type: ignore[return-value]


def draft_vocabulary(
    seqs: Sequence[Sequence_], size: int, vocab_size: int, given: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """The ``size`` most frequent tokens of the target's answers (and its top-2 alternatives), sorted,
    or ``given`` (a drafter's own vocabulary, kept when training continues from it); returns (ids,
    share of answer tokens covered)."""
    if given is not None:
        vocab = given.cpu()
    else:
        counts: Counter[int] = Counter()
        for s in seqs:
            counts.update(s.ids[s.prompt_len :].tolist())
            counts.update(s.top_ids[:, 1].tolist())
        ids = [t for t, _ in counts.most_common(size)]
        if len(ids) < size:  # pad with the lowest ids not chosen yet (rare tokens; keeps the size fixed)
            chosen = set(ids)
            ids += [t for t in range(vocab_size) if t not in chosen][: size - len(ids)]
        vocab = torch.tensor(sorted(ids), dtype=torch.long)
    inside = set(vocab.tolist())
    covered = sum(1 for s in seqs for t in s.ids[s.prompt_len :].tolist() if t in inside)
    return vocab, covered / max(1, sum(len(s.ids) - s.prompt_len for s in seqs))


def length_batches(seqs: Sequence[Sequence_], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Training batches of at most ``batch_tokens`` padded input positions (``padded_batches``), in
    ``rng``'s shuffled order."""
    batches = padded_batches([len(s.ids) - 1 for s in seqs], batch_tokens)
    rng.shuffle(batches)
    return batches


def _forward(
    model: LlamaModel, adapter: KangarooAdapter, head: torch.Tensor, seqs: Sequence[Sequence_],
    call: torch.nn.Module | None = None,  # what runs the adapter: itself, or its DDP wrapper in training
):
    """Draft logits [N, draft_vocab] at every labelled answer position of the batch, with (seq, answer idx)."""
    dev = head.device
    b = len(seqs)
    t = max(len(s.ids) - 1 for s in seqs)
    x = torch.zeros(b, t, model.cfg.hidden_size, device=dev, dtype=head.dtype)
    for i, s in enumerate(seqs):
        x[i, : len(s.ids) - 1] = s.hidden.to(dev, head.dtype)
    positions = torch.arange(t, device=dev).expand(b, t)
    cos, sin = model.rope(positions)
    cache = adapter.new_cache(b, t)
    # causal attention (mask None, queries = keys): right padding is never seen by real positions
    out = (call or adapter)(x.view(b * t, -1), (b, t), cos, sin, cache, 0, t, None).view(b, t, -1)
    rows = torch.cat([torch.full((len(s.ids) - s.prompt_len,), i) for i, s in enumerate(seqs)])
    cols = torch.cat([torch.arange(s.prompt_len - 1, len(s.ids) - 1) for s in seqs])
    return (out[rows.to(dev), cols.to(dev)] @ head.T).float()


def soft_labels(seqs: Sequence[Sequence_], local: torch.Tensor, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k target ids mapped into the draft vocabulary (−1 outside) and their renormalised probs."""
    ids = torch.cat([s.top_ids for s in seqs]).to(dev)
    p = torch.cat([s.top_p for s in seqs]).to(dev)
    loc = local[ids]
    p = torch.where(loc >= 0, p, torch.zeros_like(p))
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-6)
    return loc.clamp_min(0), p


@torch.no_grad()
def evaluate(
    model: LlamaModel,
    adapter: KangarooAdapter,
    head: torch.Tensor,
    seqs: Sequence[Sequence_],
    thresholds: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8),
    max_draft: int = 6,
) -> Evaluation:
    """Held-out top-1 agreement, and mean accepted tokens simulated for greedy Kangaroo."""
    agree = total = 0
    steps = {th: 0 for th in thresholds}
    for i in range(0, len(seqs), 16):
        chunk = seqs[i : i + 16]
        logits = _forward(model, adapter, head, chunk)
        conf, arg = logits.softmax(-1).max(-1)
        drafted = adapter.vocab[arg].cpu()
        conf = conf.cpu()
        offset = 0
        for s in chunk:
            n = len(s.ids) - s.prompt_len
            target = s.ids[s.prompt_len :]
            hit = (drafted[offset : offset + n] == target).tolist()
            c = conf[offset : offset + n].tolist()
            offset += n
            agree += sum(hit)
            total += n
            for th in thresholds:
                pos = 0
                while pos < n:  # one step: drafts from answer position pos; commits accepted + 1
                    acc = 0
                    while acc < max_draft and pos + acc < n - 1:
                        j = pos + acc
                        if not hit[j]:
                            break
                        acc += 1
                        if c[j] < th:
                            break
                    pos += acc + 1
                    steps[th] += 1
    return Evaluation(
        agreement=agree / max(1, total),
        mean_accepted={th: total / max(1, steps[th]) for th in thresholds},
        max_draft=max_draft,
        positions=total,
    )


@dataclass(frozen=True)
class Split:
    """Training and held-out sequences, and the draft vocabulary chosen from the training answers."""

    train: list[Sequence_]
    held: list[Sequence_]
    vocab: torch.Tensor  # [draft_vocab] target token ids, sorted
    local: torch.Tensor  # [vocab_size] index in the draft vocabulary, -1 outside
    head: torch.Tensor  # [draft_vocab, hidden] fp32 rows of the target's LM head

    def identity(self, settings: Any) -> dict:
        """What a checkpoint must match to be resumed: the training settings and the data (more
        distilled shards since the checkpoint mean a different plan, so training starts over)."""
        return {**asdict(settings), "train_sequences": len(self.train),
                "train_tokens": sum(len(x.ids) for x in self.train)}


def split_data(
    model: LlamaModel, seqs: Sequence[Sequence_], holdout: float, draft_vocab: int, seed: int, log=print,
    vocab: torch.Tensor | None = None,
) -> Split:
    """A seeded held-out split (sequences whose prompt has at least 2 tokens) and the draft vocabulary
    (``vocab`` when given: that of a drafter whose training continues)."""
    dev = model.device
    order = [i for i in range(len(seqs)) if seqs[i].prompt_len >= 2]
    random.Random(seed).shuffle(order)
    n_hold = max(1, int(len(order) * holdout))
    held = [seqs[i] for i in order[:n_hold]]
    train = [seqs[i] for i in order[n_hold:]]
    vocab, coverage = draft_vocabulary(train, draft_vocab, model.cfg.vocab_size, vocab)
    log(f"train {len(train)} sequences ({sum(len(x.ids) - x.prompt_len for x in train)} answer tokens), held out "
        f"{len(held)}; draft vocabulary {len(vocab)} tokens covers {coverage:.1%} of answer tokens")
    local = torch.full((model.cfg.vocab_size,), -1, dtype=torch.long, device=dev)
    local[vocab.to(dev)] = torch.arange(len(vocab), device=dev)
    head = model.head_rows(vocab).float().contiguous()
    return Split(train, held, vocab, local, head)


def train_adapter(
    model: LlamaModel,
    seqs: list[Sequence_],
    out_dir: Path,
    s: TrainSettings,
    progress: bool = True,
    log=print,
) -> tuple[KangarooAdapter, Evaluation | None]:
    """Train (resuming from ``out_dir/checkpoint.pt`` when its settings match); returns the adapter
    and its held-out evaluation (None on ranks other than 0 under a launcher)."""
    dev = model.device
    data = split_data(model, seqs, s.holdout, s.draft_vocab, s.seed, log)
    torch.manual_seed(s.seed)
    adapter = KangarooAdapter.initialized_from(model, s.exit_layer, data.vocab, s.mlp).float().train()
    for p in model.parameters():
        p.requires_grad_(False)
    plan = [length_batches(data.train, s.batch_tokens, random.Random(s.seed + e)) for e in range(s.epochs)]

    def step_loss(batch: list[int], step: int, call: torch.nn.Module) -> tuple[torch.Tensor, float]:
        # The loss is the mean over the global batch's answer positions. Each rank sums over its share
        # and divides by the global count; its factor (distributed.share) makes DDP's average of the
        # ranks' gradients exactly the single-process gradient.
        count = sum(len(data.train[i].ids) - data.train[i].prompt_len for i in batch)
        mine, factor = distributed.share(batch)
        chunk = [data.train[i] for i in mine]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=s.bf16):
            logq = _forward(model, adapter, data.head, chunk, call).log_softmax(-1)
        loc, p = soft_labels(chunk, data.local, dev)
        loss = -(p * logq.gather(1, loc)).sum() * (factor / count)
        return loss, loss.item()

    evaluations: list[Evaluation] = []

    def end_of_epoch(epoch: int) -> None:
        ev = evaluate(model, adapter, data.head, data.held)
        evaluations.append(ev)
        log(f"epoch {epoch}: held-out top-1 agreement {ev.agreement:.1%}, simulated mean accepted tokens "
            + ", ".join(f"η={th}: {v:.2f}" for th, v in ev.mean_accepted.items()))

    out_dir.mkdir(parents=True, exist_ok=True)
    fit(adapter, plan, step_loss, end_of_epoch, lr=s.lr, weight_decay=s.weight_decay, clip=s.clip, warmup=0,
        checkpoint=out_dir / "checkpoint.pt", settings=data.identity(s), kind="kangaroo", desc="adapter training",
        progress=progress, log=log)
    if not distributed.is_main():  # rank 0 evaluates and saves
        return adapter, None
    # the last epoch's evaluation is of the final weights; only a resume of a finished run lacks one
    return adapter, evaluations[-1] if evaluations else evaluate(model, adapter, data.head, data.held)
