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
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass strictly before it already reaches top_p (the top-1 always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


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
