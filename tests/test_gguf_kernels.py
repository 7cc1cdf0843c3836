"""GGUF blocks as stored on joey's VNNI kernel (``GroupKernel.from_blocks``): every block type computes
the float64 product of 8-bit activations and gguf's reference dequantization, every row gets the same
bits in any call, weights of different types side by side (``GroupKernel.concat``) and whole layers
in C give the bits of their pieces, and a cached layout (``state``/``from_state``) runs on its tensors
without copying them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from joey.models import group_kernel
from joey.models.group_kernel import GroupKernel

pytestmark = pytest.mark.skipif(not group_kernel.available(),
                                reason="joey's group kernel needs AVX512-VNNI and a C compiler")

# type name → (weights, bytes) per block, and where its fp16 factors sit (byte offset, count)
BLOCKS = {"Q4_0": (32, 18, 0, 1), "Q4_1": (32, 20, 0, 2), "Q8_0": (32, 34, 0, 1), "Q4_K": (256, 144, 0, 2),
          "Q5_0": (32, 22, 0, 1), "Q6_K": (256, 210, 208, 1)}
TYPES = sorted(BLOCKS)


def _blocks(type_name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes for ``type_name`` blocks [rows, bytes per row]: random codes and integer scales
    (Q6_K's int8 ones included), fp16 factors set to small finite values (no NaN or inf)."""
    per, nbytes, at, count = BLOCKS[type_name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // per, nbytes), dtype=np.uint8)
    halves = (rng.random((rows, cols // per, count)) * 0.02 + 1e-3).astype(np.float16)
    raw[..., at : at + 2 * count] = halves.view(np.uint8).reshape(rows, cols // per, 2 * count)
    return raw.reshape(rows, -1)


def _dequantized(type_name: str, raw: np.ndarray, rows: int, cols: int) -> torch.Tensor:
    """gguf's reference dequantization: what the blocks stand for."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols).astype(np.float64))


def _int8_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the kernel stands for, in float64: x quantized as ``quantize_rows`` does (per group of 32,
    scale max|x| / 127, codes round-half-even of x * 127 / max|x| in fp32), times w per group."""
    g = x.view(x.shape[0], -1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    codes = torch.round(g * inv).double()  # torch.round rounds half to even
    scale = (amax / 127.0).double()  # the fp32 scale, as the kernel keeps it
    wg = w.view(w.shape[0], -1, 32)
    return torch.einsum("mgk,ngk,mg->mn", codes, wg, scale[..., 0])


def _x(rows: int, cols: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return x * torch.linspace(0.1, 3, cols)  # groups of different magnitudes


@pytest.mark.parametrize("rows", [48, 40])  # 40: not a whole number of 16-output tiles
@pytest.mark.parametrize(("type_name", "cols"), [(t, 512) for t in TYPES] + [
    (t, 896) for t in TYPES if not t.endswith("_K")])  # 896: Qwen2.5-0.5B's hidden size (no K-quant super-blocks)
def test_blocks_compute_int8_activations_times_the_reference_weights(type_name, cols, rows):
    raw = _blocks(type_name, rows, cols, seed=1)
    w = _dequantized(type_name, raw, rows, cols)
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(2))
    kernel = GroupKernel.from_blocks(type_name, raw, rows, cols, bias)
    x = _x(7, cols, 3)
    x[2, 64:96] = 0  # an all-zero group (scale 0)
    y = kernel(x)
    assert y.shape == (7, rows) and y.dtype == torch.float32
    ref = _int8_product(x.double(), w) + bias.double()
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    exact = x.double() @ w.T + bias.double()  # 8-bit activations: ~1% of the output's scale
    assert (y.double() - exact).abs().max() <= 3e-2 * exact.abs().max()
    expected = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q5_0": "int5", "Q6_K": "int6", "Q8_0": "int8"}
    assert kernel.format == expected[type_name] and kernel.out == rows


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_0", "Q6_K"])
def test_blocks_are_row_invariant_for_every_row_count(type_name):
    """Rows run in blocks of 8 inside the kernel (chains split differently for more than 4): each row
    gets its bits alone, whatever the number of rows in the call and its place in it."""
    raw = _blocks(type_name, 48, 512, seed=4)
    kernel = GroupKernel.from_blocks(type_name, raw, 48, 512)
    x = _x(20, 512, 5)
    alone = torch.cat([kernel(x[i : i + 1]) for i in range(20)])
    for m in range(2, 21):
        for start in {0, 20 - m, (20 - m) // 2}:
            assert torch.equal(kernel(x[start : start + m]), alone[start : start + m]), (m, start)


@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q6_K"), ("Q5_0", "Q5_0", "Q8_0")])
def test_weights_side_by_side_give_their_parts_bits(types):
    """A fused q/k/v whose v is stored in more bits (one call, one quantization of the activations)
    equals its three kernels' outputs concatenated, bit for bit; the last may have padded outputs."""
    rows = (64, 32, 40)
    parts = [GroupKernel.from_blocks(t, _blocks(t, r, 512, seed=10 + i), r, 512,
                                     torch.randn(r, generator=torch.Generator().manual_seed(i)))
             for i, (t, r) in enumerate(zip(types, rows))]
    fused = GroupKernel.concat(parts)
    assert fused.out == sum(rows) and fused.nbytes == sum(k.nbytes for k in parts)
    assert fused.format == {"Q6_K": "int6+int4", "Q8_0": "int8+int5"}[types[2]]
    for m in (1, 5, 9, 20):
        x = _x(m, 512, m)
        assert torch.equal(fused(x), torch.cat([k(x) for k in parts], dim=1))
    with pytest.raises(ValueError, match="padded"):
        GroupKernel.concat([parts[2], parts[0]])  # 40 outputs: a padded tile in the middle
    with pytest.raises(ValueError, match="side by side"):
        GroupKernel.concat([parts[0], parts[1], parts[0], parts[1], parts[2]])  # at most 4


def _layer(types: dict[str, tuple[str, ...]], hid: int, heads: int, kv_heads: int, d: int, inter: int
           ) -> list[GroupKernel]:
    """The four kernels of a layer (fused q/k/v, o, fused gate/up, down) on random blocks of ``types``."""
    shapes = {"qkv": ([heads * d, kv_heads * d, kv_heads * d], hid), "o": ([hid], heads * d),
              "gate_up": ([inter, inter], hid), "down": ([hid], inter)}
    kernels = []
    for i, (name, (outs, cols)) in enumerate(shapes.items()):
        parts = [GroupKernel.from_blocks(t, _blocks(t, r, cols, seed=20 + 3 * i + j), r, cols)
                 for j, (t, r) in enumerate(zip(types[name], outs))]
        kernels.append(GroupKernel.concat(parts) if len(parts) > 1 else parts[0])
    return kernels


@pytest.mark.parametrize("kind", ["K-quants", "Q5_0 + Q8_0"])
def test_a_whole_layer_in_c_gives_the_bits_of_its_pieces(kind):
    """``decode_layer`` (one C call) with a mixed q/k/v and a Q6_K down projection equals the same
    layer run piece by piece (the linears, then joey's C norm, RoPE, attention and SwiGLU, as
    joey.models.llama's modules call them), for a prefill and a decoding step."""
    from joey.models.group_kernel import attention, decode_layer, layer_plan, rms_norm, rope_store, silu_mul

    types = {"K-quants": {"qkv": ("Q4_K", "Q4_K", "Q6_K"), "o": ("Q4_K",), "gate_up": ("Q4_K", "Q4_K"),
                          "down": ("Q6_K",)},
             "Q5_0 + Q8_0": {"qkv": ("Q5_0", "Q5_0", "Q8_0"), "o": ("Q5_0",), "gate_up": ("Q5_0", "Q5_0"),
                             "down": ("Q8_0",)}}[kind]
    hid, heads, kv_heads, d, inter, eps = 256, 4, 2, 64, 512, 1e-6
    g = torch.Generator().manual_seed(6)
    norm1, norm2 = torch.rand(hid, generator=g) + 0.5, torch.rand(hid, generator=g) + 0.5
    kernels = _layer(types, hid, heads, kv_heads, d, inter)
    plan = layer_plan(norm1, norm2, eps, d**-0.5, heads, kv_heads, d, kernels)
    assert plan is not None
    qkv_k, o_k, gu_k, down_k = kernels
    angles = torch.rand(12, 1, d // 2, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def pieces(x, cos, sin, k_cache, v_cache, first, t, kv_len):
        h = rms_norm(x, norm1, eps)
        q = rope_store(qkv_k(h).view(t, -1, d), cos, sin, k_cache, v_cache, first, t)
        a = attention(q.view(1, t, heads, d), k_cache, v_cache, kv_len, None, d**-0.5)
        x = x + o_k(a.view(t, heads * d))
        gu = gu_k(rms_norm(x, norm2, eps))
        return x + down_k(silu_mul(gu[:, :inter], gu[:, inter:]))

    caches = [(torch.zeros(1, kv_heads, 16, d), torch.zeros(1, kv_heads, 16, d)) for _ in range(2)]
    x = torch.randn(11, hid, generator=g)
    ref = pieces(x, cos[:11], sin[:11], *caches[0], 0, 11, 11)
    fused = x.clone()
    decode_layer(plan, fused, cos[:11], sin[:11], *caches[1], 0, (1, 11), 11, None)
    assert torch.equal(fused, ref) and torch.equal(caches[0][0], caches[1][0])
    step = torch.randn(1, hid, generator=g)
    ref = pieces(step, cos[11:], sin[11:], *caches[0], 11, 1, 12)
    decode_layer(plan, step, cos[11:], sin[11:], *caches[1], 11, (1, 1), 12, None)
    assert torch.equal(step, ref) and torch.equal(caches[0][1], caches[1][1])


def test_state_round_trip_runs_on_the_given_tensors(tmp_path):
    """``from_state`` rebuilds plain and mixed kernels on the very tensors it is given (no copy; a
    memory-mapped file's views in the loader), with the same bits; arrays that do not fit are refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    q6 = GroupKernel.from_blocks("Q6_K", _blocks("Q6_K", 40, 512, 30), 40, 512, torch.randn(40))
    q4 = GroupKernel.from_blocks("Q4_K", _blocks("Q4_K", 32, 512, 31), 32, 512)
    q41 = GroupKernel.from_blocks("Q4_1", _blocks("Q4_1", 48, 512, 32), 48, 512)
    x = _x(5, 512, 33)
    kernels = {"q6": q6, "mixed": GroupKernel.concat([q4, q41, q6]), "q41": q41}
    saved, metas = {}, {}
    for name, kernel in kernels.items():
        meta, tensors = kernel.state()
        meta = json.loads(json.dumps(meta))
        metas[name] = meta
        again = GroupKernel.from_state(meta, tensors)
        assert torch.equal(again(x), kernel(x)) and again.format == kernel.format and again.nbytes == kernel.nbytes
        given = {t.data_ptr() for t in tensors.values()}
        assert {t.data_ptr() for p in again.parts for t in p.arrays().values()} == given
        saved.update({f"{name}.{k}": v for k, v in tensors.items()})
    path = tmp_path / "kernels.safetensors"
    save_file({k: v.clone() for k, v in saved.items()}, str(path))  # "mixed" shares q6's tensors
    with safe_open(str(path), "pt") as f:
        loaded = {k: f.get_tensor(k) for k in f.keys()}
    for name, kernel in kernels.items():
        own = {k.split(".", 1)[1]: v for k, v in loaded.items() if k.split(".", 1)[0] == name}
        assert torch.equal(GroupKernel.from_state(metas[name], own)(x), kernel(x))
    meta, tensors = q6.state()
    with pytest.raises(ValueError, match="codes"):
        GroupKernel.from_state(meta, {**tensors, "0.codes": tensors["0.codes"].flatten()[:-64]})
    with pytest.raises(ValueError):
        GroupKernel.from_state(meta, {**tensors, "0.scale": tensors["0.scale"].view(torch.uint8)})


@pytest.mark.parametrize(("type_name", "bits"), [("Q4_K", 4.625), ("Q5_0", 5.5), ("Q6_K", 6.5625)])
def test_blocks_read_the_files_bits_per_weight(type_name, bits):
    """A call reads codes, scales and super-block factors at about the file's bits per weight (Q4_K:
    4.5 in the file; its 6-bit scales and mins take a byte each here)."""
    kernel = GroupKernel.from_blocks(type_name, _blocks(type_name, 64, 1024, 40), 64, 1024)
    assert kernel.nbytes * 8 / (64 * 1024) == bits


def test_layout_in_chunks_from_a_read_only_map_is_the_layout_at_once(tmp_path, monkeypatch):
    """Large tensors (a 151936-row LM head) are laid out a chunk of rows at a time straight from the
    file's read-only memory map: the same arrays as all rows at once, and for Q4_0/Q4_1/Q8_0 exactly
    ``GroupKernel(decode_tensor(...))``'s, the layout and bits of today's models."""
    from joey.models.gguf_blocks import decode_tensor

    for type_name in TYPES:
        rows, cols = 72, 512
        raw = _blocks(type_name, rows, cols, 50)
        path = tmp_path / f"{type_name}.bin"
        raw.tofile(path)
        mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=raw.shape)
        whole = GroupKernel.from_blocks(type_name, mapped, rows, cols)
        if type_name in group_kernel.LEGACY:
            legacy = GroupKernel(decode_tensor(type_name, raw, rows, cols), None)
            assert all(torch.equal(a, b) for a, b in zip(whole.parts[0].arrays().values(),
                                                          legacy.parts[0].arrays().values()))
        monkeypatch.setattr(group_kernel, "_CHUNK", 32)
        chunked = GroupKernel.from_blocks(type_name, mapped, rows, cols)
        monkeypatch.undo()
        assert chunked.parts[0].arrays().keys() == whole.parts[0].arrays().keys()
        assert all(torch.equal(a, b) for a, b in zip(chunked.parts[0].arrays().values(),
                                                      whole.parts[0].arrays().values())), type_name
