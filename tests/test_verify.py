"""Verification rules against the exact distributions, on tiny vocabularies."""

from __future__ import annotations

import math

import pytest
import torch

from joey.config import SamplingParams
from joey.sampling import probabilities, sample, warp_logits
from joey.verify import Verdict, chain_parents, children_of, residual, verify_greedy, verify_sampled

V = 6
TRIALS = 12000
TREE_TRIALS = 20000


def _first_token_distribution(p: torch.Tensor, q: torch.Tensor | None, draft_token: int | None, seed: int = 0):
    """Empirical distribution of the first committed token: draft x ~ q (or fixed), then verify."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V)
    p2 = torch.stack([p, p])  # [k + 1, V]; the second row is only used after an accept
    for _ in range(TRIALS):
        x = draft_token if q is None else int(sample(q[None], gen)[0])
        v = verify_sampled([x], chain_parents(1), p2, None if q is None else q[None], gen)
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
    both = sum(verify_sampled([0, 1], chain_parents(2), p, None, gen).accepted == 2 for _ in range(TRIALS)) / TRIALS
    assert abs(both - 0.7 * 0.6) < 0.02


def test_greedy_verification():
    logits = torch.tensor([[0.0, 5, 0], [9, 0, 0], [0, 0, 7], [1, 0, 0]])
    chain = chain_parents(3)
    assert verify_greedy([1, 0, 2], chain, logits) == Verdict((0, 1, 2), 0)
    assert verify_greedy([1, 2, 2], chain, logits) == Verdict((0,), 0)
    assert verify_greedy([0, 0, 2], chain, logits) == Verdict((), 1)
    assert verify_greedy([], (), logits[:1]) == Verdict((), 1)
    assert verify_greedy([1, 0, 2], chain, logits).accepted == 3
    # tensors are still accepted as token sequences
    assert verify_greedy(torch.tensor([1, 0, 2]), chain, logits) == Verdict((0, 1, 2), 0)


def test_warping_top_k_top_p_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    top2 = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(top2, torch.tensor([[2 / 3, 1 / 3, 0, 0]]))
    nucleus = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.7))  # 0.5 + 0.25 reaches 0.7
    assert torch.allclose(nucleus, torch.tensor([[2 / 3, 1 / 3, 0, 0]]))
    assert torch.isinf(warp_logits(logits, SamplingParams(temperature=1.0, top_p=0.4))[0, 1:]).all()
    cold = probabilities(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(cold, torch.softmax(logits / 0.5, -1))


def _nucleus_by_sort(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The textbook nucleus: sort the whole vocabulary, keep while the mass before is below top_p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    p = sorted_logits.softmax(-1)
    drop = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, (p.cumsum(-1) - p) >= top_p)
    return logits.masked_fill(drop, float("-inf"))


@pytest.mark.parametrize("scale", [0.01, 1.0, 8.0])  # 0.01: flat rows, the search must widen to the whole vocab
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_nucleus_equals_the_full_sort(scale, top_p):
    gen = torch.Generator().manual_seed(int(100 * scale) + int(1000 * top_p))
    logits = torch.randn(7, 5000, generator=gen) * scale
    logits[3] = logits[3] * 50  # one peaked row among flat ones
    warped = warp_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert torch.equal(torch.isinf(warped), torch.isinf(_nucleus_by_sort(logits, top_p)))


def test_nucleus_keeps_ties_whatever_their_order():
    logits = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    # 0.4 + 0.2 reaches 0.5 at one of the tied tokens: all three tied tokens stay, none by a sort's whim
    assert not torch.isinf(warp_logits(logits, SamplingParams(temperature=1.0, top_p=0.5))).any()


def test_sample_follows_distribution():
    gen = torch.Generator().manual_seed(3)
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(20000, 4)
    freq = torch.bincount(sample(probs, gen), minlength=4).float() / 20000
    assert freq[1] == 0 and _total_variation(freq, probs[0]) < 0.02


# ---------------------------------------------------------------------------------------------------
# Trees. A committed sequence is the accepted path's tokens followed by the bonus. Losslessness means
# it is distributed as the target's own autoregressive sample, stopped at the first token that leaves
# the tree (the target after such a token is unknown to the verifier) or one token past a leaf.
# ---------------------------------------------------------------------------------------------------

Dist = dict[tuple[int, ...], float]

# (token, children) in proposal order; siblings carry distinct tokens (deterministic top-k style).
# Depth 3, 2-3 children at every inner node.
POINT_MASS_TREE = [
    (2, [(1, [(0, []), (5, [])]), (2, [(3, []), (4, []), (1, [])]), (5, [(5, []), (2, [])])]),
    (0, [(3, [(2, []), (3, [])]), (0, [(4, []), (0, []), (1, [])])]),
    (4, [(4, [(0, []), (1, [])]), (1, [(1, []), (3, [])])]),
    (1, [(0, [(0, []), (2, [])]), (2, [(5, []), (3, [])])]),  # p_root(1) = 0: never reachable
]


def _flatten(spec) -> tuple[list[int], list[int], dict[tuple[int, ...], int]]:
    """Nested (token, children) → tokens and parents in depth-first order, and {token path: node index}."""
    tokens: list[int] = []
    parents: list[int] = []
    node_at: dict[tuple[int, ...], int] = {}

    def visit(children, parent: int, prefix: tuple[int, ...]) -> None:
        for token, grandchildren in children:
            node = len(tokens)
            tokens.append(token)
            parents.append(parent)
            node_at[prefix + (token,)] = node
            visit(grandchildren, node, prefix + (token,))

    visit(spec, -1, ())
    return tokens, parents, node_at


def _point_mass_tree_target() -> tuple[list[int], list[int], dict[tuple[int, ...], int], torch.Tensor]:
    """The tree and a fixed target: random rows with zeros, a few hand-set rows (one-hot, zeros)."""
    tokens, parents, node_at = _flatten(POINT_MASS_TREE)
    gen = torch.Generator().manual_seed(1234)
    p = torch.rand(len(tokens) + 1, V, generator=gen) ** 2
    p[torch.rand(p.shape, generator=gen) < 0.3] = 0.0  # random zeros
    p[:, 0] += 1e-3  # keep every row non-empty
    p = p / p.sum(-1, keepdim=True)
    p[0] = torch.tensor([0.3, 0.0, 0.25, 0.1, 0.35, 0.0])  # child tokens 2, 0, 4 (and 1 with zero mass); 3 leaves
    p[1 + node_at[(2,)]] = torch.eye(V)[2]  # one-hot on a child token: that child is always accepted
    p[1 + node_at[(4,)]] = torch.eye(V)[3]  # one-hot on a token outside the tree: bonus is forced
    p[1 + node_at[(0, 3)]] = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0, 0.5])  # one child token impossible
    p[1 + node_at[(2, 2, 4)]] = torch.eye(V)[5]  # one-hot at a leaf
    return tokens, parents, node_at, p


def _committed_distribution(p: torch.Tensor, node_at: dict[tuple[int, ...], int]) -> Dist:
    """Exact law of the committed sequence: the target's autoregressive sample, stopped when it leaves the tree."""
    out: Dist = {}

    def walk(prefix: tuple[int, ...], node: int, mass: float) -> None:
        for token, prob in enumerate(p[node + 1].double().tolist()):
            if prob == 0.0:
                continue
            child = node_at.get(prefix + (token,))
            if child is None:
                out[prefix + (token,)] = mass * prob
            else:
                walk(prefix + (token,), child, mass * prob)

    walk((), -1, 1.0)
    return out


def _truncate(dist: Dist, n: int) -> Dist:
    out: Dist = {}
    for seq, mass in dist.items():
        out[seq[:n]] = out.get(seq[:n], 0.0) + mass
    return out


def _tv(a: Dist, b: Dist) -> float:
    return 0.5 * sum(abs(a.get(key, 0.0) - b.get(key, 0.0)) for key in a.keys() | b.keys())


def _tv_threshold(expected: Dist, n: int, delta: float = 1e-4) -> float:
    """A bound that the TV between ``expected`` and an n-sample empirical law exceeds with prob < delta.

    E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / n) (Jensen per outcome), and TV moves by at most 1/n when
    one sample changes, so McDiarmid gives P(TV > E[TV] + t) <= exp(-2 n t^2).
    """
    mean = 0.5 * sum(math.sqrt(m * (1 - m) / n) for m in expected.values())
    return mean + math.sqrt(math.log(1 / delta) / (2 * n))


def _empirical_point_mass_tree(verify, seed: int = 0) -> Dist:
    tokens, parents, _, p = _point_mass_tree_target()
    children = children_of(parents)
    gen = torch.Generator().manual_seed(seed)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(TREE_TRIALS):
        v = verify(tokens, parents, p, None, gen)
        assert all(parents[b] == a for a, b in zip((-1,) + v.path, v.path)), v  # a root-to-node path
        seq = tuple(tokens[i] for i in v.path) + (v.bonus,)
        counts[seq] = counts.get(seq, 0) + 1
    if verify is verify_sampled:  # the bonus is never one of the (rejected) children of the last node
        for seq in counts:
            *prefix, bonus = seq
            node = -1
            for t in prefix:
                node = next(c for c in children[node + 1] if tokens[c] == t)
            assert bonus not in {tokens[c] for c in children[node + 1]}, seq
    return {seq: c / TREE_TRIALS for seq, c in counts.items()}


@pytest.fixture(scope="module")
def point_mass_tree_empirical() -> Dist:
    return _empirical_point_mass_tree(verify_sampled)


@pytest.mark.parametrize("length", [1, 2, 3, None])
def test_point_mass_tree_commits_target_samples(point_mass_tree_empirical, length):
    """First token ~ p_root; (t1, t2) for t1 a root child ~ p_root(t1) p_child(t2); likewise deeper."""
    _, _, node_at, p = _point_mass_tree_target()
    exact = _committed_distribution(p, node_at)
    assert abs(sum(exact.values()) - 1) < 1e-6  # float32 rows
    if length is not None:
        exact, empirical = _truncate(exact, length), _truncate(point_mass_tree_empirical, length)
    else:
        empirical = point_mass_tree_empirical
    if length == 1:
        assert exact == pytest.approx({(t,): m for t, m in enumerate(p[0].tolist()) if m > 0})
    if length == 2:
        # spelled out: the joint restricted to t1 in the root's children factorises through the child's row
        joint = {
            (t1, t2): p[0, t1].item() * p[1 + node, t2].item()
            for (t1, *deeper), node in node_at.items()
            if not deeper
            for t2 in range(V)
            if p[0, t1] * p[1 + node, t2] > 0
        }
        assert {seq: m for seq, m in exact.items() if len(seq) == 2} == pytest.approx(joint)
    assert set(empirical) <= set(exact), set(empirical) - set(exact)  # nothing of probability 0 is committed
    threshold = _tv_threshold(exact, TREE_TRIALS)
    assert _tv(empirical, exact) < threshold, (length, _tv(empirical, exact), threshold)


def _accept_first_child(tokens, parents, p, q, generator) -> Verdict:
    """WRONG: always accept the first child (what a drafter trusting itself would do)."""
    children = children_of(parents)
    node, path = -1, []
    while children[node + 1]:
        node = children[node + 1][0]
        path.append(node)
    return Verdict(tuple(path), int(sample(p[node + 1][None], generator)[0]))


def _resample_from_unmodified_p(tokens, parents, p, q, generator) -> Verdict:
    """WRONG: accepts each child with p(x) regardless of earlier rejections and, after rejecting every
    child, samples from the untouched p instead of the residual (a rejected token can come back)."""
    children = children_of(parents)
    node, path = -1, []
    while True:
        for c in children[node + 1]:
            if torch.rand((), generator=generator, dtype=torch.float64) < p[node + 1, tokens[c]]:
                path.append(c)
                node = c
                break
        else:
            return Verdict(tuple(path), int(sample(p[node + 1][None], generator)[0]))


@pytest.mark.parametrize("wrong_rule", [_accept_first_child, _resample_from_unmodified_p])
def test_point_mass_tree_test_has_power(wrong_rule):
    """Wrong rules run through the same harness fail the same thresholds, at the first token already."""
    _, _, node_at, p = _point_mass_tree_target()
    exact = _committed_distribution(p, node_at)
    empirical = _empirical_point_mass_tree(wrong_rule)
    for length in (1, 2):
        exact_n, empirical_n = _truncate(exact, length), _truncate(empirical, length)
        assert _tv(empirical_n, exact_n) > 2 * _tv_threshold(exact_n, TREE_TRIALS), (wrong_rule.__name__, length)


def _sampled_tree_committed(p_root: torch.Tensor, q_root: torch.Tensor, seed: int = 0) -> Dist:
    """A depth-2 tree drawn from the drafter: 2 root children i.i.d. from q_root, then 2 children of
    each i.i.d. from q_after[token]; the target after token a is p_after[a]. Returns the empirical law
    of the first two tokens of (committed sequence, continued by the target's own sampling if short)."""
    p_after = torch.stack([p_root.roll(a) for a in range(V)])  # target after (.., a): keeps the case's shape
    q_after = torch.stack([q_root.roll(a) for a in range(V)])
    gen = torch.Generator().manual_seed(seed)
    draw = torch.Generator().manual_seed(seed + 1)
    x = sample(q_root.expand(2 * TREE_TRIALS, V), draw).view(TREE_TRIALS, 2)  # root children
    g = sample(q_after[x].repeat_interleave(2, dim=1).reshape(-1, V), draw).view(TREE_TRIALS, 4)  # grandchildren
    parents = (-1, -1, 0, 0, 1, 1)
    counts: dict[tuple[int, ...], int] = {}
    for xs, gs in zip(x.tolist(), g.tolist()):
        tokens = xs + gs
        q = torch.stack([q_root, q_root, q_after[xs[0]], q_after[xs[0]], q_after[xs[1]], q_after[xs[1]]])
        p = torch.cat([p_root[None], p_after[xs], p_after[gs]])  # rows: root, nodes 0..5
        v = verify_sampled(tokens, parents, p, q, gen)
        assert all(parents[b] == a for a, b in zip((-1,) + v.path, v.path))
        seq = tuple(tokens[i] for i in v.path) + (v.bonus,)
        if len(seq) == 1:  # the target keeps decoding on its own
            seq += (int(sample(p_after[seq[0]][None], gen)[0]),)
        counts[seq[:2]] = counts.get(seq[:2], 0) + 1
    return {seq: c / TREE_TRIALS for seq, c in counts.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_sampled_tree_commits_target_samples(name):
    """Multi-candidate rejection sampling with i.i.d. candidates: first token ~ p_root, and the first two
    (continued by the target if only one was committed) ~ p_root(t1) p_after[t1](t2)."""
    p_root, q_root = CASES[name]
    empirical = _sampled_tree_committed(p_root, q_root)
    p_after = [p_root.roll(a).tolist() for a in range(V)]
    exact = {(a, b): p_root[a].item() * p_after[a][b] for a in range(V) for b in range(V) if p_root[a] * p_after[a][b]}
    first_exact = {(a,): m for a, m in enumerate(p_root.tolist()) if m > 0}
    first = _truncate(empirical, 1)
    assert set(first) <= set(first_exact) and set(empirical) <= set(exact)
    assert _tv(first, first_exact) < _tv_threshold(first_exact, TREE_TRIALS), (name, first)
    assert _tv(empirical, exact) < _tv_threshold(exact, TREE_TRIALS), name


def test_greedy_tree():
    #            node:  0  1  2  3  4  5
    tokens = [3, 1, 2, 0, 4, 2]
    parents = [-1, -1, 1, 1, 3, 0]  # root: 0, 1; node 1: 2, 3; node 3: 4; node 0: 5
    logits = torch.zeros(len(tokens) + 1, V)

    def argmax_at(row: int, token: int) -> None:
        logits[row] = 0.0
        logits[row, token] = 1.0

    argmax_at(0, 1)  # root → node 1 (the second sibling)
    argmax_at(1, 2)  # after node 0: would accept node 5, but node 0 is not on the path
    argmax_at(2, 0)  # after node 1 → node 3 (its second child)
    argmax_at(3, 4)  # after node 2 (a leaf)
    argmax_at(4, 4)  # after node 3 → node 4
    argmax_at(5, 5)  # after node 4 (a leaf): the bonus
    argmax_at(6, 0)  # after node 5 (a leaf)
    assert verify_greedy(tokens, parents, logits) == Verdict((1, 3, 4), 5)
    argmax_at(2, 2)  # after node 1 → node 2 (first child, a leaf) → bonus from row 3
    assert verify_greedy(tokens, parents, logits) == Verdict((1, 2), 4)
    argmax_at(2, 0)
    argmax_at(4, 2)  # after node 3: no child matches → the bonus is that argmax
    assert verify_greedy(tokens, parents, logits) == Verdict((1, 3), 2)
    argmax_at(2, 5)  # after node 1: neither child (2, 0) matches
    assert verify_greedy(tokens, parents, logits) == Verdict((1,), 5)
    argmax_at(0, 3)  # root → node 0 (first sibling) → node 5 (token 2) → bonus from row 6
    assert verify_greedy(tokens, parents, logits) == Verdict((0, 5), 0)
    argmax_at(0, 4)  # no root child matches
    assert verify_greedy(tokens, parents, logits) == Verdict((), 4)
    assert verify_greedy([], [], logits[:1]) == Verdict((), 4)  # empty tree: the root's argmax


def test_greedy_chain_matches_longest_prefix_rule():
    gen = torch.Generator().manual_seed(5)
    for _ in range(300):
        k = int(torch.randint(0, 6, (), generator=gen))
        logits = torch.randn(k + 1, V, generator=gen)
        choice = logits.argmax(-1).tolist()
        draft = [choice[i] if torch.rand((), generator=gen) < 0.7 else (choice[i] + 1) % V for i in range(k)]
        n = next((i for i in range(k) if draft[i] != choice[i]), k)  # the old chain rule
        assert verify_greedy(draft, chain_parents(k), logits) == Verdict(tuple(range(n)), choice[n])


def test_sampled_with_one_hot_target_is_greedy():
    """At a one-hot target (temperature → 0) sampled verification of point masses is greedy verification."""
    tokens, parents, _, _ = _point_mass_tree_target()
    gen = torch.Generator().manual_seed(7)
    for _ in range(50):
        logits = torch.randn(len(tokens) + 1, V, generator=gen)
        # make the tree's tokens the argmax often enough that paths get deep
        logits[1 + torch.arange(len(tokens)), torch.tensor(tokens)] += 1.0
        one_hot = torch.nn.functional.one_hot(logits.argmax(-1), V).float()
        assert verify_sampled(tokens, parents, one_hot, None, gen) == verify_greedy(tokens, parents, logits)


def test_children_of_and_chain_parents():
    assert chain_parents(0) == ()
    assert chain_parents(3) == (-1, 0, 1)
    assert children_of(()) == [[]]
    assert children_of(chain_parents(3)) == [[0], [1], [2], []]
    assert children_of([-1, -1, 0, 1, 0]) == [[0, 1], [2, 4], [3], [], [], []]


@pytest.mark.parametrize("parents", [[0], [-1, 1], [-1, 2, 0], [-1, 0, 3, 1], [-2]])
def test_children_of_rejects_parent_not_before_child(parents):
    with pytest.raises(ValueError):
        children_of(parents)
    tokens = [0] * len(parents)
    with pytest.raises(ValueError):
        verify_greedy(tokens, parents, torch.zeros(len(parents) + 1, V))
    with pytest.raises(ValueError):
        verify_sampled(tokens, parents, torch.full((len(parents) + 1, V), 1 / V), None, torch.Generator())


def test_residual():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    assert torch.allclose(residual(p, None, 0), torch.tensor([0.0, 0.6, 0.4, 0.0], dtype=torch.float64))
    q = torch.tensor([0.1, 0.5, 0.2, 0.2], dtype=torch.float64)
    assert torch.allclose(residual(p, q, 1), torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(residual(p, p.clone(), 0), p)  # empty residual (p == q): falls back to p
