"""A draft token tree under construction, shared by the tree drafters (Kangaroo, Jakiro).

Nodes are kept in creation order with their parent, the cumulative log-probability of their path,
their depth and, for drafters with their own caches, the slot each node's state occupies there.
``select`` keeps the best nodes (EAGLE-2's final rerank: a parent always outranks its children, so
the kept set is a tree); ``graft`` adds a retrieval branch; ``follow`` finds the committed path.
``Placement`` says where one row's tokens of a draft forward sit in that row's own caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from joey.config import SamplingParams
from joey.models.kv_cache import KVCache
from joey.models.llama import RowSpan
from joey.sampling import probabilities


def candidate_log_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Scores of candidate children: the draft's log-probabilities, after the sampling warps
    (temperature, top-k/p) when sampling, so the tree favours what the target will likely sample."""
    if params.greedy:
        return torch.log_softmax(logits.float(), -1)
    return probabilities(logits, params).log()


def contiguous(slots: list[int]) -> bool:
    """Whether slots are consecutive (then a slice, not a scatter, writes them)."""
    return slots == list(range(slots[0], slots[0] + len(slots)))


@dataclass(frozen=True)
class Placement:
    """One row's tokens of a draft forward in the row's own caches: their slots, RoPE positions and
    what each may attend to."""

    slots: tuple[int, ...]
    positions: tuple[int, ...]
    mask: torch.Tensor | None  # [1, 1, len(slots), max(slots) + 1] bool; None = causal

    def span(self, cache: KVCache, device: torch.device | str) -> RowSpan:
        """The row's part of a packed forward (``LlamaModel.run_layers_rows``) against ``cache``."""
        first: int | torch.Tensor = self.slots[0]
        if not contiguous(list(self.slots)):
            first = torch.tensor([self.slots], device=device)
        return RowSpan(len(self.slots), cache, first, max(self.slots) + 1, self.mask)


class DraftTree:
    """A draft tree under construction: nodes in creation order with parents, scores and slots."""

    def __init__(self, base: int) -> None:
        self.base = base  # slot (and length) of the context; the pending token sits at base - 1
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.scores: list[float] = []  # cumulative log-probability of the node's path
        self.depths: list[int] = []
        self.dists: list[torch.Tensor] = []  # sampled chains: the distribution each token was drawn from
        self.slots: dict[int, int] = {}  # node → slot in the drafter's caches
        self.expanded: set[int] = set()  # nodes the draft network has run on (their children exist)
        self.final: list[int] = []  # the proposed nodes, parents first

    def add(self, token: int, parent: int, score: float, depth: int, dist: torch.Tensor | None = None) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        self.depths.append(depth)
        if dist is not None:
            self.dists.append(dist)
        return len(self.tokens) - 1

    def add_children(
        self, parents: list[int], logp: torch.Tensor, vocab: torch.Tensor, k: int, depth: int
    ) -> list[list[int]]:
        """The top-``k`` tokens of each row of ``logp`` [len(parents), draft_vocab] (log-probabilities
        over the draft vocabulary ``vocab``) as children of that row's parent, scored by their path's
        cumulative log-probability; returns the new nodes of each parent."""
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        scores = (top.values + torch.tensor([self.score(p) for p in parents])[:, None]).tolist()
        ids = vocab[top.indices].tolist()
        return [
            [self.add(int(ids[r][c]), parents[r], scores[r][c], depth)
             for c in range(len(ids[r])) if scores[r][c] > float("-inf")]
            for r in range(len(parents))
        ]

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
