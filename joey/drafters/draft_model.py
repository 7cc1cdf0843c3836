"""Classic speculative sampling with a separate, smaller draft model that shares the tokenizer
(Leviathan et al. 2023; Chen et al. 2023). The draft model keeps its own KV cache, reused across
steps up to the longest prefix it shares with the committed context."""

from __future__ import annotations

import torch

from joey.batching import prefix_causal_mask
from joey.config import SamplingParams
from joey.drafters.base import Proposal, common_prefix
from joey.models.llama import LlamaModel
from joey.sampling import probabilities, sample


class DraftModelDrafter:
    """Drafts a chain token by token with a small model; one instance per sequence."""

    name = "sps"

    def __init__(
        self, model: LlamaModel, params: SamplingParams, generator: torch.Generator | None, max_len: int
    ) -> None:
        self.model = model
        self.params = params
        self.generator = generator
        self.cache = model.new_cache(1, max_len)
        self.cached: list[int] = []  # the tokens whose K/V are in self.cache, in order

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        """Append tokens to the draft cache; return the logits after the last one, [vocab]."""
        n = self.cache.lengths[0]
        dev = self.model.lm_head.weight.device
        x = torch.tensor([tokens], device=dev)
        pos = torch.arange(n, n + len(tokens), device=dev)[None]
        mask = prefix_causal_mask(n, len(tokens), dev)
        logits = self.model(x, pos, self.cache, n, n + len(tokens), mask)
        self.cache.advance([len(tokens)])
        self.cached.extend(tokens)
        return logits[0, -1]

    def propose(self, context: list[int], max_tokens: int, max_nodes: int | None = None) -> Proposal:
        """A chain of up to ``max_tokens`` (this drafter does not build trees; ``max_nodes`` is ignored)."""
        if max_tokens < 1:
            return Proposal.chain([])
        common = min(common_prefix(self.cached, context), len(context) - 1)  # always feed the last token
        self.cache.truncate([common])
        del self.cached[common:]
        logits = self._feed(context[common:])
        tokens: list[int] = []
        dists: list[torch.Tensor] = []
        for i in range(max_tokens):
            if self.params.greedy:
                tok = int(logits.argmax())
            else:
                q = probabilities(logits[None], self.params)  # [1, vocab]
                tok = int(sample(q, self.generator))
                dists.append(q[0])
            tokens.append(tok)
            if i + 1 < max_tokens:
                logits = self._feed([tok])
        return Proposal.chain(tokens, torch.stack(dists) if dists else None)
