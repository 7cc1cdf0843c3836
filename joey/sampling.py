"""Logits → probabilities → tokens. Pure functions, shared by autoregressive decoding and by
speculative verification (which must warp target and draft logits identically)."""

from __future__ import annotations

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


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row of ``probs`` [N, vocab] → [N] (inverse-CDF, reproducible on CPU/GPU)."""
    u = torch.rand(probs.shape[:-1] + (1,), generator=generator, device=probs.device, dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    # normalise by the total so rounding can never push u past the end of the CDF
    idx = torch.searchsorted(cdf, u * cdf[..., -1:], right=True)
    return idx.squeeze(-1).clamp_max(probs.shape[-1] - 1)


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [N, vocab] → tokens [N]: argmax when greedy, else a sample of the warped distribution."""
    if params.greedy:
        return logits.argmax(-1)
    return sample(probabilities(logits, params), generator)
