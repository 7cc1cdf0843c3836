"""Shared fixtures: tiny random-weight models for the logic, the real default model for a few
end-to-end checks (converted once, then loaded from joey's cache)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import joey
from joey.engine import Engine
from joey.models.adapter import KangarooAdapter
from joey.models.jakiro_head import JakiroHead
from joey.models.registry import resolve


@pytest.fixture(autouse=True)
def _drafting_not_gated_by_the_clock(request, monkeypatch):
    """Whether drafting pays by the wall clock (``joey.payoff``) is not deterministic, and many
    tests count drafts: they run without the gate. Tests marked ``payoff`` keep it."""
    if "payoff" not in request.keywords:
        monkeypatch.setattr(Engine, "measured_payoff", False)


@pytest.fixture(scope="session")
def default_source():
    return resolve(None, progress=False)


@pytest.fixture(scope="session")
def default_engine(default_source) -> joey.Engine:
    return joey.load(None, device="cpu", prepack=False, progress=False)


# Tiny random-weight models of every family joey's decoder covers: (transformers config and model
# class names, the config's own fields). All share the real default tokenizer's vocabulary.
TINY_FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False, rope_theta=1e6)),
    # Llama 3.1-3.3: an original context of 64 puts the 16-channel heads' wavelengths on both sides
    # of the blend's bounds (16 and 64)
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "linear": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "yarn": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 128})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True, rope_theta=1e6)),
    # longrope with a quarter of each head unrotated; every position tested stays inside the original
    # context (past it transformers re-encodes the whole sequence: see joey.models.rope)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        partial_rotary_factor=0.75, original_max_position_embeddings=128, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 128,
        "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [1.5, 2.0, 3.0, 4.0, 6.0, 8.0]})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8, rope_theta=10000.0)),
    # two local layers with a window of 8 and their own RoPE base, one global layer with linear
    # scaling, a final logit soft-cap
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=32, query_pre_attn_scalar=24, sliding_window=8, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    # Gemma 2: local/global alternation and both soft-caps (attention scores too)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=32, query_pre_attn_scalar=24, sliding_window=8, final_logit_softcapping=30.0,
        attn_logit_softcapping=20.0)),
}


def make_tiny(folder: Path, arch: str, tokenizer_from: Path, seed: int = 0, **overrides) -> Path:
    """Save a random-weight model of family ``arch`` (a key of ``TINY_FAMILIES``) with a real
    tokenizer, as a HF folder; ``overrides`` replace config fields."""
    import transformers

    config_name, model_name, fields = TINY_FAMILIES[arch]
    torch.manual_seed(seed)
    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, eos_token_id=2, bos_token_id=1, pad_token_id=2,
    )
    config = getattr(transformers, config_name)(**{**common, **fields, **overrides})
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):  # make the q/k/v biases matter
                p.normal_(0, 0.5)
            elif "norm" in name and arch not in ("llama", "qwen2"):  # norms that are not all ones (Gemma's
                # start at zero: 1 + w); the two original families keep the weights other tests were tuned on
                p.add_(torch.randn_like(p) * 0.3)
        for p in model.parameters():  # sharper logits so greedy ties are improbable
            p.mul_(4.0)
    model.save_pretrained(folder)
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_folder(request, tmp_path_factory, default_source) -> Path:
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return make_tiny(folder, request.param, default_source.folder)


@pytest.fixture(scope="session")
def tiny_engine(tiny_folder) -> joey.Engine:
    return joey.load(str(tiny_folder), device="cpu", prepack=False, progress=False)


def first_token_histogram(engine, prompt: str, method: str, n: int, **kw) -> dict[int, int]:
    """How often each token comes out at the first drafted position (the second new token) over
    ``n`` seeds: sampled speculative decoding must reproduce AR's histogram."""
    counts: dict[int, int] = {}
    for seed in range(n):
        tok = engine.generate(prompt, method=method, seed=seed, **kw).token_ids[1]
        counts[tok] = counts.get(tok, 0) + 1
    return counts


def total_variation(a: dict[int, int], b: dict[int, int], n: int) -> float:
    return 0.5 * sum(abs(a.get(t, 0) - b.get(t, 0)) for t in set(a) | set(b)) / n


def drafting_engine(tiny_folder, weights: str | None = None) -> Engine:
    """A tiny target whose deep layers are damped (so the shallow Kangaroo drafts are partly right),
    with an adapter at layer 1, a Jakiro head that passes its input token through, and the target
    itself as sps's draft model (every draft accepted: rows of a step commit different counts).
    ``weights``: the linears' format (None: plain fp32)."""
    eng = joey.load(str(tiny_folder), device="cpu", prepack=False, progress=False, adapter=False, head=False)
    model = eng.model
    h = model.cfg.hidden_size
    vocab = torch.arange(model.cfg.vocab_size)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(0.3)
            layer.mlp.down_proj.weight.mul_(0.3)
        adapter = KangarooAdapter.initialized_from(model, 1, vocab)
        head = JakiroHead(model.cfg, vocab, experts=2)
        head.fc.weight.zero_()
        head.fc.weight[:, :h] = torch.eye(h)
        head.fc.bias.zero_()
    if weights is not None:
        model.kernel_setup.set_weights(weights)
    return Engine(model, eng.tokenizer, eng.source, draft_model=model, adapter=adapter, head=head.eval())


@pytest.fixture(scope="session")
def engine(tiny_folder) -> Engine:
    """``drafting_engine`` in plain fp32."""
    return drafting_engine(tiny_folder)
