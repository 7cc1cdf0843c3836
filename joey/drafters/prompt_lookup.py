"""Prompt lookup decoding (PLD): training-free drafting by n-gram match in the context.

If the last n tokens occurred earlier in the prompt or the output, the tokens that followed that
earlier occurrence are proposed (longest n first, most recent match first). Strong on tasks that
copy from the input: summarization, retrieval QA, code editing.
"""

from __future__ import annotations

from joey.drafters.base import Proposal


class PromptLookupDrafter:
    """Proposes the continuation of the most recent earlier occurrence of the context's tail."""

    name = "pld"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        if max_tokens < 1:
            return Proposal.chain([])
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            tail = context[-n:]
            # scan backwards so the most recent earlier occurrence wins
            for start in range(len(context) - n - 1, -1, -1):
                if context[start : start + n] == tail:
                    follow = context[start + n : start + n + max_tokens]
                    if follow:
                        return Proposal.chain(follow)
        return Proposal.chain([])
