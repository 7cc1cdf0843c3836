"""The target model's passes for the step machine: a prefill, a verification pass, the padded baseline.

``TargetRunner`` builds the target's inputs for a batch of rows and picks the attention path: one
causal grid where every row feeds the same number of tokens, packed rows (``joey.batching.pack``,
EMS-SD: the dense layers see only real tokens) where they differ, attention row by row where a
padded grid would mostly compute padding, and the lock-step padded baseline. Self-speculative drafts
(Kangaroo) enter at the layer their states reached. Every pass returns final-norm features per row;
``logits`` runs the LM head once for a whole step. Which rows, which tokens and what to do with the
logits is the step machine's business (``joey.continuous``); this module only runs the target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from joey.batching import Lockstep, grid_positions, grid_slots, pack, row_mask, rows_pay_off, step_mask
from joey.drafters import Proposal
from joey.models.kv_cache import KVCache
from joey.models.llama import LlamaModel, RowSpan


class TargetRunner:
    """Runs ``model``'s forwards over a batch's KV cache; stateless between calls."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model

    def logits(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The LM head over several rows' features in one GEMM (the head is the largest weight of a
        small model): [n_i, hidden] each → [n_i, vocab] each (fp32)."""
        return list(self.model.head(torch.cat(list(features))).split([len(f) for f in features]))

    def prefill(
        self, cache: KVCache, prompts: Sequence[list[int]], padded: bool, split: int = 0
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the prompts in one forward, writing their K/V; each row's final-norm features
        [len(prompt), hidden] (at least: a right-padded row may carry its padding's after them),
        and, where ``split`` > 0, each row's hidden states after layer ``split`` (else none): a
        self-speculative drafter takes those and the first layers' K/V from this pass instead of
        recomputing them (the layers run in two stretches; the result is the same).

        Prompts of different lengths are packed like a ragged step (joey.batching): the dense
        layers see only real tokens and attention runs per row, so a batch of one long and many
        short prompts costs their sum, not the batch size times the longest; and each row's prefill
        is what it would be alone. The padded baseline right-pads them instead: causal attention
        alone is right then, since a real token never sees a later slot and the padding's K/V lie
        past the row's length (holes the baseline masks from then on). The cache's lengths are
        advanced by the prompts'.
        """
        model, device = self.model, self.model.device
        lengths = [len(p) for p in prompts]
        t = max(lengths)
        shallow: list[torch.Tensor] = []
        if padded or all(n == t for n in lengths):  # one shape: a plain causal forward
            tokens = torch.tensor([p + [0] * (t - len(p)) for p in prompts], device=device)
            positions = torch.arange(t, device=device).expand(len(prompts), t)
            x = model.embed(tokens)
            if split:
                x = model.run_layers(x, positions, cache, 0, t, None, 0, split)
                shallow = list(x)
            features = list(model.forward_from(x, positions, cache, 0, t, None, split, head=False))
        else:  # attention row by row, each prompt against itself only: Σ n², not rows × longest²
            inputs = torch.tensor([tok for p in prompts for tok in p], device=device)
            positions = torch.cat([torch.arange(n, device=device) for n in lengths])
            spans = [RowSpan(n, cache.row(b), 0, n, None) for b, n in enumerate(lengths)]
            x = model.embed(inputs)
            if split:
                x = model.run_layers_rows(x, positions, spans, 0, split)
                shallow = list(x.split(lengths))
            x = model.run_layers_rows(x, positions, spans, split)
            features = list(model.model.norm(x).split(lengths))
        cache.advance(lengths)
        return features, shallow

    def verify(
        self, cache: KVCache, pending: Sequence[int], proposals: Sequence[Proposal], lockstep: Lockstep | None
    ) -> list[torch.Tensor]:
        """One target forward over each row's pending token followed by its draft; returns each
        row's final-norm features [1 + len(draft), hidden]. The cache's lengths are the caller's to
        advance (only the accepted tokens stay).

        When rows feed different numbers of tokens they are packed (joey.batching): the dense
        layers run on exactly the real tokens, with no padding; where rows' lengths differ so much
        that a padded attention grid would mostly compute padding, attention runs row by row
        (``rows_pay_off``). In the padded baseline (``lockstep``) they are padded to the longest
        instead, and attention skips the cache's holes.
        """
        model, device = self.model, self.model.device
        lengths = cache.lengths
        counts = [1 + len(p) for p in proposals]
        parents = [p.parents for p in proposals]
        t = max(counts)
        kv_len = max(lengths) + t
        # Self-speculative drafts (Kangaroo) come with their layer-l states: the target runs only
        # layers [l, L) on them. Every row of a batch uses the same drafter, so all or none do.
        layer = proposals[0].start_layer if proposals[0].hidden is not None else 0
        if lockstep is not None:
            return self._padded(cache, pending, proposals, layer, lockstep)
        uniform = all(n == lengths[0] for n in lengths)
        # joey's C attention takes every row in one call, each scanning only its own slots; other
        # attention computes a padded grid, which rows of very different lengths mostly waste
        ragged = model.ragged_attention
        by_rows = not ragged and rows_pay_off(lengths, counts)
        if by_rows or any(c != t for c in counts) or (ragged and not uniform):
            packing = pack(lengths, counts, device, parents)
            if layer:
                inputs = torch.cat([prop.hidden for prop in proposals])
            else:
                inputs = torch.tensor([tok for p, prop in zip(pending, proposals) for tok in (p, *prop.tokens)])
            inputs = inputs.to(device)
            if by_rows:  # attention row by row, each against its own length
                spans = [RowSpan(c, cache.row(b), n, n + c, row_mask(n, c, p, device))
                         for b, (n, c, p) in enumerate(zip(lengths, counts, parents))]
                hidden = inputs if layer else model.embed(inputs)
                x = model.run_layers_rows(hidden, packing.positions, spans, start=layer)
                return list(model.model.norm(x).split(counts))
            mask = step_mask(lengths, t, kv_len, parents, device)
            features = model.forward_packed(inputs, cache, packing, kv_len, mask, layer, False)
            return list(features.split(counts))
        positions = grid_positions(lengths, t, parents, device)
        slots = lengths[0] if uniform else grid_slots(lengths, t, device)
        # plain decoding: the one new token may see every cached slot, no mask needed
        mask = None if uniform and t == 1 else step_mask(lengths, t, kv_len, parents, device)
        if layer:
            hidden = torch.stack([prop.hidden for prop in proposals])
        else:
            tokens = [[p, *prop.tokens] for p, prop in zip(pending, proposals)]
            hidden = model.embed(torch.tensor(tokens, device=device))
        return list(model.forward_from(hidden, positions, cache, slots, kv_len, mask, layer, head=False))

    def _padded(
        self, cache: KVCache, pending: Sequence[int], proposals: Sequence[Proposal], layer: int, lockstep: Lockstep
    ) -> list[torch.Tensor]:
        """``verify`` of the padded baseline: every row's tokens padded to the longest (the padding
        repeats the pending token, or zero states for a self-speculative draft), written from the
        shared cache length; returns only the real tokens' features."""
        model = self.model
        counts = [1 + len(p) for p in proposals]
        t, width = max(counts), lockstep.width
        if width + t > cache.max_len:  # holes use slots: grow by half again, not per step
            cache.grow(width + t + cache.max_len // 2)
            lockstep.grow(cache.max_len)
        positions, mask = lockstep.step(counts, [p.parents for p in proposals])
        if layer:
            hidden = torch.stack([torch.cat([p.hidden, p.hidden.new_zeros(t - len(p.hidden), p.hidden.shape[1])])
                                  for p in proposals])
        else:
            tokens = [[tok, *p.tokens] + [tok] * (t - 1 - len(p)) for tok, p in zip(pending, proposals)]
            hidden = model.embed(torch.tensor(tokens, device=model.device))
        features = model.forward_from(hidden, positions, cache, width, width + t, mask, layer, head=False)
        return [f[:n] for f, n in zip(features, counts)]
