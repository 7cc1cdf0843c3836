"""Verification of draft tokens against the target: the only place where drafts are accepted.

Pure functions over probabilities, shared by every drafter. Greedy: accept the longest prefix on
which the target's argmax agrees, then emit the target's own token (the *bonus*). Sampling:
speculative sampling (Leviathan et al. 2023, arXiv 2211.17192, Alg. 1; Chen et al. 2023,
arXiv 2302.01318): accept draft token x with probability min(1, p(x)/q(x)); on rejection sample
from norm(max(0, p - q)); after a fully accepted draft sample the bonus from p. The committed
tokens are then distributed exactly as the target's own samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from joey.sampling import sample


@dataclass(frozen=True)
class Verdict:
    """How many draft tokens were accepted, and the token the target adds after them."""

    accepted: int
    bonus: int


def verify_greedy(
    draft: torch.Tensor,  # [k] draft token ids
    target_logits: torch.Tensor,  # [k + 1, vocab]: row i scores the token after draft[:i]
) -> Verdict:
    """Accept the longest prefix equal to the target's argmax; bonus = argmax after it."""
    choice = target_logits.argmax(-1)  # [k + 1]
    k = draft.shape[0]
    mismatch = (draft != choice[:k]).nonzero()
    n = int(mismatch[0, 0]) if mismatch.numel() else k
    return Verdict(n, int(choice[n]))


def verify_sampled(
    draft: torch.Tensor,  # [k] draft token ids
    p: torch.Tensor,  # [k + 1, vocab] target probabilities (after temperature / top-k / top-p)
    q: torch.Tensor | None,  # [k, vocab] the distributions the drafts were sampled from; None = point mass
    generator: torch.Generator | None,
) -> Verdict:
    """Speculative sampling over a chain; exact in distribution for any q (eq. in Alg. 1 of 2211.17192)."""
    k = draft.shape[0]
    if k:
        idx = torch.arange(k, device=p.device)
        p_x = p[idx, draft]  # [k]
        q_x = q[idx, draft] if q is not None else torch.ones_like(p_x)
        u = torch.rand(k, generator=generator, device=p.device, dtype=torch.float64)
        # accept while u < p(x)/q(x), written as u * q(x) < p(x) so q(x) = 0 needs no special case
        rejected = (u * q_x.double() >= p_x.double()).nonzero()
        if rejected.numel():
            n = int(rejected[0, 0])
            fallback = residual(p[n], q[n] if q is not None else None, int(draft[n]))
            return Verdict(n, int(sample(fallback[None], generator)))
    return Verdict(k, int(sample(p[k][None], generator)))


def residual(
    p: torch.Tensor,  # [vocab] target probabilities at the rejected position
    q: torch.Tensor | None,  # [vocab] draft distribution there; None = point mass on ``token``
    token: int,  # the rejected draft token
) -> torch.Tensor:
    """norm(max(0, p - q)): what to sample from after a rejection. Falls back to p if it is empty
    (only possible through rounding when p == q, where rejection has probability ~0)."""
    if q is None:
        q = torch.zeros_like(p)
        q[token] = 1.0
    r = (p - q).clamp_min(0)
    total = r.sum()
    return r / total if total > 0 else p
