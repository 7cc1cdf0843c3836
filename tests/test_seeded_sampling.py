"""Same seed, same tokens: sampled decoding keyed by (seed, position) gives AR's tokens with every
method, chain or tree, alone or in a packed/padded batch, in continuous batching; the keyed sampler
is exact (χ²); and a wrong rule (draws keyed by anything but the position) fails these checks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from joey.config import SamplingParams, SpecConfig
from joey.continuous import ContinuousBatch
from joey.engine import Engine
from joey.sampling import keyed_uniform, next_tokens, probabilities


@pytest.fixture(scope="module")
def engine(tiny_folder) -> Engine:
    """conftest's tiny ``engine`` (damped deep layers, an adapter at layer 1, a pass-through Jakiro
    head, itself as SpS's draft model) with int8 linears: kernels that give a row the same bits in
    any batch, as joey's decoding formats do. Sampled equality needs that: an inverse-CDF draw sums
    the whole distribution, so fp32 rounding that differs between batch shapes moves the boundaries
    between tokens (a 49 k-token vocabulary at T = 1 flipped ~1 token in 100)."""
    from conftest import drafting_engine

    return drafting_engine(tiny_folder, "int8")


PROMPTS = ["Tell me a story about a cat.", "Count to ten.", "What is a tree?", "Say hello in French."]
SETTINGS = [
    SamplingParams(max_new_tokens=24, temperature=0.6, seed=11),
    SamplingParams(max_new_tokens=24, temperature=1.0, seed=5),
    SamplingParams(max_new_tokens=24, temperature=1.0, top_k=20, top_p=0.9, seed=3),
]
METHODS = [("pld", {}), ("pld", {"tree_nodes": 6}), ("sps", {}), ("kangaroo", {"threshold": 0.0}),
           ("kangaroo", {"threshold": 0.0, "tree_nodes": 6}), ("jakiro", {"tree_nodes": 6}), ("jakiro+pld", {})]


def _tokens(engine, prompts, method, params, **kw):
    gens = engine.generate(list(prompts), params, method=method, adaptive=False, **kw)
    return [g.token_ids for g in gens]


@pytest.mark.parametrize("params", SETTINGS, ids=["T0.6", "T1", "T1-topk-topp"])
@pytest.mark.parametrize("method,extra", METHODS, ids=[m + ("-tree" if "tree_nodes" in e else "") for m, e in METHODS])
def test_every_method_gives_ars_sampled_tokens_alone_and_in_batches(engine, method, extra, params):
    alone = [_tokens(engine, [p], "ar", params)[0] for p in PROMPTS[:1]]
    assert _tokens(engine, PROMPTS[:1], method, params, **extra) == alone
    # a batch: row i is seeded seed + i, so AR row by row with those seeds is the reference
    want = [_tokens(engine, [p], "ar", SamplingParams(**{**params.__dict__, "seed": params.seed + i}))[0]
            for i, p in enumerate(PROMPTS)]
    for mode in ("packed", "padded"):
        assert _tokens(engine, PROMPTS, method, params, batch_mode=mode, **extra) == want, mode


@pytest.mark.parametrize("method,extra", [("pld", {}), ("kangaroo", {"threshold": 0.0}), ("sps", {})])
def test_requests_joining_a_busy_batch_sample_what_they_sample_alone(engine, method, extra):
    params = SamplingParams(max_new_tokens=16, temperature=0.8, seed=21)
    ids = [engine.encode(p) for p in PROMPTS]
    batch = ContinuousBatch(engine, method, SpecConfig(**extra))
    events: dict = {}
    step = 0
    arrivals = {0: [0, 1], 2: [2], 5: [3]}
    while batch.busy or any(s >= step for s in arrivals):
        for key in arrivals.get(step, []):
            batch.add(ids[key], params, key=key)
        for ev in batch.step():
            if ev.generation is not None:
                events[ev.row] = ev.generation
        step += 1
    for key, prompt in enumerate(PROMPTS):
        assert events[key].token_ids == _tokens(engine, [prompt], "ar", params)[0], key
        assert events[key].seed == 21


def test_a_request_without_a_seed_gets_one_and_reports_it(engine):
    first = engine.generate(PROMPTS[0], max_new_tokens=12, temperature=1.0, method="pld")
    assert isinstance(first.seed, int)
    again = engine.generate(PROMPTS[0], max_new_tokens=12, temperature=1.0, seed=first.seed, method="ar")
    assert again.token_ids == first.token_ids


def test_keyed_uniforms_depend_on_seed_and_position_only():
    assert keyed_uniform(7, 100) == keyed_uniform(7, 100)
    us = [keyed_uniform(s, p) for s in range(50) for p in range(50)]
    assert len(set(us)) == len(us) and all(0.0 <= u < 1.0 for u in us)
    # uniform: a χ²-style check of 10 bins over 2,500 draws (expected 250 each)
    counts = torch.histc(torch.tensor(us), bins=10, min=0.0, max=1.0)
    assert ((counts - 250) ** 2 / 250).sum() < 30  # p ≈ 0.0004 under uniformity


def test_the_keyed_sampler_draws_from_the_processed_distribution():
    """AR's keyed sampler over many seeds reproduces the warped distribution (temperature, top-k,
    top-p) of a tiny vocabulary: χ² against the exact probabilities."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    params = SamplingParams(temperature=0.9, top_k=5, top_p=0.95)
    p = probabilities(logits, params)[0]
    n = 6000
    draws = [int(next_tokens(logits, SamplingParams(temperature=0.9, top_k=5, top_p=0.95, seed=s), [17])[0])
             for s in range(n)]
    counts = torch.bincount(torch.tensor(draws), minlength=6).double()
    support = p > 0
    assert counts[~support].sum() == 0  # nothing outside top-k / top-p
    expected = n * p[support].double()
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # 3 degrees of freedom at most here: p < 0.0002 if the sampler were right


def test_draws_keyed_by_the_step_instead_of_the_position_break_equality(engine, monkeypatch):
    """The checks above have teeth: verification drawing with the uniform of the wrong position
    (what a step-keyed rule amounts to once a step commits several tokens) no longer gives AR's tokens."""
    import joey.verify as verify

    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=5)
    want = [_tokens(engine, [p], "ar", params)[0] for p in PROMPTS]
    real = verify.next_tokens
    monkeypatch.setattr(verify, "next_tokens",
                        lambda logits, prm, positions, gen=None: real(logits, prm, [x + 1 for x in positions]))
    got = [_tokens(engine, [p], "sps", params)[0] for p in PROMPTS]
    assert got != want


def test_16_concurrent_sampled_server_streams_give_ars_tokens_for_their_seeds(engine):
    """Through the official client, 16 concurrent streams on a Jakiro tree server (continuous
    batching: rows join and leave at different steps) each give what AR samples for their seed."""
    from test_server import client, running, wait_ready

    cases = [(PROMPTS[i % 4], 100 + i) for i in range(16)]
    knobs = dict(temperature=0.8, top_p=0.9)
    want = [engine.generate([{"role": "user", "content": p}], method="ar", max_new_tokens=10, ignore_eos=True,
                            seed=seed, **knobs).text for p, seed in cases]

    def stream(host: str, prompt: str, seed: int) -> str:
        chunks = client(host).chat.completions.create(
            model=engine.name, messages=[{"role": "user", "content": prompt}], max_tokens=10, seed=seed, stream=True,
            extra_body={"ignore_eos": True}, **knobs)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with running(lambda: engine, method="jakiro", spec=SpecConfig(tree_nodes=6), max_batch=8) as (host, server):
        wait_ready(server)
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda case: stream(host, *case), cases))
    assert got == want and len(set(want)) > 4
