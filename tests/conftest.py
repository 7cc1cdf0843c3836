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


@pytest.fixture(scope="session")
def default_source():
    return resolve(None, progress=False)


@pytest.fixture(scope="session")
def default_engine(default_source) -> joey.Engine:
    return joey.load(None, device="cpu", prepack=False, progress=False)


def make_tiny(folder: Path, arch: str, tokenizer_from: Path, seed: int = 0) -> Path:
    """Save a random-weight llama or qwen2 model with a real tokenizer, as a HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, eos_token_id=2, bos_token_id=1, pad_token_id=2,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True, rope_theta=10000.0))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1e6))
        with torch.no_grad():  # make the q/k/v biases matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    with torch.no_grad():  # sharper logits so greedy ties are improbable
        for p in model.parameters():
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


@pytest.fixture(scope="session")
def engine(tiny_folder) -> Engine:
    """A tiny target whose deep layers are damped (so the shallow Kangaroo drafts are partly right),
    with an adapter at layer 1, a Jakiro head that passes its input token through, and the target
    itself as sps's draft model (every draft accepted: rows of a step commit different counts)."""
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
    return Engine(model, eng.tokenizer, eng.source, draft_model=model, adapter=adapter, head=head.eval())
