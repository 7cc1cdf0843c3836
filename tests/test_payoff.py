"""The wall-clock gate (joey.payoff): drafting stops where drafted steps cost more per token than
plain ones, comes back in priced probes, and a step the gate keeps plain is AR's step: no depth
search, no drafter call, the same target pass. Tokens never depend on the gate's decisions."""

from __future__ import annotations

import itertools

import pytest
from conftest import drafting_engine
from test_batch_modes import DRAFTERS, PROMPTS

import joey.continuous
from joey.budget import DepthPolicy
from joey.config import SamplingParams
from joey.payoff import (
    BURST,
    CLEAR_LOSS,
    EVIDENCE,
    MAX_GAP,
    MIN_GAP,
    PROBE_SHARE,
    REFRESH,
    WARMUP,
    WINDOW,
    Payoff,
    bucket,
)
from joey.target_runner import TargetRunner

pytestmark = pytest.mark.payoff


def _steps(gate: Payoff, rows: int, n: int, drafted_ms: float, plain_ms: float, tokens: int = 2) -> list[bool]:
    """Run ``n`` steps: a step the gate allows drafts (``drafted_ms``, ``tokens`` per row committed),
    else it is plain (``plain_ms``, one token per row). Returns the gate's answers."""
    answers = []
    for _ in range(n):
        ok = gate.allows(rows)
        answers.append(ok)
        gate.observe(rows, ok, drafted_ms if ok else plain_ms, rows * (tokens if ok else 1))
    return answers


def test_buckets_group_batch_sizes_by_powers_of_two():
    assert [bucket(r) for r in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]


def test_drafting_that_does_not_pay_stops_after_the_first_probe_and_probes_come_priced():
    gate = Payoff()
    # drafted steps: 2 tokens in 5 ms (2.5 ms a token); plain: 1 token in 2 ms
    answers = _steps(gate, 1, WARMUP + BURST + 1000, drafted_ms=5.0, plain_ms=2.0)
    assert answers[: WARMUP + BURST] == [False] * WARMUP + [True] * BURST  # plain steps first, then a probe
    rest = answers[WARMUP + BURST :]
    # after that only probes of BURST steps, spaced so that they cost PROBE_SHARE of plain decoding
    lost = BURST * (5.0 - 2 * 2.0)  # each probe step: 2 tokens that plain decoding makes in 4 ms
    gap = int(max(MIN_GAP, lost / (PROBE_SHARE * 2.0)))
    first = rest.index(True)
    assert first == gap and rest[first : first + BURST] == [True] * BURST
    second = rest.index(True, first + BURST)
    assert second - (first + BURST) == gap
    assert sum(rest) / len(rest) < 0.05


def test_a_probe_that_clearly_loses_ends_early():
    gate = Payoff()
    # drafted: 2 tokens in 10 ms (5 ms a token) against plain decoding's 2 ms: 2.5x, past CLEAR_LOSS
    answers = _steps(gate, 1, WARMUP + BURST + MAX_GAP + BURST, drafted_ms=10.0, plain_ms=2.0)
    assert answers[: WARMUP + BURST] == [False] * WARMUP + [True] * EVIDENCE + [False] * (BURST - EVIDENCE)
    assert 5.0 > CLEAR_LOSS * 2.0
    tail = answers[WARMUP + EVIDENCE :]
    lost = EVIDENCE * (10.0 - 2 * 2.0)
    gap = int(min(MAX_GAP, lost / (PROBE_SHARE * 2.0)))
    assert tail[:gap] == [False] * gap and tail[gap : gap + EVIDENCE] == [True] * EVIDENCE


def test_the_probe_gap_grows_with_what_a_probe_loses_up_to_a_bound():
    gate = Payoff()
    answers = _steps(gate, 1, WARMUP + EVIDENCE + 2 * MAX_GAP, drafted_ms=200.0, plain_ms=2.0)
    tail = answers[WARMUP + EVIDENCE :]  # after the plain warmup and the first probe (ended early)
    assert tail[:MAX_GAP] == [False] * MAX_GAP and tail[MAX_GAP] is True


def test_drafting_that_pays_goes_on_with_a_plain_step_to_refresh_the_plain_rate():
    gate = Payoff()
    answers = _steps(gate, 1, WARMUP + 3 * (REFRESH + 1), drafted_ms=3.0, plain_ms=2.0, tokens=3)
    rest = answers[WARMUP:]
    assert rest[:REFRESH] == [True] * REFRESH and rest[REFRESH] is False
    assert rest[REFRESH + 1 : 2 * REFRESH + 1] == [True] * REFRESH


def test_a_probe_that_pays_turns_drafting_back_on():
    gate = Payoff()
    _steps(gate, 1, WARMUP + BURST + 5, drafted_ms=5.0, plain_ms=2.0)  # drafting off
    b = gate.buckets[1]
    answers = _steps(gate, 1, b.gap + BURST + 20, drafted_ms=2.5, plain_ms=2.0, tokens=4)  # now it pays
    assert answers[-20:] == [True] * 20


def test_a_probe_waits_for_its_drafted_steps_when_the_depth_policy_keeps_some_plain():
    """Within a probe the depth policy may still choose no draft; those plain steps are no evidence
    about drafting, so the probe goes on until it has BURST drafted steps (here every other step) and
    drafting that pays is kept on. Before, the probe ended on its step count with one drafted step."""
    gate = Payoff()
    _steps(gate, 1, WARMUP, drafted_ms=3.0, plain_ms=2.0)
    policy_drafts = itertools.cycle([True, False])
    answers = []
    for _ in range(2 * BURST + 8):
        ok = gate.allows(1)
        answers.append(ok)
        drafts = ok and next(policy_drafts)
        gate.observe(1, drafts, 3.0 if drafts else 2.0, 3 if drafts else 1)
    assert answers[: 2 * BURST] == [True] * (2 * BURST)  # BURST drafted steps took 2 x BURST steps
    b = gate.buckets[1]
    assert b.probe.steps == BURST and b.pays and all(answers)


def test_bursty_drafting_that_pays_on_average_keeps_the_gate_open_through_its_misses():
    """Prompt lookup's pattern: a copied passage (6 tokens in a step), then 14 steps finding nothing
    at a little more than a plain step's cost. On average it pays (1.33 tokens a step for 1.15x the
    time); a 10-step memory of drafted steps closed the gate in every stretch of misses."""
    gate = Payoff()
    _steps(gate, 1, WARMUP, drafted_ms=2.3, plain_ms=2.0)
    pattern = itertools.cycle([6] + [1] * 14)
    answers = []
    for _ in range(300):
        ok = gate.allows(1)
        answers.append(ok)
        gate.observe(1, ok, 2.3 if ok else 2.0, next(pattern) if ok else 1)
    assert sum(answers[100:]) / 200 > 0.95  # plain only to refresh the plain rate


def test_a_probe_in_which_nothing_drafts_ends_after_its_window():
    gate = Payoff()
    _steps(gate, 1, WARMUP, drafted_ms=3.0, plain_ms=2.0)
    answers = []
    for _ in range(WINDOW + 5):
        answers.append(gate.allows(1))
        gate.observe(1, False, 2.0, 1)  # the depth policy never drafts
    assert answers[:WINDOW] == [True] * WINDOW and answers[WINDOW:] == [False] * 5


def test_a_first_draft_is_left_out_of_the_rates():
    gate = Payoff()
    _steps(gate, 1, WARMUP, drafted_ms=3.0, plain_ms=2.0, tokens=3)  # the plain warmup
    assert gate.allows(1)
    gate.observe(1, True, 500.0, 2, first_draft=True)  # catching up on a long prompt
    _steps(gate, 1, BURST + 10, drafted_ms=3.0, plain_ms=2.0, tokens=3)
    assert gate.buckets[1].drafted.per_token == pytest.approx(1.0)
    assert gate.allows(1)


def test_a_probes_catch_up_on_a_prompt_counts_towards_what_it_lost():
    gate = Payoff()
    _steps(gate, 1, WARMUP, drafted_ms=5.0, plain_ms=2.0)  # the plain warmup; the next step starts a probe
    assert gate.allows(1)
    gate.observe(1, True, 100.0, 2, first_draft=True)  # a new request's first draft: 96 ms over plain
    _steps(gate, 1, BURST - 1, drafted_ms=5.0, plain_ms=2.0)
    b = gate.buckets[1]
    assert b.drafted.per_token == pytest.approx(2.5)  # the catch-up is not a drafting rate
    lost = 96.0 + (BURST - 1) * (5.0 - 2 * 2.0)
    assert b.gap == min(MAX_GAP, int(lost / (PROBE_SHARE * 2.0)))


def test_batch_sizes_are_judged_apart():
    gate = Payoff()
    _steps(gate, 1, WARMUP + BURST + 5, drafted_ms=3.0, plain_ms=2.0, tokens=3)  # pays alone
    _steps(gate, 8, WARMUP + BURST + 5, drafted_ms=20.0, plain_ms=8.0, tokens=2)  # not at batch 8
    assert gate.allows(1) and not gate.allows(8)
    assert [gate.allows(16) for _ in range(WARMUP)] == [False] * WARMUP  # 16: its own plain warmup


class _Closed(Payoff):
    """A gate that never lets a step draft."""

    def allows(self, rows: int) -> bool:
        return False


class _Flipping(Payoff):
    """A gate that opens and closes in a fixed pattern, so decisions change mid-request."""

    def __init__(self) -> None:
        super().__init__()
        self.pattern = itertools.cycle([True, True, False, True, False, False, False])

    def allows(self, rows: int) -> bool:
        return next(self.pattern)


def _counting(monkeypatch, target, name: str) -> list:
    calls = []
    original = getattr(target, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, spy)
    return calls


def _passes_and_tokens(engine, monkeypatch, method: str, gate: Payoff | None = None) -> tuple[list, list]:
    """Three prompts decoded together by one ``ContinuousBatch`` (``gate``: its payoff, if given):
    the rows' shapes of every target pass, and each row's tokens."""
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batch = joey.continuous.ContinuousBatch(engine, method)
    if gate is not None:
        batch.payoff = gate
    with monkeypatch.context() as m:
        passes = _counting(m, TargetRunner, "verify")
        for i, prompt in enumerate(PROMPTS[:3]):
            batch.add(engine.encode(prompt), params, key=i)
        tokens: dict[int, list[int]] = {}
        while batch.busy:
            for ev in batch.step():
                tokens.setdefault(ev.row, []).extend(ev.token_ids)
    shapes = [[(len(p), p.tokens, p.hidden) for p in call[3]] for call in passes]
    return shapes, [tokens[i] for i in range(3)]


@pytest.mark.parametrize("method", ["pld", "sps", "jakiro", "jakiro+pld", "kangaroo", "kangaroo+pld"])
def test_a_step_the_gate_keeps_plain_is_ars_step(engine, monkeypatch, method):
    """With the gate closed: the depth search never runs, no drafter is asked, and the target
    passes are AR's, call for call and token for token, over all layers (Kangaroo too: it hands
    its first layers' K/V back to the target's cache instead of running them)."""
    ar = _passes_and_tokens(engine, monkeypatch, "ar", _Closed())
    choose = _counting(monkeypatch, DepthPolicy, "choose")
    propose = _counting(monkeypatch, joey.continuous, "propose_all")
    assert _passes_and_tokens(engine, monkeypatch, method, _Closed()) == ar
    assert not choose and not propose


@pytest.mark.parametrize("method", ["jakiro", "kangaroo", "kangaroo+pld"])
def test_a_step_in_which_no_row_drafts_is_ars_step(engine, monkeypatch, method):
    """The gate open but the depth policy drafting no row: no drafter is asked (a self-speculative
    one hands its first layers' K/V back instead of running them apart) and the passes are AR's."""
    ar = _passes_and_tokens(engine, monkeypatch, "ar")
    monkeypatch.setattr(DepthPolicy, "choose", lambda self, rows, rooms, together: [0] * len(rows))
    propose = _counting(monkeypatch, joey.continuous, "propose_all")
    assert _passes_and_tokens(engine, monkeypatch, method) == ar
    assert not propose


@pytest.fixture(scope="module")
def int8_engine(tiny_folder):
    return drafting_engine(tiny_folder, "int8")  # row-invariant kernels: sampled equality holds


@pytest.mark.parametrize("method,extra", DRAFTERS)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_tokens_do_not_depend_on_the_gates_decisions(int8_engine, monkeypatch, method, extra, temperature):
    engine = int8_engine
    params = dict(max_new_tokens=16, ignore_eos=True, temperature=temperature, seed=7)
    reference = engine.generate(PROMPTS[:2], method="ar", **params)
    monkeypatch.setattr(type(engine), "payoff", lambda self, m, spec: _Flipping())
    gated = engine.generate(PROMPTS[:2], method=method, **extra, **params)
    assert [g.token_ids for g in gated] == [g.token_ids for g in reference]


def test_a_larger_batch_waits_out_a_smaller_ones_loss_before_its_first_probe():
    gate = Payoff()
    _steps(gate, 4, WARMUP + BURST, drafted_ms=20.0, plain_ms=8.0)  # drafting loses at batch 4
    lost = gate.buckets[4]
    assert lost.probes == 1 and not lost.pays and lost.gap > MIN_GAP
    answers = _steps(gate, 8, lost.gap + WARMUP, drafted_ms=20.0, plain_ms=8.0)
    assert answers.index(True) == lost.gap  # no probe before the smaller batch's gap has passed
    # a smaller batch size that pays, or one still probing, leaves a larger one to probe at once
    for pays in (True, False):
        gate = Payoff()
        if pays:
            _steps(gate, 1, WARMUP + BURST, drafted_ms=3.0, plain_ms=2.0, tokens=3)
        else:
            _steps(gate, 1, WARMUP + 1, drafted_ms=20.0, plain_ms=2.0)  # mid-probe
        assert _steps(gate, 2, WARMUP + 1, drafted_ms=3.0, plain_ms=2.0)[WARMUP] is True
