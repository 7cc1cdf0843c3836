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

With ``topk > 1`` the draft is a dynamic token tree (EAGLE-2's expansion, as in Kangaroo's later
version): every expanded node proposes its ``topk`` most likely children, each scored by its path's
cumulative log-probability; the ``topk`` best new nodes of a depth are expanded next (one forward
of the shallow layers and the adapter for all of them), until the depth budget is spent or the most
confident new node falls below η; finally the ``max_nodes`` best candidates form the tree (a parent
always outranks its children, so they form a tree). Candidates that were never expanded get their
layer-l states in one last shallow pass. Tree nodes sit in this drafter's caches at their own slots
after the context; at the next step the accepted path is found by the committed tokens and its
entries are moved to contiguous slots. ``topk == 1`` is the chain.

Optionally (method ``kangaroo+pld``) prompt lookup's continuation joins the tree as one more branch
from the root, a retrieval branch in the spirit of SAM-Decoding; it costs one shallow pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from joey.batching import prefix_causal_mask, visible_slots_mask
from joey.config import DEFAULT_THRESHOLD, SamplingParams
from joey.drafters.base import Proposal, common_prefix
from joey.drafters.draft_head import DraftVocabHead
from joey.drafters.prompt_lookup import PromptLookupDrafter
from joey.drafters.tree import DraftTree, candidate_log_probs, contiguous
from joey.models.adapter import KangarooAdapter
from joey.models.llama import LlamaModel
from joey.sampling import probabilities, sample


@dataclass(frozen=True)
class KangarooDraft:
    """What every row's drafter shares: the target, its adapter and the draft-vocabulary head."""

    model: LlamaModel
    adapter: KangarooAdapter
    head: DraftVocabHead

    @classmethod
    def build(cls, model: LlamaModel, adapter: KangarooAdapter) -> KangarooDraft:
        return cls(model, adapter, DraftVocabHead.build(model, adapter.vocab))

    @property
    def exit_layer(self) -> int:
        return self.adapter.exit_layer

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Normalised adapter states [N, hidden] → draft logits over the draft vocabulary [N, draft_vocab]."""
        return self.head.logits(states)


class KangarooDrafter:
    """Drafts a chain (``topk == 1``) or a dynamic tree for one sequence; one instance per row."""

    name = "kangaroo"
    self_speculative = True  # runs the target's layers [0, l) itself: it must see every step

    def __init__(
        self,
        draft: KangarooDraft,
        params: SamplingParams,
        generator: torch.Generator | None,
        max_len: int,
        threshold: float = DEFAULT_THRESHOLD,
        topk: int = 1,
        lookup: PromptLookupDrafter | None = None,
    ) -> None:
        self.draft = draft
        self.params = params
        self.generator = generator
        self.threshold = threshold
        self.topk = topk
        self.lookup = lookup  # a retrieval branch: prompt lookup's continuation joins the tree
        model = draft.model
        cfg = model.cfg
        w = model.lm_head.weight
        self.shallow = model.new_cache(1, max_len, layers=draft.exit_layer)
        self.adapter_cache = draft.adapter.new_cache(1, max_len)
        # the layer-l state of every slot: the adapter's input and the verification's input
        self.hidden = torch.zeros(max_len, cfg.hidden_size, dtype=w.dtype, device=w.device)
        self.cached: list[int] = []  # tokens whose shallow K/V and layer-l state are stored, in order
        self.adapted: list[int] = []  # tokens whose adapter K/V are stored (a prefix of ``cached``)
        self._tree: DraftTree | None = None  # the last proposal, until the committed tokens say which path won

    # -- the target's shallow layers and the adapter, on slots of this drafter's caches ----------
    def _shallow(self, tokens: list[int], slots: list[int], positions: list[int], mask: torch.Tensor | None) -> None:
        """Layers [0, l) on tokens at the given slots / RoPE positions; stores their K/V and layer-l states."""
        model = self.draft.model
        dev = self.hidden.device
        x = model.embed(torch.tensor([tokens], device=dev))
        pos = torch.tensor([positions], device=dev)
        slot: int | torch.Tensor = slots[0] if contiguous(slots) else torch.tensor([slots], device=dev)
        h = model.run_layers(x, pos, self.shallow, slot, max(slots) + 1, mask, 0, self.draft.exit_layer)
        if contiguous(slots):
            self.hidden[slots[0] : slots[-1] + 1] = h[0]
        else:
            self.hidden[torch.tensor(slots, device=dev)] = h[0]

    def _adapt(self, slots: list[int], positions: list[int], mask: torch.Tensor | None) -> torch.Tensor:
        """The adapter on the stored states of ``slots`` → draft logits [len(slots), draft_vocab]."""
        dev = self.hidden.device
        n = len(slots)
        cos, sin = self.draft.model.rope(torch.tensor([positions], device=dev))
        slot: int | torch.Tensor = slots[0] if contiguous(slots) else torch.tensor([slots], device=dev)
        states = self.hidden[slots[0] : slots[-1] + 1] if contiguous(slots) else self.hidden[torch.tensor(slots)]
        out = self.draft.adapter(states, (1, n), cos, sin, self.adapter_cache, slot, max(slots) + 1, mask)
        return self.draft.logits(out)

    def _run_prefix(self, start: int, end: int, adapt_from: int | None) -> torch.Tensor | None:
        """Context slots [start, end): shallow layers, then the adapter on [adapt_from, end) → the
        draft logits after the last one ([draft_vocab]); None when ``adapt_from`` is None."""
        if end > start:
            self._shallow(self.cached[start:end], list(range(start, end)), list(range(start, end)),
                          prefix_causal_mask(start, end - start, self.hidden.device))
        if adapt_from is None:
            return None
        slots = list(range(adapt_from, end))
        return self._adapt(slots, slots, prefix_causal_mask(adapt_from, len(slots), self.hidden.device))[-1]

    # -- following the committed path through the last tree --------------------------------------
    def _follow(self, context: list[int]) -> None:
        """Keep the cache entries of the last tree's nodes that the target committed, moved to the
        contiguous slots right after the context they were drafted from."""
        tree, self._tree = self._tree, None
        if tree is None or context[: tree.base] != self.cached[: tree.base]:
            return
        path = tree.follow(context[tree.base :])
        src = [tree.slots[node] for node in path]
        dst = list(range(tree.base, tree.base + len(path)))
        self.shallow.move([0] * len(path), src, dst)
        self.hidden[dst] = self.hidden[src]
        adapted = 0  # the adapter ran on the path's nodes up to the first one that was never expanded
        while adapted < len(path) and path[adapted] in tree.expanded:
            adapted += 1
        self.adapter_cache.move([0] * adapted, src[:adapted], dst[:adapted])
        tokens = [tree.tokens[node] for node in path]
        self.cached = self.cached[: tree.base] + tokens
        self.adapted = self.cached[: tree.base + adapted]  # the adapter ran on the whole context

    # -- proposing -----------------------------------------------------------------------------
    def propose(self, context: list[int], max_tokens: int, max_nodes: int | None = None) -> Proposal:
        """Up to ``max_tokens`` deep and ``max_nodes`` tokens in all (default: a chain's worth)."""
        self._follow(context)
        n = len(context)
        # Shallow K/V: keep the prefix shared with the committed context; the last context token
        # (the pending one) is always recomputed, since verification needs its layer-l state.
        s = min(common_prefix(self.cached, context), n - 1)
        a = min(common_prefix(self.adapted, context), s, n - 1)
        self.cached = list(context)
        exit_layer = self.draft.exit_layer
        if max_tokens < 1:
            self._run_prefix(s, n, None)
            self.adapted = self.adapted[:a]
            return Proposal(tokens=(), parents=(), hidden=self.hidden[n - 1 : n].clone(), start_layer=exit_layer)
        logits = self._run_prefix(s, n, a)
        self.adapted = list(context)
        tree = DraftTree(base=n)
        grow = self._grow_sampled if not self.params.greedy and self.topk == 1 else self._grow
        grow(tree, logits, max_tokens, max_nodes or max_tokens)
        if self.lookup is not None:
            tree.graft(self.lookup.propose(context, max_tokens).tokens, self.draft.model.cfg.vocab_size)
        missing = [node for node in tree.final if node not in tree.slots]
        if missing:  # candidates never expanded: verification still needs their layer-l states
            self._expand(tree, missing, adapt=False)
        self._tree = tree
        order = tree.final
        index = {node: i for i, node in enumerate(order)}
        slots = [n - 1] + [tree.slots[node] for node in order]
        return Proposal(
            tokens=tuple(tree.tokens[node] for node in order),
            parents=tuple(index.get(tree.parents[node], -1) for node in order),
            draft_probs=torch.stack([tree.dists[node] for node in order]) if tree.dists else None,
            hidden=self.hidden[torch.tensor(slots, device=self.hidden.device)],  # [1 + k, hidden]
            start_layer=exit_layer,
        )

    def _expand(self, tree: DraftTree, nodes: list[int], adapt: bool) -> torch.Tensor | None:
        """One forward for ``nodes``: shallow layers (and the adapter when ``adapt``) at fresh slots;
        each node sees the context and its own ancestors. → draft logits [len(nodes), draft_vocab]."""
        slots = [tree.assign_slot(node) for node in nodes]
        positions = [tree.base - 1 + tree.depths[node] for node in nodes]
        mask = visible_slots_mask(tree.base, [tree.path_slots(node) for node in nodes], max(slots) + 1,
                                  self.hidden.device)
        self._shallow([tree.tokens[node] for node in nodes], slots, positions, mask)
        if not adapt:
            return None
        tree.expanded.update(nodes)
        return self._adapt(slots, positions, mask)

    def _grow(self, tree: DraftTree, logits: torch.Tensor, max_depth: int, max_nodes: int) -> None:
        """Deterministic top-k expansion (greedy, or sampling with point-mass candidates)."""
        vocab = self.draft.adapter.vocab
        frontier, rows = [-1], logits[None]  # [len(frontier), draft_vocab]
        for depth in range(1, max_depth + 1):
            logp = candidate_log_probs(rows, self.params)
            new = [c for nodes in tree.add_children(frontier, logp, vocab, self.topk, depth) for c in nodes]
            if depth == max_depth or float(logp.max().exp()) < self.threshold:
                break
            new.sort(key=lambda node: -tree.scores[node])
            frontier = new[: self.topk]
            rows = self._expand(tree, frontier, adapt=True)
        tree.select(max_nodes)

    def _grow_sampled(self, tree: DraftTree, logits: torch.Tensor, max_depth: int, max_nodes: int) -> None:
        """A chain of tokens sampled from the draft distribution q (speculative sampling's proposal)."""
        vocab = self.draft.adapter.vocab
        full_vocab = self.draft.model.cfg.vocab_size
        parent = -1
        for depth in range(1, min(max_depth, max_nodes) + 1):
            q = probabilities(logits[None], self.params)[0]  # [draft_vocab]
            local = int(sample(q[None], self.generator)[0])
            full = torch.zeros(full_vocab, dtype=q.dtype, device=q.device)
            parent = tree.add(int(vocab[local]), parent, 0.0, depth, full.index_copy_(0, vocab, q))
            if depth == min(max_depth, max_nodes) or float(q.max()) < self.threshold:
                break
            logits = self._expand(tree, [parent], adapt=True)[0]
        tree.select(len(tree.tokens))
