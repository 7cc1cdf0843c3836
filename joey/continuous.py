"""The decoding step machine: a batch that requests join and leave between steps (continuous batching).

``ContinuousBatch`` schedules requests (``joey.request.Request``) and owns the batch's KV cache.
``add()`` queues a request (token ids, its own sampling settings, seed, stop strings and length);
each ``step()`` first drops cancelled rows, then prefills the requests waiting for room and commits
their first token, then runs one decoding step for every running row, in phases: choose depths
(``joey.budget.DepthPolicy``) → propose (the drafters) → one verification pass
(``joey.target_runner.TargetRunner``) → judge each row (``judge``: ``joey.verify``) and commit its tokens →
advance the cache. Without a drafter a step is plain autoregressive decoding. ``Engine.stream()``
is a thin user (all rows join at the first step), and so is the server, whose requests arrive at
any time.

Rows keep their own KV length (no padding after the prefill; EMS-SD), a finished row leaves the
cache at once so it stops costing compute, and a joining row is prefilled into spare rows of the
batch's cache storage (``KVCache.add_rows``): a row's tokens do not depend on which other rows share
its steps. A failure in one row's own work (its sampling, detokenization, stop strings) fails that
row only.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Hashable
from dataclasses import dataclass, replace

import torch

from joey.batching import Lockstep, depths_of, path_moves
from joey.budget import DepthPolicy
from joey.config import METHODS, SamplingParams, SpecConfig, TreeShape
from joey.drafters import Proposal
from joey.drafters.base import drafts_together, propose_all
from joey.errors import InvalidArgumentError
from joey.methods import DrafterFactory
from joey.models.kv_cache import KVCache
from joey.request import FinishReason, Request, StreamEvent
from joey.sampling import next_tokens, probabilities
from joey.target_runner import TargetRunner
from joey.verify import verify_greedy, verify_keyed, verify_sampled

BATCH_MODES = ("packed", "padded")  # packed: EMS-SD, no padding; padded: the vanilla baseline (Lockstep)


def fill_gaps(alive: list[int]) -> list[int]:
    """The rows to keep (ascending old indices) as a new order in which each gap left by a row that
    went is filled by a kept row from the end: [0, 2, 3, 4] (row 1 left) → [0, 4, 2, 3]."""
    n = len(alive)
    kept = set(alive)
    order = list(range(n))
    for gap, tail in zip((i for i in range(n) if i not in kept), (r for r in alive if r >= n)):
        order[gap] = tail
    return order


@dataclass(frozen=True)
class RowStep:
    """What one row's decoding step left for the cache: ``kept`` tokens now have K/V (the pending
    one and the accepted drafts), along the draft-node ``path``; ``goes_on`` unless it finished or
    failed."""

    kept: int
    path: tuple[int, ...]
    goes_on: bool


def judge(row: Request, prop: Proposal, logits: torch.Tensor, features: torch.Tensor, policy: DepthPolicy,
          eos_ids: frozenset[int], method: str) -> tuple[RowStep, StreamEvent]:
    """One row's verdict on its draft under its own sampling settings: commit the accepted tokens and
    the target's bonus token, count the step for the row and the depth ``policy``, and hand the row's
    drafter what it reads. A failure here fails this row only (its event carries the error)."""
    try:
        if row.params.greedy:
            verdict = verify_greedy(prop.tokens, prop.parents, logits)
        elif row.params.rejection:
            verdict = verify_sampled(prop.tokens, prop.parents, probabilities(logits, row.params),
                                     prop.draft_probs, row.generator)
        else:  # the target's keyed draw at every node; the root's is the next position's
            verdict = verify_keyed(prop.tokens, prop.parents, logits, row.params,
                                   len(row.context))
        tokens = [prop.tokens[j] for j in verdict.path] + [verdict.bonus]
        row.steps += 1
        row.draft_tokens += len(prop)
        policy.record(row.policy, max(depths_of(prop.parents)), verdict.accepted, len(tokens))
        if row.drafter is not None and row.drafter.wants_features:  # pending token + accepted path
            # a slice, not an index, on the common path (plain steps: the pending token only)
            row.drafter.observe(features[[0, *(1 + j for j in verdict.path)]] if verdict.path else features[:1])
        event = replace(row.commit(tokens, eos_ids, method), draft_tokens=len(prop), accepted=verdict.accepted)
    except Exception as exc:  # this row's own work failed: it leaves, the others go on
        return RowStep(1, (), False), row.fail(exc)
    if row.finish_reason is None:
        row.pending = verdict.bonus
    return RowStep(1 + verdict.accepted, verdict.path, row.finish_reason is None), event


class ContinuousBatch:
    """Requests of one engine and one drafting method, decoded together; they join and leave between steps.

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
        self.runner = TargetRunner(engine.model)
        self.method = method
        self.spec = spec = spec or SpecConfig()
        self.shape = engine.tree_shape(method, spec) if method != "ar" else TreeShape(0, 1)
        self.factory: DrafterFactory | None = engine.drafter_factory(method, spec, self.shape)
        # measured once per model and machine (then read from the cache), before any row's clock starts
        curve = engine.cost_curve() if self.factory is not None and spec.adaptive else None
        # draft tokens of a tree of each depth (a chain: the depth)
        nodes_at = [min(self.shape.nodes, self.shape.topk * d) for d in range(spec.max_draft + 1)]
        self.policy = DepthPolicy(curve, spec.max_draft, nodes_at)
        self.padded = batch_mode == "padded"
        # the wall-clock gate: plain steps wherever drafting has not been paying (the padded
        # baseline stays as the vanilla method runs it)
        self.payoff = engine.payoff(method, spec) if self.factory is not None and spec.adaptive and not self.padded \
            else None
        # room past a row's last committed slot for a step's draft: a tree's nodes, and in a drafter's
        # own caches also the expanded nodes that did not make it into the tree, and a lookup branch
        self.extra = 2 * spec.max_draft + self.shape.nodes + self.shape.topk * spec.max_draft + 2 if self.factory else 2
        self.max_batch = max_batch
        self.waiting: list[Request] = []
        self.active: list[Request] = []
        self.cache: KVCache | None = None
        self.lockstep: Lockstep | None = None
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
        params = SamplingParams.with_overrides(params, {})
        if key is not None and not isinstance(key, Hashable):
            raise InvalidArgumentError(f"key must be hashable, got {type(key).__name__}")
        if self.padded and self._started:
            raise InvalidArgumentError("a padded batch takes all its rows before the first step")
        request = Request.new(key, prompt_ids, params, self.engine)  # checks the prompt; draws a seed
        request.key = next(self._keys) if key is None else key
        self.waiting.append(request)
        return request.key

    def cancel(self, key: Hashable) -> None:
        """Stop a request (waiting or running) at the next step; its last event has finish reason
        ``"cancelled"``. Unknown or finished keys are ignored."""
        self._cancelled.add(key)

    def abort(self, exc: Exception) -> list[StreamEvent]:
        """Fail every request, waiting or running (the server's last resort after an unexpected error)."""
        events = [row.fail(exc) for row in self.waiting + self.active]
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
        for row in [r for r in self.waiting if r.key in gone]:
            self.waiting.remove(row)
            events.append(row.finish(FinishReason.CANCELLED, self.method))
        for row in self.active:
            if row.key in gone:
                events.append(row.finish(FinishReason.CANCELLED, self.method))
        self._keep([i for i, r in enumerate(self.active) if r.key not in gone])

    def _admit(self, events: list[StreamEvent]) -> None:
        """Prefill the waiting rows that fit, in spare rows of the batch's cache storage
        (``KVCache.add_rows``), commit their first token, and keep the rows that go on."""
        room = len(self.waiting) if self.max_batch is None else self.max_batch - len(self.active)
        if room <= 0 or not self.waiting:
            return
        joiners, self.waiting = self.waiting[:room], self.waiting[room:]
        need = max(len(r.prompt_ids) + r.max_new + self.extra for r in joiners)
        if self.cache is None:
            self.cache = self.model.new_cache(0, need)
        cache, start = self.cache, self.cache.batch
        rows = cache.add_rows(len(joiners), need)  # the joiners' own cache, in the batch's storage
        try:
            for row in joiners:
                if self.factory is not None:
                    row.set_drafter(self.factory(len(row.prompt_ids) + row.max_new + self.extra, row.generator,
                                                 row.params))
                    self.policy.join(row.policy)
            # a self-speculative drafter takes the prompt's first layers from the prefill: its first
            # draft then need not run them again over the whole prompt
            split = joiners[0].drafter.prompt_layer if joiners[0].drafter is not None else 0
            features, shallow = self.runner.prefill(rows, [r.prompt_ids for r in joiners], self.padded, split)
            for i, (row, f) in enumerate(zip(joiners, features)):
                if row.drafter is not None and row.drafter.wants_features:
                    row.drafter.observe(f[: len(row.prompt_ids)])
                if split:
                    row.drafter.take_prompt(row.prompt_ids, shallow[i], rows, i)
            # the LM head only where a token is chosen
            logits = self.model.head(torch.stack([f[len(r.prompt_ids) - 1] for r, f in zip(joiners, features)]))
        except Exception as exc:  # a prompt that breaks the prefill fails the rows that brought it
            events.extend(row.fail(exc) for row in joiners)
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
                tok = int(next_tokens(logits[i : i + 1], row.params, [len(row.prompt_ids)], row.generator)[0])
                row.steps = 1
                events.append(row.commit([tok], self.engine.eos_ids, self.method))
                row.pending = tok
            except Exception as exc:
                events.append(row.fail(exc))
        self.active += joiners
        self._keep([i for i, r in enumerate(self.active) if r.finish_reason is None])

    # -- the decoding step -----------------------------------------------------------------------
    def _decode_step(self, events: list[StreamEvent]) -> None:
        """One decoding step for every running row, in phases: choose depths → propose → verify
        pass → judge rows → advance the cache."""
        active = self.active
        t0 = time.perf_counter()
        try:
            together = drafts_together([row.drafter for row in active])
            plain = self.payoff is not None and not self.payoff.allows(len(active))
            depths = [0] * len(active)
            if not plain:
                depths = self.policy.choose([r.policy for r in active], [r.room for r in active], together)
                # no row drafts: AR's step too (a self-speculative drafter would otherwise run its
                # layers apart from the target's, ~12 % dearer a step for Kangaroo on the 135M
                # model); except such a drafter in the padded baseline, which cannot hand back (its
                # cache slots are not the context's), so it is asked every step there
                hands_back = self.lockstep is None or not any(
                    row.drafter.self_speculative for row in active if row.drafter)
                plain = not any(depths) and hands_back
            if plain:  # drafting has not been paying: AR's step (no drafter call)
                for b, row in enumerate(active):
                    if row.drafter is not None and row.drafter.self_speculative:
                        row.drafter.hand_back(self.cache, b, row.context)
            # a catching-up drafter's first draft reads the whole prompt: a one-time cost of the request
            first = any(d and r.policy.catches_up and not r.policy.drafted for r, d in zip(active, depths))
            proposals = self._propose(active, depths, together, plain)
            t1 = time.perf_counter()
            features = self.runner.verify(self.cache, [r.pending for r in active], proposals, self.lockstep)
            logits = self.runner.logits(features)
        except Exception as exc:  # the shared forward failed: no row of this step can go on
            events.extend(row.fail(exc) for row in active)
            self._keep([])
            return
        steps = []
        for row, prop, lg, f in zip(active, proposals, logits, features):
            step, event = judge(row, prop, lg, f, self.policy, self.engine.eos_ids, self.method)
            steps.append(step)
            events.append(event)
        t2 = time.perf_counter()
        self.policy.timed_pass(len(active), sum(len(f) for f in features), 1000 * (t2 - t1))
        for row in active:
            row.draft_time += t1 - t0
            row.verify_time += t2 - t1
        self._advance(steps)
        if self.payoff is not None:
            self.payoff.observe(len(active), any(depths), 1000 * (time.perf_counter() - t0),
                                sum(s.kept for s in steps), first)

    def _propose(self, rows: list[Request], depths: list[int], together: bool, plain: bool) -> list[Proposal]:
        """Every row's draft, drafted together where the drafter can (one forward per draft depth
        for all rows: ``propose_all``), timed for the depth policy. A ``plain`` step (the gate closed
        drafting or no row drafts) asks no drafter, and drafters catch up on the skipped tokens later
        (a self-speculative one has handed its first layers' K/V back to the target's cache). Once
        any row drafts, a self-speculative drafter is asked for every row: one verification pass
        starts from its exit layer for all rows; so it is in the padded baseline, which never hands
        back."""
        if rows[0].drafter is None or plain:
            return [Proposal.chain([]) for _ in rows]
        start = time.perf_counter()
        props = propose_all([row.drafter for row in rows], [row.context for row in rows], depths, self.shape.nodes)
        ms = 1000 * (time.perf_counter() - start)
        self.policy.timed_drafts([row.policy for row in rows], [max(depths_of(p.parents)) for p in props], ms, together)
        return props

    def _advance(self, steps: list[RowStep]) -> None:
        """Keep each row's accepted tokens in the cache (a tree's accepted path → contiguous slots)
        and let finished rows leave."""
        cache = self.cache
        cache.move(*path_moves(cache.lengths, [s.path for s in steps]))
        counts = [s.kept for s in steps]
        if self.lockstep is not None:
            cache.advance([self.lockstep.commit(counts)] * len(counts))
        else:
            cache.advance(counts)
        self._keep([i for i, s in enumerate(steps) if s.goes_on])
