"""Spec-Bench's metrics as pure functions of plain numbers (unit-tested on hand-made values).

* tokens/s of a question = its new tokens summed over turns ÷ its wall time summed over turns;
* speedup of a method = mean of its per-question tokens/s ÷ mean of AR's over the same questions
  (a ratio of means, not a mean of ratios: Spec-Bench's definition);
* mean accepted tokens τ = committed tokens ÷ steps, the bonus token included (AR scores 1.00);
* acceptance by draft position, pooled over generations;
* agreement of two token sequences (for baselines whose tokens may legitimately differ).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    """min / median / max of a quantity measured once per repeat."""

    min: float
    median: float
    max: float


def tokens_per_s(new_tokens: Sequence[int], wall_times: Sequence[float]) -> float:
    """One question's speed: total new tokens over total wall time of its turns."""
    if len(new_tokens) != len(wall_times):
        raise ValueError("new_tokens and wall_times need one entry per turn")
    seconds = sum(wall_times)
    return sum(new_tokens) / seconds if seconds > 0 else 0.0


def speedup(method_speeds: Sequence[float], ar_speeds: Sequence[float]) -> float:
    """Mean per-question tokens/s of a method ÷ mean per-question tokens/s of AR (same questions)."""
    if len(method_speeds) != len(ar_speeds) or not ar_speeds:
        raise ValueError("speedup needs the same non-empty set of questions for the method and AR")
    ar = statistics.fmean(ar_speeds)
    return statistics.fmean(method_speeds) / ar if ar > 0 else 0.0


def mean_accepted_tokens(committed: Sequence[int], steps: Sequence[int]) -> float:
    """τ pooled over generations: all committed tokens ÷ all steps (= the mean of all accept lengths)."""
    total_steps = sum(steps)
    return sum(committed) / total_steps if total_steps > 0 else 0.0


def acceptance_by_position(drafted: Sequence[Sequence[int]], accepted: Sequence[Sequence[int]]) -> tuple[float, ...]:
    """Pool per-generation counts by draft depth into one rate per depth: all steps whose accepted
    path reached the depth ÷ all steps whose draft reached it (exact pooling, no weights)."""
    if len(drafted) != len(accepted):
        raise ValueError("drafted and accepted need one entry per generation")
    depth = max((len(d) for d in drafted), default=0)
    tried = [sum(d[i] for d in drafted if i < len(d)) for i in range(depth)]
    hits = [sum(a[i] for a in accepted if i < len(a)) for i in range(depth)]
    return tuple(h / t if t else 0.0 for h, t in zip(hits, tried))


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("spread of no values")
    return Spread(min(values), statistics.median(values), max(values))


def token_agreement(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> float:
    """Fraction of positions holding the same token, pooled over pairs of sequences (e.g. the turns
    of a question); each pair counts over its longer sequence, and empty sequences agree."""
    same = sum(sum(x == y for x, y in zip(a, b)) for a, b in pairs)
    positions = sum(max(len(a), len(b)) for a, b in pairs)
    return same / positions if positions else 1.0


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where the sequences differ (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
