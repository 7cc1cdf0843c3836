"""Verification rules against the exact distributions, on tiny vocabularies."""

from __future__ import annotations

import pytest
import torch

from joey.config import SamplingParams
from joey.sampling import probabilities, sample, warp_logits
from joey.verify import verify_greedy, verify_sampled

V = 6
TRIALS = 12000


def _first_token_distribution(p: torch.Tensor, q: torch.Tensor | None, draft_token: int | None, seed: int = 0):
    """Empirical distribution of the first committed token: draft x ~ q (or fixed), then verify."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V)
    p2 = torch.stack([p, p])  # [k + 1, V]; the second row is only used after an accept
    for _ in range(TRIALS):
        x = draft_token if q is None else int(sample(q[None], gen))
        v = verify_sampled(torch.tensor([x]), p2, None if q is None else q[None], gen)
        counts[x if v.accepted == 1 else v.bonus] += 1
    return counts / TRIALS


def _total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * (a - b).abs().sum().item()


CASES = {
    "p_equals_q": (torch.tensor([0.1, 0.2, 0.3, 0.15, 0.15, 0.1]), torch.tensor([0.1, 0.2, 0.3, 0.15, 0.15, 0.1])),
    "different": (torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1]), torch.tensor([0.05, 0.05, 0.1, 0.2, 0.3, 0.3])),
    "disjoint_supports": (torch.tensor([0.6, 0.4, 0.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5, 0.0])),
    "one_hot_q": (torch.tensor([0.2, 0.2, 0.2, 0.2, 0.1, 0.1]), torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])),
    "q_zero_where_p_positive": (
        torch.tensor([0.3, 0.3, 0.2, 0.2, 0.0, 0.0]), torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sampled_verification_reproduces_target_distribution(name):
    p, q = CASES[name]
    empirical = _first_token_distribution(p, q, None)
    # 12k samples over 6 outcomes: sampling noise in TV is ~0.01; a wrong rule is off by >= 0.05
    assert _total_variation(empirical, p) < 0.025, (name, empirical, p)
    assert (empirical[p == 0] == 0).all()


@pytest.mark.parametrize("draft_token", [0, 3, 5])
def test_deterministic_draft_is_a_point_mass(draft_token):
    p = torch.tensor([0.25, 0.05, 0.2, 0.3, 0.1, 0.1])
    empirical = _first_token_distribution(p, None, draft_token)
    assert _total_variation(empirical, p) < 0.025


def test_wrong_rule_would_be_detected():
    """The test has power: always accepting the draft yields q, far from p in TV."""
    p, q = CASES["different"]
    assert _total_variation(q, p) > 0.3


def test_chain_acceptance_counts_match_theory():
    """With a 2-token point-mass draft, P(accept both) = p0(x0) * p1(x1)."""
    p = torch.tensor([[0.7, 0.1, 0.1, 0.05, 0.05, 0.0], [0.2, 0.6, 0.1, 0.1, 0.0, 0.0], [1 / 6] * 6])
    gen = torch.Generator().manual_seed(1)
    both = sum(verify_sampled(torch.tensor([0, 1]), p, None, gen).accepted == 2 for _ in range(TRIALS)) / TRIALS
    assert abs(both - 0.7 * 0.6) < 0.02


def test_greedy_verification():
    logits = torch.tensor([[0.0, 5, 0], [9, 0, 0], [0, 0, 7], [1, 0, 0]])
    assert verify_greedy(torch.tensor([1, 0, 2]), logits).__dict__ == {"accepted": 3, "bonus": 0}
    assert verify_greedy(torch.tensor([1, 2, 2]), logits).__dict__ == {"accepted": 1, "bonus": 0}
    assert verify_greedy(torch.tensor([0, 0, 2]), logits).__dict__ == {"accepted": 0, "bonus": 1}
    assert verify_greedy(torch.tensor([], dtype=torch.long), logits[:1]).__dict__ == {"accepted": 0, "bonus": 1}


def test_warping_top_k_top_p_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    top2 = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(top2, torch.tensor([[2 / 3, 1 / 3, 0, 0]]))
    nucleus = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.7))  # 0.5 + 0.25 reaches 0.7
    assert torch.allclose(nucleus, torch.tensor([[2 / 3, 1 / 3, 0, 0]]))
    assert torch.isinf(warp_logits(logits, SamplingParams(temperature=1.0, top_p=0.4))[0, 1:]).all()
    cold = probabilities(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(cold, torch.softmax(logits / 0.5, -1))


def test_sample_follows_distribution():
    gen = torch.Generator().manual_seed(3)
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(20000, 4)
    freq = torch.bincount(sample(probs, gen), minlength=4).float() / 20000
    assert freq[1] == 0 and _total_variation(freq, probs[0]) < 0.02
