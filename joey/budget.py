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

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch

from joey.batching import causal_mask
from joey.models.llama import LlamaModel
from joey.models.weight_formats import low_bit_kernels_key

MEASURED_TOKENS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CONTEXT = 128  # cached tokens before the measured forward: a typical mid-generation state
T = TypeVar("T")
SLACK = 0.3  # a tree may cost up to 30 % more to verify than one token ("nearly free")
PROBE_EVERY = 16  # steps without drafting before drafting is tried again
PROBE_DEPTH = 2  # draft depth of a probe after steps without drafting


def cpu_name() -> str:
    """The CPU's model name (for figures and cache keys); the platform's string where /proc lacks it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def measured_once(cache_root: Path, kind: str, key: str, measure: Callable[[], dict], read: Callable[[dict], T]) -> T:
    """``read`` of the record stored for ``key`` in ``cache_root/kind``; a missing, corrupt or
    foreign file (``read`` raising on it included) is measured again with ``measure`` and rewritten.
    For measurements of the machine that are worth doing once (cost curves, weight formats)."""
    path = cache_root / kind / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    try:
        data = json.loads(path.read_text())
        if data.get("key") == key:
            return read(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    data = {"key": key, **measure()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time
    return read(data)


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
) -> int:
    """The draft depth (0 = no draft) with the most expected tokens per millisecond.

    ``nodes_at[d]``: draft tokens in a tree of depth d (d for a chain); a step drafted d deep costs
    d draft forwards plus verifying ``1 + nodes_at[d]`` tokens, plus ``catch_up_ms`` whatever its
    depth (a drafter with its own cache first reads the tokens committed while it did not draft);
    no draft costs one plain step.
    """
    best, best_rate = 0, 1.0 / curve.cost(1)
    for d in range(1, max_depth + 1):
        step_ms = catch_up_ms + d * draft_ms_per_depth + curve.cost(1 + nodes_at[d])
        rate = expected_tokens(drafted, accepted, d) / step_ms
        if rate > best_rate:
            best, best_rate = d, rate
    return best


class StepScale:
    """How much longer a batch's steps really take than the batch-1 curve says for their token
    count: per-row attention over longer contexts, masks, packing. An exponential average of
    observed ÷ predicted milliseconds, kept apart for plain steps (every row feeds one token, no
    mask) and drafted steps (packed rows, a mask): only the second pay for packing, and that
    difference is part of what a draft costs a batch. Before a drafted step is seen it is priced
    like a plain one."""

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
