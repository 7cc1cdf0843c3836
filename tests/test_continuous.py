"""Continuous batching (joey.continuous): a request that joins a busy batch between steps gets
exactly the tokens it gets alone, for every drafter; each row keeps its own sampling settings,
seed, stop strings and length; ``max_batch`` bounds the running rows; a cancelled row leaves the
cache at the next step; a failure in one row's own work fails only that row."""

from __future__ import annotations

import pytest
import torch
from test_batch_modes import DRAFTERS, PROMPTS

from joey.budget import DepthPolicy
from joey.config import SamplingParams, SpecConfig
from joey.continuous import ContinuousBatch, fill_gaps
from joey.detokenize import IncrementalText
from joey.errors import InvalidArgumentError, PromptError
from joey.models.kv_cache import KVCache

GREEDY = SamplingParams(max_new_tokens=20, ignore_eos=True)


def _spec(extra: dict) -> SpecConfig:
    return SpecConfig(**{k: v for k, v in extra.items() if k in ("threshold", "tree_nodes", "tree_topk")})


def _alone(engine, prompt: str, method: str, extra: dict, params: SamplingParams = GREEDY) -> tuple[int, ...]:
    return engine.generate(prompt, params, method=method, **extra).token_ids


def _run(batch: ContinuousBatch, arrivals: dict[int, list[tuple[int, list[int], SamplingParams]]]) -> dict:
    """Step the batch to the end; before step s, add the requests ``arrivals[s]`` (key, ids, params).
    Returns each key's events."""
    events: dict = {}
    step = 0
    while batch.busy or any(s >= step for s in arrivals):
        for key, ids, params in arrivals.get(step, []):
            batch.add(ids, params, key=key)
        for ev in batch.step():
            events.setdefault(ev.row, []).append(ev)
        step += 1
    return events


@pytest.mark.parametrize("method,extra", [("ar", {})] + DRAFTERS)
def test_requests_joining_a_busy_batch_get_their_tokens_alone(engine, method, extra):
    ids = [engine.encode(p) for p in PROMPTS]
    short = SamplingParams(max_new_tokens=7, ignore_eos=True)
    batch = ContinuousBatch(engine, method, _spec(extra))
    # two rows start; one joins at step 3 while they decode, two more at step 5 (one with a shorter length)
    events = _run(batch, {0: [(0, ids[0], GREEDY), (1, ids[1], GREEDY)], 3: [(2, ids[2], GREEDY)],
                          5: [(3, ids[3], short), (4, ids[4], GREEDY)]})
    for key in range(5):
        gen = events[key][-1].generation
        assert gen is not None and all(ev.generation is None for ev in events[key][:-1])
        want = _alone(engine, PROMPTS[key], method, extra, short if key == 3 else GREEDY)
        assert gen.token_ids == want, (key, method)
        assert tuple(t for ev in events[key] for t in ev.token_ids) == want  # events add up to the result
    assert batch.cache is None and not batch.active  # the empty batch freed its cache


def test_max_batch_bounds_the_running_rows_and_the_rest_wait_in_order(engine):
    batch = ContinuousBatch(engine, "pld", max_batch=2)
    for key, p in enumerate(PROMPTS[:4]):
        batch.add(engine.encode(p), SamplingParams(max_new_tokens=6 + 4 * key, ignore_eos=True), key=key)
    finished, seen = [], []
    while batch.busy:
        for ev in batch.step():
            seen.append(ev.row)
            if ev.last:
                finished.append(ev.row)
        assert len(batch.active) <= 2 and (batch.cache is None or batch.cache.batch == len(batch.active))
    assert seen[:2] == [0, 1] and finished == [0, 1, 2, 3]  # 2 and 3 joined only as 0 and 1 left


def test_each_row_keeps_its_own_sampling_settings_seed_and_stop(engine):
    """A sampled AR row draws from its own seeded generator, so in a busy batch of greedy rows it
    samples exactly what it samples alone; a stop string ends only its own row."""
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, seed=7, ignore_eos=True)
    alone_text = engine.generate(PROMPTS[1], GREEDY, method="ar").text
    stop = alone_text[len(alone_text) // 2 :][:3]
    stopped = SamplingParams(max_new_tokens=20, ignore_eos=True, stop=(stop,))
    ids = [engine.encode(p) for p in PROMPTS]
    batch = ContinuousBatch(engine, "ar")
    events = _run(batch, {0: [(0, ids[0], GREEDY)], 2: [(1, ids[1], stopped), (2, ids[2], sampled)]})
    assert events[0][-1].generation.token_ids == _alone(engine, PROMPTS[0], "ar", {})
    assert events[2][-1].generation.token_ids == _alone(engine, PROMPTS[2], "ar", {}, sampled)
    gen = events[1][-1].generation
    assert gen.finish_reason == "stop" and stop not in gen.text and alone_text.startswith(gen.text)
    assert "".join(ev.text for ev in events[1]) == gen.text


@pytest.mark.parametrize("method", ["ar", "kangaroo"])
def test_a_cancelled_row_leaves_at_the_next_step(engine, method):
    batch = ContinuousBatch(engine, method, SpecConfig(threshold=0.0), max_batch=3)
    for key, p in enumerate(PROMPTS[:4]):
        batch.add(engine.encode(p), GREEDY, key=key)
    batch.step()
    batch.step()
    assert [r.key for r in batch.active] == [0, 1, 2] and len(batch.waiting) == 1
    batch.cancel(1)
    batch.cancel(3)  # still waiting
    batch.cancel(99)  # unknown: ignored
    events = {ev.row: ev for ev in batch.step()}
    assert events[1].generation.finish_reason == "cancelled" and events[3].generation.finish_reason == "cancelled"
    assert 0 < events[1].generation.new_tokens < GREEDY.max_new_tokens and events[3].generation.new_tokens == 0
    assert [r.key for r in batch.active] == [0, 2] and batch.cache.batch == 2 and not batch.waiting
    rest = _run(batch, {})
    assert rest[0][-1].generation.token_ids == _alone(engine, PROMPTS[0], method, {"threshold": 0.0})


def test_a_failure_in_one_rows_own_work_fails_only_that_row(engine, monkeypatch):
    push = IncrementalText.push

    def failing_push(self, ids):  # this row's detokenizer breaks after a few tokens
        if "BOOM" in self.stop and len(self.ids) >= 3:
            raise RuntimeError("detokenizer broke")
        return push(self, ids)

    monkeypatch.setattr(IncrementalText, "push", failing_push)
    ids = [engine.encode(p) for p in PROMPTS]
    doomed = SamplingParams(max_new_tokens=20, ignore_eos=True, stop=("BOOM",))
    batch = ContinuousBatch(engine, "pld")
    events = _run(batch, {0: [(0, ids[0], GREEDY), (1, ids[1], doomed)], 1: [(2, ids[2], GREEDY)]})
    assert isinstance(events[1][-1].error, RuntimeError) and events[1][-1].generation is None
    for key in (0, 2):
        assert events[key][-1].generation.token_ids == _alone(engine, PROMPTS[key], "pld", {})


def test_bad_requests_and_settings_are_refused(engine):
    with pytest.raises(InvalidArgumentError, match="unknown method"):
        ContinuousBatch(engine, "medusa")
    with pytest.raises(InvalidArgumentError, match="max_batch"):
        ContinuousBatch(engine, "ar", max_batch=0)
    batch = ContinuousBatch(engine, "ar")
    with pytest.raises(PromptError, match="empty"):
        batch.add([])
    with pytest.raises(PromptError, match="context"):
        batch.add([5] * engine.context_length)
    padded = ContinuousBatch(engine, "pld", batch_mode="padded")
    padded.add(engine.encode(PROMPTS[0]), GREEDY)
    padded.step()
    with pytest.raises(InvalidArgumentError, match="padded batch"):
        padded.add(engine.encode(PROMPTS[1]), GREEDY)


def test_a_joining_request_starts_from_what_drafting_was_worth_before(engine):
    """Rows admitted together start with no prior (they probe at full depth); a request that joins
    later starts from the earlier rows' acceptance (PRIOR_STEPS pseudo-steps) and draft cost, so it
    is not forced to draft at full depth first."""
    batch = ContinuousBatch(engine, "kangaroo", SpecConfig(threshold=0.0))  # drafts every step
    batch.add(engine.encode(PROMPTS[0]), GREEDY, key=0)
    for _ in range(6):
        batch.step()
    policy = batch.policy
    assert batch.active[0].policy.prior_drafted == [] and policy.drafted and policy.draft_ms is not None
    batch.add(engine.encode(PROMPTS[1]), GREEDY, key=1)
    batch._admit([])
    joined = batch.active[1].policy
    assert joined.prior_drafted[0] == DepthPolicy.PRIOR_STEPS and joined.draft_ms == policy.draft_ms
    rate = [a / n for a, n in zip(policy.accepted, policy.drafted)]
    assert [a / n for a, n in zip(joined.prior_accepted, joined.prior_drafted)] == pytest.approx(rate)
    assert policy.alone(joined, 10)[1] is False  # not forced
    events = _run(batch, {})
    assert events[1][-1].generation.token_ids == _alone(engine, PROMPTS[1], "kangaroo", {"threshold": 0.0})


def test_a_first_draft_is_not_a_measure_of_the_draft_cost_but_drafting_again_is(engine, monkeypatch):
    """A row's first drafted step (the drafter catches up on the whole prompt) does not count as the
    cost of a draft depth; later drafted steps do, also right after a step without drafting (its
    catch-up on the undrafted tokens is what drafting again costs)."""
    batch = ContinuousBatch(engine, "kangaroo", SpecConfig(threshold=0.0))  # drafts every step
    batch.add(engine.encode(PROMPTS[0]), GREEDY, key=0)
    batch.step()  # prefill, then the first drafted step
    row = batch.active[0].policy
    assert row.drafted and row.draft_ms is None and batch.policy.draft_ms is None
    batch.step()
    first = row.draft_ms
    assert first is not None and batch.policy.draft_ms == first
    depth = [0]
    monkeypatch.setattr(DepthPolicy, "alone", lambda self, r, room, batched=False: (depth[0], True))
    batch.step()  # no draft: nothing measured
    assert row.draft_ms == first
    depth[0] = 3
    batch.step()  # drafts again after an undrafted step: measured
    assert row.draft_ms != first


def test_a_stateless_drafter_is_measured_in_every_step_and_new_rows_start_from_the_batch_cost(engine, monkeypatch):
    """Prompt lookup keeps no state, so its very first drafted step measures a depth's cost (a
    stateful drafter waits for a steady step, above: in a batch of 16, where some row nearly always
    starts drafting again, prompt lookup was never measured and every row drafted at full depth,
    unpriced). A row not measured yet is priced at the batch's estimate."""
    from joey.drafters.base import Proposal
    from joey.drafters.prompt_lookup import PromptLookupDrafter

    # a lookup that always finds something (the tiny model's text rarely repeats itself)
    monkeypatch.setattr(PromptLookupDrafter, "propose", lambda self, ctx, k, n=None: Proposal.chain(ctx[-2:][:k]))
    batch = ContinuousBatch(engine, "pld", SpecConfig())
    batch.add(engine.encode("one two three one two three"), GREEDY, key=0)
    batch.step()  # prefill, then the first step: drafted (unmeasured rows draft), and already measured
    row, policy = batch.active[0].policy, batch.policy
    assert row.drafted and row.draft_ms is not None and policy.draft_ms == row.draft_ms
    batch.add(engine.encode("Hi"), GREEDY, key=1)
    batch.step()
    late = batch.active[1].policy
    if late.draft_ms is None:  # it has not drafted yet: priced like the rows before it
        assert policy.row_draft_ms(late) == policy.draft_ms
    late.draft_ms = None
    assert policy.row_draft_ms(late) == policy.draft_ms is not None


def test_the_cache_adds_rows_into_spare_storage_and_fills_gaps_from_the_end():
    assert fill_gaps([0, 2, 3, 4]) == [0, 4, 2, 3] and fill_gaps([1, 2]) == [2, 1] and fill_gaps([0, 1]) == [0, 1]
    cache = KVCache(2, 0, 1, 4, 2, dtype=torch.float32, device="cpu")
    rows = cache.add_rows(3, 4)
    rows.keys.copy_(torch.arange(3.0).view(1, 3, 1, 1, 1).expand_as(rows.keys))  # each row holds its index
    rows.advance([1, 2, 3])
    cache.set_lengths(0, rows.lengths)
    assert cache.batch == 3 and cache.lengths == [1, 2, 3] and cache.keys[:, 2].eq(2).all()
    storage = cache._store[0].data_ptr()
    cache.keep_rows(fill_gaps([0, 2]))  # row 1 leaves: row 2 moves into its place, nothing else is copied
    assert cache.lengths == [1, 3] and cache.keys[:, 1].eq(2).all() and cache.keys[:, 0].eq(0).all()
    cache.add_rows(1, 4)  # spare storage: no reallocation
    assert cache._store[0].data_ptr() == storage and cache.batch == 3 and cache.lengths == [1, 3, 0]
    cache.add_rows(2, 7)  # more rows and slots than stored: grows (doubling) and keeps what was there
    assert cache.capacity == 6 and cache.max_len == 7 and cache.lengths == [1, 3, 0, 0, 0]
    assert cache.keys[:, 1, :, :4].eq(2).all() and cache.keys[:, 1, :, 4:].eq(0).all()
