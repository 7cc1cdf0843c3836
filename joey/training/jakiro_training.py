"""Train a Jakiro draft head by self-distillation (Jakiro, arXiv 2502.06282; EAGLE, arXiv 2401.15077).

Data: the target's greedy answers with its final-norm features f_j of every position and its top-k
next-token distribution at every answer position (``joey.training.distill`` with ``features``).
At input position j the head sees (x_{j+1}, f_j + noise) and predicts f_{j+1} (normal branch) and
f_{j+2} (contrastive branch). Loss, over answer positions:

    SmoothL1(f̂_{j+1}, f_{j+1}) + 0.1 · CE(p_T, softmax(head(f̂_{j+1})))
    + 0.5 · [SmoothL1(f̂_{j+2}, f_{j+2}) + 0.1 · CE(p_T, softmax(head(f̂_{j+2})))]

where CE is the soft cross-entropy against the target's top-k distribution, both over the draft
vocabulary (the most frequent answer tokens), exactly as drafting sees it. Uniform noise on the
input features teaches the head to draft from its own (imperfect) predictions deeper in a tree.

The held-out split reports the normal branch's top-1 agreement with the target and mean accepted
tokens τ *simulated with the real drafter* (``JakiroDrafter``) for a chain and for a tree: the
stored answers are the target's greedy output, so following them is exactly greedy verification.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from joey.batching import depths_of
from joey.config import SamplingParams
from joey.drafters.draft_head import DraftVocabHead
from joey.drafters.jakiro import JakiroDraft, JakiroDrafter
from joey.models.jakiro_head import JakiroHead, load_head
from joey.models.llama import LlamaModel
from joey.training import distributed
from joey.training.adapter_training import Sequence_, length_batches, soft_labels, split_data
from joey.training.loop import fit
from joey.verify import follow_choices


@dataclass(frozen=True)
class HeadTrainSettings:
    draft_vocab: int = 8192
    experts: int = 2
    intermediate: int = 0  # each expert's SwiGLU width; 0 = the target's
    epochs: int = 3
    lr: float = 3e-4
    weight_decay: float = 0.0
    clip: float = 0.5
    batch_tokens: int = 4096  # padded positions per optimizer step
    noise: float = 0.2  # width of the uniform noise on input features (EAGLE: U(-0.1, 0.1))
    token_weight: float = 0.1
    after_weight: float = 0.5  # the contrastive (t+2) branch's share of the loss
    holdout: float = 0.05
    eval_sequences: int = 64  # held-out sequences for the simulated τ
    bf16: bool = False  # bf16 autocast (fast on CPUs with AMX / AVX512-BF16)
    seed: int = 0
    init: str | None = None  # a head file to continue from (its vocabulary, experts and width are kept)


@dataclass(frozen=True)
class HeadEvaluation:
    agreement: float  # normal branch's argmax == the target's greedy token (teacher-forced features)
    agreement_after: float  # the contrastive branch's argmax == the token after next
    chain_tau: float  # simulated mean accepted tokens, chain of ``depth``
    tree_tau: float  # ... and a tree of ``tree_nodes`` nodes (top-``topk`` expansion)
    depth: int
    tree_nodes: int
    positions: int


@dataclass(frozen=True)
class Predictions:
    """Both branches' predicted features at every answer position of a batch, and the targets; row
    i is one answer token (sequences in order), whose distribution the target feature gives."""

    next: torch.Tensor  # [N, hidden] normal branch
    after: torch.Tensor  # [N, hidden] contrastive branch (made two positions earlier)
    target: torch.Tensor  # [N, hidden] the target's feature
    has_after: torch.Tensor  # [N] bool: the contrastive branch had an input for this row


def _forward(
    head: JakiroHead, model: LlamaModel, seqs: Sequence[Sequence_], noise: float,
    seeds: Sequence[int] | None,  # one noise seed per sequence: its noise does not depend on the batch
    call: torch.nn.Module | None = None,  # what runs the head: itself, or its DDP wrapper in training
) -> Predictions:
    """The head over a batch of distilled sequences (teacher-forced: inputs are the target's features,
    plus ``noise``) → its predictions at every answer position."""
    dev = head.fc.weight.device
    b = len(seqs)
    t = max(len(s.ids) - 2 for s in seqs)  # input pairs j = 0 .. n - 3
    h = model.cfg.hidden_size
    feats = torch.zeros(b, t, h, device=dev)
    tokens = torch.zeros(b, t, dtype=torch.long, device=dev)
    for i, s in enumerate(seqs):
        n = len(s.ids) - 2
        feats[i, :n] = s.hidden[:n].to(dev).float()
        tokens[i, :n] = s.ids[1 : n + 1].to(dev)
    if noise:  # per sequence, over its own positions only: the same whatever else shares the batch
        gen = torch.Generator()
        for i, s in enumerate(seqs):
            n = len(s.ids) - 2
            gen.manual_seed(seeds[i])
            feats[i, :n] += (torch.rand((n, h), generator=gen) - 0.5).to(dev) * noise
    positions = torch.arange(t, device=dev).expand(b, t)
    cos, sin = model.rope(positions)
    cos, sin = cos.float(), sin.float()
    cache = head.new_cache(b, t)
    embeds = model.embed(tokens).float().reshape(b * t, h)
    out = (call or head)(embeds, feats.reshape(b * t, h), (b, t), cos, sin, cache, 0, t, None)
    # answer token a of a sequence with prompt length P: normal branch at pair a + P - 2, contrastive
    # at a + P - 3, both predicting the feature of position a + P - 1
    rows, cols = [], []
    for i, s in enumerate(seqs):
        p, a = s.prompt_len, len(s.ids) - s.prompt_len
        rows.append(torch.full((a,), i))
        cols.append(torch.arange(p - 1, p - 1 + a))
    r = torch.cat(rows).to(dev)
    c = torch.cat(cols).to(dev)
    target = torch.cat([s.hidden[s.prompt_len - 1 : len(s.ids) - 1].float() for s in seqs]).to(dev)
    nxt = out.next.view(b, t, h)[r, c - 1]
    after = out.after_next.view(b, t, h)[r, (c - 2).clamp_min(0)]
    return Predictions(nxt, after, target, c >= 2)  # no contrastive input two positions before 0


def _loss(
    head_w: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, loc, p, mask, s: HeadTrainSettings, count: int
):
    """SmoothL1 on the features + ``token_weight`` × soft cross-entropy to the target's top-k (over
    the draft vocabulary) for the rows in ``mask``, each summed over those rows and divided by ``count``
    rows (the global batch's: a mean when one process sees the whole batch); returns (loss, the
    cross-entropy alone)."""
    count = max(1, count)
    feat = F.smooth_l1_loss(pred[mask], target[mask], reduction="sum") / (count * pred.shape[-1])
    logq = (pred[mask] @ head_w.T).float().log_softmax(-1)
    ce = -(p[mask] * logq.gather(1, loc[mask])).sum() / count
    return feat + s.token_weight * ce, ce


def _rows(x: Sequence_) -> tuple[int, int]:
    """(answer rows, of which rows with a contrastive input) of one sequence: see ``_forward``."""
    a = len(x.ids) - x.prompt_len
    return a, sum(1 for c in range(x.prompt_len - 1, x.prompt_len - 1 + a) if c >= 2)


def train_head(
    model: LlamaModel,
    seqs: list[Sequence_],
    out_dir: Path,
    s: HeadTrainSettings,
    progress: bool = True,
    log=print,
) -> tuple[JakiroHead, HeadEvaluation | None]:
    """Train (resuming from ``out_dir/checkpoint.pt`` when its settings match); returns the head and
    its held-out evaluation (None on ranks other than 0 under a launcher)."""
    dev = model.device
    start = load_head(s.init, model) if s.init else None  # fine-tuning: more data for a trained head
    data = split_data(model, seqs, s.holdout, s.draft_vocab, s.seed, log, None if start is None else start.vocab)
    torch.manual_seed(s.seed)
    head = start if start is not None else JakiroHead(model.cfg, data.vocab, s.experts, s.intermediate or None)
    head = head.to(dev).float().train()
    for p in model.parameters():
        p.requires_grad_(False)
    plan = [length_batches(data.train, s.batch_tokens, random.Random(s.seed + e)) for e in range(s.epochs)]
    def step_loss(batch: list[int], step: int, call: torch.nn.Module) -> tuple[torch.Tensor, float]:
        # Both terms are means over the global batch's rows. Each rank sums over its share and divides
        # by the global counts; its factor (distributed.share) makes DDP's average of the ranks'
        # gradients exactly the single-process gradient of the whole batch.
        rows, rows_after = (sum(c) for c in zip(*(_rows(data.train[i]) for i in batch)))
        mine, factor = distributed.share(batch)
        chunk = [data.train[i] for i in mine]
        # noise seeded by step and sequence: the same after a resume and under any number of ranks
        seeds = [(s.seed * 1_000_003 + step) * 1_000_003 + i for i in mine]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=s.bf16):
            pred = _forward(head, model, chunk, s.noise, seeds, call)
            loc, p = soft_labels(chunk, data.local, dev)
            every = torch.ones_like(pred.has_after)
            loss_next, ce = _loss(data.head, pred.next, pred.target, loc, p, every, s, rows)
            loss_after, _ = _loss(data.head, pred.after, pred.target, loc, p, pred.has_after, s, rows_after)
        # shown (by rank 0, which always has a share) as the cross-entropy of the whole batch
        return (loss_next + s.after_weight * loss_after) * factor, ce.item() * factor

    evaluations: list[HeadEvaluation] = []

    def report(when: str) -> HeadEvaluation:
        head.eval()
        ev = evaluate_head(model, head, data.held, s)
        head.train()
        log(f"{when}: held-out top-1 {ev.agreement:.1%} (t+2 branch {ev.agreement_after:.1%}); "
            f"simulated τ chain {ev.chain_tau:.2f}, tree {ev.tree_tau:.2f}")
        return ev

    def end_of_epoch(epoch: int) -> None:
        evaluations.append(report(f"epoch {epoch}"))

    if start is not None and distributed.is_main() and not (out_dir / "checkpoint.pt").exists():
        # the starting head on the same held-out split: what fine-tuning gained is the difference
        report("before fine-tuning (the --init head)")

    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(len(p) for p in plan)
    fit(head, plan, step_loss, end_of_epoch, lr=s.lr, weight_decay=s.weight_decay, clip=s.clip,
        warmup=min(200, total // 10), checkpoint=out_dir / "checkpoint.pt", settings=data.identity(s), kind="jakiro",
        desc="head training", progress=progress, log=log)
    head.eval()
    if not distributed.is_main():  # rank 0 evaluates and saves
        return head, None
    return head, evaluations[-1] if evaluations else evaluate_head(model, head, data.held, s)


@torch.no_grad()
def evaluate_head(
    model: LlamaModel, head: JakiroHead, held: Sequence[Sequence_], s: HeadTrainSettings,
    depth: int = 6, tree_nodes: int = 8, topk: int = 3,
) -> HeadEvaluation:
    """Teacher-forced top-1 agreement on ``held`` (from ``split_data``: prompts of 2+ tokens), and τ
    simulated with the real drafter."""
    dev = head.fc.weight.device
    head_w = model.head_rows(head.vocab).float()
    agree = agree_after = total = total_after = 0
    for i in range(0, len(held), 16):
        chunk = held[i : i + 16]
        pred = _forward(head, model, chunk, 0.0, None)
        truth = torch.cat([x.ids[x.prompt_len :] for x in chunk]).to(dev)
        agree += int((head.vocab[(pred.next @ head_w.T).argmax(-1)] == truth).sum())
        agree_after += int((head.vocab[(pred.after @ head_w.T).argmax(-1)] == truth)[pred.has_after].sum())
        total += len(truth)
        total_after += int(pred.has_after.sum())
    sims = held[: s.eval_sequences]
    chain = simulate_tau(model, head, sims, depth, depth, 1)
    tree = simulate_tau(model, head, sims, depth, tree_nodes, topk)
    return HeadEvaluation(agree / max(1, total), agree_after / max(1, total_after), chain, tree, depth, tree_nodes,
                          total)


@torch.inference_mode()
def simulate_tau(
    model: LlamaModel, head: JakiroHead, seqs: Sequence[Sequence_], depth: int, nodes: int, topk: int
) -> float:
    """Mean accepted tokens of greedy Jakiro drafting on stored greedy answers: each step the drafter
    proposes a tree from the committed context (and the stored target features), the longest
    proposed path that matches the answer is accepted, and the next answer token is the bonus."""
    if not seqs:
        return 1.0
    draft = JakiroDraft(model, head, DraftVocabHead.build(model, head.vocab, head.fc.weight.dtype))
    steps = tokens = 0
    for x in seqs:
        ids = x.ids.tolist()
        drafter = JakiroDrafter(draft, SamplingParams(temperature=0.0), len(ids) + 2 * depth * topk + 8, topk)
        feats = x.hidden.to(head.fc.weight.device).float()
        drafter.observe(feats[: x.prompt_len])
        k = x.prompt_len + 1  # the first answer token comes from the prefill
        while k < len(ids):
            prop = drafter.propose(ids[:k], min(depth, len(ids) - k - 1), nodes)
            # the target's greedy choice after a node of depth d is the answer's token k + d
            choice = [ids[k + d] if k + d < len(ids) else -1 for d in depths_of(prop.parents)]
            commit = min(follow_choices(prop.tokens, prop.parents, choice).accepted + 1, len(ids) - k)
            drafter.observe(feats[k - 1 : k - 1 + commit])
            k += commit
            steps += 1
            tokens += commit
    return tokens / max(1, steps)

