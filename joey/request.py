"""A request while it is decoded, and what it streams: the public row type of the step machine.

``Request`` holds one sequence's prompt, settings, committed tokens and text, its drafter and its
drafting record (``joey.budget.RowPolicy``); ``ContinuousBatch`` schedules requests, and the server
and the tests may read them (``ContinuousBatch.active`` / ``.waiting``). A request applies its own
end conditions (``commit``): an end-of-sequence token, a stop string, its length.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Hashable
from dataclasses import dataclass, replace
from enum import StrEnum

import torch

from joey.budget import RowPolicy
from joey.config import Generation, GenerationStats, SamplingParams
from joey.detokenize import IncrementalText
from joey.drafters import Drafter
from joey.errors import InvalidArgumentError, PromptError


class FinishReason(StrEnum):
    """Why a request ended (a string: ``"stop"`` == FinishReason.STOP, as OpenAI's API spells them)."""

    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_new_tokens, or the model's context
    CANCELLED = "cancelled"  # ContinuousBatch.cancel (a client that went away)
    ERROR = "error"  # the request's own work failed; its last event carries the exception


@dataclass(frozen=True)
class StreamEvent:
    """A piece of output for one request; its last event carries its ``Generation`` (or, when the
    request failed, ``error``: the exception, and no generation)."""

    row: Hashable  # the key the request was added with
    text: str  # new text since the previous event of this request
    token_ids: tuple[int, ...]  # tokens committed in this event
    generation: Generation | None = None
    error: Exception | None = None
    draft_tokens: int = 0  # draft tokens this request's step proposed (0: a plain step, or the prefill)
    accepted: int = 0  # of which the target accepted (the accepted path's length)

    @property
    def last(self) -> bool:
        return self.generation is not None or self.error is not None


class Request:
    """One sequence being generated: its inputs, its output so far and its bookkeeping."""

    def __init__(
        self,
        key: Hashable,
        prompt_ids: list[int],
        params: SamplingParams,
        generator: torch.Generator | None,
        max_new: int,
        detok: IncrementalText,
    ) -> None:
        self.key = key  # what its events are labelled with (``StreamEvent.row``)
        self.prompt_ids = prompt_ids
        self.params = params
        self.generator = generator  # rejection sampling's stateful draws (None unless params.rejection)
        self.max_new = max_new  # most new tokens: the request's max, or what the context leaves
        self.new_ids: list[int] = []
        self.detok = detok
        self.start = time.perf_counter()
        self.first_token_s = 0.0  # set when the first token is committed
        self.finish_reason: FinishReason | None = None
        self.pending: int | None = None  # committed token whose K/V is not in the cache yet
        self.drafter: Drafter | None = None
        self.policy = RowPolicy(False, False)  # its drafting record; set again with its drafter
        self.steps = 0
        self.draft_tokens = 0
        self.draft_time = 0.0
        self.verify_time = 0.0

    @classmethod
    def new(cls, key: Hashable, prompt_ids: list[int], params: SamplingParams, engine) -> Request:
        """A request for ``engine`` (joey.engine.Engine), its prompt checked: token ids inside the
        vocabulary, shorter than the context. A request without a seed gets a random one here,
        reported in its result, so any output can be reproduced."""
        if not isinstance(prompt_ids, (list, tuple)) or not all(isinstance(t, int) for t in prompt_ids):
            raise InvalidArgumentError("prompt_ids must be a list of token ids (ints); Engine.encode makes one")
        if not prompt_ids:
            raise PromptError("the prompt is empty")
        vocab = engine.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidArgumentError(f"prompt_ids holds a token id outside the vocabulary [0, {vocab})")
        context = engine.context_length
        if len(prompt_ids) >= context:
            raise PromptError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {context}")
        if params.seed is None:
            params = replace(params, seed=secrets.randbits(63))
        generator = None
        if params.rejection and not params.greedy:  # rejection sampling's stateful draws
            generator = torch.Generator(device=engine.device)
            generator.manual_seed(params.seed)
        max_new = min(params.max_new_tokens, context - len(prompt_ids))
        return cls(key, list(prompt_ids), params, generator, max_new, IncrementalText(engine.tokenizer, params.stop))

    def set_drafter(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self.policy = RowPolicy(True, drafter.catches_up)

    @property
    def context(self) -> list[int]:
        """Prompt and committed tokens: what a drafter drafts after."""
        return self.prompt_ids + self.new_ids

    @property
    def room(self) -> int:
        """The most tokens a step may draft for it: the bonus token always comes on top of a draft."""
        return self.max_new - len(self.new_ids) - 1

    def commit(self, tokens: list[int], eos_ids: frozenset[int], method: str) -> StreamEvent:
        """Append tokens, applying end-of-sequence, stop strings and length; the event to stream
        (the last one, with the ``Generation``, when the request ends here)."""
        kept: list[int] = []
        for tok in tokens:
            if tok in eos_ids and not self.params.ignore_eos:
                self.finish_reason = FinishReason.STOP
                break
            kept.append(tok)
            if len(self.new_ids) + len(kept) >= self.max_new:
                self.finish_reason = FinishReason.LENGTH
                break
        if not self.first_token_s:
            self.first_token_s = time.perf_counter() - self.start
        self.new_ids.extend(kept)
        text = self.detok.push(kept) if kept else ""
        if self.detok.stopped:
            self.finish_reason = FinishReason.STOP
        if self.finish_reason is None:
            return StreamEvent(self.key, text, tuple(kept))
        return self.finish(self.finish_reason, method, text + self.detok.finish(), tuple(kept))

    def finish(self, reason: FinishReason, method: str, text: str = "", kept: tuple[int, ...] = ()) -> StreamEvent:
        """End the request: its last event, with the ``Generation``."""
        self.finish_reason = reason
        gen = Generation(
            text=self.detok.text,
            token_ids=tuple(self.new_ids),
            prompt_tokens=len(self.prompt_ids),
            new_tokens=len(self.new_ids),
            wall_time_s=time.perf_counter() - self.start,
            finish_reason=reason,
            method=method,
            stats=self.stats(),
            seed=self.params.seed,
            first_token_s=self.first_token_s,
        )
        return StreamEvent(self.key, text, kept, gen)

    def fail(self, exc: Exception) -> StreamEvent:
        """End the request with an error: its last event carries the exception."""
        self.finish_reason = FinishReason.ERROR
        return StreamEvent(self.key, "", (), None, exc)

    def stats(self) -> GenerationStats:
        return GenerationStats(
            steps=self.steps,
            mean_accepted_tokens=len(self.new_ids) / self.steps if self.steps else 1.0,
            drafted_by_depth=tuple(self.policy.drafted),
            accepted_by_depth=tuple(self.policy.accepted),
            draft_tokens=self.draft_tokens,
            draft_time_s=self.draft_time,
            verify_time_s=self.verify_time,
        )
