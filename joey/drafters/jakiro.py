"""Jakiro: dynamic token trees drafted by a mixture-of-experts head over the target's own features
(arXiv 2502.06282, built on EAGLE-2's dynamic tree, arXiv 2406.16858).

The head (``joey.models.jakiro_head``) reads, at position j, the next token's embedding and the
target's final-norm feature f_j, and predicts f_{j+1} (normal branch) and f_{j+2} (contrastive
branch). The engine hands this drafter the target's features of every committed token
(``observe``) — the verification pass computes them anyway; the drafter never sees the target's
cache. Each step:

1. **Catch-up**: the head runs on the positions committed since the last step with the *true*
   target features (its own KV cache holds only such positions; tree nodes' entries, computed from
   predicted features, are overwritten). The last position's output is the tree's root.
2. **Dynamic tree** (EAGLE-2): the root's top-k tokens are depth 1; each depth, the ``topk`` best
   new nodes by cumulative log-probability are expanded in one head forward (a node's input is its
   token and the feature predicted for it), each proposing its top-k children.
3. **Hybrid last level** (Jakiro): the forward that makes depth D-1 also predicts, through the
   contrastive branch, the features one step further; their top-k become depth D under the best
   child of the node they were computed from — one head forward saved.
4. The ``max_nodes`` best candidates form the tree (a parent outranks its children). Optionally
   prompt lookup's continuation joins as one more branch from the root (method ``jakiro+pld``).

Candidates are deterministic (top-k), so verification treats them as point masses; sampled
decoding stays exact through ``joey.verify``'s recursive rejection.

The rows of a batch draft together (``propose_batch``): the catch-ups of all rows are one head
forward, and so is each tree depth; fc, gate, experts and the draft-vocabulary head run on all rows'
inputs packed, attention per row against the row's own cache.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch

from joey.batching import prefix_causal_mask, visible_slots_mask
from joey.config import SamplingParams
from joey.drafters.base import BatchedDrafter, Proposal, common_prefix
from joey.drafters.draft_head import DraftVocabHead
from joey.drafters.prompt_lookup import PromptLookupDrafter
from joey.drafters.tree import DraftTree, Placement, candidate_log_probs
from joey.measurements import median_ms
from joey.models.jakiro_head import JakiroHead
from joey.models.llama import LlamaModel
from joey.models.weight_formats import low_bit_kernels


@dataclass(frozen=True)
class JakiroDraft:
    """What every row's drafter shares: the target (its embedding), the head and its vocabulary head."""

    model: LlamaModel
    head: JakiroHead
    vocab_head: DraftVocabHead

    @classmethod
    def build(cls, model: LlamaModel, head: JakiroHead) -> JakiroDraft:
        """On CPU, the head drafts in fp32, bf16 or (where joey's low-bit kernel runs) with int8
        weights, whichever one forward measures fastest here (bf16 oneDNN kernels are ~3x faster on
        CPUs with AMX and far slower on some without; int8 halved a one-node forward on a Zen 5). The
        drafting precision never changes the output: the target verifies in its own."""
        if model.device.type != "cpu" or model.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return cls(model, head, DraftVocabHead.build(model, head.vocab))
        choices: list[tuple[torch.dtype, str | None]] = [(torch.float32, None)]
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            choices.append((torch.bfloat16, None))
        if low_bit_kernels() == "vnni":
            choices.append((torch.float32, "int8"))
        timed = []
        for dtype, low_bit in choices:
            copy = JakiroHead(model.cfg, head.vocab, head.num_experts, head.cfg.intermediate_size)
            copy.load_state_dict(head.state_dict())
            copy = copy.to(dtype).eval()
            copy.prepack(low_bit)
            draft = cls(model, copy, DraftVocabHead.build(model, head.vocab, dtype, low_bit))
            # one node (a chain, the budget's usual depth) and a small tree level, equally weighted
            timed.append((draft.forward_ms(rows=1) + draft.forward_ms(), len(timed), draft))
        return min(timed)[2]

    @torch.inference_mode()
    def forward_ms(self, rows: int = 3, context: int = 64, repeats: int = 5) -> float:
        """Median time of one tree-depth forward (head + draft-vocabulary logits) for ``rows`` nodes."""
        p = self.head.fc.weight
        cache = self.head.new_cache(1, context + rows)
        x = torch.zeros(rows, self.model.cfg.hidden_size, dtype=p.dtype, device=p.device)
        positions = torch.arange(context, context + rows, device=p.device)[None]
        cos, sin = self.model.rope(positions)

        def forward() -> None:
            out = self.head(x, x, (1, rows), cos, sin, cache, context, context + rows, None)
            self.vocab_head.logits(out.next)

        return median_ms(forward, repeats)


@dataclass(frozen=True)
class _HeadPass:
    """One row's share of a head forward: inputs (token, feature) at ``where``'s slots of the row's
    cache, and which outputs the row scores with the draft-vocabulary head."""

    drafter: JakiroDrafter
    tokens: tuple[int, ...]  # x_{j+1} of each input
    features: torch.Tensor  # [len(tokens), hidden] f_j: the target's, or the head's own predictions
    where: Placement
    last_only: bool  # score only the last output (a catch-up, whose last output is the tree's root)
    after: bool  # score the contrastive branch too (the next tree level is the hybrid one)


@dataclass(frozen=True)
class Scored:
    """A head forward's predictions at one row's scored positions, with their candidate scores."""

    next: torch.Tensor  # [F, hidden] predicted f_{j+1}
    after_next: torch.Tensor  # [F, hidden] predicted f_{j+2}
    logp_next: torch.Tensor  # [F, draft_vocab] candidate log-probabilities of the next token
    logp_after: torch.Tensor | None  # [F, draft_vocab] of the one after; None unless asked for


class JakiroDrafter(BatchedDrafter):
    """Drafts a dynamic tree (a chain when ``topk == 1``) for one sequence; one instance per row (the
    rows of a batch draft together through ``propose_batch``)."""

    name = "jakiro"
    wants_features = True  # the engine hands it the target's features of committed tokens

    def __init__(
        self,
        draft: JakiroDraft,
        params: SamplingParams,
        max_len: int,
        topk: int = 3,
        lookup: PromptLookupDrafter | None = None,
        hybrid: bool = True,
    ) -> None:
        self.draft = draft
        self.params = params
        self.topk = topk
        self.lookup = lookup
        self.hybrid = hybrid
        w = draft.head.fc.weight  # the drafting precision (JakiroDraft.build)
        self.cache = draft.head.new_cache(1, max_len)
        self.features = torch.zeros(max_len, draft.model.cfg.hidden_size, dtype=w.dtype, device=w.device)
        self.known = 0  # target features stored for positions [0, known)
        self.tokens: list[int] = []  # the context of the last catch-up
        self.done = 0  # head cache slots [0, done) hold true-feature entries for ``tokens``

    def observe(self, features: torch.Tensor) -> None:
        """The target's final-norm features [n, hidden] of the next ``n`` committed tokens."""
        n = features.shape[0]
        self.features[self.known : self.known + n] = features
        self.known += n

    # -- one head forward for the rows of a batch -----------------------------------------------
    @staticmethod
    def _run(passes: list[_HeadPass]) -> list[Scored]:
        """One head forward for several rows' inputs, packed, attention per row against the row's
        own cache; then one draft-vocabulary GEMM over the outputs the rows score."""
        draft = passes[0].drafter.draft
        model = draft.model
        dtype, dev = draft.head.fc.weight.dtype, draft.head.fc.weight.device
        embeds = model.embed(torch.tensor([t for p in passes for t in p.tokens], device=dev)).to(dtype)
        features = torch.cat([p.features for p in passes])
        cos, sin = model.rope(torch.tensor([q for p in passes for q in p.where.positions], device=dev))
        out = draft.head.forward_rows(embeds, features, cos, sin, [p.where.span(p.drafter.cache, dev) for p in passes])
        picks: list[torch.Tensor] = []  # per row: the packed indices of its scored outputs
        start = 0
        for p in passes:
            n = len(p.tokens)
            picks.append(torch.arange(start + n - 1 if p.last_only else start, start + n, device=dev))
            start += n
        nexts = [out.next[pick] for pick in picks]
        afters = [out.after_next[pick] for p, pick in zip(passes, picks) if p.after]
        logits = draft.vocab_head.logits(torch.cat(nexts + afters)).split([len(x) for x in nexts + afters])
        after_logits = iter(logits[len(nexts) :])
        results = []
        for p, pick, nxt, rows in zip(passes, picks, nexts, logits):
            lp = p.drafter.params
            results.append(Scored(nxt, out.after_next[pick], candidate_log_probs(rows, lp),
                                  candidate_log_probs(next(after_logits), lp) if p.after else None))
        return results

    def _catch_up(self, context: list[int], after: bool) -> _HeadPass:
        """Head slots j < n - 1 from (context[j + 1], f_j); the forward scores the last new slot,
        the root of this step's tree (``after``: its contrastive branch too)."""
        n = len(context)
        if self.known < n - 1:
            raise RuntimeError(f"Jakiro needs the target's features of {n - 1} positions; it has {self.known}")
        # the last slot is recomputed when nothing is new, so there is always a root
        start = max(0, min(self.done, common_prefix(self.tokens, context) - 1, n - 2))
        self.tokens = list(context)
        self.done = n - 1
        slots = tuple(range(start, n - 1))
        where = Placement(slots, slots, prefix_causal_mask(start, len(slots), self.features.device))
        return _HeadPass(self, tuple(context[start + 1 :]), self.features[start : n - 1], where, True, after)

    # -- proposing -------------------------------------------------------------------------------
    @property
    def shared(self) -> JakiroDraft:
        """The target and head every row drafts from (rows drafted together share it)."""
        return self.draft

    def _steps(
        self, context: list[int], max_tokens: int, max_nodes: int | None
    ) -> Generator[_HeadPass, Scored, Proposal]:
        """This row's drafting: yields the head forwards it needs, receives their scored predictions."""
        if max_tokens < 1:
            return Proposal.chain([])
        root = yield self._catch_up(context, after=self.hybrid and max_tokens == 2)
        # slots after the context: slot j holds the head input for the token at position j + 1
        tree = DraftTree(base=len(context) - 1)
        yield from self._grow(tree, root, max_tokens, max_nodes or max_tokens)
        if self.lookup is not None:
            tree.graft(self.lookup.propose(context, max_tokens).tokens, self.draft.model.cfg.vocab_size)
        order = tree.final
        index = {node: i for i, node in enumerate(order)}
        return Proposal(
            tokens=tuple(tree.tokens[node] for node in order),
            parents=tuple(index.get(tree.parents[node], -1) for node in order),
        )

    def _grow(
        self, tree: DraftTree, root: Scored, max_depth: int, max_nodes: int
    ) -> Generator[_HeadPass, Scored, None]:
        """EAGLE-2's expansion with Jakiro's hybrid last level, from the root's predictions (one row).
        Each expansion is a yielded head forward; its result holds the predicted features of the
        frontier's children / grandchildren and their scores."""
        vocab = self.draft.vocab_head.vocab
        frontier = [-1]
        scored = root
        made_by: dict[int, torch.Tensor] = {}  # node → the predicted feature its token was drawn from
        for depth in range(1, max_depth + 1):
            children = tree.add_children(frontier, scored.logp_next, vocab, self.topk, depth)
            for r, nodes in enumerate(children):
                for node in nodes:
                    made_by[node] = scored.next[r]
            if depth == max_depth:
                break
            if self.hybrid and depth == max_depth - 1:
                # the contrastive prediction of row r belongs under the best child of frontier node r
                best = [max(nodes, key=lambda c: tree.scores[c]) if nodes else None for nodes in children]
                rows = [r for r, b in enumerate(best) if b is not None]
                logp_after = scored.logp_after[rows]  # type: ignore[index]  # asked for at this depth
                tree.add_children([best[r] for r in rows], logp_after, vocab, self.topk, depth + 1)
                break
            new = sorted((c for nodes in children for c in nodes), key=lambda node: -tree.scores[node])
            frontier = new[: self.topk]
            if not frontier:
                break
            features = torch.stack([made_by[node] for node in frontier])
            scored = yield self._expand(tree, frontier, features, after=self.hybrid and depth + 2 == max_depth)
        tree.select(max_nodes)

    def _expand(self, tree: DraftTree, nodes: list[int], features: torch.Tensor, after: bool) -> _HeadPass:
        """The head forward for ``nodes`` (each sees the context and its own ancestors)."""
        slots = tuple(tree.assign_slot(node) for node in nodes)
        positions = tuple(tree.base - 1 + tree.depths[node] for node in nodes)
        mask = visible_slots_mask(tree.base, [tree.path_slots(node) for node in nodes], max(slots) + 1,
                                  self.features.device)
        tree.expanded.update(nodes)
        tokens = tuple(tree.tokens[node] for node in nodes)
        return _HeadPass(self, tokens, features, Placement(slots, positions, mask), False, after)
