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


def acceptance_by_position(rates: Sequence[Sequence[float]], weights: Sequence[float]) -> tuple[float, ...]:
    """Pool per-generation acceptance rates by draft position into one rate per position.

    Each generation reports only its rates, not how many drafts it made at each position, so the
    rates are averaged with a weight per generation (its number of steps, the best available proxy
    for its number of drafts); a generation counts only at the positions it drafted.
    """
    if len(rates) != len(weights):
        raise ValueError("rates and weights need one entry per generation")
    depth = max((len(r) for r in rates), default=0)
    pooled = []
    for i in range(depth):
        pairs = [(r[i], w) for r, w in zip(rates, weights) if i < len(r) and w > 0]
        total = sum(w for _, w in pairs)
        pooled.append(sum(r * w for r, w in pairs) / total if total > 0 else 0.0)
    return tuple(pooled)


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
