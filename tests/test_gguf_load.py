"""GGUF files read in place: tiny GGUFs written here (random blocks of the types real files mix)
load to what transformers' float conversion computes, run natively on their stored blocks without
a float copy, cache their kernel layout (a damaged one is rebuilt), and fail with one line when
corrupt. Models known by name say how to install them. The real Qwen2.5-Coder pair only in a slow
test that skips without their packages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import joey
from joey.errors import ModelFormatError, ModelNotFoundError
from joey.models import gguf_load, registry
from joey.models.gguf_file import BlockEmbedding, BlockRows, GGUFFile
from joey.models.weight_formats import low_bit_kernels

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
# (offset, count) of each type's fp16 fields in a block, and the scale they get (weights ~0.05)
_HALVES = {"Q4_0": (0, 1, 0.01), "Q4_1": (0, 2, 0.005), "Q8_0": (0, 1, 5e-4), "Q5_0": (0, 1, 0.005),
           "Q4_K": (0, 2, 3e-4), "Q6_K": (208, 1, 2e-5)}
needs_kernel = pytest.mark.skipif(low_bit_kernels() != "vnni", reason="joey's low-bit kernel needs AVX512-VNNI")


def _blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of a type with small finite fp16 scales: [rows, bytes per row] uint8."""
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES

    per, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    raw = rng.integers(0, 256, size=(rows, cols // per, size), dtype=np.uint8)
    at, count, scale = _HALVES[type_name]
    halves = (np.abs(rng.standard_normal((rows, cols // per, count))) * scale + scale / 4).astype(np.float16)
    if type_name == "Q4_1":  # d, then the group's minimum (negative)
        halves[..., 1] = -halves[..., 1] * 8
    raw[..., at: at + 2 * count] = halves.view(np.uint8).reshape(rows, cols // per, 2 * count)
    return raw.reshape(rows, -1)


@pytest.fixture(scope="session")
def tokenizer_fields(default_source):
    """The default GGUF's tokenizer metadata (a real BPE vocabulary of 49152 tokens)."""
    from gguf import GGUFReader, GGUFValueType

    fields = []
    for key, f in GGUFReader(str(default_source.gguf)).fields.items():
        if key.startswith("tokenizer."):
            kind = GGUFValueType(f.types[0])
            sub = GGUFValueType(f.types[-1]) if kind == GGUFValueType.ARRAY else None
            fields.append((key, f.contents(), kind, sub))
    return fields


def write_gguf(path: Path, fields, arch: str = "qwen2", linear: str = "Q4_K", v: str = "Q6_K", down: str = "Q6_K",
               head: str | None = "Q6_K", embed: str = "Q4_K", seed: int = 0) -> Path:
    """A 2-layer model of ``arch`` with random blocks: q/k/o/gate/up in ``linear``, v and the second
    layer's down projection in ``v``/``down``, an output head in ``head`` (None: tied to the
    embedding, stored in ``embed``)."""
    from gguf import GGMLQuantizationType, GGUFWriter

    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    for key, value, kind, sub in fields:
        w.add_key_value(key, value, kind, sub)

    def quant(name: str, type_name: str, rows: int, cols: int) -> None:
        w.add_tensor(name, _blocks(type_name, rows, cols, rng), raw_dtype=GGMLQuantizationType[type_name])

    def floats(name: str, n: int, around: float) -> None:
        w.add_tensor(name, (around + 0.1 * rng.standard_normal(n)).astype(np.float32))

    vocab = 49152
    quant("token_embd.weight", embed, vocab, HIDDEN)
    if head is not None:
        quant("output.weight", head, vocab, HIDDEN)
    floats("output_norm.weight", HIDDEN, 1.0)
    d = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"blk.{i}"
        floats(f"{p}.attn_norm.weight", HIDDEN, 1.0)
        floats(f"{p}.ffn_norm.weight", HIDDEN, 1.0)
        quant(f"{p}.attn_q.weight", linear, HIDDEN, HIDDEN)
        quant(f"{p}.attn_k.weight", linear, KV_HEADS * d, HIDDEN)
        quant(f"{p}.attn_v.weight", v if i == 0 else linear, KV_HEADS * d, HIDDEN)
        quant(f"{p}.attn_output.weight", linear, HIDDEN, HIDDEN)
        quant(f"{p}.ffn_gate.weight", linear, INTER, HIDDEN)
        quant(f"{p}.ffn_up.weight", linear, INTER, HIDDEN)
        quant(f"{p}.ffn_down.weight", down if i == 1 else linear, HIDDEN, INTER)
        if arch == "qwen2":
            for n, rows in (("attn_q", HIDDEN), ("attn_k", KV_HEADS * d), ("attn_v", KV_HEADS * d)):
                floats(f"{p}.{n}.bias", rows, 0.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JOEY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _logits(engine: joey.Engine, ids: list[int]) -> torch.Tensor:
    model = engine.model
    cache = model.new_cache(1, len(ids))
    with torch.inference_mode():
        t = torch.tensor([ids])
        return model(t, torch.arange(len(ids))[None], cache, 0, len(ids))[0]


@pytest.mark.parametrize("arch,kinds", [
    ("qwen2", dict(linear="Q4_K", v="Q6_K", down="Q6_K", head="Q6_K", embed="Q4_K")),
    ("llama", dict(linear="Q4_1", v="Q4_1", down="Q4_1", head=None, embed="Q8_0")),
])
def test_float_path_equals_transformers_conversion(tmp_path, cache, tokenizer_fields, arch, kinds):
    """Names, q/k row order (llama) and dequantized values as transformers reads the same file."""
    from transformers import AutoModelForCausalLM

    path = write_gguf(tmp_path / f"{arch}.gguf", tokenizer_fields, arch=arch, **kinds)
    engine = joey.load(str(path), device="cpu", progress=False, weights="fp32")
    ids = engine.encode("The quick brown fox jumps over the lazy dog.")
    ours = _logits(engine, ids)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_native_load_keeps_no_float_copy_and_is_lossless(tmp_path, cache, tokenizer_fields, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf", tokenizer_fields)
    engine = joey.load(str(path), device="cpu", progress=False, draft_model=str(path))  # itself drafts for sps
    model = engine.model
    assert model.weight_format == "int4+int6"
    assert model.lm_head.weight is None and isinstance(model.model.embed_tokens, BlockEmbedding)
    assert all(lin.weight is None for layer in model.model.layers
               for lin in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj))
    # the bytes one step reads: about the stored blocks' (4.5 / 6.56 bits a weight), not a widened copy
    file = GGUFFile(path)
    stored = sum(t.nbytes for n, t in file.tensors.items() if n != "token_embd.weight" and t.type_name != "F32")
    assert stored <= model.weight_bytes() <= 1.1 * stored
    # close to the exact dequantization (activations are quantized to 8 bits, as llama.cpp does)
    ids = engine.encode("Explain the water cycle in two sentences.")
    reference = joey.load(str(path), device="cpu", progress=False, weights="fp32")
    a, b = _logits(engine, ids), _logits(reference, ids)
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    # the draft vocabulary's rows of the head read from its blocks are the float head's rows
    index = torch.tensor([0, 5, 49151])
    assert torch.equal(model.head_rows(index), reference.model.lm_head.weight[index])
    prompts = ["Hi", "Count: one two three four five six seven", "Repeat: a b c a b c a b c"]
    ar = [g.token_ids for g in engine.generate(prompts, max_new_tokens=16, method="ar")]
    for method in ("pld", "sps"):
        got = [g.token_ids for g in engine.generate(prompts, max_new_tokens=16, method=method)]
        assert got == ar, method
    assert [engine.generate(p, max_new_tokens=16, method="ar").token_ids for p in prompts] == ar
    # a later load maps the cached layout instead of laying the blocks out again
    monkeypatch.setattr(gguf_load, "build_kernels", lambda *a, **k: pytest.fail("layout rebuilt"))
    again = joey.load(str(path), device="cpu", progress=False)
    assert [g.token_ids for g in again.generate(prompts, max_new_tokens=16, method="ar")] == ar


@needs_kernel
def test_block_embedding_keeps_the_rows_it_dequantized(tmp_path, cache, tokenizer_fields, monkeypatch):
    """The same lookup again reads no blocks; a full memo starts over instead of growing."""
    path = write_gguf(tmp_path / "m.gguf", tokenizer_fields)
    embed = joey.load(str(path), device="cpu", progress=False).model.model.embed_tokens
    reference = joey.load(str(path), device="cpu", progress=False, weights="fp32").model.model.embed_tokens
    assert isinstance(embed, BlockEmbedding)
    tokens = torch.tensor([[3, 7, 3], [9, 7, 11]])
    first = embed(tokens)
    assert torch.equal(first, reference(tokens))
    with monkeypatch.context() as m:
        m.setattr(BlockRows, "__call__", lambda *a: pytest.fail("dequantized again"))
        assert torch.equal(embed(tokens), first)
    monkeypatch.setattr(BlockEmbedding, "MEMO", 5)
    embed._memo = {}
    embed(torch.tensor([20, 21, 22, 23]))
    later = torch.tensor([30, 21, 31])
    assert torch.equal(embed(later), reference(later))
    assert sorted(embed._memo) == [21, 30, 31]  # 4 + 2 new rows > 5: started over with this lookup's


@needs_kernel
def test_damaged_kernel_layout_is_rebuilt(tmp_path, cache, tokenizer_fields):
    path = write_gguf(tmp_path / "m.gguf", tokenizer_fields, linear="Q5_0", v="Q8_0", down="Q6_K", head="Q8_0",
                      embed="Q5_0")
    first = joey.load(str(path), device="cpu", progress=False)
    assert first.model.weight_format == "int5+int6+int8"
    want = first.generate("Hello", max_new_tokens=8, method="ar").token_ids
    (layout,) = cache.glob("models/*/kernels-*.bin")
    data = bytearray(layout.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layout.write_bytes(bytes(data))
    assert gguf_load.read_kernels(layout) is None
    again = joey.load(str(path), device="cpu", progress=False)
    assert again.generate("Hello", max_new_tokens=8, method="ar").token_ids == want
    assert gguf_load.read_kernels(layout) is not None


def test_truncated_or_corrupt_gguf_is_one_line_error(tmp_path, cache, tokenizer_fields, capsys):
    from joey.cli import main

    path = write_gguf(tmp_path / "m.gguf", tokenizer_fields)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match="truncated"):
        GGUFFile(cut)
    assert main(["generate", "Hi", "--model", str(cut)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("joey: error:") and "truncated" in err and "Traceback" not in err
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ModelFormatError):
        joey.load(str(junk), device="cpu", progress=False)


def test_named_models_say_how_to_install_them(cache, capsys):
    from joey.cli import main

    big = registry.known_model("qwen2.5-coder-1.5b-instruct")
    assert big is not None and registry.known_model("Qwen2.5-Coder-1.5B") is big
    if registry.installed_gguf(big) is None:
        with pytest.raises(ModelNotFoundError, match="joey install qwen2.5-coder-1.5b-instruct"):
            registry.resolve("qwen2.5-coder-1.5b-instruct")
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'"):
        registry.install("nope")
    assert main(["info", "--models"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-0.5b-instruct" in out and "smollm2-135m" in out


def test_joined_parts_are_checked(tmp_path, cache):
    part = tmp_path / "p1.bin"
    part.write_bytes(b"GGUF" + b"\0" * 60)
    model = registry.KnownModel("tiny", (), ("tiny-part1",), ("tiny_part1/data/part01.bin",), 64, "0" * 64, "test")
    with pytest.raises(ModelFormatError, match="SHA-256"):
        registry._join(model, [part], tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
    good = registry.KnownModel("tiny", (), ("tiny-part1",), ("tiny_part1/data/part01.bin",), 64,
                               registry.file_sha256(part), "test")
    assert registry._join(good, [part], tmp_path / "out.gguf").read_bytes() == part.read_bytes()


@pytest.mark.slow
def test_real_qwen_coder_pair_is_lossless():
    """Qwen2.5-Coder-1.5B on its Q4_K/Q6_K blocks: PLD, SpS with the 0.5B (Q5_0/Q8_0/Q4_K/Q6_K) and
    the Jakiro head shipped for it (found by itself) give AR's greedy tokens. Skips unless both
    models are installed (joey install ...)."""
    for name in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"):
        if registry.installed_gguf(registry.known_model(name)) is None:  # type: ignore[arg-type]
            pytest.skip(f"{name} is not installed (joey install {name})")
    engine = joey.load("qwen2.5-coder-1.5b-instruct", device="cpu", progress=False,
                       draft_model="qwen2.5-coder-0.5b-instruct")
    assert engine.model.weight_format == "int4+int6"
    prompt = "Write a Python function that returns the n-th Fibonacci number."
    ar = engine.generate(prompt, max_new_tokens=24, method="ar").token_ids
    assert engine.generate(prompt, max_new_tokens=24, method="pld").token_ids == ar
    assert engine.generate(prompt, max_new_tokens=24, method="sps").token_ids == ar
    assert engine.jakiro is not None  # joey/heads/qwen2.5-coder-1.5b-instruct.safetensors
    assert engine.generate(prompt, max_new_tokens=24, method="jakiro").token_ids == ar
    assert engine.generate(prompt, max_new_tokens=24, method="jakiro+pld").token_ids == ar
