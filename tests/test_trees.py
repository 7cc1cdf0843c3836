"""Token trees: tree attention and cache compaction on a real (tiny) decoder, tree drafting by every
tree-capable drafter at batch 1 and in ragged batches, sampled trees against AR's distribution,
and the budget that sizes trees from the measured verification cost."""

from __future__ import annotations

import json

import pytest
import torch

from joey.batching import depths_of, grid_positions, pack, path_moves, step_mask
from joey.budget import (
    CostCurve,
    DepthPolicy,
    RowPolicy,
    StepScale,
    batch_depths,
    best_depth,
    cached_curve,
    expected_tokens,
)
from joey.drafters import PromptLookupDrafter

TREE = (-1, -1, 0, 0, 1, 2, 4)  # parents: two root children, branching below both, depth 4


def _fresh_last_logits(model, tokens: list[int]) -> torch.Tensor:
    """Logits after the last of ``tokens``, from a fresh cache (the reference)."""
    cache = model.new_cache(1, len(tokens))
    n = len(tokens)
    return model(torch.tensor([tokens]), torch.arange(n)[None], cache, 0, n, None)[0, -1]


def _path_to(node: int, parents=TREE) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def test_depths_and_tree_mask():
    assert depths_of(TREE) == [0, 1, 1, 2, 2, 2, 3, 3]
    mask = step_mask([2], 8, 10, [TREE], "cpu")[0, 0]  # 2 cached slots, then [pending, 7 nodes]
    assert mask[:, :2].all()  # every token sees the cached prefix
    # node 6 (step token 7) sees pending, node 1, node 4 and itself: slots 2, 4, 7, 9
    assert mask[7].nonzero().flatten().tolist() == [0, 1, 2, 4, 7, 9]
    assert mask[1].nonzero().flatten().tolist() == [0, 1, 2, 3]  # node 0: pending + itself
    chain = step_mask([2], 3, 5, [(-1, 0)], "cpu")
    assert torch.equal(chain, step_mask([2], 3, 5, None, "cpu"))  # a chain is causal


def test_packed_positions_follow_depth_and_slots_stay_contiguous():
    p = pack([5, 3], [1 + len(TREE), 3], "cpu", [TREE, (-1, 0)])
    assert p.slots.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 3, 4, 5]
    assert p.positions.tolist() == [5, 6, 6, 7, 7, 7, 8, 8, 3, 4, 5]
    assert grid_positions([5], 8, [TREE], "cpu").tolist() == [[5, 6, 6, 7, 7, 7, 8, 8]]


def test_path_moves_only_move_what_is_out_of_place():
    rows, src, dst = path_moves([10, 4], [(0, 2), (1, 4, 6)])
    # row 0: node 0 is in place, node 2 (slot 13) → slot 12; row 1: 1→0, 4→1, 6→2 after the pending slot 4
    assert (rows, src, dst) == ([0, 1, 1, 1], [13, 6, 9, 11], [12, 5, 6, 7])


def test_tree_forward_matches_each_path_and_compaction_matches_fresh_prefill(tiny_engine):
    """Every tree node's logits equal a plain forward of its own path; after moving an accepted
    path into place, continuing gives a fresh prefill's logits."""
    model = tiny_engine.model
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(100, 5000, (9,), generator=gen).tolist()
    pending = 77
    nodes = torch.randint(100, 5000, (len(TREE),), generator=gen).tolist()
    with torch.inference_mode():
        cache = model.new_cache(1, 64)
        model(torch.tensor([prefix]), torch.arange(9)[None], cache, 0, 9, None)
        cache.advance([9])
        t = 1 + len(TREE)
        pos = grid_positions(cache.lengths, t, [TREE], "cpu")
        mask = step_mask(cache.lengths, t, 9 + t, [TREE], "cpu")
        logits = model(torch.tensor([[pending, *nodes]]), pos, cache, 9, 9 + t, mask)[0]
        for node in range(len(TREE)):
            want = _fresh_last_logits(model, prefix + [pending] + [nodes[i] for i in _path_to(node)])
            torch.testing.assert_close(logits[node + 1], want, rtol=1e-4, atol=1e-4)
        path = _path_to(6)  # nodes 1, 4, 6: none of them at its chain slot
        cache.move(*path_moves(cache.lengths, [path]))
        cache.advance([1 + len(path)])
        n = cache.lengths[0]
        nxt = model(torch.tensor([[123]]), torch.tensor([[n]]), cache, n, n + 1, None)[0, -1]
        want = _fresh_last_logits(model, prefix + [pending] + [nodes[i] for i in path] + [123])
        torch.testing.assert_close(nxt, want, rtol=1e-4, atol=1e-4)


def test_prompt_lookup_tree_merges_matches_into_a_trie():
    d = PromptLookupDrafter(max_ngram=2, branches=3, depth_by_ngram=())  # 2-grams drafting 3 deep
    ctx = [1, 2, 3, 4, 9, 1, 2, 3, 5, 8, 1, 2, 7, 1, 2]
    prop = d.propose(ctx, 3, max_nodes=8)
    # matches of [1, 2], most recent first: 7 1 2 | 3 5 8 | 3 4 9 → a trie sharing the "3" node
    assert prop.tokens == (7, 1, 2, 3, 5, 8, 4, 9)
    assert prop.parents == (-1, 0, 1, -1, 3, 4, 3, 6)
    assert d.propose(ctx, 3, max_nodes=4).tokens == (7, 1, 2, 3)  # the node budget cuts the trie
    assert d.propose(ctx, 3).tokens == (7, 1, 2)  # no node budget: the chain


COPY = ["the cat sat on the mat and the cat sat on the hat and the cat", "a b c d a b c e a b c d a b"]


def test_pld_tree_greedy_equals_ar_single_and_ragged_batch(tiny_engine):
    ar = [g.token_ids for g in tiny_engine.generate(COPY, max_new_tokens=30, ignore_eos=True)]
    for prompt, want in zip(COPY, ar):
        g = tiny_engine.generate(prompt, max_new_tokens=30, ignore_eos=True, method="pld", tree_nodes=8,
                                 adaptive=False)
        assert g.token_ids == want
    batch = tiny_engine.generate(COPY, max_new_tokens=30, ignore_eos=True, method="pld", tree_nodes=8,
                                 adaptive=False)
    assert [g.token_ids for g in batch] == ar


@pytest.fixture(scope="module")
def partial_kangaroo(tiny_folder):
    from test_kangaroo import _engine

    return _engine(tiny_folder, 0.3)


PROMPTS = ["Hello there, how are you today?", "Write a poem about cats and dogs.", "Hi"]


@pytest.mark.parametrize("topk,nodes", [(2, 5), (3, 10)])
def test_kangaroo_tree_greedy_equals_ar_single_and_ragged_batch(partial_kangaroo, topk, nodes):
    eng = partial_kangaroo
    ar = [g.token_ids for g in eng.generate(PROMPTS, max_new_tokens=25, ignore_eos=True, method="ar")]
    kw = dict(max_new_tokens=25, ignore_eos=True, method="kangaroo", threshold=0.0, tree_topk=topk,
              tree_nodes=nodes, adaptive=False)
    for prompt, want in zip(PROMPTS, ar):
        assert eng.generate(prompt, **kw).token_ids == want
    batch = eng.generate(PROMPTS, **kw)
    assert [g.token_ids for g in batch] == ar
    assert sum(g.stats.draft_tokens for g in batch) > 0


def test_kangaroo_tree_sampling_matches_ar_distribution(partial_kangaroo):
    """Top-k candidates are point masses: the second token's histogram over seeds must be AR's."""
    from conftest import first_token_histogram, total_variation

    n, kw = 200, dict(max_new_tokens=2, temperature=0.7, top_k=4, ignore_eos=True)
    a = first_token_histogram(partial_kangaroo, "alpha beta", "ar", n, **kw)
    b = first_token_histogram(partial_kangaroo, "alpha beta", "kangaroo", n, tree_nodes=6, tree_topk=3,
                              adaptive=False, **kw)
    assert total_variation(a, b, n) < 0.2, (a, b)


def test_default_model_kangaroo_tree_is_lossless(default_engine):
    prompts = ["Explain in three sentences why the sky is blue.", "What is 17 times 3? Think step by step."]
    ar = [g.token_ids for g in default_engine.generate(prompts, max_new_tokens=32, method="ar")]
    for prompt, want in zip(prompts, ar):
        g = default_engine.generate(prompt, max_new_tokens=32, method="kangaroo", tree_nodes=8, tree_topk=3,
                                    adaptive=False)
        assert g.token_ids == want
        assert g.stats.draft_tokens > g.stats.steps - 1  # it drafted trees, not chains
    assert [g.token_ids for g in default_engine.generate(prompts, max_new_tokens=32, method="kangaroo",
                                                         tree_nodes=8)] == ar


# -- the budget ----------------------------------------------------------------------------------
CURVE = CostCurve((1, 2, 4, 8, 16), (10.0, 10.5, 11.0, 13.0, 20.0), "cpu", "float32", 2)


def test_cost_curve_interpolates_and_sizes_trees():
    assert CURVE.cost(1) == 10.0 and CURVE.cost(3) == pytest.approx(10.75)
    assert CURVE.cost(12) == pytest.approx(16.5)
    assert CURVE.cost(24) == pytest.approx(27.0)  # extrapolated with the last slope
    assert CURVE.tree_nodes(slack=0.3) == 7  # 8 tokens cost 1.3x one; 9 would cost more
    assert CURVE.tree_nodes(slack=0.0) == 1


def test_best_depth_drafts_when_it_pays_and_falls_back_when_it_cannot():
    nodes_at = list(range(7))
    # accepted almost always at every depth: drafting deep pays
    assert best_depth(CURVE, [50] * 6, [49] * 6, 6, nodes_at, 0.5) >= 4
    # never accepted and drafting is expensive: no draft at all
    assert best_depth(CURVE, [50] * 6, [0] * 6, 6, nodes_at, 5.0) == 0
    # half accepted at a cheap depth pays, until the drafter must first catch up on many tokens
    assert best_depth(CURVE, [50] * 6, [25] * 6, 6, nodes_at, 2.0) >= 1
    assert best_depth(CURVE, [50] * 6, [25] * 6, 6, nodes_at, 2.0, catch_up_ms=20.0) == 0
    # the prior alone (no data) gives 1.5 tokens at depth 1, and each level beyond halves
    assert expected_tokens([], [], 1) == pytest.approx(1.5)
    assert expected_tokens([], [], 3) == pytest.approx(1.875)
    # depth 1 accepted 60 % of 100 steps, deeper levels never drafted: they are priced as if they
    # kept that rate (r², r³), not at a flat 1/2, so drafting them does not look free
    r = 61 / 102
    assert expected_tokens([100], [60], 3) == pytest.approx(1 + r + r**2 + r**3)
    # measured deeper levels replace the guess as their steps accumulate
    assert expected_tokens([100, 100], [60, 50], 2) == pytest.approx(1 + r + (50 + 2 * r * r) / 102)


def test_best_depth_prices_steps_by_what_they_really_took():
    """A curve measured on a faster sibling host (or a shorter context) makes a plain step look
    cheaper than it is and a draft dearer; the step scale observed at batch 1 corrects both sides."""
    nodes_at = list(range(7))
    curve = CostCurve((1, 2, 4, 8), (39.0, 41.0, 46.0, 55.0), "cpu", "int4", 2)
    evidence = ([1, 1], [0, 0])  # one missed draft so far: depth 1 is now worth 1/3 of a token
    assert best_depth(curve, *evidence, 6, nodes_at, 12.0) == 0  # on the stale curve: no draft
    policy = DepthPolicy(curve, 6, nodes_at)
    for _ in range(20):
        policy.timed_pass(1, 1, 46.0)  # the host's plain steps: 46 ms, not the curve's 39
    assert policy.scale(False) == pytest.approx(46.0 / 39.0, rel=0.01)
    assert best_depth(curve, *evidence, 6, nodes_at, 12.0, scale=policy.scale) == 1


def test_a_rows_first_drafts_go_full_depth_alone_and_shallow_in_a_batch():
    """Before a draft's cost is measured a row's depth is forced: alone the full depth (it learns how
    deep drafts are accepted for a few tokens), in a batch ``FIRST_DEPTH`` (every row's full-depth
    first draft at once would make one packed step of 8 x 7 tokens)."""
    curve = CostCurve((1, 2, 4, 8, 16, 64), (10.0, 11.0, 13.0, 20.0, 35.0, 120.0), "cpu", "int4", 2)
    policy = DepthPolicy(curve, 6, list(range(7)))
    assert policy.choose([RowPolicy(True, False)], [100], False) == [6]
    batch = [RowPolicy(True, False) for _ in range(8)]
    assert policy.choose(batch, [100] * 8, False) == [DepthPolicy.FIRST_DEPTH] * 8 == [2] * 8
    assert policy.choose(batch, [1] * 8, False) == [1] * 8  # never past a row's room
    policy.timed_drafts(batch, [2] * 8, 1.6, False)  # measured: from now on the budget decides
    assert policy.alone(batch[0], 100, True)[1] is False


def test_batch_depths_price_a_draft_at_the_whole_packed_step():
    """In a batch a row's draft costs what its tokens add to the packed step: cheap verification
    keeps every row's own depth, a steep curve (a low-bit CPU target) drafts only rows that pay."""
    nodes_at = list(range(7))
    good, poor = ([50] * 6, [45] * 6), ([50] * 6, [5] * 6)
    flat = CostCurve((1, 64), (10.0, 10.5), "cpu", "fp32", 2)
    steep = CostCurve((1, 2, 4, 8, 16, 32), (10.0, 11.4, 13.8, 21.0, 35.0, 60.0), "cpu", "int4", 2)
    rows = [good, poor, good, poor]
    args = ([r[0] for r in rows], [r[1] for r in rows], nodes_at, [0.2] * 4)
    free = args[:3] + ([0.0] * 4,)  # drafting costs nothing and verifying hardly anything: all draft
    assert batch_depths(flat, [4, 4, 4, 4], [False] * 4, *free) == [4, 4, 4, 4]
    # with a draft cost, rows that rarely accept would slow the whole step more than they add
    assert batch_depths(flat, [4, 4, 4, 4], [False] * 4, *args) == [4, 0, 4, 0]
    on_steep = batch_depths(steep, [4, 4, 4, 4], [False] * 4, *args)
    assert on_steep[1] == on_steep[3] == 0 and on_steep[0] > 0  # only rows that accept draft
    # a probing row keeps its full depth whatever the others do
    assert batch_depths(steep, [4, 4, 4, 4], [False, True, False, False], *args)[1] == 4
    # never deeper than a row would draft alone
    assert batch_depths(flat, [2, 0, 1, 3], [False] * 4, *free) == [2, 0, 1, 3]
    # rows that draft together share each draft forward: what one row alone cannot pay for, four can
    shared = args[:3] + ([3.0] * 4,)
    assert batch_depths(flat, [4, 4, 4, 4], [False] * 4, *shared) == [0, 0, 0, 0]
    assert batch_depths(flat, [4, 4, 4, 4], [False] * 4, *shared, None, True) == [4, 4, 4, 4]


def test_step_scale_prices_the_packing_overhead_a_batch_really_pays():
    """Drafted (packed) steps observed at twice their predicted cost while plain steps cost what the
    curve says: drafts that paid on the curve alone no longer do, and the batch decodes plainly."""
    nodes_at = list(range(7))
    curve = CostCurve((1, 2, 4, 8, 16), (10.0, 11.0, 12.0, 14.0, 20.0), "cpu", "int4", 2)
    rows = ([50] * 6, [30] * 6)  # accepted 60 % of the time at every depth
    args = ([rows[0]] * 4, [rows[1]] * 4, nodes_at, [0.0] * 4)
    scale = StepScale()
    assert scale(True) == scale(False) == 1.0  # nothing seen: the curve as measured
    assert batch_depths(curve, [4] * 4, [False] * 4, *args, scale) == batch_depths(curve, [4] * 4, [False] * 4, *args)
    assert any(batch_depths(curve, [4] * 4, [False] * 4, *args, scale))
    for _ in range(20):
        scale.observe(False, 12.0, 12.0)
        scale.observe(True, 14.0, 28.0)
    assert scale(False) == pytest.approx(1.0) and scale(True) == pytest.approx(2.0, rel=0.02)
    assert batch_depths(curve, [4] * 4, [False] * 4, *args, scale) == [0, 0, 0, 0]
    fresh = StepScale()
    fresh.observe(False, 10.0, 15.0)
    assert fresh(True) == 1.5  # a drafted step not seen yet is priced like a plain one


def test_cost_curve_is_cached_and_a_corrupt_cache_is_remeasured(tiny_engine, tmp_path):
    first = cached_curve(tiny_engine.model, "tiny", tmp_path)
    files = list((tmp_path / "budget").glob("*.json"))
    assert len(files) == 1 and first.ms[0] > 0 and len(first.ms) == len(first.tokens)
    assert all(a <= b for a, b in zip(first.ms, first.ms[1:]))  # more tokens never cost less
    assert cached_curve(tiny_engine.model, "tiny", tmp_path) == first  # read back, not re-measured
    files[0].write_text("{not json")
    again = cached_curve(tiny_engine.model, "tiny", tmp_path)
    assert json.loads(files[0].read_text())["curve"]["tokens"] == list(again.tokens)


def test_kangaroo_with_lookup_branch_is_lossless_greedy_and_sampled(partial_kangaroo):
    """The lookup branch joins the tree (greedy: point masses beside top-k candidates; sampled:
    point masses beside a chain sampled from q) and the output stays AR's."""
    from conftest import first_token_histogram, total_variation

    eng = partial_kangaroo
    ar = [g.token_ids for g in eng.generate(COPY, max_new_tokens=25, ignore_eos=True, method="ar")]
    kw = dict(max_new_tokens=25, ignore_eos=True, method="kangaroo+pld", threshold=0.0, adaptive=False)
    for prompt, want in zip(COPY, ar):
        assert eng.generate(prompt, tree_nodes=6, **kw).token_ids == want
        assert eng.generate(prompt, tree_nodes=0, **kw).token_ids == want  # chain + branch
    assert [g.token_ids for g in eng.generate(COPY, tree_nodes=6, **kw)] == ar
    n, skw = 200, dict(max_new_tokens=2, temperature=0.9, ignore_eos=True)
    prompt = "one two one two one two one two"
    a = first_token_histogram(eng, prompt, "ar", n, **skw)
    b = first_token_histogram(eng, prompt, "kangaroo+pld", n, tree_nodes=0, adaptive=False, **skw)
    assert total_variation(a, b, n) < 0.2, (a, b)


def test_tree_of_one_node_and_chain_match_ar(partial_kangaroo):
    ar = partial_kangaroo.generate(PROMPTS[1], max_new_tokens=20, ignore_eos=True, method="ar").token_ids
    for nodes in (0, 1):
        g = partial_kangaroo.generate(PROMPTS[1], max_new_tokens=20, ignore_eos=True, method="kangaroo",
                                      tree_nodes=nodes, threshold=0.0, adaptive=False)
        assert g.token_ids == ar
        assert g.stats.draft_tokens <= (g.stats.steps - 1) * (6 if nodes == 0 else 1)


def test_median_ms_warms_up_then_takes_the_median(monkeypatch):
    """Drafters time their forwards with ``median_ms``: one untimed call, then the median of the rest."""
    from joey import measurements

    clock = iter([0.0, 0.005, 1.0, 1.001, 2.0, 2.003])  # timed calls of 5, 1 and 3 ms
    monkeypatch.setattr(measurements.time, "perf_counter", lambda: next(clock))
    calls = []
    assert measurements.median_ms(lambda: calls.append(1), repeats=3) == pytest.approx(3.0)
    assert len(calls) == 4  # the warm-up call is not timed
