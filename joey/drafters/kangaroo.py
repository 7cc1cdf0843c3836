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

The rows of a batch draft together (``propose_batch``, EMS-SD's packing applied to drafting): each
draft depth is one forward for every row still drafting, the dense layers on all rows' tokens packed,
attention per row against the row's own caches. A row whose drafting stopped drops out.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch

from joey.batching import prefix_causal_mask, visible_slots_mask
from joey.config import DEFAULT_THRESHOLD, SamplingParams
from joey.drafters.base import BatchedDrafter, Proposal, common_prefix
from joey.drafters.draft_head import DraftVocabHead
from joey.drafters.prompt_lookup import PromptLookupDrafter
from joey.drafters.tree import DraftTree, Placement, candidate_log_probs, contiguous
from joey.measurements import median_ms
from joey.models.adapter import KangarooAdapter
from joey.models.llama import LlamaModel
from joey.models.weight_formats import low_bit_kernels
from joey.sampling import draw, probabilities


@dataclass(frozen=True)
class KangarooDraft:
    """What every row's drafter shares: the target, its adapter and the draft-vocabulary head."""

    model: LlamaModel
    adapter: KangarooAdapter
    head: DraftVocabHead

    @classmethod
    def build(cls, model: LlamaModel, adapter: KangarooAdapter) -> KangarooDraft:
        """When the target runs pre-packed kernels (``model.kernel_setup``'s ``prepack`` /
        ``set_weights``), so does a copy of the adapter: like the target's, its GEMMs then cost nearly
        the same for the packed rows of a batch as for one, and a row's result does not depend on the
        others, so a row drafts exactly the same alone or batched (``propose_batch``). Where joey's
        low-bit kernel runs, the adapter and its draft-vocabulary head may instead carry int8
        weights: whichever of the two one draft forward measures faster here (on the Xeon the fp32
        vocabulary head alone took 0.45 ms a call against 0.09 ms in int8, of a ~5 ms step of the
        135M model). The drafting precision never changes the output: the target verifies."""
        if not model.kernel_setup.kernels():
            return cls(model, adapter, DraftVocabHead.build(model, adapter.vocab))
        w = adapter.norm.weight
        choices: list[str | None] = [None]
        if low_bit_kernels() == "vnni" and w.dtype == torch.float32:
            choices.append("int8")
        timed = []
        for low_bit in choices:
            copy = KangarooAdapter(model.cfg, adapter.exit_layer, adapter.vocab, mlp=adapter.mlp is not None)
            copy.load_state_dict(adapter.state_dict())
            copy = copy.to(w.device, w.dtype).eval()
            for part in (copy.self_attn, copy.mlp):
                if part is not None and low_bit:
                    part.set_weights(low_bit)
                elif part is not None:
                    part.prepack()
            draft = cls(model, copy, DraftVocabHead.build(model, adapter.vocab, low_bit=low_bit))
            timed.append((draft.forward_ms(), len(timed), draft))
        return min(timed)[2]

    @torch.inference_mode()
    def forward_ms(self, context: int = 64, repeats: int = 5) -> float:
        """Median time of the adapter and the draft-vocabulary head on one token after ``context``
        cached ones (the target's shallow layers, the same in every precision, are left out)."""
        dev = self.adapter.norm.weight.device
        cache = self.adapter.new_cache(1, context + 1)
        x = torch.zeros(1, self.model.cfg.hidden_size, dtype=self.adapter.norm.weight.dtype, device=dev)
        cos, sin = self.model.rope(torch.tensor([context], device=dev))
        return median_ms(lambda: self.logits(self.adapter(x, (1, 1), cos, sin, cache, context, context + 1, None)),
                         repeats)

    @property
    def exit_layer(self) -> int:
        return self.adapter.exit_layer

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Normalised adapter states [N, hidden] → draft logits over the draft vocabulary [N, draft_vocab]."""
        return self.head.logits(states)


@dataclass(frozen=True)
class _Pass:
    """One row's share of a draft forward: the target's layers [0, l) on ``tokens`` at ``shallow``'s
    slots, then (unless ``adapt`` is None) the adapter on the stored states of ``adapt``'s slots."""

    drafter: KangarooDrafter
    tokens: tuple[int, ...]
    shallow: Placement
    adapt: Placement | None
    last_only: bool = False  # only the last adapted slot's draft logits are wanted (a context prefix)


class KangarooDrafter(BatchedDrafter):
    """Drafts a chain (``topk == 1``) or a dynamic tree for one sequence; one instance per row (the
    rows of a batch draft together through ``propose_batch``)."""

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
        self.shallow = model.new_cache(1, max_len, layers=draft.exit_layer)
        self.adapter_cache = draft.adapter.new_cache(1, max_len)
        # the layer-l state of every slot: the adapter's input and the verification's input
        self.hidden = torch.zeros(max_len, cfg.hidden_size, dtype=model.dtype, device=model.device)
        self.cached: list[int] = []  # tokens whose shallow K/V and layer-l state are stored, in order
        self.adapted: list[int] = []  # tokens whose adapter K/V are stored (a prefix of ``cached``)
        self._tree: DraftTree | None = None  # the last proposal, until the committed tokens say which path won
        # how many leading context tokens have layers [0, l) in the *target's* cache: the prompt (its
        # prefill ran every layer) and tokens of plain steps; set at the first call
        self.synced: int | None = None

    # -- one draft forward for the rows of a batch ----------------------------------------------
    @staticmethod
    def _run(passes: list[_Pass]) -> list[torch.Tensor | None]:
        """One draft forward for several rows: the target's layers [0, l) on every row's new tokens,
        packed, storing their K/V and layer-l states in the row's caches; then the adapter on the
        stored states of the slots each row asks for, packed → each row's draft logits
        [len(adapt slots) or 1, draft_vocab], None for a row that asked for the shallow layers only."""
        draft = passes[0].drafter.draft
        model = draft.model
        dev = model.device
        tokens = torch.tensor([t for p in passes for t in p.tokens], device=dev)
        positions = torch.tensor([q for p in passes for q in p.shallow.positions], device=dev)
        spans = [p.shallow.span(p.drafter.shallow, dev) for p in passes]
        h = model.run_layers_rows(model.embed(tokens), positions, spans, 0, draft.exit_layer)
        for p, states in zip(passes, h.split([len(p.tokens) for p in passes])):
            p.drafter._store(p.shallow.slots, states)
        adapting = [(i, p, p.adapt) for i, p in enumerate(passes) if p.adapt is not None]
        out: list[torch.Tensor | None] = [None] * len(passes)
        if not adapting:
            return out
        states = torch.cat([p.drafter._states(where.slots) for _, p, where in adapting])
        cos, sin = model.rope(torch.tensor([q for _, _, where in adapting for q in where.positions], device=dev))
        spans = [where.span(p.drafter.adapter_cache, dev) for _, p, where in adapting]
        normed = draft.adapter.forward_rows(states, cos, sin, spans)
        # the head only where logits are used: a prefix's last slot, every expanded node
        want: list[int] = []
        counts: list[int] = []
        start = 0
        for _, p, where in adapting:
            n = len(where.slots)
            want.extend([start + n - 1] if p.last_only else range(start, start + n))
            counts.append(1 if p.last_only else n)
            start += n
        logits = draft.logits(normed[torch.tensor(want, device=dev)]).split(counts)
        for (i, _, _), rows in zip(adapting, logits):
            out[i] = rows
        return out

    def _store(self, slots: tuple[int, ...], states: torch.Tensor) -> None:
        """Keep the layer-l states [len(slots), hidden] of these slots (the adapter's and verification's input)."""
        if contiguous(list(slots)):
            self.hidden[slots[0] : slots[-1] + 1] = states
        else:
            self.hidden[torch.tensor(slots, device=self.hidden.device)] = states

    def _states(self, slots: tuple[int, ...]) -> torch.Tensor:
        """The stored layer-l states of ``slots`` [len(slots), hidden]."""
        if contiguous(list(slots)):
            return self.hidden[slots[0] : slots[-1] + 1]
        return self.hidden[torch.tensor(slots, device=self.hidden.device)]

    def _prefix(self, start: int, end: int, adapt_from: int | None) -> _Pass:
        """Context slots [start, end) through the shallow layers, then the adapter on [adapt_from, end)
        (its last draft logits only); none when ``adapt_from`` is None."""
        dev = self.hidden.device
        span = tuple(range(start, end))
        shallow = Placement(span, span, prefix_causal_mask(start, end - start, dev))
        adapt = None
        if adapt_from is not None:
            slots = tuple(range(adapt_from, end))
            adapt = Placement(slots, slots, prefix_causal_mask(adapt_from, len(slots), dev))
        return _Pass(self, tuple(self.cached[start:end]), shallow, adapt, last_only=True)

    @property
    def prompt_layer(self) -> int:  # type: ignore[override]  # the adapter's exit layer
        return self.draft.exit_layer

    def take_prompt(self, prompt: list[int], states: torch.Tensor, cache, row: int) -> None:
        """Keep the prompt's layers [0, l) K/V and layer-l states from the target's prefill: they are
        what this drafter's own shallow pass would compute over the prompt, which its first draft
        then skips (only the adapter still runs over the prompt). On the 135M model that pass cost
        ~2/3 of the ~26 ms first draft of a ~280-token prompt."""
        n = len(prompt)
        self._copy_shallow(cache, row, self.shallow, 0, 0, n)
        self.hidden[:n] = states[:n]
        self.cached = list(prompt)

    def _copy_shallow(self, src, src_row: int, dst, dst_row: int, lo: int, hi: int) -> None:
        """Layers [0, l)'s K/V of slots [lo, hi) from row ``src_row`` of cache ``src`` to row
        ``dst_row`` of ``dst`` (the batch's tensors are indexed directly: a row view per row per
        step cost ~30 µs)."""
        for layer in range(self.draft.exit_layer):
            dst.k[layer][dst_row, :, lo:hi] = src.k[layer][src_row, :, lo:hi]
            dst.v[layer][dst_row, :, lo:hi] = src.v[layer][src_row, :, lo:hi]

    def hand_back(self, cache, row: int, context: list[int]) -> None:
        """Copy layers [0, l)'s K/V of the committed tokens the target's cache lacks (those verified
        from layer l since the last plain step) from this drafter's cache into the target's, so the
        target can run a plain step over all its layers. They are the target's own layers on the
        same tokens, whose states verification already takes from this cache. A later draft
        recomputes the shallow K/V of the plain steps' tokens here (its catch-up)."""
        n = len(context)
        if self.synced is None:  # never drafted: the prefill filled the target's cache
            self.synced = n - 1
        if self.synced < n - 1:
            self._follow(context)
            if common_prefix(self.cached, context) < n - 1:
                raise RuntimeError("kangaroo: the drafter's cache does not hold the committed tokens")
            self._copy_shallow(self.shallow, 0, cache, row, self.synced, n - 1)
        self.synced = n  # the plain step computes the pending token's K/V in every layer

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
    @property
    def shared(self) -> KangarooDraft:
        """The target, adapter and head every row drafts from (rows drafted together share it)."""
        return self.draft

    def _steps(
        self, context: list[int], max_tokens: int, max_nodes: int | None
    ) -> Generator[_Pass, torch.Tensor | None, Proposal]:
        """This row's drafting: yields the draft forwards it needs, receives their draft logits."""
        self._follow(context)
        n = len(context)
        # from here on verification runs layers [l, L) only: the target's cache lacks [0, l) past n - 1
        self.synced = n - 1 if self.synced is None else min(self.synced, n - 1)
        # Shallow K/V: keep the prefix shared with the committed context; the last context token
        # (the pending one) is always recomputed, since verification needs its layer-l state.
        s = min(common_prefix(self.cached, context), n - 1)
        a = min(common_prefix(self.adapted, context), s, n - 1)
        self.cached = list(context)
        exit_layer = self.draft.exit_layer
        if max_tokens < 1:
            yield self._prefix(s, n, None)
            self.adapted = self.adapted[:a]
            return Proposal(tokens=(), parents=(), hidden=self.hidden[n - 1 : n].clone(), start_layer=exit_layer)
        logits = yield self._prefix(s, n, a)
        self.adapted = list(context)
        tree = DraftTree(base=n)
        grow = self._grow_sampled if not self.params.greedy and self.topk == 1 else self._grow
        yield from grow(tree, logits[-1], max_tokens, max_nodes or max_tokens)  # type: ignore[index]
        if self.lookup is not None:
            tree.graft(self.lookup.propose(context, max_tokens).tokens, self.draft.model.cfg.vocab_size)
        missing = [node for node in tree.final if node not in tree.slots]
        if missing:  # candidates never expanded: verification still needs their layer-l states
            yield self._expand(tree, missing, adapt=False)
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

    def _expand(self, tree: DraftTree, nodes: list[int], adapt: bool) -> _Pass:
        """The forward for ``nodes``: shallow layers (and the adapter when ``adapt``) at fresh slots;
        each node sees the context and its own ancestors. Its result: draft logits [len(nodes), draft_vocab]."""
        slots = tuple(tree.assign_slot(node) for node in nodes)
        positions = tuple(tree.base - 1 + tree.depths[node] for node in nodes)
        mask = visible_slots_mask(tree.base, [tree.path_slots(node) for node in nodes], max(slots) + 1,
                                  self.hidden.device)
        where = Placement(slots, positions, mask)
        if adapt:
            tree.expanded.update(nodes)
        return _Pass(self, tuple(tree.tokens[node] for node in nodes), where, where if adapt else None)

    def _grow(
        self, tree: DraftTree, logits: torch.Tensor, max_depth: int, max_nodes: int
    ) -> Generator[_Pass, torch.Tensor | None, None]:
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
            rows = yield self._expand(tree, frontier, adapt=True)
        tree.select(max_nodes)

    def _grow_sampled(
        self, tree: DraftTree, logits: torch.Tensor, max_depth: int, max_nodes: int
    ) -> Generator[_Pass, torch.Tensor | None, None]:
        """A chain of tokens sampled from the draft distribution q (speculative sampling's proposal)."""
        vocab = self.draft.adapter.vocab
        full_vocab = self.draft.model.cfg.vocab_size
        parent = -1
        for depth in range(1, min(max_depth, max_nodes) + 1):
            q = probabilities(logits[None], self.params)[0]  # [draft_vocab]
            # keyed like the target's draw at this position (the tree's base is the context's length):
            # the draft vocabulary is sorted by id, so its CDF runs in the target's order
            local = int(draw(q[None], self.params, [tree.base + depth - 1], self.generator)[0])
            full = torch.zeros(full_vocab, dtype=q.dtype, device=q.device)
            parent = tree.add(int(vocab[local]), parent, 0.0, depth, full.index_copy_(0, vocab, q))
            if depth == min(max_depth, max_nodes) or float(q.max()) < self.threshold:
                break
            logits = (yield self._expand(tree, [parent], adapt=True))[0]  # type: ignore[index]
        tree.select(len(tree.tokens))
