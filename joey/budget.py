"""The budget: what a verification of k tokens costs on this machine, and how much to draft.

Speculative decoding pays only while a step's extra cost stays below what its accepted tokens
save, and that cost is a property of the hardware: on a 2-core CPU a target forward of 16 tokens
costs ~2x one token, on a GPU 60 tokens cost about the same as one. So joey measures the curve
once per model, device, dtype and thread count (about two seconds, then cached in ``JOEY_CACHE``),
sizes draft trees from it, and each step picks the draft depth that maximises expected tokens per
second from the row's own acceptance so far (SpecDec++ / vLLM's dynamic speculation do the same),
falling back to no draft at all when drafting cannot pay.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from joey.batching import causal_mask
from joey.measurements import cpu_name, measured_once
from joey.models.llama import LlamaModel
from joey.models.weight_formats import low_bit_kernels_key

MEASURED_TOKENS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CONTEXT = 128  # cached tokens before the measured forward: a typical mid-generation state
SLACK = 0.3  # a tree may cost up to 30 % more to verify than one token ("nearly free")
PROBE_EVERY = 16  # steps without drafting before drafting is tried again
PROBE_DEPTH = 2  # draft depth of a probe after steps without drafting


@dataclass(frozen=True)
class CostCurve:
    """Median milliseconds of one target forward of k new tokens after ``CONTEXT`` cached ones."""

    tokens: tuple[int, ...]
    ms: tuple[float, ...]
    device: str
    dtype: str  # the weight format the curve was measured with (fp32, bf16, int8, int4, ...)
    threads: int

    def cost(self, k: int) -> float:
        """Interpolated ms for k tokens (linear between measured points, extrapolated past the last)."""
        ks, ms = self.tokens, self.ms
        if k <= ks[0]:
            return ms[0]
        for (k0, m0), (k1, m1) in zip(zip(ks, ms), zip(ks[1:], ms[1:])):
            if k <= k1:
                return m0 + (m1 - m0) * (k - k0) / (k1 - k0)
        slope = (ms[-1] - ms[-2]) / (ks[-1] - ks[-2])
        return ms[-1] + slope * (k - ks[-1])

    def ratio(self, k: int) -> float:
        return self.cost(k) / self.cost(1)

    def tree_nodes(self, slack: float = SLACK) -> int:
        """The largest number of draft tokens whose verification (with the pending token) costs at
        most ``1 + slack`` times a plain decoding step; at least 1."""
        nodes = 1
        for k in range(2, self.tokens[-1] + 1):
            if self.ratio(k) <= 1.0 + slack:
                nodes = k - 1
        return nodes


def measure(model: LlamaModel, tokens: Sequence[int] = MEASURED_TOKENS, repeats: int = 5) -> CostCurve:
    """Time one forward of k new tokens after ``CONTEXT`` cached (the median of ``repeats``, after warm-up)."""
    dev = model.device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.cfg.vocab_size - 1, (1, CONTEXT + max(tokens)), generator=gen).to(dev)
    cache = model.new_cache(1, CONTEXT + max(tokens))
    ms = []
    with torch.inference_mode():
        model(ids[:, :CONTEXT], torch.arange(CONTEXT, device=dev)[None], cache, 0, CONTEXT, None)
        for k in tokens:
            mask = None if k == 1 else causal_mask([CONTEXT], k, CONTEXT + k, dev)
            pos = torch.arange(CONTEXT, CONTEXT + k, device=dev)[None]
            times = []
            for i in range(repeats + 2):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(ids[:, CONTEXT : CONTEXT + k], pos, cache, CONTEXT, CONTEXT + k, mask)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 2:  # the first calls of a shape warm up its kernels
                    times.append(1000 * (time.perf_counter() - start))
            ms.append(statistics.median(times))
    # More tokens never cost less: a point above a later one was disturbed (another process on a
    # shared machine), so each point is capped by every later one.
    ms = [min(ms[i:]) for i in range(len(ms))]
    return CostCurve(tuple(tokens), tuple(ms), str(dev), model.weight_format, torch.get_num_threads())


def cached_curve(model: LlamaModel, model_key: str, cache_root: Path) -> CostCurve:
    """The cost curve of this model on this device/dtype/thread count, measured once and then read
    from ``cache_root/budget``. A corrupt or foreign cache file is measured again."""
    hw = cpu_name() if model.device.type == "cpu" else torch.cuda.get_device_name(model.device)
    kernels = model.weight_format if model.lm_head.kernel is not None else "plain"
    if "int" in kernels:
        kernels += "/" + low_bit_kernels_key()
    key = json.dumps([model_key, str(model.device), str(model.dtype), kernels, torch.get_num_threads(), hw,
                      MEASURED_TOKENS])

    def read(data: dict) -> CostCurve:
        d = data["curve"]
        return CostCurve(tuple(d["tokens"]), tuple(d["ms"]), d["device"], d["dtype"], d["threads"])

    return measured_once(cache_root, "budget", key, lambda: {"hardware": hw, "curve": asdict(measure(model))}, read)


def expected_tokens(drafted: Sequence[int], accepted: Sequence[int], depth: int) -> float:
    """Expected committed tokens of a step drafted ``depth`` deep, from a row's counts so far: the
    bonus plus, per depth, the observed rate at which accepted paths reached it, each with a prior
    worth two steps (one unlucky step does not rule a depth out). Depth 1's prior is 1/2. A path
    reaches depth d + 1 only through depth d, so a deeper level's prior is the level above times
    depth 1's rate (as if every level kept the first one's acceptance), and no rate exceeds the one
    above it. A flat prior of 1/2 for levels the budget has rarely drafted made it draft them: with
    depth 1 accepted half the time, every untried level looked worth half a token."""
    total, rate, first = 1.0, 1.0, 0.5
    for d in range(depth):
        n = drafted[d] if d < len(drafted) else 0
        a = accepted[d] if d < len(accepted) else 0
        prior = 0.5 if d == 0 else rate * first
        rate = min(rate, (a + 2 * prior) / (n + 2))
        if d == 0:
            first = rate
        total += rate
    return total


def best_depth(
    curve: CostCurve,
    drafted: Sequence[int],
    accepted: Sequence[int],
    max_depth: int,
    nodes_at: Sequence[int],
    draft_ms_per_depth: float,
    catch_up_ms: float = 0.0,
    scale: Callable[[bool], float] | None = None,
) -> int:
    """The draft depth (0 = no draft) with the most expected tokens per millisecond.

    ``nodes_at[d]``: draft tokens in a tree of depth d (d for a chain); a step drafted d deep costs
    d draft forwards plus verifying ``1 + nodes_at[d]`` tokens, plus ``catch_up_ms`` whatever its
    depth (a drafter with its own cache first reads the tokens committed while it did not draft);
    no draft costs one plain step. ``scale`` (a ``StepScale``) corrects the curve by what plain and
    drafted passes really took.
    """
    plain_scale, drafted_scale = (scale(False), scale(True)) if scale else (1.0, 1.0)
    best, best_rate = 0, 1.0 / (curve.cost(1) * plain_scale)
    for d in range(1, max_depth + 1):
        step_ms = catch_up_ms + d * draft_ms_per_depth + curve.cost(1 + nodes_at[d]) * drafted_scale
        rate = expected_tokens(drafted, accepted, d) / step_ms
        if rate > best_rate:
            best, best_rate = d, rate
    return best


class StepScale:
    """How much longer steps really take than the curve says for their token count: per-row
    attention over longer contexts, masks, packing, and a curve cached on a sibling host (a cloud
    "Xeon" names several CPUs; the 1.5B's cached step was 39 ms where the host's took 45). An
    exponential average of observed ÷ predicted milliseconds, kept apart for plain steps (every row
    feeds one token, no mask) and drafted steps (packed rows, a mask): only the second pay for
    packing and tree masks, and that difference is part of what a draft costs. Before a drafted step
    is seen it is priced like a plain one."""

    WEIGHT = 0.2  # of the newest observation; ~10 steps of memory

    def __init__(self) -> None:
        self._ratio: dict[bool, float] = {}

    def observe(self, drafted: bool, predicted_ms: float, observed_ms: float) -> None:
        ratio = observed_ms / predicted_ms
        old = self._ratio.get(drafted)
        self._ratio[drafted] = ratio if old is None else (1 - self.WEIGHT) * old + self.WEIGHT * ratio

    def __call__(self, drafted: bool) -> float:
        return self._ratio.get(drafted, self._ratio.get(False, 1.0))


def batch_depths(
    curve: CostCurve,
    caps: Sequence[int],
    forced: Sequence[bool],
    drafted: Sequence[Sequence[int]],
    accepted: Sequence[Sequence[int]],
    nodes_at: Sequence[int],
    draft_ms: Sequence[float | None],
    scale: Callable[[bool], float] | None = None,
    together: bool = False,
) -> list[int]:
    """Draft depths for the rows of one packed step (EMS-SD), each at most its ``cap`` (what
    ``best_depth`` chose for it alone); ``forced`` rows (probing, or not measured yet) keep theirs.

    A packed step is one target forward over every row's tokens, so a row's draft costs what its
    tokens add to the *whole* step (the curve at the batch's total), not what they would cost alone;
    at batch 8 on a 2-core CPU that can be several times more. Starting from no drafts (forced rows
    at theirs), a local search takes the move that raises the step's expected committed tokens per
    millisecond most (one row's depth up or down, or with ``together`` all rows up to a depth at
    once) while any does; so a batch drafts less or not at all where verification stops being
    cheap (vLLM and SGLang turn speculation down under load for the same reason). ``scale``
    (a ``StepScale``) corrects the curve by what this batch's plain and drafted steps really took.
    ``together``: rows draft together (one forward per depth for all), so drafting costs the
    deepest row's depths, not every row's one after another.
    """
    rows = len(caps)
    depths = [cap if force else 0 for cap, force in zip(caps, forced)]
    # each row's expected tokens at every depth it may take, once (the search scores many trials)
    expected = [[expected_tokens(dr, ac, d) for d in range(cap + 1)] for dr, ac, cap in zip(drafted, accepted, caps)]

    def rate(ds: list[int]) -> float:
        tokens = sum(row[d] for row, d in zip(expected, ds))
        ms = curve.cost(rows + sum(nodes_at[d] for d in ds)) * (scale(any(ds)) if scale else 1.0)
        costs = [d * (m or 0.0) for d, m in zip(ds, draft_ms)]
        ms += max(costs) if together else sum(costs)
        return tokens / ms

    best_rate = rate(depths)
    floor = list(depths)  # forced rows never go below their depth
    for _ in range(4 * rows * (max(caps, default=0) + 1)):  # a bound; each move raises the rate
        trials = [depths[:i] + [d] + depths[i + 1 :] for i in range(rows)
                  for d in range(floor[i], caps[i] + 1) if d != depths[i]]
        if together:  # drafting is shared: many rows drafting may pay where one alone does not
            trials += [[max(x, min(cap, d)) for x, cap in zip(depths, caps)] for d in range(1, max(caps) + 1)]
        scored = [(rate(t), t) for t in trials]
        top = max(scored, key=lambda st: st[0], default=None)
        if top is None or top[0] <= best_rate:
            break
        best_rate, depths = top
    return depths


def _average(old: float | None, new: float) -> float:
    """A running estimate of a draft depth's cost: mostly the past, a fifth the newest measurement."""
    return new if old is None else 0.8 * old + 0.2 * new


def count_by_depth(drafted: list[int], accepted: list[int], reached: int, kept: int) -> None:
    """Add one step to per-depth counts: the depths its draft ``reached``, and the ``kept`` first of
    them that its accepted path reached."""
    for d in range(reached):
        if d == len(drafted):
            drafted.append(0)
            accepted.append(0)
        drafted[d] += 1
        accepted[d] += d < kept


class RowPolicy:
    """One row's drafting record and the state of the depth decisions about it (``DepthPolicy``)."""

    def __init__(self, drafts: bool, catches_up: bool) -> None:
        self.drafts = drafts  # the row has a drafter
        self.catches_up = catches_up  # ... with state of its own (``Drafter.catches_up``)
        self.drafted: list[int] = []  # per draft depth: steps whose draft reached that depth
        self.accepted: list[int] = []  # ... and steps whose accepted path reached it
        # pseudo-counts per depth, from the rows before this one (DepthPolicy.join): what the budget
        # assumes about drafting for this request until its own steps say otherwise
        self.prior_drafted: list[float] = []
        self.prior_accepted: list[float] = []
        self.draft_ms: float | None = None  # running estimate of one draft depth's cost
        self.behind = 0  # tokens committed since the drafter last drafted: its next draft reads them first
        self.catch_up_ms: float | None = None  # running estimate of reading one such token
        self.idle = 0  # consecutive steps the budget chose not to draft
        self.probe_every = PROBE_EVERY  # idle steps before drafting again; doubles after each probe

    def evidence(self) -> tuple[list[float], list[float]]:
        """Drafted / accepted counts per depth for the budget: the row's own plus its prior."""
        n = max(len(self.drafted), len(self.prior_drafted))

        def add(own: list[int], prior: list[float]) -> list[float]:
            return [(own[d] if d < len(own) else 0) + (prior[d] if d < len(prior) else 0.0) for d in range(n)]

        return add(self.drafted, self.prior_drafted), add(self.accepted, self.prior_accepted)


class DepthPolicy:
    """How deep every row of a batch drafts, step by step, and what the decision learns from.

    Called once per step with the running rows (``choose``), then told what the drafts cost
    (``timed_drafts``), what each row's verification kept (``record``) and what the target pass
    took (``timed_pass``). It holds the per-batch state (the cost curve, the measured step scale, the batch's
    acceptance per depth and draft cost, from which a joining row starts: ``join``) and each row's
    ``RowPolicy``. ``curve`` None (``adaptive=False``) drafts every row at full depth.
    """

    PRIOR_STEPS = 8  # how many steps of the earlier rows' acceptance a new row starts with (0: none)
    # forced depth of a batched row's drafts until their cost is measured: alone, a row's first drafts
    # go full depth, which learns how deep drafts are accepted at the cost of a few verified tokens
    # (Jakiro at batch 1, Zen 4: 0.98x and 1.04x AR in two runs, against 0.95x and 1.00x when
    # shallow); in a batch every new row does so at once, in one packed step (8 PLD rows: 56 tokens,
    # ~3x a plain step, most of them rejected; 0.95x and 0.94x AR at batch 8, against 1.00x and 0.98x
    # shallow: single runs on a noisy host, each pair in the same direction)
    FIRST_DEPTH = PROBE_DEPTH

    def __init__(self, curve: CostCurve | None, max_draft: int, nodes_at: Sequence[int]) -> None:
        self.curve = curve
        self.max_draft = max_draft
        self.nodes_at = list(nodes_at)  # draft tokens of a tree of each depth (a chain: the depth)
        self.scale = StepScale()  # what this batch's steps really cost, against the curve
        # what drafting was worth for every row so far (per depth) and what a draft depth cost
        self.drafted: list[int] = []
        self.accepted: list[int] = []
        self.draft_ms: float | None = None
        self.catch_up_ms: float | None = None

    def join(self, row: RowPolicy) -> None:
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

    def row_draft_ms(self, row: RowPolicy) -> float | None:
        """What one draft depth costs this row: its own measurement, else the batch's (a row whose
        drafting has not been timed yet is priced like the others instead of drafting at full depth
        unpriced; in a large batch that would be every step of a row that rarely drafts)."""
        return row.draft_ms if row.draft_ms is not None else self.draft_ms

    def alone(self, row: RowPolicy, room: int, batched: bool = False) -> tuple[int, bool]:
        """How deep this row would draft this step alone, and whether that depth is forced: the most
        the budget expects to pay (``best_depth``); before a draft's cost is measured, the full depth,
        or ``FIRST_DEPTH`` for a row of a ``batched`` step; after a fallback to no draft, once more
        after ``PROBE_EVERY`` steps (then 2x, 4x, 8x as long while drafting keeps not paying) to
        measure acceptance again (all three forced). Without a curve (``adaptive=False``) always the
        full depth."""
        if not row.drafts or room <= 0:
            return 0, False
        if self.curve is None:
            return self.max_draft, True
        draft_ms = self.row_draft_ms(row)
        if draft_ms is None:
            return min(self.max_draft, self.FIRST_DEPTH) if batched else self.max_draft, True
        if row.idle >= row.probe_every:  # probes that keep failing come less and less often
            row.idle = 0
            row.probe_every = min(8 * PROBE_EVERY, 2 * row.probe_every)
            # shallow: a probe asks whether drafting pays again, and a deeper level is only tried once
            # the first ones are accepted (a full-depth probe of a 0.5B draft model cost ~3x a target
            # step and mostly failed where drafting did not pay)
            return min(self.max_draft, PROBE_DEPTH), True
        catch_up = row.catch_up_ms if row.catch_up_ms is not None else self.catch_up_ms
        depth = best_depth(self.curve, *row.evidence(), self.max_draft, self.nodes_at, draft_ms,
                           row.behind * (catch_up or 0.0), self.scale)
        row.idle = row.idle + 1 if depth == 0 else 0
        if depth:
            row.probe_every = PROBE_EVERY
        return depth, False

    def choose(self, rows: Sequence[RowPolicy], rooms: Sequence[int], together: bool) -> list[int]:
        """This step's draft depth for every row (``rooms``: the most each may draft); with several
        rows, each draft is priced at what it adds to the packed step (``batch_depths``)."""
        alone = [self.alone(row, room, len(rows) > 1) for row, room in zip(rows, rooms)]
        depths = [min(room, d) for room, (d, _) in zip(rooms, alone)]
        if len(rows) > 1 and self.curve is not None:
            evidence = [row.evidence() for row in rows]
            depths = batch_depths(self.curve, depths, [f for _, f in alone], [e[0] for e in evidence],
                                  [e[1] for e in evidence], self.nodes_at, [self.row_draft_ms(r) for r in rows],
                                  self.scale, together)
        return depths

    def timed_drafts(self, rows: Sequence[RowPolicy], deepest: Sequence[int], ms: float, together: bool) -> None:
        """What one ``propose_all`` call cost (``ms``) for rows whose drafts reached ``deepest``.

        Each row's ``draft_ms`` follows what one depth cost: the whole call ÷ the deepest draft for
        rows that draft together (they share each forward), the row's own share for drafters that go
        row by row. A step counts only when every drafting row has drafted before: a first draft
        also catches the drafter up on the whole prompt (a 769-token prompt made Jakiro's first
        measurement 115 ms a depth, ~150x a steady one, and the budget then never drafted again).
        Catching up on a few undrafted steps does count: it is what drafting again costs (leaving it
        out made jakiro+pld 0.77x batched AR at batch 16, against 0.88x with it). A drafter without
        state (``catches_up`` False: prompt lookup) is measured from its first step."""
        # a row with no drafted step yet (empty per-depth counts) is making its first draft
        steady = all(row.drafted for row, d in zip(rows, deepest) if d and row.catches_up)
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
        elif steady:
            for row, d in drafting:
                per_depth = ms / max(deepest) if together else ms / len(rows) / d
                row.draft_ms = _average(row.draft_ms, per_depth)
                self.draft_ms = _average(self.draft_ms, per_depth)
        for row, d in zip(rows, deepest):
            if d:
                row.behind = 0

    def record(self, row: RowPolicy, reached: int, kept: int, committed: int) -> None:
        """One row's verdict: its draft ``reached`` this depth, the accepted path ``kept`` that many
        draft tokens, and ``committed`` tokens were committed (a drafter with state reads those
        at its next draft when this step drafted nothing)."""
        count_by_depth(row.drafted, row.accepted, reached, kept)
        count_by_depth(self.drafted, self.accepted, reached, kept)
        if not reached and row.drafts and row.catches_up:
            row.behind += committed

    def timed_pass(self, rows: int, fed: int, ms: float) -> None:
        """A target pass over ``fed`` tokens for ``rows`` rows took ``ms``: the step scale learns
        from it (one row's steps too: its context and tree masks are not the curve's)."""
        if self.curve is not None:
            self.scale.observe(fed > rows, self.curve.cost(fed), ms)
