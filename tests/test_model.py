"""The compact decoder against transformers' own implementation, and KV-cache behaviour."""

from __future__ import annotations

import pytest
import torch

from joey.batching import causal_mask
from joey.models.weights import load_model


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def default_hf(default_source):
    """transformers' model of the default GGUF (its own dequantization; joey keeps no float copy)."""
    return default_source.transformers_model(dtype=torch.float32).eval()


def _prefill(model, ids):
    cache = model.new_cache(1, 256)
    x = torch.tensor([ids])
    logits = model(x, torch.arange(len(ids))[None], cache, 0, len(ids), None)
    cache.advance([len(ids)])
    return logits, cache


@pytest.mark.parametrize("prepack", [False, True])
def test_tiny_logits_match_transformers(tiny_folder, prepack):
    model = load_model(tiny_folder, torch.device("cpu"), torch.float32)
    if prepack:
        assert model.kernel_setup.prepack()
    hf = _hf(tiny_folder)
    ids = torch.randint(0, 49152, (1, 37), generator=torch.Generator().manual_seed(0)).tolist()[0]
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits
        ours, _ = _prefill(model, ids)
    assert (ref - ours).abs().max().item() < 1e-3


def test_default_logits_match_transformers(default_engine, default_hf):
    hf = default_hf
    ids = default_engine.encode("Explain what a KV cache is in one sentence.")
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits
        ours, _ = _prefill(default_engine.model, ids)
    assert (ref - ours).abs().max().item() < 1e-3


def test_default_greedy_matches_transformers_generate(default_engine, default_hf):
    hf = default_hf
    for prompt in ["Write a haiku about the sea.", "List three uses of copper."]:
        ids = default_engine.encode(prompt)
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)
        expected = out[0, len(ids) :].tolist()
        got = default_engine.generate(prompt, max_new_tokens=64, ignore_eos=True).token_ids
        assert list(got[: len(expected)]) == expected


def test_incremental_decode_matches_full_forward(tiny_engine):
    """Decoding token by token through the cache gives the logits of one full forward."""
    model = tiny_engine.model
    ids = list(range(100, 130))
    with torch.inference_mode():
        full, _ = _prefill(model, ids)
        _, cache = _prefill(model, ids[:20])
        for i in range(20, 30):
            step = model(torch.tensor([[ids[i]]]), torch.tensor([[i]]), cache, i, i + 1, None)
            cache.advance([1])
            assert torch.allclose(step[0, -1], full[0, i], atol=1e-4)


def test_rollback_then_continue_equals_fresh_prefill(tiny_engine):
    """Write 5 draft tokens, keep ``accepted`` of them, continue: logits equal a fresh prefill."""
    model = tiny_engine.model
    prefix, draft, rest = list(range(200, 230)), [7, 8, 9, 10, 11], list(range(600, 610))
    with torch.inference_mode():
        for accepted in (0, 1, 3, 5):
            fresh, _ = _prefill(model, prefix + draft[:accepted] + rest)
            _, cache = _prefill(model, prefix)
            model(torch.tensor([draft]), torch.arange(30, 35)[None], cache, 30, 35, causal_mask([30], 5, 35, "cpu"))
            cache.advance([5])
            n = 30 + accepted
            cache.truncate([n])
            mask = causal_mask([n], 10, n + 10, "cpu")
            logits = model(torch.tensor([rest]), torch.arange(n, n + 10)[None], cache, n, n + 10, mask)
            assert torch.allclose(logits[0], fresh[0, n:], atol=1e-4)


def test_ragged_batch_rows_match_single_rows(tiny_engine):
    """Rows of different cached lengths in one batch give the same logits as each row alone."""
    model = tiny_engine.model
    rows = [list(range(300, 311)), list(range(400, 405)), list(range(500, 520))]
    with torch.inference_mode():
        singles = [_prefill(model, r)[0][0, -1] for r in rows]
        cache = model.new_cache(3, 64)
        prefixes = [r[:-1] for r in rows]
        t = max(len(p) for p in prefixes)
        tokens = torch.zeros(3, t, dtype=torch.long)
        for b, p in enumerate(prefixes):
            tokens[b, : len(p)] = torch.tensor(p)
        model(tokens, torch.arange(t).expand(3, t), cache, 0, t, None)
        cache.advance([len(p) for p in prefixes])
        lengths = cache.lengths
        last = torch.tensor([[r[-1]] for r in rows])
        pos = torch.tensor(lengths)[:, None]
        kv_len = max(lengths) + 1
        logits = model(last, pos, cache, pos, kv_len, causal_mask(lengths, 1, kv_len, "cpu"))
    for b in range(3):
        assert torch.allclose(logits[b, -1], singles[b], atol=1e-4)


def packed_rows(model, prefixes: list[list[int]], news: list[list[int]]):
    """Each prefix prefilled alone into its row of one cache, then every row's new tokens in one
    packed forward (no padding): each row's logits of its new tokens, and the packing."""
    from joey.batching import pack

    with torch.inference_mode():
        cache = model.new_cache(len(prefixes), 64)
        for b, p in enumerate(prefixes):  # fill each row's cache from its own single-row prefill
            _, one = _prefill(model, p)
            for layer in range(model.cfg.num_layers):
                cache.k[layer][b, :, : len(p)] = one.k[layer][0, :, : len(p)]
                cache.v[layer][b, :, : len(p)] = one.v[layer][0, :, : len(p)]
        lengths = [len(p) for p in prefixes]
        cache.advance(lengths)
        counts = [len(n) for n in news]
        packing = pack(lengths, counts, "cpu")
        kv_len = max(lengths) + max(counts)
        tokens = torch.tensor([tok for n in news for tok in n])
        logits = model.forward_packed(tokens, cache, packing, kv_len, causal_mask(lengths, max(counts), kv_len, "cpu"))
    return logits.split(counts), packing


def test_packed_ragged_rows_match_single_rows(tiny_engine):
    """EMS-SD packing: rows feeding 1, 4 and 2 new tokens, packed without padding, give the same
    logits as running each row on its own."""
    model = tiny_engine.model
    prefixes = [list(range(300, 311)), list(range(400, 405)), list(range(500, 520))]
    news = [[7], [8, 9, 10, 11], [12, 13]]
    with torch.inference_mode():
        singles = [_prefill(model, p + n)[0][0, len(p) :] for p, n in zip(prefixes, news)]
    got, packing = packed_rows(model, prefixes, news)
    for g, want in zip(got, singles):
        assert torch.allclose(g, want, atol=1e-4)
    assert packing.from_grid.tolist() == [0, 4, 5, 6, 7, 8, 9]
