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
from joey.drafters.prompt_lookup import PromptLookupDrafter
from joey.models.adapter import KangarooAdapter
from joey.models.kv_cache import KVCache
from joey.models.llama import LlamaModel, pack_weight, packed_linear
from joey.sampling import probabilities, sample


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
        self.shallow = KVCache(
            draft.exit_layer, 1, cfg.num_kv_heads, max_len, cfg.head_dim, dtype=w.dtype, device=w.device
        )
        self.adapter_cache = draft.adapter.new_cache(1, max_len)
        # the layer-l state of every slot: the adapter's input and the verification's input
        self.hidden = torch.zeros(max_len, cfg.hidden_size, dtype=w.dtype, device=w.device)
        self.cached: list[int] = []  # tokens whose shallow K/V and layer-l state are stored, in order
        self.adapted: list[int] = []  # tokens whose adapter K/V are stored (a prefix of ``cached``)
        self._tree: _Tree | None = None  # the last proposal, until the committed tokens say which path won

    # -- the target's shallow layers and the adapter, on slots of this drafter's caches ----------
    def _shallow(self, tokens: list[int], slots: list[int], positions: list[int], mask: torch.Tensor | None) -> None:
        """Layers [0, l) on tokens at the given slots / RoPE positions; stores their K/V and layer-l states."""
        model = self.draft.model
        dev = self.hidden.device
        x = model.embed(torch.tensor([tokens], device=dev))
        pos = torch.tensor([positions], device=dev)
        slot: int | torch.Tensor = slots[0] if _contiguous(slots) else torch.tensor([slots], device=dev)
        h = model.run_layers(x, pos, self.shallow, slot, max(slots) + 1, mask, 0, self.draft.exit_layer)
        if _contiguous(slots):
            self.hidden[slots[0] : slots[-1] + 1] = h[0]
        else:
            self.hidden[torch.tensor(slots, device=dev)] = h[0]

    def _adapt(self, slots: list[int], positions: list[int], mask: torch.Tensor | None) -> torch.Tensor:
        """The adapter on the stored states of ``slots`` → draft logits [len(slots), draft_vocab]."""
        dev = self.hidden.device
        n = len(slots)
        cos, sin = self.draft.model.rope(torch.tensor([positions], device=dev))
        slot: int | torch.Tensor = slots[0] if _contiguous(slots) else torch.tensor([slots], device=dev)
        states = self.hidden[slots[0] : slots[-1] + 1] if _contiguous(slots) else self.hidden[torch.tensor(slots)]
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
        tree = _Tree(base=n)
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

    def _expand(self, tree: _Tree, nodes: list[int], adapt: bool) -> torch.Tensor | None:
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

    def _grow(self, tree: _Tree, logits: torch.Tensor, max_depth: int, max_nodes: int) -> None:
        """Deterministic top-k expansion (greedy, or sampling with point-mass candidates)."""
        vocab = self.draft.adapter.vocab
        frontier, rows = [-1], logits[None]  # [len(frontier), draft_vocab]
        for depth in range(1, max_depth + 1):
            logp = self._log_probs(rows)
            top = logp.topk(min(self.topk, logp.shape[-1]), dim=-1)
            scores = (top.values + torch.tensor([tree.score(f) for f in frontier])[:, None]).tolist()
            ids = vocab[top.indices].tolist()
            new = [tree.add(int(ids[r][c]), frontier[r], scores[r][c], depth)
                   for r in range(len(frontier)) for c in range(len(ids[r])) if scores[r][c] > float("-inf")]
            if depth == max_depth or float(top.values[:, 0].max().exp()) < self.threshold:
                break
            new.sort(key=lambda node: -tree.scores[node])
            frontier = new[: self.topk]
            rows = self._expand(tree, frontier, adapt=True)
        tree.select(max_nodes)

    def _grow_sampled(self, tree: _Tree, logits: torch.Tensor, max_depth: int, max_nodes: int) -> None:
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

    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores of candidate children: the draft's log-probabilities (after the sampling warps when sampling)."""
        if self.params.greedy:
            return torch.log_softmax(logits.float(), -1)
        return probabilities(logits, self.params).log()


def _contiguous(slots: list[int]) -> bool:
    return slots == list(range(slots[0], slots[0] + len(slots)))


class _Tree:
    """A draft tree under construction: nodes in creation order with parents, scores and slots."""

    def __init__(self, base: int) -> None:
        self.base = base  # slot (and length) of the context; the pending token sits at base - 1
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.scores: list[float] = []  # cumulative log-probability of the node's path
        self.depths: list[int] = []
        self.dists: list[torch.Tensor] = []  # sampled chains: the distribution each token was drawn from
        self.slots: dict[int, int] = {}  # node → slot in the drafter's caches
        self.expanded: set[int] = set()  # nodes the adapter has run on
        self.final: list[int] = []  # the proposed nodes, parents first

    def add(self, token: int, parent: int, score: float, depth: int, dist: torch.Tensor | None = None) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        self.depths.append(depth)
        if dist is not None:
            self.dists.append(dist)
        return len(self.tokens) - 1

    def score(self, node: int) -> float:
        return 0.0 if node < 0 else self.scores[node]

    def assign_slot(self, node: int) -> int:
        self.slots[node] = self.base + len(self.slots)
        return self.slots[node]

    def select(self, max_nodes: int) -> None:
        """The best ``max_nodes`` nodes by score; ties go to the shallower (so parents come first)."""
        ranked = sorted(range(len(self.tokens)), key=lambda node: (-self.scores[node], self.depths[node], node))
        keep = set(ranked[:max_nodes])
        self.final = sorted(keep, key=lambda node: (self.depths[node], node))

    def graft(self, tokens: tuple[int, ...], vocab_size: int) -> None:
        """Add a chain from the root (prompt lookup's continuation), sharing the nodes that already
        hold its tokens. In a sampled chain the grafted tokens are point masses (one-hot q)."""
        parent = -1
        for token in tokens:
            node = self.child(parent, token)
            if node is None:
                dist = None
                if self.dists:
                    dist = torch.zeros(vocab_size, dtype=self.dists[0].dtype, device=self.dists[0].device)
                    dist[token] = 1.0
                node = self.add(token, parent, float("-inf"), 1 + (self.depths[parent] if parent >= 0 else 0), dist)
                self.final.append(node)
            parent = node
        self.final.sort(key=lambda node: (self.depths[node], node))

    def child(self, parent: int, token: int) -> int | None:
        """The proposed child of ``parent`` holding ``token``, if any."""
        return next((c for c in self.final if self.parents[c] == parent and self.tokens[c] == token), None)

    def path_slots(self, node: int) -> list[int]:
        """Slots of a node and its ancestors (what it may attend to besides the context)."""
        slots = []
        while node >= 0:
            slots.append(self.slots[node])
            node = self.parents[node]
        return slots

    def follow(self, committed: list[int]) -> list[int]:
        """The nodes whose tokens the target committed after the context, root first."""
        path: list[int] = []
        parent = -1
        for token in committed:
            nxt = self.child(parent, token)
            if nxt is None:
                break
            path.append(nxt)
            parent = nxt
        return path
