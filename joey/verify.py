"""Verification of draft tokens against the target: the only place where drafts are accepted.

Pure functions over the target's logits or probabilities, shared by every drafter. A draft is a
*tree* given by parent indices (``parents[i] = -1``: child of the last committed token); a chain is
the tree with one branch everywhere, so there is one code path for both.

Row 0 of the target's distributions scores the token after the last committed one (the root);
row ``i + 1`` scores the token after draft node ``i``.

Greedy: follow the root-to-node path whose every token equals the target's argmax at its parent;
the *bonus* is the target's argmax after the last accepted node.

Sampling (the default, ``verify_keyed``): the target's choice at every node is its draw keyed by the
request's seed and the node's position (``joey.sampling.keyed_uniform``), the very draw AR makes
there; following the choices as in greedy decoding accepts exactly AR's tokens, for every method,
tree and batch. A deterministic candidate x is accepted with probability p(x); a sampled drafter
that draws with the same keyed uniform on its own q is coupled to the target.

Sampling with ``SamplingParams.rejection``: recursive rejection over the children of each node
(multi-candidate speculative sampling: SpecInfer, Miao et al. 2024, arXiv 2305.09781, Alg. 2; for
one child per node it is Leviathan et al. 2023, arXiv 2211.17192, Alg. 1). At a node with target distribution p, try its
children in order; child c carries token x_c drawn from q_c (a point mass for deterministic
drafters: top-k candidates, prompt lookup). Accept x_c with probability min(1, p(x_c) / q_c(x_c));
on rejection replace p by norm(max(0, p − q_c)) and try the next child — for a point mass that is
"set p(x_c) = 0 and renormalise". If every child is rejected, sample from what is left of p; after
an accepted leaf the bonus is sampled from the target's processed distribution at the leaf. Each
child's trial is one speculative-sampling step whose "else" branch samples exactly from the
residual, so the committed tokens are distributed exactly as the target's own samples. This needs
each q_c to be the distribution x_c was really drawn from given what came before it: siblings
drawn i.i.d. from one q, or point masses chosen without looking at the target; siblings sampled
*without replacement* would need their conditional q.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from joey.batching import depths_of
from joey.config import SamplingParams
from joey.sampling import next_tokens, sample


@dataclass(frozen=True)
class Verdict:
    """The accepted root-to-node path (draft node indices, in order) and the token the target adds
    after it."""

    path: tuple[int, ...]
    bonus: int

    @property
    def accepted(self) -> int:
        return len(self.path)


def children_of(parents: Sequence[int]) -> list[list[int]]:
    """Children of every node in proposal order: entry 0 is the root's, entry ``i + 1`` node i's."""
    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"node {i} has parent {parent}; a parent must come before its child")
        children[parent + 1].append(i)
    return children


def chain_parents(k: int) -> tuple[int, ...]:
    """Parent indices of a chain of k draft tokens: [-1, 0, 1, ...]."""
    return tuple(range(-1, k - 1))


def verify_greedy(
    tokens: Sequence[int],  # [k] draft token ids
    parents: Sequence[int],  # [k] parent index of each node (-1 = root)
    target_logits: torch.Tensor,  # [k + 1, vocab]: row 0 at the root, row i + 1 after node i
) -> Verdict:
    """The path on which every draft token equals the target's argmax at its parent."""
    return follow_choices(tokens, parents, target_logits.argmax(-1).tolist())


def follow_choices(
    tokens: Sequence[int],  # [k] draft token ids
    parents: Sequence[int],  # [k] parent index of each node (-1 = root)
    choice: Sequence[int] | Callable[[int], int],  # the target's token at the root (0) and after node i (i + 1)
) -> Verdict:
    """The path on which every draft token equals the target's choice at its parent; the bonus is
    the choice after the path. At each node the first child holding that token is followed
    (drafters never propose equal siblings). ``choice`` may be a function, asked only for the
    rows the walk reaches."""
    choose = choice if callable(choice) else choice.__getitem__
    children = children_of(parents)
    node, path = -1, []
    while True:
        want = choose(node + 1)
        nxt = next((c for c in children[node + 1] if tokens[c] == want), None)
        if nxt is None:
            return Verdict(tuple(path), int(want))
        path.append(nxt)
        node = nxt


def verify_keyed(
    tokens: Sequence[int],  # [k] draft token ids
    parents: Sequence[int],  # [k] parent index of each node (-1 = root)
    logits: torch.Tensor,  # [k + 1, vocab] target logits at the root and after each node
    params: SamplingParams,  # how to warp them; its seed keys the draws
    position: int,  # the sequence position the root's row chooses (the pending token's + 1)
) -> Verdict:
    """The target's choice at every node is its keyed draw at that node's position (the root's at
    ``position``, a node at depth d chooses position + d: ``joey.sampling.keyed_uniform``): exactly
    what AR samples there, so following the choices accepts AR's tokens. A deterministic candidate
    x is accepted with probability p(x), as under rejection sampling. Only the rows on the accepted
    path and the bonus's are warped and drawn (one row costs ~0.35 ms at a 49 k vocabulary, a
    tenth of the 135M model's step), each alone, as AR draws it."""
    depths = depths_of(parents)

    def choice(row: int) -> int:
        return int(next_tokens(logits[row : row + 1], params, [position + depths[row]])[0])

    return follow_choices(tokens, parents, choice)


def verify_sampled(
    tokens: Sequence[int],  # [k] draft token ids
    parents: Sequence[int],  # [k] parent index of each node (-1 = root)
    p: torch.Tensor,  # [k + 1, vocab] target probabilities (after temperature / top-k / top-p)
    q: torch.Tensor | None,  # [k, vocab] the distribution each node was drawn from; None = point masses
    generator: torch.Generator | None,
) -> Verdict:
    """Recursive rejection sampling over the tree (SpecInfer Alg. 2); exact in distribution."""
    children = children_of(parents)
    node, path = -1, []
    while True:
        dist = p[node + 1].double()  # p at this node; shrinks as children are rejected
        for c in children[node + 1]:
            x = tokens[c]
            q_c = q[c].double() if q is not None else None
            q_x = q_c[x] if q_c is not None else 1.0
            u = torch.rand((), generator=generator, device=p.device, dtype=torch.float64)
            # accept while u < p(x)/q(x), written as u * q(x) < p(x) so q(x) = 0 needs no special case
            if u * q_x < dist[x]:
                path.append(c)
                node = c
                break
            dist = residual(dist, q_c, x)
        else:
            return Verdict(tuple(path), int(sample(dist[None], generator)[0]))


def residual(
    p: torch.Tensor,  # [vocab] target probabilities at the node (what is left of them)
    q: torch.Tensor | None,  # [vocab] the rejected child's draft distribution; None = point mass on ``token``
    token: int,  # the rejected draft token
) -> torch.Tensor:
    """norm(max(0, p − q)): what to sample from after a rejection. Falls back to p if it is empty
    (only possible through rounding when p == q, where rejection has probability ~0)."""
    if q is None:
        r = p.clone()
        r[token] = 0.0
    else:
        r = (p - q).clamp_min(0)
    total = r.sum()
    return r / total if total > 0 else p
