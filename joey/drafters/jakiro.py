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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from joey.batching import prefix_causal_mask, visible_slots_mask
from joey.config import SamplingParams
from joey.drafters.base import Proposal, common_prefix
from joey.drafters.draft_head import DraftVocabHead
from joey.drafters.prompt_lookup import PromptLookupDrafter
from joey.drafters.tree import DraftTree, candidate_log_probs, contiguous
from joey.models.jakiro_head import HeadOutput, JakiroHead
from joey.models.llama import LlamaModel


@dataclass(frozen=True)
class JakiroDraft:
    """What every row's drafter shares: the target (its embedding), the head and its vocabulary head."""

    model: LlamaModel
    head: JakiroHead
    vocab_head: DraftVocabHead

    @classmethod
    def build(cls, model: LlamaModel, head: JakiroHead) -> JakiroDraft:
        """On CPU, the head drafts in fp32 or bf16, whichever one forward measures faster here (bf16
        oneDNN kernels are ~3x faster on CPUs with AMX and far slower on some without). The
        drafting precision never changes the output: the target verifies in its own."""
        w = model.lm_head.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return cls(model, head, DraftVocabHead.build(model, head.vocab))
        choices = [torch.float32]
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            choices.append(torch.bfloat16)
        timed = []
        for dtype in choices:
            copy = JakiroHead(model.cfg, head.vocab, head.num_experts, head.cfg.intermediate_size)
            copy.load_state_dict(head.state_dict())
            copy = copy.to(dtype).eval()
            copy.prepack()
            draft = cls(model, copy, DraftVocabHead.build(model, head.vocab, dtype))
            timed.append((draft.forward_ms(), len(timed), draft))
        return min(timed)[2]

    @torch.inference_mode()
    def forward_ms(self, rows: int = 3, context: int = 64, repeats: int = 5) -> float:
        """Median time of one tree-depth forward (head + draft-vocabulary logits) for ``rows`` nodes."""
        import time

        p = self.head.fc.weight
        cache = self.head.new_cache(1, context + rows)
        x = torch.zeros(rows, self.model.cfg.hidden_size, dtype=p.dtype, device=p.device)
        positions = torch.arange(context, context + rows, device=p.device)[None]
        cos, sin = self.model.rope(positions)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            out = self.head(x, x, (1, rows), cos, sin, cache, context, context + rows, None)
            self.vocab_head.logits(out.next)
            times.append(time.perf_counter() - start)
        return 1000 * sorted(times[1:])[repeats // 2]


class JakiroDrafter:
    """Drafts a dynamic tree (a chain when ``topk == 1``) for one sequence; one instance per row."""

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

    # -- the head on slots of this drafter's cache -----------------------------------------------
    def _forward(
        self, tokens: list[int], features: torch.Tensor, slots: list[int], positions: list[int], mask
    ) -> HeadOutput:
        """Head inputs (token, feature) at ``slots`` / RoPE ``positions`` → its two predictions."""
        model = self.draft.model
        dev = self.features.device
        embeds = model.embed(torch.tensor(tokens, device=dev)).to(features.dtype)
        cos, sin = model.rope(torch.tensor([positions], device=dev))
        slot: int | torch.Tensor = slots[0] if contiguous(slots) else torch.tensor([slots], device=dev)
        return self.draft.head(embeds, features, (1, len(tokens)), cos, sin, self.cache, slot, max(slots) + 1, mask)

    def _catch_up(self, context: list[int]) -> HeadOutput:
        """Head slots j < n - 1 from (context[j + 1], f_j); returns the outputs of the new slots
        (the last one is the root of this step's tree)."""
        n = len(context)
        if self.known < n - 1:
            raise RuntimeError(f"Jakiro needs the target's features of {n - 1} positions; it has {self.known}")
        # the last slot is recomputed when nothing is new, so there is always a root
        start = max(0, min(self.done, common_prefix(self.tokens, context) - 1, n - 2))
        self.tokens = list(context)
        self.done = n - 1
        slots = list(range(start, n - 1))
        mask = prefix_causal_mask(start, len(slots), self.features.device)
        return self._forward(context[start + 1 :], self.features[start : n - 1], slots, slots, mask)

    # -- proposing -------------------------------------------------------------------------------
    def propose(self, context: list[int], max_tokens: int, max_nodes: int | None = None) -> Proposal:
        """Up to ``max_tokens`` deep and ``max_nodes`` tokens in all (default: a chain's worth)."""
        if max_tokens < 1:
            return Proposal.chain([])
        root = self._catch_up(context)
        # slots after the context: slot j holds the head input for the token at position j + 1
        tree = DraftTree(base=len(context) - 1)
        self._grow(tree, root.next[-1:], root.after_next[-1:], max_tokens, max_nodes or max_tokens)
        if self.lookup is not None:
            tree.graft(self.lookup.propose(context, max_tokens).tokens, self.draft.model.cfg.vocab_size)
        order = tree.final
        index = {node: i for i, node in enumerate(order)}
        return Proposal(
            tokens=tuple(tree.tokens[node] for node in order),
            parents=tuple(index.get(tree.parents[node], -1) for node in order),
        )

    def _grow(
        self, tree: DraftTree, nxt: torch.Tensor, after: torch.Tensor, max_depth: int, max_nodes: int
    ) -> None:
        """EAGLE-2's expansion with Jakiro's hybrid last level. ``nxt``/``after`` [F, hidden]: the
        predicted features of the frontier's children / grandchildren."""
        vocab = self.draft.vocab_head.vocab
        frontier = [-1]
        made_by: dict[int, torch.Tensor] = {}  # node → the predicted feature its token was drawn from
        for depth in range(1, max_depth + 1):
            children = tree.add_children(frontier, self._log_probs(nxt), vocab, self.topk, depth)
            for r, nodes in enumerate(children):
                for node in nodes:
                    made_by[node] = nxt[r]
            if depth == max_depth:
                break
            if self.hybrid and depth == max_depth - 1:
                # the contrastive prediction of row r belongs under the best child of frontier node r
                best = [max(nodes, key=lambda c: tree.scores[c]) if nodes else None for nodes in children]
                rows = [r for r, b in enumerate(best) if b is not None]
                tree.add_children([best[r] for r in rows], self._log_probs(after[rows]), vocab, self.topk, depth + 1)
                break
            new = sorted((c for nodes in children for c in nodes), key=lambda node: -tree.scores[node])
            frontier = new[: self.topk]
            if not frontier:
                break
            out = self._expand(tree, frontier, torch.stack([made_by[node] for node in frontier]))
            nxt, after = out.next, out.after_next
        tree.select(max_nodes)

    def _log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted features [F, hidden] → candidate scores over the draft vocabulary [F, draft_vocab]."""
        return candidate_log_probs(self.draft.vocab_head.logits(features), self.params)

    def _expand(self, tree: DraftTree, nodes: list[int], features: torch.Tensor) -> HeadOutput:
        """One head forward for ``nodes`` (each sees the context and its own ancestors)."""
        slots = [tree.assign_slot(node) for node in nodes]
        positions = [tree.base - 1 + tree.depths[node] for node in nodes]
        mask = visible_slots_mask(tree.base, [tree.path_slots(node) for node in nodes], max(slots) + 1,
                                  self.features.device)
        tree.expanded.update(nodes)
        return self._forward([tree.tokens[node] for node in nodes], features, slots, positions, mask)
