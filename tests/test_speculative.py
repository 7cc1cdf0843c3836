"""Losslessness of speculative decoding: drafted output equals autoregressive output exactly."""

from __future__ import annotations

import pytest

from joey.drafters import PromptLookupDrafter, Proposal

COPY_PROMPTS = [
    "Repeat exactly: alpha beta gamma delta alpha beta gamma delta alpha beta gamma delta",
    "Summarize: The cat sat on the mat. The cat sat on the mat. The dog barked at the cat on the mat.",
    "Hi",
]


def test_prompt_lookup_proposals():
    d = PromptLookupDrafter(max_ngram=3)
    assert d.propose([1, 2, 3, 4, 5, 1, 2, 3], 2).tokens == (4, 5)
    assert d.propose([1, 2, 9, 7, 1, 2], 3).tokens == (9, 7)  # a 2-gram's match: at most 2 tokens
    assert d.propose([3, 1, 2, 9, 7, 3, 3, 1, 2], 3).tokens == (9, 7, 3)  # a 3-gram's: the asked depth
    assert d.propose([4, 9, 7, 6, 4], 3).tokens == (9,)  # a 1-gram's: one token
    assert PromptLookupDrafter(depth_by_ngram=()).propose([1, 2, 9, 7, 1, 2], 3).tokens == (9, 7, 1)
    assert d.propose([5, 6, 7], 4).tokens == ()
    assert Proposal.chain([4, 5]).parents == (-1, 0)


@pytest.mark.parametrize("max_draft", [1, 4])
def test_pld_greedy_equals_ar_tiny_single(tiny_engine, max_draft):
    for prompt in COPY_PROMPTS:
        ar = tiny_engine.generate(prompt, max_new_tokens=40, ignore_eos=True)
        pld = tiny_engine.generate(prompt, max_new_tokens=40, ignore_eos=True, method="pld", max_draft=max_draft)
        assert pld.token_ids == ar.token_ids
        assert pld.text == ar.text


def test_pld_greedy_equals_ar_tiny_batch(tiny_engine):
    ar = [g.token_ids for g in tiny_engine.generate(COPY_PROMPTS, max_new_tokens=40, ignore_eos=True)]
    pld = tiny_engine.generate(COPY_PROMPTS, max_new_tokens=40, ignore_eos=True, method="pld")
    assert [g.token_ids for g in pld] == ar


def test_pld_greedy_equals_ar_default_model(default_engine):
    prompts = COPY_PROMPTS[:2] + ["Write a Python function that adds two numbers."]
    steps = tokens = 0
    for prompt in prompts:
        ar = default_engine.generate(prompt, max_new_tokens=48)
        pld = default_engine.generate(prompt, max_new_tokens=48, method="pld")
        assert pld.token_ids == ar.token_ids
        assert len(pld.stats.acceptance_by_position) > 0
        steps, tokens = steps + pld.stats.steps, tokens + pld.new_tokens
    # drafting saved target passes (on the copy prompts: a free-form answer may find nothing to copy)
    assert steps < tokens


def test_pld_stats(default_engine):
    g = default_engine.generate(COPY_PROMPTS[0], max_new_tokens=32, ignore_eos=True, method="pld")
    assert g.method == "pld"
    assert g.stats.mean_accepted_tokens == pytest.approx(g.new_tokens / g.stats.steps)
    assert g.stats.mean_accepted_tokens > 1.0
    assert all(0.0 <= a <= 1.0 for a in g.stats.acceptance_by_position)


def test_pld_sampling_matches_ar_distribution(tiny_engine):
    """Sampled PLD and sampled AR give the same first-token distribution (lossless sampling).

    The prompt repeats itself, so PLD drafts from the very first step."""
    prompt = "one two one two one two one two"
    kw = dict(max_new_tokens=2, temperature=1.5, ignore_eos=True)
    n = 150

    from conftest import first_token_histogram, total_variation

    a = first_token_histogram(tiny_engine, prompt, "ar", n, **kw)
    b = first_token_histogram(tiny_engine, prompt, "pld", n, **kw)
    tv = total_variation(a, b, n)
    assert tv < 0.3, (a, b)


@pytest.fixture(scope="module")
def sps_engines(tiny_folder, tmp_path_factory, default_source):
    """(target with an unrelated random draft model, target drafting for itself)."""
    from conftest import make_tiny

    import joey

    arch = "qwen2" if "qwen2" in tiny_folder.name else "llama"
    other = make_tiny(tmp_path_factory.mktemp("draft"), arch, default_source.folder, seed=1)
    weak = joey.load(str(tiny_folder), device="cpu", prepack=False, progress=False, draft_model=str(other))
    perfect = joey.load(str(tiny_folder), device="cpu", prepack=False, progress=False, draft_model=str(tiny_folder))
    return weak, perfect


def test_sps_greedy_equals_ar(tiny_engine, sps_engines):
    weak, perfect = sps_engines
    ar = [g.token_ids for g in tiny_engine.generate(COPY_PROMPTS, max_new_tokens=30, ignore_eos=True)]
    for eng in (weak, perfect):
        single = [eng.generate(p, max_new_tokens=30, ignore_eos=True, method="sps", max_draft=4).token_ids
                  for p in COPY_PROMPTS]
        batch = eng.generate(COPY_PROMPTS, max_new_tokens=30, ignore_eos=True, method="sps", max_draft=4)
        assert single == ar
        assert [g.token_ids for g in batch] == ar


def test_sps_draft_reads_only_the_end_of_a_long_prompt(tiny_engine, sps_engines, monkeypatch):
    """The draft model reads the last PROMPT_WINDOW prompt tokens (its prefill is paid whether
    drafting pays or not); the output stays AR's."""
    from joey.drafters import draft_model

    monkeypatch.setattr(draft_model, "PROMPT_WINDOW", 16)
    long = " ".join(f"item {i} is {i * 7 % 10};" for i in range(40)) + " item 3 is"
    ar = tiny_engine.generate(long, max_new_tokens=20, ignore_eos=True).token_ids
    seen = []
    original = draft_model.DraftModelDrafter._steps

    def spy(self, context, max_tokens, max_nodes):
        out = yield from original(self, context, max_tokens, max_nodes)
        seen.append((len(context), self.start, self.cache.lengths[0]))
        return out

    monkeypatch.setattr(draft_model.DraftModelDrafter, "_steps", spy)
    for eng in sps_engines:
        assert eng.generate(long, max_new_tokens=20, ignore_eos=True, method="sps", adaptive=False).token_ids == ar
    n0, start, _ = seen[0]  # the first draft: the whole prompt was there, the window kept its end
    assert start == n0 - 16
    assert max(length for _, _, length in seen) <= 16 + 20 + 8


def test_sps_with_the_target_as_draft_accepts_everything(sps_engines):
    """The all-accepted path: every draft token is accepted and the bonus comes on top."""
    _, perfect = sps_engines
    g = perfect.generate(COPY_PROMPTS[1], max_new_tokens=31, ignore_eos=True, method="sps", max_draft=4,
                          adaptive=False)
    assert g.new_tokens == 31
    assert g.stats.acceptance_by_position == (1.0, 1.0, 1.0, 1.0)
    assert g.stats.steps == 7  # 1 (after prefill) + 6 steps of 4 drafts + bonus


def test_sps_sampling_first_token_distribution(tiny_engine, sps_engines):
    """Sampled SpS draws the first drafted position from the target's distribution."""
    weak, _ = sps_engines
    prompt, n = "alpha beta", 200
    kw = dict(max_new_tokens=2, temperature=1.0, top_k=4, ignore_eos=True)

    from conftest import first_token_histogram, total_variation

    a = first_token_histogram(tiny_engine, prompt, "ar", n, **kw)
    b = first_token_histogram(weak, prompt, "sps", n, **kw)
    tv = total_variation(a, b, n)
    assert tv < 0.2, (a, b)
