"""Batches (EMS-SD): packed and padded batches give every row exactly AR's tokens for every
drafter, at batch sizes 1-5, with prompts of different lengths and rows that finish early; sampled
rows keep the distribution they have when run alone; the padded baseline's holes are masked."""

from __future__ import annotations

import pytest

from joey.batching import Lockstep
from joey.errors import InvalidArgumentError

# different lengths; the first two repeat themselves so prompt lookup has matches
PROMPTS = [
    "one two three one two three one two three one two",
    "Repeat: the cat sat on the mat, the cat sat on the mat, the cat",
    "Hi",
    "Write a poem about cats and dogs.",
    "alpha beta gamma",
]
# (method, extra generate() arguments): every drafter, chains and trees
DRAFTERS = [
    ("pld", {}),
    ("pld", {"tree_nodes": 6}),
    ("sps", {}),
    ("kangaroo", {"threshold": 0.0}),
    ("kangaroo", {"threshold": 0.0, "tree_nodes": 6, "tree_topk": 2}),
    ("kangaroo+pld", {"threshold": 0.0, "tree_nodes": 6, "tree_topk": 2}),
    ("jakiro", {"tree_nodes": 6}),
    ("jakiro+pld", {"tree_nodes": 6}),
]


def _tokens(gens) -> list[tuple[int, ...]]:
    return [g.token_ids for g in gens]


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_every_drafter_gives_ar_tokens_at_batch_sizes_1_to_5(engine, mode):
    kw = dict(max_new_tokens=20, ignore_eos=True, adaptive=False)
    alone = [engine.generate(p, method="ar", **kw).token_ids for p in PROMPTS]
    for size in range(1, 6):
        rows = PROMPTS[:size]
        assert _tokens(engine.generate(rows, method="ar", batch_mode=mode, **kw)) == alone[:size], ("ar", size)
        for method, extra in DRAFTERS:
            if size in (1, 5) or method == "pld":  # every drafter at both ends, one at every size
                gens = engine.generate(rows, method=method, batch_mode=mode, **kw, **extra)
                assert _tokens(gens) == alone[:size], (method, extra, size)


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_rows_that_finish_early_leave_the_others_unchanged(engine, mode):
    """A token that row 0 emits early (and other rows later or never) is made an EOS: row 0 stops
    mid-batch, the others go on; every row equals its AR run alone with that EOS."""
    kw = dict(max_new_tokens=24, adaptive=False)
    full = [engine.generate(p, method="ar", ignore_eos=True, **kw).token_ids for p in PROMPTS[:4]]
    stop = full[0][5]
    original = engine.eos_ids
    engine.eos_ids = frozenset({stop})
    try:
        alone = [engine.generate(p, method="ar", **kw) for p in PROMPTS[:4]]
        assert alone[0].finish_reason == "stop" and alone[0].new_tokens < 24
        for method, extra in [("ar", {}), *DRAFTERS[::2]]:
            gens = engine.generate(PROMPTS[:4], method=method, batch_mode=mode, **kw, **extra)
            assert _tokens(gens) == _tokens(alone), (method, extra)
            assert [g.finish_reason for g in gens] == [g.finish_reason for g in alone]
    finally:
        engine.eos_ids = original


@pytest.mark.parametrize("method,mode", [("pld", "packed"), ("pld", "padded"), ("kangaroo", "padded")])
def test_sampled_rows_keep_the_distribution_they_have_alone(engine, method, mode):
    """Row 1's second token (the first drafted position) over seeds: in a batch of three, with its
    neighbours drafting and accepting differently, its histogram must be the row's AR histogram alone."""
    from conftest import total_variation

    n, kw = 200, dict(max_new_tokens=3, temperature=1.5, top_k=2, ignore_eos=True)
    alone: dict[int, int] = {}
    batched: dict[int, int] = {}
    for seed in range(n):
        tok = engine.generate(PROMPTS[1], method="ar", seed=seed, **kw).token_ids[1]
        alone[tok] = alone.get(tok, 0) + 1
        gens = engine.generate(PROMPTS[:3], method=method, batch_mode=mode, seed=seed, adaptive=False, **kw)
        batched[gens[1].token_ids[1]] = batched.get(gens[1].token_ids[1], 0) + 1
    assert total_variation(alone, batched, n) < 0.15, (alone, batched)


def test_lockstep_masks_holes_and_advances_by_the_largest_commit():
    ls = Lockstep([3, 1], capacity=12, device="cpu")
    assert ls.width == 3 and ls.real == [3, 1]
    positions, mask = ls.step([3, 1], [(-1, 0), ()])
    assert positions.tolist() == [[3, 4, 5], [1, 2, 3]]  # row 1's padding cells continue its positions
    assert mask.shape == (2, 1, 3, 6)
    assert mask[1, 0, 0].tolist() == [True, False, False, True, False, False]  # its prompt's hole masked
    assert mask[1, 0, 2].tolist() == [True, False, False, True, True, True]  # padding of a chain: causal
    assert mask[0, 0, 2].tolist() == [True] * 6  # a chain: causal over its own tokens
    _, tree = ls.step([3, 1], [(-1, -1), ()])
    assert tree[0, 0, 2].tolist() == [True] * 3 + [True, False, True]  # siblings do not see each other
    assert ls.commit([2, 1]) == 2
    assert ls.width == 5 and ls.real == [5, 2]
    assert ls.valid[1, :5].tolist() == [True, False, False, True, False]  # the rejected slot is a hole
    ls.keep_rows([1])
    assert ls.real == [2] and ls.valid.shape == (1, 12)


def test_padded_cache_grows_past_its_first_size(engine):
    """Lock-step rows pay holes in slots: a long run with deep drafts outgrows the first cache."""
    kw = dict(max_new_tokens=60, ignore_eos=True, adaptive=False, max_draft=8)
    alone = [engine.generate(p, method="ar", **kw).token_ids for p in PROMPTS[:3]]
    assert _tokens(engine.generate(PROMPTS[:3], method="sps", batch_mode="padded", **kw)) == alone


def test_unknown_batch_mode_is_refused(engine):
    with pytest.raises(InvalidArgumentError, match="batch mode"):
        engine.generate("Hi", batch_mode="ragged")


@pytest.mark.parametrize("ragged", [True, False], ids=["one-call", "row-by-row"])
def test_a_long_prompt_among_short_ones(engine, monkeypatch, ragged):
    """One long prompt among short ones. Where joey's C attention serves the model, every step's
    rows attend in one call, each scanning only its own slots; elsewhere the grid would mostly
    compute padding, so the steps attend row by row. Every row still gets exactly its tokens alone."""
    import joey.target_runner as runner
    from joey.batching import rows_pay_off
    from joey.models import group_kernel
    from joey.models.llama import LlamaModel

    if ragged and not engine.model.ragged_attention:
        pytest.skip("joey's C attention does not run on this machine")
    if not ragged:
        monkeypatch.setattr(LlamaModel, "ragged_attention", property(lambda self: False))
    assert rows_pay_off([300, 20, 25], [1, 1, 1]) and not rows_pay_off([30, 28, 31], [3, 2, 3])
    row_calls, ragged_calls = [], []
    monkeypatch.setattr(runner, "rows_pay_off", lambda *a: row_calls.append(rows_pay_off(*a)) or row_calls[-1])
    real = group_kernel.attention

    def spy(q, *args, **kw):
        if len(args) > 5 and args[5] is not None:  # counts/ends given: one call for a ragged batch
            ragged_calls.append(q.shape[0])
        return real(q, *args, **kw)

    monkeypatch.setattr(group_kernel, "attention", spy)
    long = "Summarize this: " + " ".join(f"item {i} is {i * 7 % 13}." for i in range(30))
    prompts = [long, "Hi", PROMPTS[0]]
    kw = dict(max_new_tokens=12, ignore_eos=True, adaptive=False)
    alone = [engine.generate(p, method="ar", **kw).token_ids for p in prompts]
    for method, extra in [("ar", {}), ("pld", {}), ("kangaroo", {"threshold": 0.0, "tree_nodes": 6, "tree_topk": 2}),
                          ("jakiro", {"tree_nodes": 6})]:
        row_calls.clear()
        ragged_calls.clear()
        assert _tokens(engine.generate(prompts, method=method, **kw, **extra)) == alone, method
        if ragged:  # the whole batch in one call per layer, never row by row
            assert 3 in ragged_calls and not row_calls, method
        else:
            assert any(row_calls), method  # the row-by-row path really ran
