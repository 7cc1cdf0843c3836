"""Engine behaviour: batching, sampling reproducibility, stop conditions, streaming, bad input."""

from __future__ import annotations

import pytest

import joey
from joey.errors import InvalidArgumentError, PromptError

PROMPTS = ["Name three rivers.", "What is the boiling point of water at sea level, in Celsius?", "Hi"]


def test_batched_greedy_equals_single(tiny_engine):
    singles = [tiny_engine.generate(p, max_new_tokens=24, ignore_eos=True).token_ids for p in PROMPTS]
    batched = [g.token_ids for g in tiny_engine.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)]
    assert batched == singles


def test_row_finishing_early_leaves_others_unchanged(default_engine):
    """One row hits EOS after a few tokens and is dropped from the batch; the others continue
    exactly as they would alone."""
    prompts = ["Reply with just the word yes.", "Write a short poem about autumn.", "Count from 1 to 10."]
    singles = [default_engine.generate(p, max_new_tokens=24) for p in prompts]
    batched = default_engine.generate(prompts, max_new_tokens=24)
    assert singles[0].finish_reason == "stop" and singles[0].new_tokens < 24
    assert [g.token_ids for g in batched] == [g.token_ids for g in singles]
    assert [g.finish_reason for g in batched] == [g.finish_reason for g in singles]


def test_sampling_is_reproducible_with_seed(tiny_engine):
    kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=50, ignore_eos=True)
    a = tiny_engine.generate(PROMPTS[0], seed=123, **kw).token_ids
    b = tiny_engine.generate(PROMPTS[0], seed=123, **kw).token_ids
    c = tiny_engine.generate(PROMPTS[0], seed=124, **kw).token_ids
    assert a == b
    assert a != c


def test_stream_deltas_concatenate_to_text(tiny_engine):
    events = list(tiny_engine.stream(PROMPTS[0], max_new_tokens=20, ignore_eos=True))
    final = events[-1].generation
    assert final is not None and final.new_tokens == 20
    assert "".join(e.text for e in events) == final.text
    assert sum(len(e.token_ids) for e in events) == 20


def test_stop_string_truncates_and_stops(tiny_engine):
    full = tiny_engine.generate(PROMPTS[1], max_new_tokens=30, ignore_eos=True)
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = tiny_engine.generate(PROMPTS[1], max_new_tokens=30, ignore_eos=True, stop=(stop,))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.new_tokens < full.new_tokens


def test_eos_ends_generation(default_engine):
    g = default_engine.generate("Reply with just the word yes.", max_new_tokens=40)
    assert g.finish_reason == "stop"
    assert g.new_tokens < 40
    assert not any(t in default_engine.eos_ids for t in g.token_ids)


def test_multi_turn_messages_use_the_chat_template(default_engine):
    msgs = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    ids = default_engine.encode(msgs)
    text = default_engine.tokenizer.decode(ids)
    assert text.count("<|im_start|>user") == 2 and text.rstrip().endswith("<|im_start|>assistant")
    assert "Nice to meet you, Ada.<|im_end|>" in text
    assert default_engine.generate(msgs, max_new_tokens=4).new_tokens > 0


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2), dict(max_new_tokens=0)],
)
def test_invalid_sampling_values_raise(tiny_engine, kwargs):
    with pytest.raises(InvalidArgumentError):
        tiny_engine.generate("hello", **kwargs)


def test_empty_and_too_long_prompts_raise(tiny_engine):
    with pytest.raises(PromptError):
        tiny_engine.generate("   ")
    with pytest.raises(PromptError):
        tiny_engine.generate([])
    with pytest.raises(PromptError, match="context"):
        tiny_engine.generate("word " * 600)  # the tiny models have a 512-token context


def test_generation_stats_for_ar(tiny_engine):
    assert tiny_engine.default_method == "pld"
    g = tiny_engine.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True, method="ar")
    assert isinstance(g, joey.Generation)
    assert g.method == "ar" and g.stats.steps == 8 and g.stats.mean_accepted_tokens == 1.0
    assert g.tokens_per_s > 0 and g.prompt_tokens > 0


def test_auto_picks_the_fastest_measured_method_whose_drafter_is_loaded(tiny_engine, monkeypatch):
    """``--method auto`` (and None) is the registry's measured order for a known model, skipping
    methods whose drafter is not loaded; prompt lookup for a model joey does not know."""
    import dataclasses

    from joey.models import registry

    assert tiny_engine.resolve_method("auto") == tiny_engine.resolve_method(None) == "pld"
    assert tiny_engine.resolve_method("ar") == "ar"
    known = registry.KNOWN_MODELS[0]
    monkeypatch.setattr(registry, "known_model", lambda name: dataclasses.replace(known, methods=("sps", "jakiro")))
    want = "jakiro" if tiny_engine.jakiro is not None else "pld"  # no draft model for sps here
    assert tiny_engine.default_method == want
