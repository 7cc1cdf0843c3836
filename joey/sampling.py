"""Logits → probabilities → tokens. Pure functions, shared by autoregressive decoding and by
speculative verification (which must warp target and draft logits identically)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from joey.config import SamplingParams


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k and top-p to ``logits`` [..., vocab] (fp32); removed entries → -inf.

    Order as in transformers: temperature, then top-k, then top-p (nucleus over the top-k survivors).
    """
    if params.greedy:
        return logits
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        logits = logits.masked_fill(logits < nucleus_floor(logits, params.top_p), float("-inf"))
    return logits


# the first nucleus search looks at this many candidates; LLM distributions usually reach top_p well within it
_NUCLEUS_FIRST_K = 64


def nucleus_floor(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest logit top-p keeps, per row of ``logits`` [..., vocab] → [..., 1]: a token stays
    when the mass of the tokens above it is below ``top_p`` (the top-1 always stays; tokens tied
    with the last one kept stay too, so ties never depend on a sort's order).

    Why not a sort of the vocabulary: that costs ~2.7 ms for 49 k logits on a 2-core Xeon, more
    than half an AR step of the 135M model. The nucleus lies inside the top k as soon as their mass
    reaches ``top_p``, so the search looks at the top 64 and widens (x16) only for rows that need it;
    the answer is the same as the full sort's."""
    vocab = logits.shape[-1]
    log_total = logits.logsumexp(-1, keepdim=True)
    k = min(_NUCLEUS_FIRST_K, vocab)
    while True:
        top = logits.topk(k, dim=-1).values  # sorted, descending
        probs = (top - log_total).exp()
        before = probs.cumsum(-1) - probs
        # mass of the k candidates = before[-1] + probs[-1]; once it reaches top_p for every row, every
        # token below the candidates has at least top_p above it and is dropped
        if k == vocab or bool(((before[..., -1] + probs[..., -1]) >= top_p).all()):
            break
        k = min(16 * k, vocab)
    kept = (before < top_p).sum(-1, keepdim=True)  # >= 1: before[0] = 0 < top_p
    return top.gather(-1, kept - 1)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the sampler draws from, [..., vocab]; one-hot on the argmax when greedy."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return warp_logits(logits.float(), params).softmax(-1)


_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that scrambles every bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def keyed_uniform(seed: int, position: int) -> float:
    """The uniform in [0, 1) that chooses the token at ``position`` (its index in the sequence,
    prompt included) of a request with ``seed``: a function of the two numbers only (a counter-based
    generator), never of the batch, the step or the method. So every method reproduces AR's sampled
    tokens: the target's choice at a position is the same draw whichever way the position is
    reached. Distinct positions get independent-looking uniforms, so AR's sequence distribution is
    exactly the model's."""
    return (_mix(_mix(seed & _MASK) ^ (position & _MASK)) >> 11) * 2.0**-53


def sample_at(probs: torch.Tensor, uniforms: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: one token per row of ``probs`` [N, vocab] for the given uniforms [N] → [N]."""
    u = torch.as_tensor(uniforms, dtype=torch.float64, device=probs.device).reshape(-1, 1)
    cdf = probs.double().cumsum(-1)
    # normalise by the total so rounding can never push u past the end of the CDF
    idx = torch.searchsorted(cdf, u * cdf[..., -1:], right=True)
    return idx.squeeze(-1).clamp_max(probs.shape[-1] - 1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row of ``probs`` [N, vocab] → [N] with uniforms from a stateful generator
    (rejection sampling's draws, whose order depends on the method: not token-reproducible)."""
    u = torch.rand(probs.shape[:-1], generator=generator, device=probs.device, dtype=torch.float64)
    return sample_at(probs, u)


def draw(probs: torch.Tensor, params: SamplingParams, positions: Sequence[int],
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``probs`` [N, vocab], row i being the token at ``positions[i]``: keyed
    by the request's seed and the position (``keyed_uniform``), or from ``generator`` under
    ``params.rejection``."""
    if params.rejection:
        return sample(probs, generator)
    assert params.seed is not None, "a sampled request carries a seed (ContinuousBatch.add gives one)"
    return sample_at(probs, [keyed_uniform(params.seed, p) for p in positions])


def next_tokens(logits: torch.Tensor, params: SamplingParams, positions: Sequence[int],
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [N, vocab] → tokens [N] at ``positions``: argmax when greedy, else a draw (``draw``)
    from the warped distribution."""
    if params.greedy:
        return logits.argmax(-1)
    return draw(probabilities(logits, params), params, positions, generator)
