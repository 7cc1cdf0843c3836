"""The one Drafter protocol: drafters only propose; they never accept, reject or touch the
target's KV cache. Acceptance lives in ``joey.verify`` for every drafter alike.

Drafting a batch: ``propose_all`` asks every row's drafter at once. A drafter class with a
``propose_batch`` classmethod drafts all its rows together, one forward per draft depth for every
row still drafting (``draft_in_rounds``), each row keeping its own caches and state.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch


@dataclass(frozen=True)
class Proposal:
    """Draft tokens for one sequence.

    ``parents[i]`` is the index of token i's parent in ``tokens`` (-1 = the last committed token),
    so a chain has parents ``[-1, 0, 1, ...]`` and a tree may branch. ``draft_probs`` holds the
    distribution each token was *sampled from* ([num_tokens, vocab]); None for a deterministic
    drafter (prompt lookup, greedy drafting), which verification treats as a point mass.

    A self-speculative drafter (Kangaroo) has already run the target's layers [0, start_layer) on
    the pending token and the drafts: ``hidden`` holds those states ([1 + num_tokens, hidden]) and
    verification runs only the remaining layers on them.
    """

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    draft_probs: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    start_layer: int = 0

    @classmethod
    def chain(cls, tokens: list[int], draft_probs: torch.Tensor | None = None) -> Proposal:
        return cls(tuple(tokens), tuple(range(-1, len(tokens) - 1)), draft_probs)

    def __len__(self) -> int:
        return len(self.tokens)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest shared prefix: how much of a drafter's cache still fits the context."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Drafter:
    """Anything that can guess the next tokens of a sequence: the one base of every drafter, whose
    flags tell the step machine how to treat it (the defaults fit a drafter with its own state that
    needs nothing from the target)."""

    name: str = "drafter"
    # True for a drafter that runs the target's own first layers in its place (Kangaroo): it must be
    # asked every step, even to draft nothing, because the target's cache lacks those layers
    self_speculative: bool = False
    # True for a drafter that reads the target's final-norm features of committed tokens (Jakiro):
    # the engine then calls ``observe`` with the features of every token it commits, in order
    # (the prompt's after the prefill; the pending token's and the accepted path's after each step)
    wants_features: bool = False
    # True for a drafter with state of its own (caches, features) that a draft after undrafted steps
    # first brings up to date: that call's time is no measure of a draft depth's cost. A stateless
    # drafter (prompt lookup) is False: every call it makes measures what it costs
    catches_up: bool = True
    # > 0 for a self-speculative drafter that takes the prompt's first ``prompt_layer`` layers from
    # the target's prefill (``take_prompt``) rather than running them again at its first draft
    prompt_layer: int = 0

    def observe(self, features: torch.Tensor) -> None:
        """Features [n, hidden] of the next n committed tokens (called only if ``wants_features``)."""

    def take_prompt(self, prompt: list[int], states: torch.Tensor, cache: Any, row: int) -> None:
        """After the prefill (called only if ``prompt_layer`` > 0): the prompt's hidden states after
        layer ``prompt_layer`` ([len(prompt), hidden] at least) and the target ``cache`` (a
        ``KVCache``) whose row ``row`` now holds every layer's K/V of the prompt; a drafter reads
        them, it never writes there."""

    def hand_back(self, cache: Any, row: int, context: list[int]) -> None:
        """Before a step in which the target decodes this row alone, all its layers (the wall-clock
        gate closed drafting): a self-speculative drafter writes into row ``row`` of the batch's
        target ``cache`` (a ``KVCache``) the first layers' K/V it holds for ``context``'s committed
        tokens, which the target's cache lacks. Other drafters have nothing to hand back."""

    def propose(self, context: list[int], max_tokens: int, max_nodes: int | None = None) -> Proposal:
        """Propose tokens to follow ``context`` (prompt + committed tokens): no path deeper than
        ``max_tokens``, at most ``max_nodes`` tokens in all (None: ``max_tokens``, a chain's worth).

        A tree drafter may keep per-node state between calls (its own caches): the next call's
        context tells which path the target committed."""
        raise NotImplementedError


Request = TypeVar("Request")
Result = TypeVar("Result")


def draft_in_rounds(
    rows: Sequence[Generator[Request, Result, Proposal]], run: Callable[[list[Request]], list[Result]]
) -> list[Proposal]:
    """Drive several rows' drafting together. Each row's drafting is a generator that yields the
    draft forward it needs next (a request), receives that forward's result and finally returns
    the row's proposal. Each round, the requests of every row still drafting go to ``run`` as one
    list (one batched forward), whose results go back to the rows in order; a row whose drafting
    stopped (confidence stop, its depth reached, depth 0) yields nothing more and drops out."""
    proposals: list[Proposal | None] = [None] * len(rows)
    waiting: dict[int, Request] = {}

    def resume(i: int, result: Result | None) -> None:
        try:
            waiting[i] = rows[i].send(result)  # type: ignore[arg-type]  # None starts a generator
        except StopIteration as done:
            proposals[i] = done.value

    for i in range(len(rows)):
        resume(i, None)
    while waiting:
        order = list(waiting)
        results = run([waiting.pop(i) for i in order])
        for i, result in zip(order, results):
            resume(i, result)
    return proposals  # type: ignore[return-value]  # every row has returned


class BatchedDrafter(Drafter):
    """A drafter whose rows draft together: ``propose`` is ``propose_batch`` of one row, so a row
    alone and a batch run one code path. A subclass gives ``shared`` (what its draft forwards run
    on; the rows of one batch must share it), ``_steps`` (one row's drafting: a generator of the
    draft forwards it needs, returning its proposal) and ``_run`` (one packed forward for a list
    of such requests)."""

    @property
    def shared(self) -> object:
        raise NotImplementedError

    def _steps(self, context: list[int], max_tokens: int, max_nodes: int | None) -> Generator[Any, Any, Proposal]:
        raise NotImplementedError

    @staticmethod
    def _run(requests: list[Any]) -> list[Any]:
        raise NotImplementedError

    def propose(self, context: list[int], max_tokens: int, max_nodes: int | None = None) -> Proposal:
        """``Drafter.propose``: this row alone."""
        return self.propose_batch([self], [context], [max_tokens], max_nodes)[0]

    @classmethod
    def propose_batch(
        cls, drafters: Sequence[BatchedDrafter], contexts: Sequence[list[int]], max_tokens: Sequence[int],
        max_nodes: int | None,
    ) -> list[Proposal]:
        """``propose`` for every row; each draft forward runs once for all rows still drafting."""
        if any(d.shared is not drafters[0].shared for d in drafters):
            raise ValueError(f"rows drafted together must share one {type(drafters[0].shared).__name__}")
        steps = [d._steps(c, k, max_nodes) for d, c, k in zip(drafters, contexts, max_tokens)]
        return draft_in_rounds(steps, cls._run)


def drafts_together(drafters: Sequence[Drafter | None]) -> bool:
    """Whether ``propose_all`` drafts these rows together (one forward per depth for all of them)."""
    kind = type(drafters[0]) if drafters else None
    return getattr(kind, "propose_batch", None) is not None and all(type(d) is kind for d in drafters)


def propose_all(
    drafters: Sequence[Drafter], contexts: Sequence[list[int]], max_tokens: Sequence[int], max_nodes: int | None
) -> list[Proposal]:
    """Every row's proposal (``Drafter.propose`` of row i with ``contexts[i]``, ``max_tokens[i]``):
    batched by the drafters' ``propose_batch`` when all rows have drafters of one class that has
    one, else row by row."""
    if not drafters:
        return []
    if drafts_together(drafters):
        return type(drafters[0]).propose_batch(list(drafters), list(contexts), list(max_tokens), max_nodes)
    return [d.propose(c, k, max_nodes) for d, c, k in zip(drafters, contexts, max_tokens)]
