"""Kangaroo: self-speculative drafting with the target's first layers plus a trained adapter, and
a confidence-based early stop (arXiv 2404.18911).

A draft token costs layers [0, l) of the target, the adapter and the draft-vocabulary LM head.
Drafting of a step stops after ``max_tokens`` tokens or as soon as the draft's top-1 probability
falls below ``threshold`` (that token is still proposed: it is cheap to verify and often right).

The proposal carries the layer-l hidden states of [pending token, draft tokens], so the target's
verification pass runs only layers [l, L): the shallow layers are never recomputed. This drafter
keeps its own KV cache for layers [0, l) (they are the target's own layers, so those entries are
exactly what the target would compute) and one for the adapter; the target's cache is never
touched. Both are rolled back to the longest prefix shared with the committed context, so a step
after a fully accepted draft feeds the adapter two positions (the last draft, which the adapter has
not seen yet, and the bonus token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from joey.config import SamplingParams
from joey.drafters.base import Proposal, common_prefix
from joey.models.adapter import KangarooAdapter
from joey.models.kv_cache import KVCache
from joey.models.llama import LlamaModel, pack_weight, packed_linear, prefix_causal_mask
from joey.sampling import probabilities, sample

DEFAULT_THRESHOLD = 0.6


@dataclass(frozen=True)
class KangarooDraft:
    """What every row's drafter shares: the target, its adapter and the draft-vocabulary head."""

    model: LlamaModel
    adapter: KangarooAdapter
    head: torch.Tensor  # [draft_vocab, hidden] rows of the target's LM head
    packed_head: torch.Tensor | None  # the same, pre-packed for oneDNN (fp32 CPU)

    @classmethod
    def build(cls, model: LlamaModel, adapter: KangarooAdapter) -> KangarooDraft:
        head = model.lm_head.weight.detach()[adapter.vocab].contiguous()
        packed = None
        if head.device.type == "cpu" and head.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            packed = pack_weight(head)
        return cls(model, adapter, head, packed)

    @property
    def exit_layer(self) -> int:
        return self.adapter.exit_layer

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Normalised adapter states [N, hidden] → draft logits over the draft vocabulary [N, draft_vocab]."""
        if self.packed_head is not None:
            return packed_linear(states, self.packed_head, None).float()
        return (states @ self.head.T).float()


class KangarooDrafter:
    """Drafts a chain for one sequence; one instance per row of a batch."""

    name = "kangaroo"

    def __init__(
        self,
        draft: KangarooDraft,
        params: SamplingParams,
        generator: torch.Generator | None,
        max_len: int,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> None:
        self.draft = draft
        self.params = params
        self.generator = generator
        self.threshold = threshold
        model = draft.model
        cfg = model.cfg
        w = model.lm_head.weight
        self.shallow = KVCache(
            draft.exit_layer, 1, cfg.num_kv_heads, max_len, cfg.head_dim, dtype=w.dtype, device=w.device
        )
        self.adapter_cache = draft.adapter.new_cache(1, max_len)
        # the layer-l state of every position: the adapter's input and the verification's input
        self.hidden = torch.zeros(max_len, cfg.hidden_size, dtype=w.dtype, device=w.device)
        self.cached: list[int] = []  # tokens whose shallow K/V and layer-l state are stored
        self.adapted: list[int] = []  # tokens whose adapter K/V are stored (a prefix of ``cached``)

    def _positions(self, start: int, n: int) -> torch.Tensor:
        return torch.arange(start, start + n, device=self.hidden.device)[None]  # [1, n]

    def _shallow(self, tokens: list[int], start: int) -> None:
        """Layers [0, l) on tokens at positions start..; stores their K/V and layer-l states."""
        n = len(tokens)
        model = self.draft.model
        x = model.embed(torch.tensor([tokens], device=self.hidden.device))
        mask = prefix_causal_mask(start, n, x.device)
        positions = self._positions(start, n)
        h = model.run_layers(x, positions, self.shallow, start, start + n, mask, 0, self.draft.exit_layer)
        self.hidden[start : start + n] = h[0]

    def _adapt(self, start: int, end: int) -> torch.Tensor:
        """The adapter on the stored states of positions [start, end) → draft logits of the last one."""
        n = end - start
        cos, sin = self.draft.model.rope(self._positions(start, n))
        mask = prefix_causal_mask(start, n, cos.device)
        out = self.draft.adapter(self.hidden[start:end], (1, n), cos, sin, self.adapter_cache, start, end, mask)
        return self.draft.logits(out[-1:])[0]

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        n = len(context)
        # Shallow K/V: keep the prefix shared with the committed context; the last context token
        # (the pending one) is always recomputed, since verification needs its layer-l state.
        s = min(common_prefix(self.cached, context), n - 1)
        self._shallow(context[s:], s)
        a = min(common_prefix(self.adapted, context), s, n - 1)
        self.cached = list(context)
        if max_tokens < 1:
            self.adapted = self.adapted[:a]
            hidden = self.hidden[n - 1 : n].clone()
            return Proposal(tokens=(), parents=(), hidden=hidden, start_layer=self.draft.exit_layer)
        logits = self._adapt(a, n)
        vocab = self.draft.adapter.vocab
        tokens: list[int] = []
        dists: list[torch.Tensor] = []
        for i in range(max_tokens):
            if self.params.greedy:
                conf, local = torch.softmax(logits, -1).max(-1)
                local = int(local)
            else:
                q = probabilities(logits[None], self.params)[0]  # [draft_vocab]
                local = int(sample(q[None], self.generator)[0])
                conf = q.max()
                full = torch.zeros(self.draft.model.cfg.vocab_size, dtype=q.dtype, device=q.device)
                dists.append(full.index_copy_(0, vocab, q))
            tokens.append(int(vocab[local]))
            self._shallow(tokens[-1:], n + i)  # verification needs every draft token's layer-l state
            if i + 1 == max_tokens or float(conf) < self.threshold:
                break
            logits = self._adapt(n + i, n + i + 1)
        self.cached = list(context) + tokens
        self.adapted = list(context) + tokens[:-1]  # the adapter has not seen the last draft token
        k = len(tokens)
        return Proposal(
            tokens=tuple(tokens),
            parents=tuple(range(-1, k - 1)),
            draft_probs=torch.stack(dists) if dists else None,
            hidden=self.hidden[n - 1 : n + k].clone(),  # [1 + k, hidden]: pending token + drafts
            start_layer=self.draft.exit_layer,
        )
