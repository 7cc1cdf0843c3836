"""Batched drafting: ``propose_batch`` (one draft forward per depth for all rows, each row against its
own caches) proposes exactly what each row's drafter proposes alone, step after step, for every
drafter (chain, tree, retrieval branch), ragged contexts and per-row depths including 0; sampled
drafting draws from the same distributions."""

from __future__ import annotations

import pytest
import torch

import joey
from joey.config import SamplingParams
from joey.drafters import DraftModelDrafter, JakiroDraft, JakiroDrafter, KangarooDraft, KangarooDrafter, Proposal
from joey.drafters.base import propose_all
from joey.drafters.draft_head import DraftVocabHead
from joey.drafters.prompt_lookup import PromptLookupDrafter
from joey.models.adapter import KangarooAdapter
from joey.models.jakiro_head import JakiroHead

MAX_LEN = 256
GREEDY = SamplingParams(temperature=0.0)
# drafters drawing from their own generators (rejection sampling's mode; keyed draws: tests/test_seeded_sampling.py)
SAMPLED = SamplingParams(temperature=1.0, top_k=4, rejection=True)

# one architecture keeps this file fast: qwen2, whose q/k/v biases and untied head cover more
pytestmark = pytest.mark.parametrize("tiny_folder", ["qwen2"], indirect=True)


@pytest.fixture(scope="module")
def model(tiny_folder):
    """The tiny target with row-invariant (pre-packed) kernels, as the engine runs it."""
    m = joey.load(str(tiny_folder), device="cpu", prepack=False, progress=False, adapter=False, head=False).model
    m.kernel_setup.prepack()
    return m


@pytest.fixture(scope="module")
def kangaroo(model) -> KangarooDraft:
    torch.manual_seed(1)
    vocab = torch.randperm(model.cfg.vocab_size, generator=torch.Generator().manual_seed(0))[:4000].sort().values
    adapter = KangarooAdapter.initialized_from(model, 1, vocab)
    with torch.no_grad():  # not the target's next layer: a drafter that is partly wrong
        adapter.self_attn.o_proj.weight.mul_(0.5)
    return KangarooDraft.build(model, adapter.eval())  # pre-packs a copy, as the target is


@pytest.fixture(scope="module")
def jakiro(model) -> JakiroDraft:
    torch.manual_seed(2)
    head = JakiroHead(model.cfg, torch.arange(0, model.cfg.vocab_size, 7), experts=2).eval()
    head.prepack()
    return JakiroDraft(model, head, DraftVocabHead.build(model, head.vocab))


def contexts(n_rows: int) -> list[list[int]]:
    """Ragged contexts with repeated n-grams (so prompt lookup finds continuations)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for r in range(n_rows):
        part = torch.randint(100, 5000, (3 + 2 * r,), generator=g).tolist()
        out.append(part + [11, 12] + part[: 2 + r] + [11, 12])
    return out


def advance(ctx: list[int], prop: Proposal, keep: int, bonus: int) -> list[int]:
    """The context after the target commits ``keep`` tokens of the proposal's last-made path
    (off the first branch in a tree) and a bonus token."""
    path: list[int] = []
    parent = -1
    while len(path) < keep:
        children = [i for i, p in enumerate(prop.parents) if p == parent]
        if not children:
            break
        parent = children[-1]
        path.append(prop.tokens[parent])
    return ctx + path + [bonus]


def same(a: Proposal, b: Proposal) -> None:
    assert a.tokens == b.tokens
    assert a.parents == b.parents
    assert a.start_layer == b.start_layer
    for x, y in ((a.hidden, b.hidden), (a.draft_probs, b.draft_probs)):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)  # row-invariant kernels: bit for bit


def run_steps(make, depths: list[list[int]], nodes: int | None, observe=None) -> list[list[Proposal]]:
    """Several steps of batched drafting next to per-row drafting with separately made drafters;
    returns the batched proposals of every step."""
    rows = len(depths[0])
    batched, alone = [make() for _ in range(rows)], [make() for _ in range(rows)]
    ctxs = contexts(rows)
    steps = []
    with torch.inference_mode():
        for step, ks in enumerate(depths):
            if observe is not None:
                for r in range(rows):
                    observe(batched[r], r, len(ctxs[r]))
                    observe(alone[r], r, len(ctxs[r]))
            got = type(batched[0]).propose_batch(batched, ctxs, ks, nodes)
            want = [d.propose(c, k, nodes) for d, c, k in zip(alone, ctxs, ks)]
            for g, w in zip(got, want):
                same(g, w)
            steps.append(got)
            ctxs = [advance(c, p, (step + r) % 3, 200 + 10 * step + r) for r, (c, p) in enumerate(zip(ctxs, got))]
    return steps


DEPTHS = [[3, 0, 1, 4], [1, 4, 0, 2], [4, 2, 3, 0]]


def test_sps_chain(model):
    steps = run_steps(lambda: DraftModelDrafter(model, GREEDY, None, MAX_LEN), DEPTHS, None)
    assert [len(p) for p in steps[0]] == DEPTHS[0]


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_kangaroo_chain(kangaroo, threshold):
    steps = run_steps(lambda: KangarooDrafter(kangaroo, GREEDY, None, MAX_LEN, threshold), DEPTHS, None)
    assert all(p.hidden is not None and len(p.hidden) == 1 + len(p) for ps in steps for p in ps)  # depth 0 too
    if threshold == 0.0:
        assert [len(p) for p in steps[0]] == DEPTHS[0]


@pytest.mark.parametrize("params", [GREEDY, SAMPLED])  # sampled trees: top-k candidates of the warped q
def test_kangaroo_tree(kangaroo, params):
    steps = run_steps(lambda: KangarooDrafter(kangaroo, params, None, MAX_LEN, 0.05, topk=3), DEPTHS, 8)
    assert any(p.parents != tuple(range(-1, len(p) - 1)) for ps in steps for p in ps)  # real trees


def test_kangaroo_tree_with_lookup(kangaroo):
    run_steps(lambda: KangarooDrafter(kangaroo, GREEDY, None, MAX_LEN, 0.05, topk=2, lookup=PromptLookupDrafter()),
              DEPTHS, 6)
    run_steps(lambda: KangarooDrafter(kangaroo, GREEDY, None, MAX_LEN, 0.5, lookup=PromptLookupDrafter()),
              DEPTHS, None)


def _features(model):
    g = torch.Generator().manual_seed(3)
    table = torch.randn(4, MAX_LEN, model.cfg.hidden_size, generator=g)  # [row, position, hidden]

    def observe(drafter: JakiroDrafter, row: int, n: int) -> None:
        """The target's features of positions [known, n - 1), as the engine hands them over."""
        if drafter.known < n - 1:
            drafter.observe(table[row, drafter.known : n - 1])

    return observe


@pytest.mark.parametrize("lookup", [False, True])
def test_jakiro_tree(jakiro, model, lookup):
    def make():
        return JakiroDrafter(jakiro, GREEDY, MAX_LEN, topk=3, lookup=PromptLookupDrafter() if lookup else None)

    steps = run_steps(make, DEPTHS, 8, _features(model))
    assert any(p.parents != tuple(range(-1, len(p) - 1)) for ps in steps for p in ps)
    run_steps(lambda: JakiroDrafter(jakiro, GREEDY, MAX_LEN, topk=1, hybrid=False), DEPTHS, None, _features(model))
    run_steps(lambda: JakiroDrafter(jakiro, SAMPLED, MAX_LEN, topk=2), DEPTHS, 6, _features(model))


def test_propose_all_batches_one_class_and_loops_mixed(model, kangaroo):
    ctxs, ks = contexts(2), [2, 1]
    with torch.inference_mode():
        sps = [DraftModelDrafter(model, GREEDY, None, MAX_LEN) for _ in ctxs]
        want = [DraftModelDrafter(model, GREEDY, None, MAX_LEN).propose(c, k) for c, k in zip(ctxs, ks)]
        for g, w in zip(propose_all(sps, ctxs, ks, None), want):
            same(g, w)
        mixed = [PromptLookupDrafter(), KangarooDrafter(kangaroo, GREEDY, None, MAX_LEN, 0.0)]
        got = propose_all(mixed, ctxs, ks, None)
    assert got[0].tokens == PromptLookupDrafter().propose(ctxs[0], 2).tokens and len(got[1]) == 1
    assert propose_all([], [], [], None) == []


@pytest.mark.parametrize("kind", ["sps", "kangaroo"])
def test_sampled_rows_with_their_own_generators_match_alone(model, kangaroo, kind):
    """A generator per row: its draws come in the same order batched or alone, so proposals are equal."""
    def make(seed: int):
        g = torch.Generator().manual_seed(seed)
        if kind == "sps":
            return DraftModelDrafter(model, SAMPLED, g, MAX_LEN)
        return KangarooDrafter(kangaroo, SAMPLED, g, MAX_LEN, threshold=0.0)

    ctxs = contexts(3)
    ks = [3, 0, 2]
    batched, alone = [make(s) for s in range(3)], [make(s) for s in range(3)]
    with torch.inference_mode():
        for step in range(3):
            got = type(batched[0]).propose_batch(batched, ctxs, ks, None)
            for g, d, c, k in zip(got, alone, ctxs, ks):
                same(g, d.propose(c, k))
            ctxs = [advance(c, p, 1, 300 + step) for c, p in zip(ctxs, got)]


def test_sampled_first_tokens_follow_the_row_distribution(model):
    """One shared generator (the engine's): rows draw in a different order than one by one, but each
    row's first draft token still follows that row's q, which ``draft_probs`` reports."""
    ctxs, ks, draws = contexts(3), [2, 1, 1], 250
    gen = torch.Generator().manual_seed(11)
    drafters = [DraftModelDrafter(model, SAMPLED, gen, MAX_LEN) for _ in ctxs]
    counts: list[dict[int, int]] = [{} for _ in ctxs]
    with torch.inference_mode():
        # q after a first draw: then a drafter feeds only the pending token (a full prefill of the
        # context computes attention over a different number of queries, equal only to ~1e-7)
        alone = [DraftModelDrafter(model, SAMPLED, torch.Generator(), MAX_LEN) for _ in ctxs]
        first = [d.propose(c, 1).draft_probs[0] for d, c in zip(alone, ctxs)]
        q = [d.propose(c, 1).draft_probs[0] for d, c in zip(alone, ctxs)]
        for draw in range(draws):
            for r, p in enumerate(DraftModelDrafter.propose_batch(drafters, ctxs, ks, None)):
                assert torch.equal(p.draft_probs[0], first[r] if draw == 0 else q[r])
                counts[r][p.tokens[0]] = counts[r].get(p.tokens[0], 0) + 1
    for r in range(len(ctxs)):
        assert sum(counts[r].values()) == draws
        tv = 0.5 * sum(abs(counts[r].get(t, 0) / draws - float(q[r][t])) for t in set(counts[r]) | set(
            q[r].nonzero().flatten().tolist()))
        assert tv < 0.12, (r, counts[r], q[r][q[r] > 0])


@pytest.mark.parametrize("kind", ["sps", "kangaroo"])
def test_one_forward_per_draft_depth(model, kangaroo, monkeypatch, kind):
    """Depths 3, 0, 1, 4: the catch-up of every row is one forward, then each round one more for
    all rows still drafting, not one per row and depth."""
    calls: list[int] = []
    run = model.run_layers_rows

    def counted(hidden, positions, rows, *args, **kw):
        calls.append(len(rows))
        return run(hidden, positions, rows, *args, **kw)

    monkeypatch.setattr(model, "run_layers_rows", counted)
    if kind == "sps":
        drafters = [DraftModelDrafter(model, GREEDY, None, MAX_LEN) for _ in range(4)]
    else:
        drafters = [KangarooDrafter(kangaroo, GREEDY, None, MAX_LEN, threshold=0.0) for _ in range(4)]
    with torch.inference_mode():
        type(drafters[0]).propose_batch(drafters, contexts(4), [3, 0, 1, 4], None)
    if kind == "sps":  # a depth-0 row feeds nothing; each token but a row's last is fed
        assert calls == [3, 2, 2, 1]
    else:
        # a depth-0 row still runs its pending token's shallow layers; a row's last round is the
        # shallow pass of its last tokens (verification needs their layer-l states), in the same
        # forward as the other rows' expansions
        assert calls == [4, 3, 2, 2, 1]


def test_kangaroo_drafts_in_the_precision_one_forward_measures_fastest(model, monkeypatch):
    """Where joey's low-bit kernel runs, the adapter and its vocabulary head carry int8 weights when
    that measures faster, float ones otherwise; either drafts a usable proposal."""
    from joey.models.group_kernel import GroupKernel
    from joey.models.weight_formats import low_bit_kernels

    if low_bit_kernels() != "vnni":
        pytest.skip("needs joey's low-bit kernel")
    vocab = torch.arange(0, model.cfg.vocab_size, 3)
    adapter = KangarooAdapter.initialized_from(model, 1, vocab).eval()
    assert KangarooDraft.build(model, adapter).forward_ms() > 0  # the real measurement runs
    for int8_faster in (True, False):
        monkeypatch.setattr(KangarooDraft, "forward_ms", lambda self, int8_faster=int8_faster:
                            1.0 if isinstance(self.head.kernel, GroupKernel) == int8_faster else 2.0)
        draft = KangarooDraft.build(model, adapter)
        assert isinstance(draft.head.kernel, GroupKernel) == int8_faster
        drafter = KangarooDrafter(draft, SamplingParams(), None, 64, threshold=0.0)
        with torch.inference_mode():
            assert len(drafter.propose(contexts(1)[0], 3).tokens) == 3
