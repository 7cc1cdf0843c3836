"""Classic speculative sampling with a separate, smaller draft model that shares the tokenizer
(Leviathan et al. 2023; Chen et al. 2023). The draft model keeps its own KV cache per row, reused
across steps up to the longest prefix it shares with the committed context. The rows of a batch
draft together (``propose_batch``): each draft position is one forward of the draft model over the
packed new tokens of every row still drafting, attention per row against the row's own cache."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch

from joey.batching import prefix_causal_mask
from joey.config import SamplingParams
from joey.drafters.base import BatchedDrafter, Proposal, common_prefix
from joey.models.llama import LlamaModel, RowSpan
from joey.sampling import draw, probabilities


@dataclass(frozen=True)
class _Feed:
    """One row's share of a draft forward: tokens to append to its drafter's cache."""

    drafter: DraftModelDrafter
    tokens: tuple[int, ...]


PROMPT_WINDOW = 256  # prompt tokens the draft model reads (the last ones)


class DraftModelDrafter(BatchedDrafter):
    """Drafts a chain token by token with a small model; one instance per sequence.

    The draft model reads only the last ``PROMPT_WINDOW`` tokens of a long prompt: its prefill is
    paid by every request whether drafting then pays or not (Qwen2.5-Coder-0.5B drafting for the
    1.5B lost most on the long prompts of Spec-Bench's summarization and rag questions), and drafts
    from a shorter context only change what is proposed, never what is committed. RoPE makes the cut
    invisible to attention (positions count from the window's start)."""

    name = "sps"

    def __init__(
        self, model: LlamaModel, params: SamplingParams, generator: torch.Generator | None, max_len: int
    ) -> None:
        self.model = model
        self.params = params
        self.generator = generator
        self.cache = model.new_cache(1, max_len)
        self.cached: list[int] = []  # the tokens whose K/V are in self.cache, in order
        self.start: int | None = None  # where in the context self.cache starts (set by the first draft)

    @property
    def shared(self) -> LlamaModel:
        """The draft model (rows drafted together share it). This drafter draws chains: ``max_nodes`` is ignored."""
        return self.model

    def _steps(
        self, context: list[int], max_tokens: int, max_nodes: int | None
    ) -> Generator[_Feed, torch.Tensor, Proposal]:
        """This row's drafting: yields the tokens to feed, receives the logits after the last one [vocab]."""
        if max_tokens < 1:
            return Proposal.chain([])
        if self.start is None:
            self.start = max(0, len(context) - PROMPT_WINDOW)
        position = len(context)  # of the first draft token in the sequence: what keys its draw
        context = context[self.start:]
        common = min(common_prefix(self.cached, context), len(context) - 1)  # always feed the last token
        self.cache.truncate([common])
        del self.cached[common:]
        logits = yield _Feed(self, tuple(context[common:]))
        tokens: list[int] = []
        dists: list[torch.Tensor] = []
        for i in range(max_tokens):
            if self.params.greedy:
                tok = int(logits.argmax())
            else:
                q = probabilities(logits[None], self.params)  # [1, vocab]
                # the target's keyed uniform for this position: the draft is coupled to its choice
                tok = int(draw(q, self.params, [position + i], self.generator)[0])
                dists.append(q[0])
            tokens.append(tok)
            if i + 1 < max_tokens:
                logits = yield _Feed(self, (tok,))
        return Proposal.chain(tokens, torch.stack(dists) if dists else None)

    @staticmethod
    def _run(feeds: list[_Feed]) -> list[torch.Tensor]:
        """One draft-model forward over every row's new tokens, packed; appends them to the rows'
        caches → each row's logits after its last token [vocab]."""
        model = feeds[0].drafter.model
        dev = model.device
        spans, positions, last = [], [], []
        for f in feeds:
            n, t = f.drafter.cache.lengths[0], len(f.tokens)
            spans.append(RowSpan(t, f.drafter.cache, n, n + t, prefix_causal_mask(n, t, dev)))
            positions.extend(range(n, n + t))
            last.append(len(positions) - 1)
        tokens = torch.tensor([t for f in feeds for t in f.tokens], device=dev)
        h = model.run_layers_rows(model.embed(tokens), torch.tensor(positions, device=dev), spans)
        logits = model.logits(h[torch.tensor(last, device=dev)])  # [rows, vocab]: only what is sampled from
        for f in feeds:
            f.drafter.cache.advance([len(f.tokens)])
            f.drafter.cached.extend(f.tokens)
        return list(logits)
