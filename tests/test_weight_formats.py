"""Weight formats: each kernel computes its weight's product, GGUF blocks decode to the reference
values, low-bit models verify k tokens bitwise like decoding them one by one, and every drafter
stays lossless on int8 and int4 targets (greedy and sampled)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import joey
from joey.engine import Engine
from joey.errors import InvalidArgumentError
from joey.models.adapter import KangarooAdapter
from joey.models.gguf_blocks import DECODERS, decode_tensor
from joey.models.gguf_file import GGUFFile
from joey.models.gguf_load import quantized_weights
from joey.models.group_kernel import GroupKernel
from joey.models.jakiro_head import JakiroHead
from joey.models.quantized import QuantizedWeight
from joey.models.weight_formats import Int8Kernel, low_bit_kernels, make_kernel, quantize_int4, quantize_int8
from joey.models.weights import source_formats

PROMPTS = ["Hello there, how are you today?", "Write a poem about cats and dogs.", "Hi"]


def _x(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("out", [96, 100])  # the int4 packing takes whole blocks of 16 outputs
def test_kernel_matches_its_weights_product(fmt, out):
    w, bias, x = _x(out, 64, 1), _x(1, out, 2)[0], _x(5, 64, 3)
    kernel = make_kernel(fmt, w, bias)
    if fmt == "fp32":
        ref, tol = x @ w.T + bias, 1e-4
    elif fmt != "bf16" and low_bit_kernels() == "vnni":  # joey's kernel: 8-bit activations, exact sums
        q = {"int8": quantize_int8(w), "int4": quantize_int4(w)}[fmt]
        ref, tol = _int8_activation_product(x, q) + bias, 1e-4 * _int8_activation_product(x, q).abs().max()
    else:  # bf16 activations (and weights / scales): compare with what the kernel stands for
        q = {"bf16": None, "int8": quantize_int8(w), "int4": quantize_int4(w)}[fmt]
        wq = w if q is None else q.dequantize()
        ref = x.bfloat16().float() @ wq.bfloat16().float().T + bias
        tol = 1e-2 * ref.abs().max()  # bf16 outputs and scales: ~3 significant digits
    assert kernel.format == fmt
    assert (kernel(x) - ref).abs().max() < tol


def _int8_activation_product(x: torch.Tensor, q: QuantizedWeight) -> torch.Tensor:
    """What joey's VNNI kernel stands for, in float64: x quantized to int8 per group of 32
    (scale max|x| / 127, round to nearest) times the dequantized weight."""
    g = x.double().view(x.shape[0], -1, 32)
    amax = g.abs().amax(-1, keepdim=True).float()
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    codes = torch.round(g.float() * inv).double()
    xq = (codes * (amax / 127.0).double()).view_as(x)
    return (xq @ q.dequantize().double().T).float()


needs_vnni = pytest.mark.skipif(low_bit_kernels() != "vnni", reason="joey's kernel needs AVX512-VNNI and a C compiler")


@needs_vnni
@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q4_1_fp16", "q8_0", "q8_0_fp16", "int8_per_row"])
@pytest.mark.parametrize("out", [48, 100])  # 100: not a whole number of 16-column tiles
def test_group_kernel_computes_int8_activations_times_its_codes(kind, out):
    """joey's kernel equals the float64 product of 8-bit-quantized activations and the dequantized
    weight (its sums are exact integers; only the float combination rounds), for every code layout."""
    g = torch.Generator().manual_seed(11)
    cols = 96
    scale = torch.rand(out, cols // 32, generator=g) * 0.02 + 0.001
    if kind.endswith("fp16"):  # a GGUF's own scales: the kernel keeps them in fp16, exactly
        scale = scale.half().float()
    if kind.startswith("q8_0"):
        q = QuantizedWeight(8, torch.randint(-128, 128, (out, cols), generator=g, dtype=torch.int8), scale, None, 32)
    elif kind == "int8_per_row":
        q = quantize_int8(_x(out, cols, 12))
    else:
        codes = torch.randint(0, 16, (out, cols), generator=g, dtype=torch.uint8)
        offset = -8 * scale if kind == "q4_0" else torch.randn(out, cols // 32, generator=g) * 0.05
        if kind.endswith("fp16"):
            offset = offset.half().float()
        q = QuantizedWeight(4, codes, scale, offset, 32)
    bias = _x(1, out, 13)[0]
    x = _x(7, cols, 14) * torch.linspace(0.1, 3, cols)  # groups of different magnitudes
    x[2, :32] = 0  # an all-zero group (scale 0)
    kernel = GroupKernel(q, bias)
    assert kernel.half == kind.endswith("fp16")
    ref = _int8_activation_product(x, q) + bias
    assert kernel.format == f"int{q.bits}" and kernel(x).shape == (7, out)
    assert (kernel(x) - ref).abs().max() < 1e-5 * ref.abs().max() + 1e-6


@needs_vnni
def test_group_kernel_is_row_invariant_for_every_row_count():
    """Rows are blocked by 8 inside the kernel: every count from 1 to 40 (each block remainder) and
    every offset of a row within the call gives that row's bits exactly."""
    kernel = GroupKernel(quantize_int4(_x(200, 576, 15)), None)
    x = _x(40, 576, 16)
    full = kernel(x)
    assert all(torch.equal(kernel(x[:m]), full[:m]) for m in range(1, 41))
    assert all(torch.equal(kernel(x[i : i + 1])[0], full[i]) for i in range(40))


@needs_vnni
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("d", [32, 64, 128])  # the kernel's generic path and its two constant head sizes
def test_c_attention_equals_sdpa_and_never_depends_on_the_number_of_queries(masked, d):
    """joey's C attention (GQA 6 query / 2 kv heads) agrees with SDPA, and each of T queries gets
    exactly the bits it gets when it is computed alone (its own row of the mask)."""
    from joey.models.group_kernel import attention

    g = torch.Generator().manual_seed(17)
    b, t, h, kvh, length, kv = 2, 5, 6, 2, 40, 23
    q = torch.randn(b, t, h, d, generator=g)
    k = torch.randn(b, kvh, length, d, generator=g)
    v = torch.randn(b, kvh, length, d, generator=g)
    if masked:  # a tree-like mask: random ancestors among the new keys, the past always visible
        mask = torch.rand(b, 1, t, kv, generator=g) > 0.4
        mask[..., : kv - t] = True
    else:  # the queries are the last t positions: causal
        mask = torch.ones(t, kv, dtype=torch.bool).tril(kv - t).expand(b, 1, t, kv)
    out = attention(q, k, v, kv, mask if masked else None, d**-0.5)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k[:, :, :kv], v[:, :, :kv], attn_mask=mask,
                                         enable_gqa=True).transpose(1, 2)
    assert (out - ref).abs().max() < 1e-5
    for i in range(t):
        alone = attention(q[:, i : i + 1], k, v, kv, mask[:, :, i : i + 1], d**-0.5)
        assert torch.equal(alone, out[:, i : i + 1])


@needs_vnni
def test_c_attention_depends_only_on_the_keys_a_query_sees():
    """A tree puts a node's ancestors at scattered cache slots; decoding puts the same keys side by
    side. Same visible keys in the same order → the same bits, wherever they sit and however many
    keys the call spans."""
    from joey.models.group_kernel import attention

    g = torch.Generator().manual_seed(19)
    d, h, kvh = 32, 4, 2
    q = torch.randn(1, 1, h, d, generator=g)
    k = torch.randn(1, kvh, 64, d, generator=g)
    v = torch.randn(1, kvh, 64, d, generator=g)
    seen = list(range(20)) + [23, 29, 30, 41]  # a prefix, then a path through a tree
    scattered = torch.zeros(1, 1, 1, 50, dtype=torch.bool)
    scattered[..., seen] = True
    tree = attention(q, k, v, 50, scattered, d**-0.5)
    packed_k, packed_v = torch.zeros_like(k), torch.zeros_like(v)
    packed_k[:, :, : len(seen)], packed_v[:, :, : len(seen)] = k[:, :, seen], v[:, :, seen]
    assert torch.equal(attention(q, packed_k, packed_v, len(seen), None, d**-0.5), tree)


@needs_vnni
@pytest.mark.parametrize("d", [64, 128])
def test_c_attention_serves_a_ragged_batch_in_one_call(d):
    """Rows of very different lengths feeding different numbers of tokens, in one call with each
    row's real queries (``counts``) and the end of its slots (``ends``): every real query gets the
    bits it gets in its row's own call, padding queries get zeros, and no row reads past its end
    (the slots there hold NaN)."""
    from joey.models.group_kernel import attention

    g = torch.Generator().manual_seed(23)
    h, kvh = 9, 3
    lengths, counts = [70, 3, 17, 1], [1, 4, 2, 3]
    t, kv = max(counts), max(lengths) + max(counts)
    k = torch.randn(4, kvh, kv + 8, d, generator=g)
    v = torch.randn(4, kvh, kv + 8, d, generator=g)
    for b, (n, c) in enumerate(zip(lengths, counts)):
        k[b, :, n + c :] = v[b, :, n + c :] = float("nan")
    q = torch.randn(4, t, h, d, generator=g)
    mask = torch.zeros(4, 1, t, kv, dtype=torch.bool)
    for b, n in enumerate(lengths):
        for i in range(t):
            mask[b, 0, i, : n + i + 1] = True
    out = attention(q, k, v, kv, mask, d**-0.5, torch.tensor(counts), torch.tensor(lengths) + torch.tensor(counts))
    for b, (n, c) in enumerate(zip(lengths, counts)):
        alone = attention(q[b : b + 1, :c].contiguous(), k[b : b + 1], v[b : b + 1], n + c, None, d**-0.5)
        assert torch.equal(out[b : b + 1, :c], alone)
        assert out[b, c:].eq(0).all()


@needs_vnni
@pytest.mark.parametrize("where", ["from one slot", "slot per token", "packed rows"])
def test_rope_and_cache_writes_in_c_give_pytorchs_bits(where):
    """``rope_store`` (RoPE on queries and keys, keys and values written to the cache, one C call)
    gives exactly the bits of ``apply_rope`` and ``write_kv``, for every way a forward names slots."""
    from joey.models.group_kernel import rope_store
    from joey.models.llama import apply_rope, write_kv

    g = torch.Generator().manual_seed(29)
    h, kvh, d, b, t = 6, 2, 32, 3, 4
    qkv = torch.randn(b * t, h + 2 * kvh, d, generator=g)
    angles = torch.rand(b * t, 1, d // 2, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rows = None
    if where == "from one slot":
        slots = 5
    elif where == "slot per token":
        slots = torch.tensor([[2, 3, 4, 5], [7, 8, 9, 10], [0, 1, 2, 3]])
    else:  # ragged rows packed: 5 tokens of row 0, 2 of row 1, 5 of row 2
        rows = torch.tensor([0] * 5 + [1] * 2 + [2] * 5)
        slots = torch.tensor([3, 4, 5, 6, 7, 11, 12, 0, 1, 2, 3, 4])
    ref_k, ref_v = torch.zeros(b, kvh, 16, d), torch.zeros(b, kvh, 16, d)
    qk = apply_rope(qkv[:, : h + kvh], cos, sin)
    write_kv(ref_k, ref_v, qk[:, h:], qkv[:, h + kvh :], (b, t), slots, rows)
    k, v = torch.zeros_like(ref_k), torch.zeros_like(ref_v)
    q = rope_store(qkv, cos, sin, k, v, slots, t, rows)
    assert torch.equal(q, qk[:, :h]) and torch.equal(k, ref_k) and torch.equal(v, ref_v)


def test_quantizers_round_to_nearest_code():
    w = _x(16, 64, 4)
    q4, q8 = quantize_int4(w), quantize_int8(w)
    assert int(q4.codes.max()) <= 15 and int(q8.codes.min()) >= -128
    assert ((q4.dequantize() - w).abs() <= q4.scale.repeat_interleave(32, 1) / 2 + 1e-6).all()
    assert ((q8.dequantize() - w).abs() <= q8.scale / 2 + 1e-6).all()
    with pytest.raises(InvalidArgumentError, match="divisible by 32"):
        quantize_int4(_x(4, 48))


def test_int8_groups_run_exactly_as_two_int4_planes():
    """A Q8_0-style weight (a scale per 32 columns) on the two-plane path equals its dequantized
    product up to bf16 rounding of the activations, and the per-row path agrees with its own."""
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(-128, 128, (64, 96), generator=g, dtype=torch.int8)
    scale = torch.rand(64, 3, generator=g) * 0.01 + 0.001
    q = QuantizedWeight(8, codes, scale, None, 32)
    x = _x(3, 96, 6)
    kernel = Int8Kernel(q, None)  # PyTorch's path (where joey's VNNI kernel does not run)
    assert kernel.planes is not None  # a scale per 32 columns: the two-plane path
    ref = x.bfloat16().float() @ q.dequantize().bfloat16().float().T
    assert (kernel(x) - ref).abs().max() < 2e-2 * ref.abs().max()


def _random_blocks(type_name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes for ``type_name`` blocks, with finite fp16 scales where the format keeps them."""
    per, nbytes, _, _ = DECODERS[type_name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // per, nbytes), dtype=np.uint8)
    n_halves = 2 if type_name in ("Q4_1", "Q4_K") else 1
    halves = (rng.standard_normal((rows, cols // per, n_halves)) * 0.02).astype(np.float16)
    raw[..., : 2 * n_halves] = halves.view(np.uint8).reshape(rows, cols // per, 2 * n_halves)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", sorted(DECODERS))
def test_gguf_blocks_decode_to_the_reference_values(type_name):
    """joey's codes + scales dequantize to what the gguf package's reference (transformers' GGUF
    loader) produces: exactly, or within fp32 rounding where Q4_0's d(q - 8) becomes d q - 8 d."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows, cols = 6, 512
    raw = _random_blocks(type_name, rows, cols, seed=7)
    ref = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols).astype(np.float32))
    q = decode_tensor(type_name, raw, rows, cols)
    assert q.group == 32 and q.bits == DECODERS[type_name][3]
    if type_name == "Q4_0":
        torch.testing.assert_close(q.dequantize(), ref, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(q.dequantize(), ref)


def test_default_gguf_blocks_equal_the_float_conversion(default_source):
    """Every linear weight of the embedded Q4_1 GGUF (its LM head is Q8_0) read as codes equals its
    reference dequantization bit for bit, and the q/k rows come back in the order transformers'
    converter gives them (llama.cpp interleaves each head's RoPE halves)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    file = GGUFFile(default_source.gguf)
    names = file.hf_names()
    native = quantized_weights(file, names, names["model.embed_tokens.weight"])
    assert len(native) == 30 * 7 + 1
    assert {q.bits for q in native.values()} == {4, 8} and native["lm_head.weight"].bits == 8
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "lm_head.weight"):
        g = names.get(name, "token_embd.weight")
        assert torch.equal(native[name].dequantize(), file.float_tensor(g))
    g = names["model.layers.7.self_attn.k_proj.weight"]
    t = file.tensors[g]
    plain = dequantize(file.raw(t), GGMLQuantizationType[t.type_name]).reshape(t.rows, t.cols)
    cfg = {"num_attention_heads": 9, "num_key_value_heads": 3}
    reference = LlamaTensorProcessor(config=cfg).process(plain, g).weights
    assert torch.equal(file.float_tensor(g), torch.from_numpy(np.ascontiguousarray(reference)))
    assert source_formats(native, "float32") == ["native", "fp32"]
    assert source_formats({}, "float32") == ["fp32"]


def _low_bit_engine(folder, fmt: str) -> Engine:
    """A tiny model in ``fmt`` with a random Kangaroo adapter (exit layer 1) and Jakiro head."""
    eng = joey.load(str(folder), device="cpu", progress=False, adapter=False, head=False, weights=fmt,
                    draft_model=str(folder))
    model = eng.model
    torch.manual_seed(0)
    vocab = torch.arange(model.cfg.vocab_size)
    adapter = KangarooAdapter(model.cfg, 1, vocab).eval()  # random: the target's float layers are freed
    head = JakiroHead(model.cfg, vocab, experts=2).eval()
    return Engine(model, eng.tokenizer, eng.source, draft_model=eng.draft_model, adapter=adapter, head=head)


@pytest.fixture(scope="module", params=["int8", "int4", "bf16"])
def low_bit(request, tiny_folder) -> Engine:
    if request.param == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16 kernels")
    return _low_bit_engine(tiny_folder, request.param)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_low_bit_kernels_are_row_invariant(fmt):
    """A row's output never depends on how many rows share the call (1 to 200), which is what lets
    verification, batches and prefills reproduce one-token decoding bit for bit. (fp32 oneDNN is
    not: its drafters are lossless only up to fp32 rounding, as before low-bit weights.)"""
    if fmt == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16 kernels")
    kernel = make_kernel(fmt, _x(3072, 576, 9))
    x = _x(200, 576, 10)
    full = kernel(x)
    same = [torch.equal(kernel(x[:m]), full[:m]) for m in (1, 2, 5, 16, 17, 64, 100)]
    assert all(same), same


def test_low_bit_verification_is_bitwise_equal_to_decoding(low_bit):
    """k tokens verified in one forward give exactly the logits of decoding them one at a time:
    the kernels are row-invariant and attention runs in float64 (LlamaModel.cache_dtype)."""
    from joey.batching import causal_mask

    model = low_bit.model
    # float64 attention, or fp32 where joey's C attention computes every query on its own
    fixed_attention = low_bit_kernels() == "vnni"
    assert model.cache_dtype == (torch.float32 if fixed_attention else torch.float64)
    ids = torch.randint(100, 4000, (1, 30), generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        one = model.new_cache(1, 64)
        model(ids[:, :20], torch.arange(20)[None], one, 0, 20)
        steps = torch.cat([model(ids[:, i : i + 1], torch.tensor([[i]]), one, i, i + 1)[0] for i in range(20, 30)])
        many = model.new_cache(1, 64)
        model(ids[:, :20], torch.arange(20)[None], many, 0, 20)
        at_once = model(ids[:, 20:30], torch.arange(20, 30)[None], many, 20, 30, causal_mask([20], 10, 30, "cpu"))[0]
    assert torch.equal(steps, at_once)


def test_low_bit_prefill_in_pieces_is_bitwise_the_prefill_at_once(low_bit):
    """Kangaroo's drafter runs the shallow layers over n - 1 prompt tokens where AR's prefill runs
    all n at once, and a turn's prompt may be prefilled after its prefix: a prompt longer than a
    verification (150 tokens) split anywhere must give exactly the logits of one prefill."""
    from joey.batching import causal_mask

    model = low_bit.model
    ids = torch.randint(100, 4000, (1, 150), generator=torch.Generator().manual_seed(21))
    with torch.inference_mode():
        whole = model.new_cache(1, 160)
        at_once = model(ids, torch.arange(150)[None], whole, 0, 150)[0]
        for cut in (149, 100, 7):
            parts = model.new_cache(1, 160)
            model(ids[:, :cut], torch.arange(cut)[None], parts, 0, cut)
            mask = causal_mask([cut], 150 - cut, 150, "cpu") if 150 - cut > 1 else None
            rest = model(ids[:, cut:], torch.arange(cut, 150)[None], parts, cut, 150, mask)[0]
            assert torch.equal(rest, at_once[cut:]), cut


@pytest.mark.parametrize("method", ["pld", "sps", "kangaroo", "jakiro", "jakiro+pld"])
def test_every_drafter_is_lossless_on_low_bit_targets(low_bit, method):
    kw = dict(max_new_tokens=20, ignore_eos=True, max_draft=4)
    ar = [g.token_ids for g in low_bit.generate(PROMPTS, method="ar", **kw)]
    assert [g.token_ids for g in low_bit.generate(PROMPTS, method=method, **kw)] == ar  # ragged batch
    assert low_bit.generate(PROMPTS[1], method=method, **kw).token_ids == ar[1]


def test_low_bit_sampling_keeps_the_distribution(tiny_folder):
    """Sampled PLD on an int4 target gives AR's first-drafted-token distribution."""
    from conftest import first_token_histogram, total_variation

    eng = joey.load(str(tiny_folder), device="cpu", progress=False, adapter=False, head=False, weights="int4")
    prompt = "one two one two one two one two"
    kw = dict(max_new_tokens=2, temperature=1.5, ignore_eos=True)
    a = first_token_histogram(eng, prompt, "ar", 150, **kw)
    b = first_token_histogram(eng, prompt, "pld", 150, **kw)
    assert total_variation(a, b, 150) < 0.3, (a, b)


@needs_vnni
def test_whole_layers_in_c_give_the_bits_of_the_modules(tiny_folder, monkeypatch):
    """With joey's low-bit kernels a layer runs in one C call (``LlamaModel.layer_plans``); its
    logits equal the module-by-module path's bit for bit for a prefill, a masked verification and a
    decoding step, and a ragged batch (packed rows, one call) gives the same tokens either way."""
    from joey.batching import causal_mask
    from joey.models.llama import LlamaModel

    eng = joey.load(str(tiny_folder), device="cpu", progress=False, adapter=False, head=False, weights="int4")
    model = eng.model
    assert all(p is not None for p in model.layer_plans())
    ids = torch.randint(100, 1000, (1, 40), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=16, ignore_eos=True)
    runs = []
    for whole in (True, False):
        if not whole:  # every layer module by module
            monkeypatch.setattr(LlamaModel, "layer_plans", lambda self: [None] * self.cfg.num_layers)
        cache = model.new_cache(1, 48)
        with torch.inference_mode():
            logits = [model(ids[:, :30], torch.arange(30)[None], cache, 0, 30, None),
                      model(ids[:, 30:35], torch.arange(30, 35)[None], cache, 30, 35, causal_mask([30], 5, 35, "cpu")),
                      model(ids[:, 35:36], torch.tensor([[35]]), cache, 35, 36, None)]
        tokens = [g.token_ids for g in eng.generate(PROMPTS, method="ar", **kw)]
        runs.append((logits, tokens, [g.token_ids for g in eng.generate(PROMPTS, method="pld", **kw)]))
    (fused, fused_tokens, fused_pld), (modules, module_tokens, module_pld) = runs
    assert all(torch.equal(a, b) for a, b in zip(fused, modules))
    assert fused_tokens == module_tokens == fused_pld == module_pld


def test_default_model_native_weights_are_lossless():
    """The embedded GGUF on its own Q4_1/Q8_0 codes: drafters reproduce AR on those weights."""
    eng = joey.load(None, device="cpu", progress=False, weights="int4")
    assert eng.model.weight_format == "int4"
    native = joey.load(None, device="cpu", progress=False, adapter=False, head=False, weights="fp32")
    file = GGUFFile(native.source.gguf)
    names = file.hf_names()
    native.model.kernel_setup.set_weights("native", quantized_weights(file, names, names["model.embed_tokens.weight"]))
    assert native.model.weight_format == "int4+int8"
    long = "Summarize: " + " ".join(f"Paragraph {i}: the committee met, argued and adjourned." for i in range(25))
    for prompt in ("List three uses of a paperclip.", long):  # long: ~300 tokens, more than any verification
        ar = eng.generate(prompt, max_new_tokens=24, method="ar").token_ids
        for method in ("pld", "kangaroo", "jakiro"):
            assert eng.generate(prompt, max_new_tokens=24, method=method).token_ids == ar, method


def test_bad_weight_formats_are_refused(tiny_folder):
    with pytest.raises(InvalidArgumentError, match="unknown weight format 'int3'"):
        joey.load(str(tiny_folder), device="cpu", progress=False, weights="int3")


def test_cli_rejects_an_unknown_weight_format(capsys):
    from joey.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["info", "--weights", "int2"])
    assert exc.value.code == 2
    assert "invalid choice: 'int2'" in capsys.readouterr().err
