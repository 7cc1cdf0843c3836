"""The decoding step machine: a batch that requests join and leave between steps (continuous batching).

``ContinuousBatch`` owns the rows being generated and their KV cache. ``add()`` queues a request
(token ids, its own sampling settings, seed, stop strings and length); each ``step()`` first drops
cancelled rows, then prefills the requests waiting for room and commits their first token, then
runs one speculative step for every running row: draft → one target pass over [pending token +
draft] → verify → commit ``accepted + 1`` tokens per row. Without a drafter a step is plain
autoregressive decoding. ``Engine.stream()`` is a thin user (all rows join at the first step), and
so is the server, whose requests arrive at any time.

Rows keep their own KV length (no padding after the prefill; EMS-SD), a finished row leaves the
cache at once so it stops costing compute, and a joining row is prefilled in a cache of its own that
is then appended to the batch's: a row's tokens do not depend on which other rows share its steps.
A failure in one row's own work (its sampling, detokenization, stop strings) fails that row only.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace

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
from joey.budget import PROBE_DEPTH, PROBE_EVERY, CostCurve, StepScale, batch_depths, best_depth
from joey.config import METHODS, Generation, GenerationStats, SamplingParams, SpecConfig, TreeShape
from joey.detokenize import IncrementalText
from joey.drafters import Drafter, Proposal
from joey.drafters.base import drafts_together, propose_all
from joey.errors import InvalidArgumentError, PromptError
from joey.models.kv_cache import KVCache
from joey.models.llama import RowSpan
from joey.sampling import next_tokens, probabilities
from joey.verify import Verdict, verify_greedy, verify_sampled

BATCH_MODES = ("packed", "padded")  # packed: EMS-SD, no padding; padded: the vanilla baseline (Lockstep)
# what makes a row's drafter: f(max_len, generator, params) -> Drafter; None for AR
DrafterFactory = Callable[[int, "torch.Generator | None", SamplingParams], Drafter]


@dataclass(frozen=True)
class StreamEvent:
    """A piece of output for one row; the row's last event carries its ``Generation`` (or, when the
    row failed, ``error``: the exception, and no generation)."""

    row: Hashable  # the key the row was added with
    text: str  # new text since the previous event of this row
    token_ids: tuple[int, ...]  # tokens committed in this event
    generation: Generation | None = None
    error: Exception | None = None
    draft_tokens: int = 0  # draft tokens this row's step proposed (0: a plain step, or the prefill)
    accepted: int = 0  # of which the target accepted (the accepted path's length)

    @property
    def last(self) -> bool:
        return self.generation is not None or self.error is not None


def fill_gaps(alive: list[int]) -> list[int]:
    """The rows to keep (ascending old indices) as a new order in which each gap left by a row that
    went is filled by a kept row from the end: [0, 2, 3, 4] (row 1 left) → [0, 4, 2, 3]."""
    n = len(alive)
    kept = set(alive)
    order = list(range(n))
    for gap, tail in zip((i for i in range(n) if i not in kept), (r for r in alive if r >= n)):
        order[gap] = tail
    return order


def _average(old: float | None, new: float) -> float:
    """A running estimate of a draft depth's cost: mostly the past, a fifth the newest measurement."""
    return new if old is None else 0.8 * old + 0.2 * new


def count_by_depth(drafted: list[int], accepted: list[int], prop: Proposal, verdict: Verdict) -> None:
    """Add one step to per-depth counts: the depths its draft reached, and those its accepted path reached."""
    for d in range(max(depths_of(prop.parents))):
        if d == len(drafted):
            drafted.append(0)
            accepted.append(0)
        drafted[d] += 1
        accepted[d] += d < verdict.accepted


class _Row:
    """Mutable bookkeeping for one sequence while it is being generated."""

    def __init__(
        self,
        key: Hashable,
        prompt_ids: list[int],
        params: SamplingParams,
        generator: torch.Generator | None,
        budget: int,
        detok: IncrementalText,
    ) -> None:
        self.index = key
        self.prompt_ids = prompt_ids
        self.params = params
        self.generator = generator
        self.budget = budget  # most new tokens: the request's max, or what the context leaves
        self.new_ids: list[int] = []
        self.detok = detok
        self.start = time.perf_counter()
        self.finish_reason: str | None = None
        self.pending: int | None = None  # committed token whose K/V is not in the cache yet
        self.drafter: Drafter | None = None
        self.steps = 0
        self.drafted: list[int] = []  # per draft depth: steps whose draft reached that depth
        self.accepted: list[int] = []  # ... and steps whose accepted path reached it
        self.draft_tokens = 0
        self.draft_ms: float | None = None  # running estimate of one draft depth's cost
        self.behind = 0  # tokens committed since the drafter last drafted: its next draft reads them first
        self.catch_up_ms: float | None = None  # running estimate of reading one such token
        # pseudo-counts per depth, from the rows before this one (ContinuousBatch._prior): what the
        # budget assumes about drafting for this request until its own steps say otherwise
        self.prior_drafted: list[float] = []
        self.prior_accepted: list[float] = []
        self.idle = 0  # consecutive steps the budget chose not to draft
        self.probe_every = PROBE_EVERY  # idle steps before drafting again; doubles after each probe
        self.draft_time = 0.0
        self.verify_time = 0.0

    def record(self, prop: Proposal, verdict: Verdict) -> None:
        self.steps += 1
        self.draft_tokens += len(prop)
        count_by_depth(self.drafted, self.accepted, prop, verdict)

    def evidence(self) -> tuple[list[float], list[float]]:
        """Drafted / accepted counts per depth for the budget: the row's own plus its prior."""
        n = max(len(self.drafted), len(self.prior_drafted))

        def add(own: list[int], prior: list[float]) -> list[float]:
            return [(own[d] if d < len(own) else 0) + (prior[d] if d < len(prior) else 0.0) for d in range(n)]

        return add(self.drafted, self.prior_drafted), add(self.accepted, self.prior_accepted)

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


class ContinuousBatch:
    """Rows of one engine and one drafting method, decoded together; rows join and leave between steps.

    ``max_batch`` bounds the rows decoding at once (None: no bound); requests past it wait, in
    order, until a row leaves. ``batch_mode="padded"`` is the lock-step baseline EMS-SD measures
    against (``joey.batching.Lockstep``): its rows must all be added before the first step.
    Not thread-safe: one thread calls ``add``/``cancel``/``step`` (the server's worker does).
    """

    def __init__(
        self,
        engine,  # joey.engine.Engine (not imported: the engine imports this module)
        method: str,
        spec: SpecConfig | None = None,
        *,
        batch_mode: str = "packed",
        max_batch: int | None = None,
    ) -> None:
        if method not in METHODS:
            raise InvalidArgumentError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
        if batch_mode not in BATCH_MODES:
            raise InvalidArgumentError(f"unknown batch mode '{batch_mode}'; choose from {', '.join(BATCH_MODES)}")
        if max_batch is not None and max_batch < 1:
            raise InvalidArgumentError(f"max_batch must be >= 1, got {max_batch}")
        if max_batch is not None and batch_mode == "padded":
            raise InvalidArgumentError("a padded batch takes all its rows at once; it has no max_batch")
        self.engine = engine
        self.model = engine.model
        self.method = method
        self.spec = spec = spec or SpecConfig()
        self.shape = engine.tree_shape(method, spec) if method != "ar" else TreeShape(0, 1)
        self.factory: DrafterFactory | None = engine.drafter_factory(method, spec, self.shape)
        # measured once per model and machine (then read from the cache), before any row's clock starts
        self.curve: CostCurve | None = engine.cost_curve() if self.factory is not None and spec.adaptive else None
        # room past a row's last committed slot for a step's draft: a tree's nodes, and in a drafter's
        # own caches also the expanded nodes that did not make it into the tree, and a lookup branch
        self.extra = 2 * spec.max_draft + self.shape.nodes + self.shape.topk * spec.max_draft + 2 if self.factory else 2
        # draft tokens of a tree of each depth (a chain: the depth)
        self.nodes_at = [min(self.shape.nodes, self.shape.topk * d) for d in range(spec.max_draft + 1)]
        self.padded = batch_mode == "padded"
        self.max_batch = max_batch
        self.waiting: list[_Row] = []
        self.active: list[_Row] = []
        self.cache: KVCache | None = None
        self.lockstep: Lockstep | None = None
        self.scale = StepScale()  # what this batch's steps really cost, against the curve
        # what drafting was worth for every row so far (per depth) and what a draft depth cost: a
        # request that joins later starts from these instead of probing at full depth (_prior)
        self.drafted: list[int] = []
        self.accepted: list[int] = []
        self.draft_ms: float | None = None
        self.catch_up_ms: float | None = None
        self._cancelled: set[Hashable] = set()
        self._started = False
        self._keys = itertools.count()

    # -- requests --------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Whether a step has anything to do."""
        return bool(self.waiting or self.active or self._cancelled)

    def add(self, prompt_ids: list[int], params: SamplingParams | None = None, key: Hashable | None = None) -> Hashable:
        """Queue a request; it joins at the next step that has room. Returns its key (the ``row`` of
        its events): ``key`` if given, else a new integer."""
        params = params or SamplingParams()
        if not prompt_ids:
            raise PromptError("the prompt is empty")
        context = self.engine.context_length
        if len(prompt_ids) >= context:
            raise PromptError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {context}")
        if self.padded and self._started:
            raise InvalidArgumentError("a padded batch takes all its rows before the first step")
        if key is None:
            key = next(self._keys)
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.engine.device)
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        budget = min(params.max_new_tokens, context - len(prompt_ids))
        self.waiting.append(_Row(key, list(prompt_ids), params, generator, budget,
                                 IncrementalText(self.engine.tokenizer, params.stop)))
        return key

    def cancel(self, key: Hashable) -> None:
        """Stop a request (waiting or running) at the next step; its last event has finish reason
        ``"cancelled"``. Unknown or finished keys are ignored."""
        self._cancelled.add(key)

    def abort(self, exc: Exception) -> list[StreamEvent]:
        """Fail every row, waiting or running (the server's last resort after an unexpected error)."""
        events = [self._failed(row, exc) for row in self.waiting + self.active]
        self.waiting = []
        self._keep([])
        return events

    def step(self) -> list[StreamEvent]:
        """Drop cancelled rows, admit waiting ones (prefill + first token), then one decoding step
        for every running row. Returns the events of this step, in row order."""
        self._started = True
        events: list[StreamEvent] = []
        with torch.inference_mode():
            self._drop_cancelled(events)
            self._admit(events)
            if self.active:
                self._decode_step(events)
        return events

    # -- joining and leaving ---------------------------------------------------------------------
    def _keep(self, alive: list[int]) -> None:
        """Keep only the running rows at these indices (finished rows leave cache and lock-step).
        Each gap is filled with a row from the end, so only as many cache rows move as leave."""
        if len(alive) == len(self.active):
            return
        if not alive:  # an empty batch frees its cache; the next request starts a new one
            self.active = []
            self.cache = self.lockstep = None
            return
        order = fill_gaps(alive)
        self.active = [self.active[i] for i in order]
        self.cache.keep_rows(order)
        if self.lockstep is not None:
            self.lockstep.keep_rows(order)

    def _drop_cancelled(self, events: list[StreamEvent]) -> None:
        if not self._cancelled:
            return
        gone = self._cancelled
        self._cancelled = set()
        for row in [r for r in self.waiting if r.index in gone]:
            self.waiting.remove(row)
            events.append(self._finished(row, "cancelled", ""))
        for row in self.active:
            if row.index in gone:
                events.append(self._finished(row, "cancelled", ""))
        self._keep([i for i, r in enumerate(self.active) if r.index not in gone])

    def _admit(self, events: list[StreamEvent]) -> None:
        """Prefill the waiting rows that fit, in spare rows of the batch's cache storage
        (``KVCache.add_rows``), commit their first token, and keep the rows that go on."""
        room = len(self.waiting) if self.max_batch is None else self.max_batch - len(self.active)
        if room <= 0 or not self.waiting:
            return
        joiners, self.waiting = self.waiting[:room], self.waiting[room:]
        need = max(len(r.prompt_ids) + r.budget + self.extra for r in joiners)
        if self.cache is None:
            self.cache = self.model.new_cache(0, need)
        cache, start = self.cache, self.cache.batch
        rows = cache.add_rows(len(joiners), need)  # the joiners' own cache, in the batch's storage
        try:
            for row in joiners:
                if self.factory is not None:
                    row.drafter = self.factory(len(row.prompt_ids) + row.budget + self.extra, row.generator, row.params)
                    self._prior(row)
            logits = self._prefill(rows, joiners)
        except Exception as exc:  # a prompt that breaks the prefill fails the rows that brought it
            events.extend(self._failed(row, exc) for row in joiners)
            cache.keep_rows(list(range(start)))
            if not start:
                self.cache = None
            return
        cache.set_lengths(start, rows.lengths)
        if self.padded:  # all rows join at once; every row's cache now ends where the longest prompt does
            self.lockstep = Lockstep(cache.lengths, cache.max_len, self.engine.device)
            cache.advance([self.lockstep.width - n for n in cache.lengths])
        for i, row in enumerate(joiners):
            try:
                tok = int(next_tokens(logits[i : i + 1], row.params, row.generator)[0])
                row.steps = 1
                events.append(self._commit(row, [tok]))
                row.pending = tok
            except Exception as exc:
                events.append(self._failed(row, exc))
        self.active += joiners
        self._keep([i for i, r in enumerate(self.active) if r.finish_reason is None])

    PRIOR_STEPS = 8  # how many steps of the earlier rows' acceptance a new row starts with (0: none)

    def _prior(self, row: _Row) -> None:
        """Start a joining row from what drafting has been worth for the rows before it: their
        acceptance per depth as ``PRIOR_STEPS`` pseudo-steps, and their draft cost. Without this
        every request would first draft at full depth to measure itself, which a large batch pays
        for on every arrival. Rows admitted together at the start (``Engine.stream``) have none."""
        if not self.PRIOR_STEPS or not self.drafted or self.draft_ms is None:
            return
        weight = self.PRIOR_STEPS / self.drafted[0]
        row.prior_drafted = [weight * n for n in self.drafted]
        row.prior_accepted = [weight * a for a in self.accepted]
        row.draft_ms = self.draft_ms

    # -- the decoding step -----------------------------------------------------------------------
    def _decode_step(self, events: list[StreamEvent]) -> None:
        """One draft → verify → commit step for every running row."""
        active, cache, curve = self.active, self.cache, self.curve
        t0 = time.perf_counter()
        try:
            # the bonus token always comes on top of the draft, so a row drafts at most its room - 1
            rooms = [row.budget - len(row.new_ids) - 1 for row in active]
            evidence = [row.evidence() for row in active]  # (drafted, accepted) per depth, with the prior
            alone = [self._depth(row, room, ev) for row, room, ev in zip(active, rooms, evidence)]
            depths = [min(room, d) for room, (d, _) in zip(rooms, alone)]
            together = drafts_together([row.drafter for row in active])
            if len(active) > 1 and curve is not None:  # price each row's draft at what it adds to the packed step
                depths = batch_depths(curve, depths, [f for _, f in alone], [e[0] for e in evidence],
                                      [e[1] for e in evidence], self.nodes_at, [self._draft_ms(r) for r in active],
                                      self.scale, together)
            # No row drafts: a plain decoding step, and drafters catch up on the skipped tokens later.
            # Not for a self-speculative drafter: the target's own cache lacks the layers it runs.
            skip = not any(depths) and not any(getattr(row.drafter, "self_speculative", False) for row in active)
            proposals = [Proposal.chain([]) for _ in active] if skip else self._propose(active, depths, together)
            t1 = time.perf_counter()
            features = self._verify_pass(cache, active, proposals)  # per row: [1 + draft, hidden]
            # one LM-head GEMM for the whole step (the head is the largest weight of a small model)
            logits = self.model.head(torch.cat(features)).split([len(f) for f in features])
        except Exception as exc:  # the shared forward failed: no row of this step can go on
            events.extend(self._failed(row, exc) for row in active)
            self._keep([])
            return
        still: list[int] = []
        counts: list[int] = []
        paths: list[tuple[int, ...]] = []
        for i, (row, prop) in enumerate(zip(active, proposals)):
            try:
                verdict = self._judge(logits[i], prop, row)
                row.record(prop, verdict)
                count_by_depth(self.drafted, self.accepted, prop, verdict)
                if getattr(row.drafter, "wants_features", False):  # pending token + accepted path
                    row.drafter.observe(features[i][[0, *(1 + j for j in verdict.path)]])
                tokens = [prop.tokens[j] for j in verdict.path] + [verdict.bonus]
                events.append(replace(self._commit(row, tokens), draft_tokens=len(prop), accepted=verdict.accepted))
            except Exception as exc:  # this row's own work failed: it leaves, the others go on
                events.append(self._failed(row, exc))
                counts.append(1)
                paths.append(())
                continue
            counts.append(1 + verdict.accepted)  # pending + accepted drafts now have K/V
            paths.append(verdict.path)
            if not len(prop) and row.drafter is not None and getattr(row.drafter, "catches_up", True):
                row.behind += len(tokens)  # a drafter with its own cache reads these at its next draft
            if row.finish_reason is None:
                row.pending = verdict.bonus
                still.append(i)
        t2 = time.perf_counter()
        if len(active) > 1 and curve is not None:
            fed = sum(len(f) for f in features)
            self.scale.observe(fed > len(active), curve.cost(fed), 1000 * (t2 - t1))
        for row in active:
            row.draft_time += t1 - t0
            row.verify_time += t2 - t1
        cache.move(*path_moves(cache.lengths, paths))  # a tree's accepted path → contiguous slots
        if self.lockstep is not None:
            cache.advance([self.lockstep.commit(counts)] * len(counts))
        else:
            cache.advance(counts)
        self._keep(still)

    def _depth(self, row: _Row, room: int, evidence: tuple[list[float], list[float]]) -> tuple[int, bool]:
        """How deep this row would draft this step alone, and whether that depth is forced: the most
        the budget expects to pay (joey.budget), the full depth before anything is measured and,
        after a fallback to no draft, once more after ``PROBE_EVERY`` steps (then 2x, 4x, 8x as long
        while drafting keeps not paying) to measure acceptance again (both forced)."""
        spec = self.spec
        if row.drafter is None or room <= 0:
            return 0, False
        draft_ms = self._draft_ms(row)
        if self.curve is None or draft_ms is None:
            return spec.max_draft, True
        if row.idle >= row.probe_every:  # probes that keep failing come less and less often
            row.idle = 0
            row.probe_every = min(8 * PROBE_EVERY, 2 * row.probe_every)
            # shallow: a probe asks whether drafting pays again, and a deeper level is only tried once
            # the first ones are accepted (a full-depth probe of a 0.5B draft model cost ~3x a target
            # step and mostly failed where drafting did not pay)
            return min(spec.max_draft, PROBE_DEPTH), True
        catch_up = row.catch_up_ms if row.catch_up_ms is not None else self.catch_up_ms
        depth = best_depth(self.curve, *evidence, spec.max_draft, self.nodes_at, draft_ms,
                           row.behind * (catch_up or 0.0))
        row.idle = row.idle + 1 if depth == 0 else 0
        if depth:
            row.probe_every = PROBE_EVERY
        return depth, False

    def _draft_ms(self, row: _Row) -> float | None:
        """What one draft depth costs this row: its own measurement, else the batch's (a row whose
        drafting has not been timed yet is priced like the others instead of drafting at full depth
        unpriced; in a large batch that would be every step of a row that rarely drafts)."""
        return row.draft_ms if row.draft_ms is not None else self.draft_ms

    def _propose(self, rows: list[_Row], depths: list[int], together: bool) -> list[Proposal]:
        """Every row's draft, drafted together where the drafter can (one forward per draft depth
        for all rows: ``propose_all``). Each row's ``draft_ms`` follows what one depth cost: the
        whole call ÷ the deepest draft for rows that draft together (they share each forward), the
        row's own share for drafters that go row by row. A step counts only when every drafting row
        has drafted before: a first draft also catches the drafter up on the whole prompt (a
        769-token prompt made Jakiro's first measurement 115 ms a depth, ~150x a steady one, and the
        budget then never drafted again). Catching up on a few undrafted steps does count: it is what
        drafting again costs (leaving it out made jakiro+pld 0.77x batched AR at batch 16, against
        0.88x with it). A drafter without state (``catches_up`` False: prompt lookup) is measured
        from its first step."""
        if rows[0].drafter is None:
            return [Proposal.chain([]) for _ in rows]
        drafters = [row.drafter for row in rows]
        start = time.perf_counter()
        # asked even for depth 0 while other rows draft: a self-speculative drafter still supplies
        # the pending token's state, since one verification pass starts from one layer for all rows
        props = propose_all(drafters, [row.prompt_ids + row.new_ids for row in rows], depths, self.shape.nodes)
        ms = 1000 * (time.perf_counter() - start)
        deepest = [max(depths_of(p.parents)) if len(p) else 0 for p in props]
        # a row with no drafted step yet (empty per-depth counts) is making its first draft
        steady = all(row.drafted for row, d in zip(rows, deepest) if d and getattr(row.drafter, "catches_up", True))
        drafting = [(row, d) for row, d in zip(rows, deepest) if d]
        if steady and len(drafting) == 1 and drafting[0][0].behind > 1 and drafting[0][0].draft_ms is not None:
            # one row resuming after undrafted steps: what its draft cost beyond its depths was the
            # catch-up, priced per token apart from the depths (before, it was averaged into the
            # per-depth cost, and a draft model that had skipped 30 tokens then looked too dear to
            # draft again: Qwen2.5-Coder-0.5B drafting for the 1.5B)
            row, d = drafting[0]
            per_token = max(0.0, ms - d * row.draft_ms) / row.behind
            row.catch_up_ms = _average(row.catch_up_ms, per_token)
            self.catch_up_ms = _average(self.catch_up_ms, per_token)
        else:
            for row, d in drafting:
                if steady:
                    per_depth = ms / max(deepest) if together else ms / len(rows) / d
                    row.draft_ms = _average(row.draft_ms, per_depth)
                    self.draft_ms = _average(self.draft_ms, per_depth)
        for row, d in zip(rows, deepest):
            if d:
                row.behind = 0
        return props

    def _judge(self, logits: torch.Tensor, prop: Proposal, row: _Row) -> Verdict:
        """logits [len(prop) + 1, vocab] of one row → Verdict, under the row's own sampling settings."""
        if row.params.greedy:
            return verify_greedy(prop.tokens, prop.parents, logits)
        return verify_sampled(prop.tokens, prop.parents, probabilities(logits, row.params), prop.draft_probs,
                              row.generator)

    # -- committing ------------------------------------------------------------------------------
    def _commit(self, row: _Row, tokens: list[int]) -> StreamEvent:
        """Append tokens to a row, apply EOS / stop strings / length, and make its stream event."""
        kept: list[int] = []
        for tok in tokens:
            if tok in self.engine.eos_ids and not row.params.ignore_eos:
                row.finish_reason = "stop"
                break
            kept.append(tok)
            if len(row.new_ids) + len(kept) >= row.budget:
                row.finish_reason = "length"
                break
        row.new_ids.extend(kept)
        text = row.detok.push(kept) if kept else ""
        if row.detok.stopped:
            row.finish_reason = "stop"
        if row.finish_reason is None:
            return StreamEvent(row.index, text, tuple(kept))
        return self._finished(row, row.finish_reason, text + row.detok.finish(), tuple(kept))

    def _finished(self, row: _Row, reason: str, text: str, kept: tuple[int, ...] = ()) -> StreamEvent:
        row.finish_reason = reason
        gen = Generation(
            text=row.detok.text,
            token_ids=tuple(row.new_ids),
            prompt_tokens=len(row.prompt_ids),
            new_tokens=len(row.new_ids),
            wall_time_s=time.perf_counter() - row.start,
            finish_reason=reason,
            method=self.method,
            stats=row.stats(),
        )
        return StreamEvent(row.index, text, kept, gen)

    @staticmethod
    def _failed(row: _Row, exc: Exception) -> StreamEvent:
        row.finish_reason = "error"
        return StreamEvent(row.index, "", (), None, exc)

    # -- target passes ---------------------------------------------------------------------------
    def _prefill(self, cache: KVCache, rows: list[_Row]) -> torch.Tensor:
        """Run the prompts in one forward and return each row's last logits [B, vocab]; drafters
        that read the target's features get those of every prompt position.

        Prompts of different lengths are packed like a ragged step (joey.batching): the dense
        layers see only real tokens and attention runs per row, so a batch of one long and many
        short prompts costs their sum, not the batch size times the longest; and each row's prefill
        is what it would be alone. The padded baseline right-pads them instead: causal attention
        alone is right then, since a real token never sees a later slot and the padding's K/V lie
        past the row's length (holes the baseline masks from then on).
        """
        model, device = self.model, self.engine.device
        lengths = [len(r.prompt_ids) for r in rows]
        t = max(lengths)
        if self.padded or all(n == t for n in lengths):  # one shape: a plain causal forward
            tokens = torch.tensor([r.prompt_ids + [0] * (t - len(r.prompt_ids)) for r in rows], device=device)
            positions = torch.arange(t, device=device).expand(len(rows), t)
            grid = model.forward_from(model.embed(tokens), positions, cache, 0, t, None, 0, head=False)
            features = list(grid)
        else:  # attention row by row, each prompt against itself only: Σ n², not rows × longest²
            inputs = torch.tensor([tok for r in rows for tok in r.prompt_ids], device=device)
            positions = torch.cat([torch.arange(n, device=device) for n in lengths])
            spans = [RowSpan(n, cache.row(b), 0, n, None) for b, n in enumerate(lengths)]
            x = model.run_layers_rows(model.embed(inputs), positions, spans)
            features = list(model.model.norm(x).split(lengths))
        cache.advance(lengths)
        for row, f in zip(rows, features):
            if getattr(row.drafter, "wants_features", False):
                row.drafter.observe(f[: len(row.prompt_ids)])
        # the LM head only where a token is chosen
        return model.head(torch.stack([f[len(row.prompt_ids) - 1] for row, f in zip(rows, features)]))

    def _verify_pass(self, cache: KVCache, rows: list[_Row], proposals: list[Proposal]) -> list[torch.Tensor]:
        """One target forward over each row's pending token followed by its draft; returns each
        row's final-norm features [1 + len(draft), hidden] (``model.head`` makes the logits; feature
        drafters read them).

        When rows feed different numbers of tokens they are packed (joey.batching): the dense
        layers run on exactly the real tokens, with no padding; where rows' lengths differ so much
        that a padded attention grid would mostly compute padding, attention runs row by row
        (``rows_pay_off``). In the padded baseline they are padded to the longest instead, and
        attention skips the cache's holes.
        """
        model, device = self.model, self.engine.device
        lengths = cache.lengths
        counts = [1 + len(p) for p in proposals]
        parents = [p.parents for p in proposals]
        t = max(counts)
        kv_len = max(lengths) + t
        # Self-speculative drafts (Kangaroo) come with their layer-l states: the target runs only
        # layers [l, L) on them. Every row of a batch uses the same drafter, so all or none do.
        layer = proposals[0].start_layer if proposals[0].hidden is not None else 0
        if self.lockstep is not None:
            return self._padded_pass(cache, rows, proposals, layer)
        uniform = all(n == lengths[0] for n in lengths)
        # joey's C attention takes every row in one call, each scanning only its own slots; other
        # attention computes a padded grid, which rows of very different lengths mostly waste
        ragged = model.ragged_attention
        by_rows = not ragged and rows_pay_off(lengths, counts)
        if by_rows or any(c != t for c in counts) or (ragged and not uniform):
            packing = pack(lengths, counts, device, parents)
            if layer:
                inputs = torch.cat([prop.hidden for prop in proposals])
            else:
                inputs = torch.tensor(
                    [tok for row, prop in zip(rows, proposals) for tok in (row.pending, *prop.tokens)]
                )
            inputs = inputs.to(device)
            if by_rows:  # attention row by row, each against its own length
                spans = [RowSpan(c, cache.row(b), n, n + c, row_mask(n, c, p, device))
                         for b, (n, c, p) in enumerate(zip(lengths, counts, parents))]
                hidden = inputs if layer else model.embed(inputs)
                x = model.run_layers_rows(hidden, packing.positions, spans, start=layer)
                return list(model.model.norm(x).split(counts))
            mask = step_mask(lengths, t, kv_len, parents, device)
            features = model.forward_packed(inputs, cache, packing, kv_len, mask, layer, False)
            return list(features.split(counts))
        positions = grid_positions(lengths, t, parents, device)
        slots = lengths[0] if uniform else grid_slots(lengths, t, device)
        # plain decoding: the one new token may see every cached slot, no mask needed
        mask = None if uniform and t == 1 else step_mask(lengths, t, kv_len, parents, device)
        if layer:
            hidden = torch.stack([prop.hidden for prop in proposals])
        else:
            tokens = [[row.pending, *prop.tokens] for row, prop in zip(rows, proposals)]
            hidden = model.embed(torch.tensor(tokens, device=device))
        return list(model.forward_from(hidden, positions, cache, slots, kv_len, mask, layer, head=False))

    def _padded_pass(
        self, cache: KVCache, rows: list[_Row], proposals: list[Proposal], layer: int
    ) -> list[torch.Tensor]:
        """``_verify_pass`` of the padded baseline: every row's tokens padded to the longest (the
        padding repeats the pending token, or zero states for a self-speculative draft), written
        from the shared cache length; returns only the real tokens' features."""
        model, lockstep = self.model, self.lockstep
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
            hidden = model.embed(torch.tensor(tokens, device=self.engine.device))
        features = model.forward_from(hidden, positions, cache, width, width + t, mask, layer, head=False)
        return [f[:n] for f, n in zip(features, counts)]
