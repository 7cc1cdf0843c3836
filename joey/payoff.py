"""Whether drafting pays, by the wall clock: the gate that keeps speculation from costing speed.

``joey.budget`` prices a draft from the measured verify curve and the rows' acceptance, but a
drafted step also pays for what no curve holds: the drafters' calls, packing and masks, tree
bookkeeping, per-row verification, the depth search itself. On the 135M default model those made
every method 0.80-0.97x batched AR although the budget expected gains. So the step machine also
times whole steps, as they run: per batch-size bucket it keeps the running milliseconds per
committed token of *plain* steps (no row drafts) and of *drafted* steps (the depth policy was asked
and some row drafted), everything included. A step may draft only while drafted steps have been
cheaper per token than plain ones; otherwise the step is plain decoding (the depth policy is not
even asked, no drafter runs: AR's step), and drafting is tried again in short probes whose spacing
is priced: after a probe that lost ``extra`` ms against plain decoding, the next comes once that
loss is at most ``PROBE_SHARE`` of the plain steps' time in between. A batch size starts with a
few plain steps (they price everything else) and then a probe; a probe whose first drafted steps
already lose by far (``CLEAR_LOSS``) ends early. While drafting pays, a plain step now and then
(``REFRESH``) keeps the plain rate current (it moves with the context length).

A request's first draft also catches its drafter up on the whole prompt (a head's features, a
draft model's prefill): a one-time cost of the request, not of a step, so such a step is left out of
both rates rather than making drafting look ~100x dearer than it is for the rest of the request.
Within a probe it still counts towards what the probe lost: a closed gate's probes are what makes
each new request catch up, so their spacing pays for that too.

One ``Payoff`` per engine and method (``Engine.payoff``): what a server or a benchmark learned in
one batch holds for the next, so a short request does not pay for learning again. A batch size
whose smaller neighbour has probed and lost starts as if it had lost too, and waits that bucket's
gap before its own first probe: drafting pays less the larger the batch (a plain step's cost per
row falls while a draft's extra tokens cost more of it; vLLM and SGLang switch drafting off above a
batch size for that reason), and a larger batch's first probe is the dearest one: every row's
drafter catches up on its prompt at once (Jakiro at batch 16 on the 135M model: 354 ms, ~7 plain
steps, then a drafted step at 4x a plain one's time per token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

WARMUP = 4  # plain steps before the first probe
BURST = 4  # drafted steps in one probe (one step would mostly measure a drafter catching up)
# steps a probe may last: within a probe the depth policy may still keep a step plain, and a probe
# that ended on the steps' count saw one drafted step (the 1.5B: one missed draft closed Jakiro's
# gate for 116 steps although it paid 1.2x with the gate off)
WINDOW = 4 * BURST
# a probe ends after EVIDENCE drafted steps when they cost more than CLEAR_LOSS x plain
# decoding's time per token: a loss that large needs no more steps to be seen (measured: 2.6x at
# batch 16 for Jakiro on the 135M model, where each further drafted step lost 1.6 plain steps)
EVIDENCE, CLEAR_LOSS = 2, 1.5
REFRESH = 64  # drafted steps between plain steps that refresh the plain rate
PROBE_SHARE = 0.01  # what probes may cost, as a share of plain decoding's time
MIN_GAP, MAX_GAP = 16, 2048  # steps between probes
WEIGHT = 0.1  # of the newest plain step in the plain rate (after the first 1/WEIGHT steps)
# ... and of the newest drafted step in the drafted rate: a longer memory, because what a drafted
# step commits is noisy and bursty (prompt lookup copies a passage, then finds nothing for a while),
# and a 10-step memory closed the gate in every stretch of misses. On the 135M model at batch 1,
# PLD then took 3,297 steps for 3,998 tokens against 3,101 without the gate (18 Spec-Bench questions)
DRAFTED_WEIGHT = 1 / 64


def bucket(rows: int) -> int:
    """Batch sizes whose steps are compared with each other: 1, 2, 3-4, 5-8, 9-16, ..."""
    return 1 << (rows - 1).bit_length()


@dataclass
class Rate:
    """Running milliseconds and committed tokens per step of one kind: their ratio is ms per token."""

    ms: float = 0.0
    tokens: float = 0.0
    steps: int = 0
    weight: float = WEIGHT

    def add(self, ms: float, tokens: int) -> None:
        self.steps += 1
        w = max(self.weight, 1.0 / self.steps)  # a plain mean until there are 1/weight steps
        self.ms += w * (ms - self.ms)
        self.tokens += w * (tokens - self.tokens)

    @property
    def per_token(self) -> float:
        return self.ms / self.tokens if self.tokens else float("inf")


@dataclass
class Bucket:
    """The gate's state for one batch-size bucket."""

    plain: Rate = field(default_factory=Rate)
    drafted: Rate = field(default_factory=lambda: Rate(weight=DRAFTED_WEIGHT))
    since_plain: int = 0  # drafted steps since the last plain step
    idle: int = 0  # plain steps since drafting was last tried
    gap: int = MIN_GAP  # plain steps before the next probe
    burst: int = 0  # drafted steps the current probe still needs
    window: int = 0  # steps the current probe may still last
    probe: Rate = field(default_factory=Rate)  # the current probe's steps
    catch_up_lost: float = 0.0  # ms the current probe's first drafts cost beyond plain decoding
    probes: int = 0  # probes started

    @property
    def pays(self) -> bool:
        return self.drafted.per_token < self.plain.per_token

    def clearly_loses(self, drafted: Rate) -> bool:
        """Whether ``drafted`` steps already show a loss too large to need more of them."""
        return drafted.steps >= EVIDENCE and drafted.per_token > CLEAR_LOSS * self.plain.per_token


class Payoff:
    """The wall-clock gate for one engine and drafting method (see the module docstring)."""

    def __init__(self) -> None:
        self.buckets: dict[int, Bucket] = {}

    def _bucket(self, rows: int) -> Bucket:
        """The gate's state for this batch size; a new one inherits a smaller batch size's loss."""
        size = bucket(rows)
        if size not in self.buckets:
            probed = [s for s, b in self.buckets.items() if s < size and b.probes and not b.burst]
            new = self.buckets[size] = Bucket()
            near = self.buckets[max(probed)] if probed else None
            if near is not None and not near.pays:  # as if its own first probe had lost the same way
                new.gap, new.probes = near.gap, 1
        return self.buckets[size]

    def allows(self, rows: int) -> bool:
        """Whether the next step of a batch of ``rows`` rows may draft (else it is AR's step)."""
        b = self._bucket(rows)
        if b.burst:
            return True
        if b.plain.steps < WARMUP:  # plain steps first: they cost nothing and price what follows
            return False
        if b.pays:  # never before a probe: without drafted steps the drafted rate is infinite
            return b.since_plain < REFRESH
        if b.idle >= b.gap or not b.probes:  # a probe (the first one right after the plain warmup)
            b.burst, b.window, b.idle, b.probe, b.catch_up_lost = BURST, WINDOW, 0, Rate(), 0.0
            b.probes += 1
            return True
        return False

    def observe(self, rows: int, drafted: bool, ms: float, tokens: int, first_draft: bool = False) -> None:
        """A decoding step of ``rows`` rows took ``ms`` and committed ``tokens``; ``drafted``: some row
        drafted; ``first_draft``: some row's drafter caught up on its prompt in it (left out)."""
        b = self._bucket(rows)
        if drafted:
            b.since_plain += 1
            if not first_draft:
                b.drafted.add(ms, tokens)
                if b.burst:
                    b.probe.add(ms, tokens)
            elif b.burst and b.plain.steps:
                b.catch_up_lost += max(0.0, ms - tokens * b.plain.per_token)
        else:
            b.since_plain = 0
            b.idle += 1
            b.plain.add(ms, tokens)
        if b.burst:
            b.burst -= drafted
            b.window -= 1
            if not b.window or b.clearly_loses(b.probe):
                b.burst = 0
            if not b.burst:
                self._priced(b)

    @staticmethod
    def _priced(b: Bucket) -> None:
        """After a probe: its steps are what drafting costs now (older drafted steps are stale), and
        the next probe waits until what this one lost is ``PROBE_SHARE`` of the plain time between."""
        lost, b.idle = b.catch_up_lost, 0  # the gap counts from the probe's end
        if b.probe.steps:
            b.drafted = Rate(b.probe.ms, b.probe.tokens, WARMUP, DRAFTED_WEIGHT)
            lost += b.probe.steps * (b.probe.ms - b.probe.tokens * b.plain.per_token)
        if lost <= 0:
            b.gap = MIN_GAP
        else:
            b.gap = int(min(MAX_GAP, max(MIN_GAP, lost / (PROBE_SHARE * b.plain.ms))))
