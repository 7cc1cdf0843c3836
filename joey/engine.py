"""The generation loop: prompts in, streamed text out, for one or many sequences at once.

``Engine.stream()`` is the single generation loop; ``generate()``, the CLI, the server and the
benchmark are all built on it. Rows of a batch keep their own KV length (no padding after the
prefill), and a row that finishes is dropped from the batch so it stops costing compute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Union

import torch

from joey.batching import (
    Lockstep,
    depths_of,
    grid_positions,
    grid_slots,
    pack,
    path_moves,
    row_mask,
    rows_pay_off,
    step_mask,
)
from joey.budget import PROBE_EVERY, CostCurve, StepScale, batch_depths, best_depth, cached_curve
from joey.config import (
    DEFAULT_MAX_DRAFT,
    DEFAULT_THRESHOLD,
    Generation,
    GenerationStats,
    SamplingParams,
    SpecConfig,
    TreeShape,
)
from joey.detokenize import IncrementalText
from joey.drafters import (
    Drafter,
    DraftModelDrafter,
    JakiroDraft,
    JakiroDrafter,
    KangarooDraft,
    KangarooDrafter,
    PromptLookupDrafter,
    Proposal,
)
from joey.drafters.base import drafts_together, propose_all
from joey.errors import InvalidArgumentError, PromptError
from joey.models.adapter import KangarooAdapter
from joey.models.jakiro_head import JakiroHead
from joey.models.kv_cache import KVCache
from joey.models.llama import LlamaModel, RowSpan
from joey.models.registry import ModelSource
from joey.models.weights import read_config
from joey.sampling import next_tokens, probabilities
from joey.verify import Verdict, verify_greedy, verify_sampled

Message = dict[str, str]
Prompt = Union[str, Sequence[Message]]
METHODS = ("ar", "pld", "sps", "kangaroo", "kangaroo+pld", "jakiro", "jakiro+pld")
KANGAROO_TOPK = 3  # children per expanded node of Kangaroo's tree (benchmarks/tree_sweep.py)
JAKIRO_TOPK = 2  # children per expanded node of Jakiro's tree (benchmarks/tree_sweep.py)
PLD_BRANCHES = 3  # distinct continuations prompt lookup may offer at once, when asked for a tree
BATCH_MODES = ("packed", "padded")  # packed: EMS-SD, no padding; padded: the vanilla baseline (Lockstep)


@dataclass(frozen=True)
class StreamEvent:
    """A piece of output for one row of the batch; the row's last event carries its ``Generation``."""

    row: int
    text: str  # new text since the previous event of this row
    token_ids: tuple[int, ...]  # tokens committed in this event
    generation: Generation | None = None


class _Row:
    """Mutable bookkeeping for one sequence while it is being generated."""

    def __init__(self, index: int, prompt_ids: list[int], detok: IncrementalText, start: float) -> None:
        self.index = index
        self.prompt_ids = prompt_ids
        self.new_ids: list[int] = []
        self.detok = detok
        self.start = start
        self.finish_reason: str | None = None
        self.pending: int | None = None  # committed token whose K/V is not in the cache yet
        self.drafter: Drafter | None = None
        self.steps = 0
        self.drafted: list[int] = []  # per draft depth: steps whose draft reached that depth
        self.accepted: list[int] = []  # ... and steps whose accepted path reached it
        self.draft_tokens = 0
        self.draft_ms: float | None = None  # running estimate of one draft depth's cost
        self.idle = 0  # consecutive steps the budget chose not to draft
        self.probe_every = PROBE_EVERY  # idle steps before drafting again; doubles after each probe
        self.draft_time = 0.0
        self.verify_time = 0.0

    def record(self, prop: Proposal, verdict: Verdict) -> None:
        self.steps += 1
        self.draft_tokens += len(prop)
        deepest = max(depths_of(prop.parents))
        for d in range(deepest):
            if d == len(self.drafted):
                self.drafted.append(0)
                self.accepted.append(0)
            self.drafted[d] += 1
            self.accepted[d] += d < verdict.accepted

    def stats(self) -> GenerationStats:
        return GenerationStats(
            steps=self.steps,
            mean_accepted_tokens=len(self.new_ids) / self.steps if self.steps else 1.0,
            drafted_by_depth=tuple(self.drafted),
            accepted_by_depth=tuple(self.accepted),
            draft_tokens=self.draft_tokens,
            draft_time_s=self.draft_time,
            verify_time_s=self.verify_time,
        )


def _is_messages(p: Any) -> bool:
    return isinstance(p, (list, tuple)) and len(p) > 0 and all(isinstance(m, dict) for m in p)


class Engine:
    """A loaded target model with its tokenizer; generates text autoregressively or speculatively."""

    def __init__(
        self,
        model: LlamaModel,
        tokenizer: Any,
        source: ModelSource | None = None,
        draft_model: LlamaModel | None = None,
        adapter: KangarooAdapter | None = None,
        head: JakiroHead | None = None,
    ) -> None:
        if draft_model is not None and draft_model.cfg.vocab_size != model.cfg.vocab_size:
            raise InvalidArgumentError(
                f"the draft model's vocabulary ({draft_model.cfg.vocab_size}) differs from the target's "
                f"({model.cfg.vocab_size}); a draft model must share the tokenizer"
            )
        self.model = model
        self.draft_model = draft_model
        self.kangaroo = KangarooDraft.build(model, adapter) if adapter is not None else None
        self.jakiro = JakiroDraft.build(model, head) if head is not None else None
        # Jakiro's hybrid inference (the last tree level from the contrastive branch); a setting so
        # that benchmarks/tree_sweep.py can measure what it is worth
        self.jakiro_hybrid = True
        self.tokenizer = tokenizer
        self.source = source
        self.name = source.name if source else "model"
        self.eos_ids = self._eos_ids()
        self._curve: CostCurve | None = None

    # -- properties ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def default_method(self) -> str:
        """Prompt lookup: the fastest lossless method measured on Spec-Bench for the default model
        (README: PLD 1.56-1.59x AR, above Jakiro with or without its lookup branch and Kangaroo), and
        training-free, so it applies to every model; where the context offers no match a step is
        plain decoding."""
        return "pld"

    @property
    def context_length(self) -> int:
        return self.model.cfg.max_position_embeddings

    def _eos_ids(self) -> frozenset[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        if self.source is not None:
            eos = read_config(self.source.folder)[1].get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return frozenset(ids)

    # -- prompts ---------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = True) -> list[int]:
        """Token ids of a prompt: a string (wrapped as one user message when ``chat``) or messages."""
        if _is_messages(prompt):
            messages = list(prompt)
            for m in messages:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise InvalidArgumentError("each message needs string 'role' and 'content' fields")
        elif isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("the prompt is empty")
            messages = [{"role": "user", "content": prompt}]
        else:
            raise InvalidArgumentError(f"a prompt must be a string or a list of messages, got {type(prompt).__name__}")
        if not any(m["content"].strip() for m in messages):
            raise PromptError("the prompt is empty")
        if chat and getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        text = "\n".join(m["content"] for m in messages)
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _as_batch(self, prompts: Prompt | Sequence[Prompt]) -> tuple[list[Prompt], bool]:
        if isinstance(prompts, str) or _is_messages(prompts):
            return [prompts], False
        if isinstance(prompts, (list, tuple)) and prompts:
            return list(prompts), True
        raise PromptError("no prompt given")

    # -- generation ------------------------------------------------------------------------------
    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        *,
        method: str | None = None,
        chat: bool = True,
        max_draft: int = DEFAULT_MAX_DRAFT,
        threshold: float = DEFAULT_THRESHOLD,
        tree_nodes: int | None = None,
        tree_topk: int = 0,
        adaptive: bool = True,
        batch_mode: str = "packed",
        **overrides: Any,
    ) -> Iterator[StreamEvent]:
        """Generate for one prompt or a batch, yielding text deltas as tokens are committed.

        ``method``: one of ``METHODS`` (default: ``default_method``). ``max_draft`` is
        the most draft tokens on one path per step (Kangaroo's γ); ``threshold`` is Kangaroo's η, the
        draft confidence below which drafting of a step stops; ``tree_nodes`` (0 = chain, None =
        chosen from the measured verification cost) and ``tree_topk`` shape a draft tree (see
        ``SpecConfig``); ``adaptive`` lets each step draft less, or nothing, when the row's acceptance
        so far cannot pay for drafting (``joey.budget``). ``batch_mode``: ``"packed"`` (rows keep their
        own lengths, no padding anywhere) or ``"padded"``, the vanilla baseline EMS-SD measures
        against (``joey.batching.Lockstep``); both give the same tokens. ``overrides`` are SamplingParams fields
        (``max_new_tokens=64, temperature=0.7, ...``).
        """
        method = method or self.default_method
        params = replace(params or SamplingParams(), **overrides) if overrides else (params or SamplingParams())
        if method not in METHODS:
            raise InvalidArgumentError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
        if batch_mode not in BATCH_MODES:
            raise InvalidArgumentError(f"unknown batch mode '{batch_mode}'; choose from {', '.join(BATCH_MODES)}")
        spec = SpecConfig(max_draft, threshold, tree_nodes, tree_topk, adaptive)
        shape = self.tree_shape(method, spec) if method != "ar" else TreeShape(0, 1)
        drafter_factory = self._drafter_factory(method, params, spec, shape)
        batch, _ = self._as_batch(prompts)
        encoded = [self.encode(p, chat=chat) for p in batch]
        longest = max(len(ids) for ids in encoded)
        if longest >= self.context_length:
            raise PromptError(f"the prompt has {longest} tokens; the model's context is {self.context_length}")
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        # measured once per model and machine (then read from the cache): before the clock starts
        curve = self.cost_curve() if drafter_factory is not None and spec.adaptive else None
        start = time.perf_counter()
        rows = [_Row(i, ids, IncrementalText(self.tokenizer, params.stop), start) for i, ids in enumerate(encoded)]
        with torch.inference_mode():
            yield from self._decode(rows, params, generator, drafter_factory, spec, shape, curve, method,
                                    batch_mode == "padded")

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> Generation | list[Generation]:
        """Run ``stream()`` to the end; one ``Generation`` per prompt (a list for a list of prompts)."""
        _, is_batch = self._as_batch(prompts)
        done: dict[int, Generation] = {}
        for event in self.stream(prompts, params, **kwargs):
            if event.generation is not None:
                done[event.row] = event.generation
        results = [done[i] for i in sorted(done)]
        return results if is_batch else results[0]

    def cost_curve(self) -> CostCurve:
        """What verifying k tokens costs on this machine (measured once, then cached; joey.budget)."""
        if self._curve is None:
            from joey.models.draft_files import model_cache_key
            from joey.models.registry import cache_dir

            self._curve = cached_curve(self.model, model_cache_key(self.model), cache_dir())
        return self._curve

    def tree_shape(self, method: str, spec: SpecConfig) -> TreeShape:
        """How a method drafts under ``spec``: chain or tree, its node budget and branching."""
        if method.startswith(("kangaroo", "jakiro")):
            topk = spec.tree_topk or (KANGAROO_TOPK if method.startswith("kangaroo") else JAKIRO_TOPK)
            nodes = spec.tree_nodes if spec.tree_nodes is not None else self.cost_curve().tree_nodes()
        elif method == "pld":
            topk, nodes = spec.tree_topk or PLD_BRANCHES, spec.tree_nodes or 0
        else:
            if method == "sps" and spec.tree_nodes:
                raise InvalidArgumentError("method 'sps' drafts chains only; use --tree-nodes 0")
            topk, nodes = 1, 0
        if nodes == 0 or topk == 1:
            return TreeShape(nodes=spec.max_draft, topk=1)
        return TreeShape(nodes=nodes, topk=topk)

    def _drafter_factory(
        self, method: str, params: SamplingParams, spec: SpecConfig, shape: TreeShape
    ) -> Callable[..., Drafter] | None:
        """What makes each row's drafter: f(max_len, generator) -> Drafter; None for AR."""
        if method == "pld":
            return lambda max_len, generator: PromptLookupDrafter(branches=shape.topk)
        if method == "sps":
            if self.draft_model is None:
                raise InvalidArgumentError("method 'sps' needs a draft model: joey.load(..., draft_model=...)")
            draft = self.draft_model
            return lambda max_len, generator: DraftModelDrafter(draft, params, generator, max_len)
        if method.startswith("jakiro"):
            if self.jakiro is None:
                raise InvalidArgumentError(
                    f"method '{method}' needs a Jakiro head for this model: joey.load(..., head=...); "
                    "train one with `joey train-drafter`"
                )
            jd, hybrid = self.jakiro, self.jakiro_hybrid
            lookup = method == "jakiro+pld"
            return lambda max_len, generator: JakiroDrafter(
                jd, params, max_len, shape.topk, PromptLookupDrafter() if lookup else None, hybrid
            )
        if method.startswith("kangaroo"):
            if self.kangaroo is None:
                raise InvalidArgumentError(
                    f"method '{method}' needs an adapter for this model: joey.load(..., adapter=...)"
                )
            kd = self.kangaroo
            lookup = method == "kangaroo+pld"
            return lambda max_len, generator: KangarooDrafter(
                kd, params, generator, max_len, spec.threshold, shape.topk, PromptLookupDrafter() if lookup else None
            )
        return None

    # -- the decoding loop -----------------------------------------------------------------------
    def _budget(self, rows: list[_Row], params: SamplingParams) -> int:
        return min(params.max_new_tokens, self.context_length - max(len(r.prompt_ids) for r in rows))

    def _prefill(self, cache: KVCache, rows: list[_Row], padded: bool = False) -> torch.Tensor:
        """Run the prompts in one forward and return each row's last logits [B, vocab]; drafters
        that read the target's features get those of every prompt position.

        Prompts of different lengths are packed like a ragged step (joey.batching): the dense
        layers see only real tokens and attention runs per row, so a batch of one long and many
        short prompts costs their sum, not the batch size times the longest; and each row's prefill
        is what it would be alone. ``padded`` (the lock-step baseline) right-pads them
        instead: causal attention alone is right then, since a real token never sees a later slot and
        the padding's K/V lie past the row's length (holes the baseline masks from then on).
        """
        lengths = [len(r.prompt_ids) for r in rows]
        t = max(lengths)
        if padded or all(n == t for n in lengths):  # one shape: a plain causal forward
            tokens = torch.tensor([r.prompt_ids + [0] * (t - len(r.prompt_ids)) for r in rows], device=self.device)
            positions = torch.arange(t, device=self.device).expand(len(rows), t)
            grid = self.model.forward_from(self.model.embed(tokens), positions, cache, 0, t, None, 0, head=False)
            features = list(grid)
        else:  # attention row by row, each prompt against itself only: Σ n², not rows × longest²
            inputs = torch.tensor([tok for r in rows for tok in r.prompt_ids], device=self.device)
            positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
            spans = [RowSpan(n, cache.row(b), 0, n, None) for b, n in enumerate(lengths)]
            x = self.model.run_layers_rows(self.model.embed(inputs), positions, spans)
            features = list(self.model.model.norm(x).split(lengths))
        cache.advance(lengths)
        for row, f in zip(rows, features):
            if getattr(row.drafter, "wants_features", False):
                row.drafter.observe(f[: len(row.prompt_ids)])
        # the LM head only where a token is chosen
        return self.model.head(torch.stack([f[len(row.prompt_ids) - 1] for row, f in zip(rows, features)]))

    def _commit(
        self, row: _Row, tokens: list[int], budget: int, params: SamplingParams, method: str = "ar"
    ) -> StreamEvent:
        """Append tokens to a row, apply EOS / stop strings / length, and make its stream event."""
        kept: list[int] = []
        for tok in tokens:
            if tok in self.eos_ids and not params.ignore_eos:
                row.finish_reason = "stop"
                break
            kept.append(tok)
            if len(row.new_ids) + len(kept) >= budget:
                row.finish_reason = "length"
                break
        row.new_ids.extend(kept)
        text = row.detok.push(kept) if kept else ""
        if row.detok.stopped:
            row.finish_reason = "stop"
        if row.finish_reason is None:
            return StreamEvent(row.index, text, tuple(kept))
        text += row.detok.finish()
        gen = Generation(
            text=row.detok.text,
            token_ids=tuple(row.new_ids),
            prompt_tokens=len(row.prompt_ids),
            new_tokens=len(row.new_ids),
            wall_time_s=time.perf_counter() - row.start,
            finish_reason=row.finish_reason,
            method=method,
            stats=row.stats(),
        )
        return StreamEvent(row.index, text, tuple(kept), gen)

    def _decode(
        self,
        rows: list[_Row],
        params: SamplingParams,
        generator: torch.Generator | None,
        drafter_factory: Callable[..., Drafter] | None,
        spec: SpecConfig,
        shape: TreeShape,
        curve: CostCurve | None,
        method: str,
        padded: bool = False,
    ) -> Iterator[StreamEvent]:
        """Prefill, then repeat: draft → one target pass over [pending token + draft] → verify →
        commit ``accepted + 1`` tokens per row. Without a drafter this is plain autoregressive
        decoding (one token per row per step). ``padded``: the lock-step baseline (Lockstep)."""
        budget = self._budget(rows, params)
        # room past the last committed slot for a step's draft: a tree's nodes, and in a drafter's
        # own caches also the expanded nodes that did not make it into the tree, and a lookup branch
        extra = 2 * spec.max_draft + shape.nodes + shape.topk * spec.max_draft + 2 if drafter_factory else 2
        cache = self.model.new_cache(len(rows), max(len(r.prompt_ids) for r in rows) + budget + extra)
        for row in rows:
            if drafter_factory is not None:
                row.drafter = drafter_factory(len(row.prompt_ids) + budget + extra, generator)
        logits = self._prefill(cache, rows, padded)
        lockstep = None
        if padded:  # every row's cache now ends where the longest prompt does
            lockstep = Lockstep(cache.lengths, cache.max_len, self.device)
            cache.advance([lockstep.width - n for n in cache.lengths])
        first = next_tokens(logits, params, generator).tolist()
        active: list[_Row] = []
        for row, tok in zip(rows, first):
            row.steps = 1
            yield self._commit(row, [tok], budget, params, method)
            if row.finish_reason is None:
                row.pending = tok
                active.append(row)
        def keep(alive: list[int]) -> None:  # finished rows leave the cache (and the lock-step's holes)
            cache.keep_rows(alive)
            if lockstep is not None:
                lockstep.keep_rows(alive)

        keep([i for i, r in enumerate(rows) if r.finish_reason is None])
        scale = StepScale()  # what this batch's steps really cost, against the curve
        # draft tokens of a tree of each depth (a chain: the depth), and whether rows draft together
        nodes_at = [min(shape.nodes, shape.topk * d) for d in range(spec.max_draft + 1)]
        together = drafts_together([row.drafter for row in active])
        while active:
            t0 = time.perf_counter()
            # the bonus token always comes on top of the draft, so a row drafts at most its room - 1
            rooms = [budget - len(row.new_ids) - 1 for row in active]
            alone = [self._depth(row, room, spec, nodes_at, curve) for row, room in zip(active, rooms)]
            depths = [min(room, d) for room, (d, _) in zip(rooms, alone)]
            if len(active) > 1 and curve is not None:  # price each row's draft at what it adds to the packed step
                depths = batch_depths(curve, depths, [f for _, f in alone], [r.drafted for r in active],
                                      [r.accepted for r in active], nodes_at, [r.draft_ms for r in active], scale,
                                      together)
            # No row drafts: a plain decoding step, and drafters catch up on the skipped tokens later.
            # Not for a self-speculative drafter: the target's own cache lacks the layers it runs.
            skip = not any(depths) and not any(getattr(row.drafter, "self_speculative", False) for row in active)
            proposals = [Proposal.chain([]) for _ in active] if skip else self._propose(active, depths, shape, together)
            t1 = time.perf_counter()
            features = self._verify_pass(cache, active, proposals, lockstep)  # per row: [1 + draft, hidden]
            # one LM-head GEMM for the whole step (the head is the largest weight of a small model)
            logits = self.model.head(torch.cat(features)).split([len(f) for f in features])
            still: list[int] = []
            counts: list[int] = []
            paths: list[tuple[int, ...]] = []
            for i, (row, prop) in enumerate(zip(active, proposals)):
                verdict = self._judge(logits[i], prop, params, generator)
                row.record(prop, verdict)
                if getattr(row.drafter, "wants_features", False):  # pending token + accepted path
                    row.drafter.observe(features[i][[0, *(1 + j for j in verdict.path)]])
                tokens = [prop.tokens[j] for j in verdict.path] + [verdict.bonus]
                counts.append(1 + verdict.accepted)  # pending + accepted drafts now have K/V
                paths.append(verdict.path)
                yield self._commit(row, tokens, budget, params, method)
                if row.finish_reason is None:
                    row.pending = verdict.bonus
                    still.append(i)
            t2 = time.perf_counter()
            if len(active) > 1 and curve is not None:
                fed = sum(len(f) for f in features)
                scale.observe(fed > len(active), curve.cost(fed), 1000 * (t2 - t1))
            for row in active:
                row.draft_time += t1 - t0
                row.verify_time += t2 - t1
            cache.move(*path_moves(cache.lengths, paths))  # a tree's accepted path → contiguous slots
            if lockstep is not None:
                cache.advance([lockstep.commit(counts)] * len(counts))
            else:
                cache.advance(counts)
            if len(still) < len(active):
                keep(still)
                active = [active[i] for i in still]

    def _depth(
        self, row: _Row, room: int, spec: SpecConfig, nodes_at: list[int], curve: CostCurve | None
    ) -> tuple[int, bool]:
        """How deep this row would draft this step alone, and whether that depth is forced: the most
        the budget expects to pay (joey.budget), the full depth before anything is measured and,
        after a fallback to no draft, once more after ``PROBE_EVERY`` steps (then 2x, 4x, 8x as long
        while drafting keeps not paying) to measure acceptance again (both forced)."""
        if row.drafter is None or room <= 0:
            return 0, False
        if curve is None or row.draft_ms is None:
            return spec.max_draft, True
        if row.idle >= row.probe_every:  # probes that keep failing come less and less often
            row.idle = 0
            row.probe_every = min(8 * PROBE_EVERY, 2 * row.probe_every)
            return spec.max_draft, True
        depth = best_depth(curve, row.drafted, row.accepted, spec.max_draft, nodes_at, row.draft_ms)
        row.idle = row.idle + 1 if depth == 0 else 0
        if depth:
            row.probe_every = PROBE_EVERY
        return depth, False

    def _propose(self, rows: list[_Row], depths: list[int], shape: TreeShape, together: bool) -> list[Proposal]:
        """Every row's draft, drafted together where the drafter can (one forward per draft depth
        for all rows: ``propose_all``). Each row's ``draft_ms`` follows what one depth cost: the
        whole call ÷ the deepest draft for rows that draft together (they share each forward), the
        row's own share for drafters that go row by row."""
        if rows[0].drafter is None:
            return [Proposal.chain([]) for _ in rows]
        drafters = [row.drafter for row in rows]
        start = time.perf_counter()
        # asked even for depth 0 while other rows draft: a self-speculative drafter still supplies
        # the pending token's state, since one verification pass starts from one layer for all rows
        props = propose_all(drafters, [row.prompt_ids + row.new_ids for row in rows], depths, shape.nodes)
        ms = 1000 * (time.perf_counter() - start)
        deepest = [max(depths_of(p.parents)) if len(p) else 0 for p in props]
        for row, d in zip(rows, deepest):
            if d:
                per_depth = ms / max(deepest) if together else ms / len(rows) / d
                row.draft_ms = per_depth if row.draft_ms is None else 0.8 * row.draft_ms + 0.2 * per_depth
        return props

    def _verify_pass(
        self, cache: KVCache, rows: list[_Row], proposals: list[Proposal], lockstep: Lockstep | None = None
    ) -> list[torch.Tensor]:
        """One target forward over each row's pending token followed by its draft; returns each
        row's final-norm features [1 + len(draft), hidden] (``model.head`` makes the logits; feature
        drafters read them).

        When rows feed different numbers of tokens they are packed (joey.batching): the dense
        layers run on exactly the real tokens, with no padding; where rows' lengths differ so much
        that a padded attention grid would mostly compute padding, attention runs row by row
        (``rows_pay_off``). With a ``lockstep`` (the padded
        baseline) they are padded to the longest instead, and attention skips the cache's holes.
        """
        lengths = cache.lengths
        counts = [1 + len(p) for p in proposals]
        parents = [p.parents for p in proposals]
        t = max(counts)
        kv_len = max(lengths) + t
        # Self-speculative drafts (Kangaroo) come with their layer-l states: the target runs only
        # layers [l, L) on them. Every row of a batch uses the same drafter, so all or none do.
        layer = proposals[0].start_layer if proposals[0].hidden is not None else 0
        if lockstep is not None:
            return self._padded_pass(cache, rows, proposals, lockstep, layer)
        by_rows = rows_pay_off(lengths, counts)
        if by_rows or any(c != t for c in counts):
            packing = pack(lengths, counts, self.device, parents)
            if layer:
                inputs = torch.cat([prop.hidden for prop in proposals])
            else:
                inputs = torch.tensor(
                    [tok for row, prop in zip(rows, proposals) for tok in (row.pending, *prop.tokens)]
                )
            inputs = inputs.to(self.device)
            if by_rows:  # attention row by row, each against its own length
                spans = [RowSpan(c, cache.row(b), n, n + c, row_mask(n, c, p, self.device))
                         for b, (n, c, p) in enumerate(zip(lengths, counts, parents))]
                hidden = inputs if layer else self.model.embed(inputs)
                x = self.model.run_layers_rows(hidden, packing.positions, spans, start=layer)
                return list(self.model.model.norm(x).split(counts))
            mask = step_mask(lengths, t, kv_len, parents, self.device)
            features = self.model.forward_packed(inputs, cache, packing, kv_len, mask, layer, False)
            return list(features.split(counts))
        positions = grid_positions(lengths, t, parents, self.device)
        uniform = all(n == lengths[0] for n in lengths)
        slots = lengths[0] if uniform else grid_slots(lengths, t, self.device)
        # plain decoding: the one new token may see every cached slot, no mask needed
        mask = None if uniform and t == 1 else step_mask(lengths, t, kv_len, parents, self.device)
        if layer:
            hidden = torch.stack([prop.hidden for prop in proposals])
        else:
            tokens = [[row.pending, *prop.tokens] for row, prop in zip(rows, proposals)]
            hidden = self.model.embed(torch.tensor(tokens, device=self.device))
        return list(self.model.forward_from(hidden, positions, cache, slots, kv_len, mask, layer, head=False))

    def _padded_pass(
        self, cache: KVCache, rows: list[_Row], proposals: list[Proposal], lockstep: Lockstep, layer: int
    ) -> list[torch.Tensor]:
        """``_verify_pass`` of the padded baseline: every row's tokens padded to the longest (the
        padding repeats the pending token, or zero states for a self-speculative draft), written
        from the shared cache length; returns only the real tokens' features."""
        counts = [1 + len(p) for p in proposals]
        t, width = max(counts), lockstep.width
        if width + t > cache.max_len:  # holes use slots: grow by half again, not per step
            cache.grow(width + t + cache.max_len // 2)
            lockstep.grow(cache.max_len)
        positions, mask = lockstep.step(counts, [p.parents for p in proposals])
        if layer:
            hidden = torch.stack([torch.cat([p.hidden, p.hidden.new_zeros(t - len(p.hidden), p.hidden.shape[1])])
                                  for p in proposals])
        else:
            tokens = [[row.pending, *p.tokens] + [row.pending] * (t - 1 - len(p)) for row, p in zip(rows, proposals)]
            hidden = self.model.embed(torch.tensor(tokens, device=self.device))
        features = self.model.forward_from(hidden, positions, cache, width, width + t, mask, layer, head=False)
        return [f[:n] for f, n in zip(features, counts)]

    def _judge(
        self, logits: torch.Tensor, prop: Proposal, params: SamplingParams, generator: torch.Generator | None
    ) -> Verdict:
        """logits [len(prop) + 1, vocab] of one row → Verdict."""
        if params.greedy:
            return verify_greedy(prop.tokens, prop.parents, logits)
        return verify_sampled(prop.tokens, prop.parents, probabilities(logits, params), prop.draft_probs, generator)
