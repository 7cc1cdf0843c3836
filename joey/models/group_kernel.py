"""joey's own CPU kernel for low-bit weights in groups of 32 columns (``kernels/group_gemm.c``).

PyTorch's int4/int8 CPU kernels turn every weight into a float for every row of activations: a
decode step is compute-bound and a forward of k tokens costs about k times one token, which leaves
speculative decoding little room. This kernel does what llama.cpp does with the same GGUF blocks:
activations are quantized to 8 bits per group of 32 and each group's dot products are integer sums
on the CPU's byte dot-product instruction (AVX512-VNNI), one load of the codes serving up to eight
rows. Every row gets the same bits however many rows share a call, which keeps verification
lossless (tests/test_weight_formats.py, tests/test_gguf_kernels.py).

Weights, as ``GroupKernel`` lays them out (the C source describes the bytes):

- ``QuantizedWeight`` codes (4 or 8 bits, a scale and offset per group of 32, fp16 where exact):
  joey's own int4/int8 quantizations and a GGUF's Q4_0, Q4_1 and Q8_0 blocks;
- a GGUF's Q4_K, Q5_0 and Q6_K blocks as stored (``GroupKernel.from_blocks``): their own codes,
  integer scales and fp16 factors, at 4.625, 5.5 and 6.5625 bits a weight, so a decode step reads
  about the file's bytes and the weights are exactly the file's numbers (widening Q6_K/Q5_0 to int8
  with a scale per row cost 10 bits a weight and changed the numbers);
- several such weights side by side along the outputs (``GroupKernel.concat``): a fused q/k/v whose
  v is stored in more bits than q and k still runs as one call, and whole layers in C.

It is compiled at first use with the machine's C compiler (``cc -O3 -mavx512vnni -fopenmp``, about
a second), cached under ``JOEY_CACHE/kernels`` by source, compiler and CPU flags, and called through
ctypes (which releases the GIL). CPUs without AVX512-VNNI, machines without a compiler, a failed
build, or ``JOEY_GROUP_KERNEL=0`` keep PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from joey.models.gguf_blocks import decode_tensor
from joey.models.quantized import GROUP, QuantizedWeight

SOURCE = Path(__file__).parent / "kernels" / "group_gemm.c"
TILE = 16  # output columns per tile (LANES in the C source)


def _cpu_flags() -> str:
    """The CPU's feature flags: a build for one CPU kind must never load on another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def source_digest() -> str:
    """A short hash of the kernel's C source (part of the cache keys of what was measured with it)."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot be (PyTorch's kernels then run)."""
    if os.environ.get("JOEY_GROUP_KERNEL", "1") == "0" or sys.platform != "linux":
        return None
    if not {"avx512f", "avx512bw", "avx512_vnni"} <= set(_cpu_flags().split()):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    from joey.models.registry import cache_dir

    flags = ["-O3", "-march=native", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp", "-ffp-contract=off",
             "-shared", "-fPIC"]
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\n".join([SOURCE.read_text(), cc, version, " ".join(flags), _cpu_flags()]).encode())
        path = cache_dir() / "kernels" / f"group_gemm-{key.hexdigest()[:24]}.so"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.so")
            subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp)], check=True, capture_output=True, timeout=120)
            tmp.replace(path)  # whole or not at all: another process may be building the same file
        # torch has already loaded its OpenMP runtime (libgomp.so.1); the kernel binds to that same
        # one, so the two share one pool of threads instead of competing for the cores
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.linear_gemm.restype = None
    lib.linear_gemm.argtypes = [p, i, i, p, p]
    lib.rms_norm.restype = lib.attention.restype = None
    lib.rms_norm.argtypes = [p, i, i, p, ctypes.c_float, p]
    lib.attention.argtypes = [p, i, i, i, i, p, p, i, i, i, i, p, i, i, i, ctypes.c_float, p, p, p]
    lib.rope_store.restype = lib.silu_mul.restype = lib.decode_layer.restype = None
    lib.rope_store.argtypes = [p, i, i, i, i, p, p, p, p, p, i, i, p, p, i, i]
    lib.silu_mul.argtypes = [p, p, i, i, i, p]
    lib.decode_layer.argtypes = [ctypes.POINTER(LayerPlan), p, i, p, p, p, p, i, i, p, p, i, i, i, i, p, i, i, i, p, p]
    return lib


# kinds of weights, as the C side numbers them (its enum)
U4, U8, Q4K, Q5, Q6K = range(5)
KIND_NAMES = {"u4": U4, "u8": U8, "Q4_K": Q4K, "Q5_0": Q5, "Q6_K": Q6K}
BITS = {U4: 4, U8: 8, Q4K: 4, Q5: 5, Q6K: 6}
SEGMENTS = 4  # weights one linear may mix (SEGMENTS in the C source)
SUPER = 256  # columns of a K-quant super-block
# GGUF block types laid out here as stored: weights and bytes per block
BLOCKS = {"Q4_K": (256, 144), "Q5_0": (32, 22), "Q6_K": (256, 210)}
LEGACY = ("Q4_0", "Q4_1", "Q8_0")  # through ``QuantizedWeight`` (joey.models.gguf_blocks.decode_tensor)
_CHUNK = 8192  # output rows laid out at a time: bounds the transient memory of a large LM head


class _Segment(ctypes.Structure):
    """One weight of a linear (the C side's ``segment_t``)."""

    _fields_ = [("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("offset", ctypes.c_void_p),
                ("super", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("n", ctypes.c_int64),
                ("kind", ctypes.c_int64), ("half", ctypes.c_int64)]


class _Linear(ctypes.Structure):
    """A ``GroupKernel``'s weights as the C side's ``linear_t``: up to ``SEGMENTS`` side by side."""

    _fields_ = [("count", ctypes.c_int64), ("n", ctypes.c_int64), ("seg", _Segment * SEGMENTS)]


class LayerPlan(ctypes.Structure):
    """One decoder layer for ``decode_layer`` (the C side's ``layer_t``): norm weights, shapes and the
    four kernels' arrays. It points into tensors the model owns: build it from the live modules and
    drop it whenever their weights change."""

    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("hidden", ctypes.c_int64), ("inter", ctypes.c_int64),
                ("H", ctypes.c_int64), ("KVH", ctypes.c_int64), ("D", ctypes.c_int64), ("qkv", _Linear),
                ("o", _Linear), ("gate_up", _Linear), ("down", _Linear)]


def layer_plan(norm1: torch.Tensor, norm2: torch.Tensor, eps: float, scale: float, heads: int, kv_heads: int,
               head_dim: int, kernels: list[object]) -> LayerPlan | None:
    """A ``LayerPlan`` for a layer whose q/k/v (fused), o, gate/up (fused) and down kernels are
    ``kernels`` (plain or mixed, ``GroupKernel.concat``); None unless all four are ``GroupKernel``s
    without padded outputs and the norms are fp32 (the layer then runs module by module)."""
    if library() is None or not all(isinstance(k, GroupKernel) and k.n == k.out for k in kernels):
        return None
    if any(w.dtype != torch.float32 or not w.is_contiguous() or w.device.type != "cpu" for w in (norm1, norm2)):
        return None
    qkv, o, gate_up, down = kernels
    if gate_up.n != 2 * down.cols:  # type: ignore[attr-defined]  # the C side sizes its buffers by these
        return None
    return LayerPlan(norm1.data_ptr(), norm2.data_ptr(), eps, scale, qkv.cols, down.cols,  # type: ignore[attr-defined]
                     heads, kv_heads, head_dim, *(k._lin for k in kernels))  # type: ignore[attr-defined]


def decode_layer(
    plan: LayerPlan,
    x: torch.Tensor,  # [N, hidden] fp32 contiguous, updated in place
    cos: torch.Tensor,  # [N, 1, head_dim]
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [B, kv_heads, max_len, head_dim] fp32
    v_cache: torch.Tensor,
    slots: int | torch.Tensor,  # as in ``rope_store``
    shape: tuple[int, int],  # (B, T): the queries' grid, N = B * T
    kv_len: int,
    mask: torch.Tensor | None,  # as in ``attention``
    rows: torch.Tensor | None = None,  # [N] row of each token (packed rows of one token each)
    counts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
) -> None:
    """A whole decoder layer in one C call (``decode_layer`` in the C source): the same kernels in the
    same order as the modules, so the same bits, without their per-op overhead."""
    b, t = shape
    n = x.shape[0]
    if not _cache_fits(k_cache, v_cache, plan.D) or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("decode_layer needs contiguous cos/sin and a cache with contiguous slots of head_dim")
    flat, first = _slot_args(slots)
    library().decode_layer(  # type: ignore[union-attr]
        ctypes.byref(plan), x.data_ptr(), n, cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.stride(0), k_cache.stride(1), _int64_ptr(rows, n), _int64_ptr(flat, n), t, first, b, kv_len,
        *_mask_args(mask), _int64_ptr(counts, b), _int64_ptr(ends, b))


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for fp32 CPU rows [N, I] (views of one fused gate/up output, or two tensors of
    the same row stride) in one C call; None where the kernel does not run (PyTorch's ops then do;
    their bits differ, so a model uses one or the other on every path: this one whenever it runs)."""
    lib = library()
    if (lib is None or torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
            or gate.dtype != torch.float32 or up.dtype != torch.float32 or gate.device.type != "cpu"
            or gate.dim() != 2 or gate.shape != up.shape or gate.stride(1) != 1 or up.stride(1) != 1
            or gate.stride(0) != up.stride(0)):
        return None
    out = torch.empty(gate.shape)
    lib.silu_mul(gate.data_ptr(), up.data_ptr(), gate.shape[0], gate.shape[1], gate.stride(0), out.data_ptr())
    return out


def available() -> bool:
    """Whether joey's kernel runs on this machine (it is compiled on first call)."""
    return library() is not None


def serves_attention(head_dim: int) -> bool:
    """Whether ``attention`` runs for heads of this size here: what lets a low-bit model keep an fp32
    cache (``LlamaModel.cache_dtype``); its vectors hold the head in at most 16 pieces of 16."""
    return available() and head_dim % 16 == 0 and head_dim <= 256


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of fp32 CPU rows in one C call (decode-time overhead), or None where the kernel does
    not run or the tensors do not fit (the caller then uses PyTorch's)."""
    lib = library()
    if (lib is None or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu"):
        return None
    xs = x.contiguous()
    k = xs.shape[-1]
    y = torch.empty_like(xs)
    lib.rms_norm(xs.data_ptr(), xs.numel() // k, k, weight.data_ptr(), eps, y.data_ptr())
    return y


def attention(
    q: torch.Tensor,  # [B, T, H, D] fp32
    k_cache: torch.Tensor,  # [B, KVH, max_len, D] fp32
    v_cache: torch.Tensor,
    kv_len: int,  # attend to slots [0, kv_len)
    mask: torch.Tensor | None,  # [B or 1, 1, T, kv_len] bool; None = the queries are the last T positions
    scale: float,
    counts: torch.Tensor | None = None,  # [B] int64: row b's real queries (the rest of T is padding)
    ends: torch.Tensor | None = None,  # [B] int64: row b sees no slot at or past ends[b]
) -> torch.Tensor | None:
    """Attention with every query computed on its own in a fixed order (see the C source), so a
    query's result never depends on how many share the call → [B, T, H, D]; None where the kernel
    does not run or the call does not fit (the caller then uses SDPA). ``counts`` and ``ends`` let
    one call serve a ragged batch: padding queries are skipped (zeros out) and a short row never
    scans the longest row's slots."""
    b, t, h, d = q.shape
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad):
        return None  # no backward here: training runs PyTorch's attention
    if (not serves_attention(d) or q.dtype != torch.float32 or k_cache.dtype != torch.float32
            or q.device.type != "cpu" or not _cache_fits(k_cache, v_cache, d)
            or (mask is not None and mask.shape[-1] != kv_len)):
        return None
    qs = q.contiguous()
    out = torch.empty_like(qs)
    library().attention(qs.data_ptr(), b, t, h, d, k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1], kv_len,
                  k_cache.stride(0), k_cache.stride(1), *_mask_args(mask), scale, _int64_ptr(counts, b),
                  _int64_ptr(ends, b), out.data_ptr())
    return out


def _cache_fits(k_cache: torch.Tensor, v_cache: torch.Tensor, head_dim: int) -> bool:
    """Whether a cache has the layout the C side reads: slots of ``head_dim`` contiguous floats,
    keys and values laid out alike."""
    return k_cache.stride(3) == 1 and k_cache.stride(2) == head_dim and v_cache.stride() == k_cache.stride()


def _mask_args(mask: torch.Tensor | None) -> tuple[int | None, int, int, int]:
    """A mask [B or 1, 1, T, S] as the C side takes it: its address and its strides over rows, queries
    and keys (0 over a dimension of size 1, which every row or query then shares)."""
    if mask is None:
        return None, 0, 0, 0
    return (mask.data_ptr(), mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(2) if mask.shape[2] > 1 else 0,
            mask.stride(3))


def _slot_args(slots: int | torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """Slots as the C side takes them: (the slot of each token, flat; or None) and the first slot
    of every row (0 where each token has its own). Keep the tensor alive through the call."""
    if isinstance(slots, int):
        return None, slots
    return slots.reshape(-1).contiguous(), 0


def rope_store(
    qkv: torch.Tensor,  # [N, heads + 2 * kv_heads, head_dim] fp32: queries, keys, values
    cos: torch.Tensor,  # [N, 1, head_dim]
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [B, kv_heads, max_len, head_dim] fp32
    v_cache: torch.Tensor,
    slots: int | torch.Tensor,  # first slot of every row, or the slot of each token ([B, T] or [N])
    t: int,  # tokens per row where ``rows`` is None
    rows: torch.Tensor | None = None,  # [N] row of each token (packed rows); None: token n is in row n // t
) -> torch.Tensor | None:
    """RoPE on queries and keys, keys and values written to their cache slots, in one C call →
    the rotated queries [N, heads, head_dim]; None where the kernel does not run or the tensors do
    not fit (the caller then runs PyTorch's ops, which give the same bits)."""
    lib = library()
    n, width, d = qkv.shape
    kvh = k_cache.shape[1]
    h = width - 2 * kvh
    if (lib is None or torch.is_grad_enabled() and qkv.requires_grad or qkv.dtype != torch.float32
            or k_cache.dtype != torch.float32 or qkv.device.type != "cpu" or cos.shape[-1] != d
            or not (qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous())
            or not _cache_fits(k_cache, v_cache, d) or cos.dtype != torch.float32 or sin.dtype != torch.float32):
        return None
    q = torch.empty(n, h, d)
    flat, first = _slot_args(slots)
    lib.rope_store(qkv.data_ptr(), n, h, kvh, d, cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k_cache.data_ptr(),
                   v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), _int64_ptr(rows, n), _int64_ptr(flat, n),
                   t, first)
    return q


def _int64_ptr(x: torch.Tensor | None, n: int) -> int | None:
    """The address of ``n`` contiguous int64 CPU values (a C array argument), or None for none."""
    if x is None:
        return None
    if x.dtype != torch.int64 or x.device.type != "cpu" or not x.is_contiguous() or x.numel() != n:
        raise ValueError("attention's counts/ends must be one contiguous int64 CPU value per row")
    return x.data_ptr()


@dataclass
class Part:
    """One weight of a ``GroupKernel``: its arrays as the C side reads them (layouts in its source),
    its outputs (``n``: padded to whole tiles of 16) and bias (fp32 [n] or None). ``half``: a U4/U8
    weight's scales and offsets are fp16 (else fp32); the GGUF kinds have fixed types."""

    kind: int
    out: int
    n: int
    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None = None
    super: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    half: bool = False

    def arrays(self) -> dict[str, torch.Tensor]:
        """The part's tensors by field name (those it has)."""
        named = {"codes": self.codes, "scale": self.scale, "offset": self.offset, "super": self.super,
                 "bias": self.bias}
        return {k: v for k, v in named.items() if v is not None}

    @property
    def nbytes(self) -> int:
        """Bytes of weight data a call reads: codes, scales, offsets and super-block factors."""
        return sum(t.numel() * t.element_size() for k, t in self.arrays().items() if k != "bias")

    def check(self, cols: int) -> None:
        """Refuse arrays the C side would read out of bounds or misread (from_state's input is a file)."""
        tiles, groups = self.n // TILE, cols // GROUP
        if self.n % TILE or not 0 < self.out <= self.n or cols % GROUP or self.n - self.out >= TILE:
            raise ValueError(f"bad outputs {self.out}/{self.n} or input size {cols}")
        if self.kind in (U4, U8):
            kind = torch.float16 if self.half else torch.float32
            want = {"codes": (torch.uint8, groups * (256 if self.kind == U4 else 512)), "scale": (kind, groups * TILE)}
            if self.offset is not None:
                want["offset"] = (kind, groups * TILE)
        else:
            if self.kind != Q5 and cols % SUPER:  # Q5_0 has no super-blocks: any multiple of 32
                raise ValueError(f"{cols} input columns are not whole super-blocks of {SUPER}")
            per_group = {Q4K: 256, Q5: 320, Q6K: 384}[self.kind]
            small = {Q4K: torch.uint8, Q5: torch.float16, Q6K: torch.int8}[self.kind]
            want = {"codes": (torch.uint8, groups * per_group),
                    "scale": (small, groups * (TILE if self.kind == Q5 else 2 * TILE))}
            if self.kind != Q5:
                want["super"] = (torch.float16, cols // SUPER * (2 * TILE if self.kind == Q4K else TILE))
        if self.bias is not None:
            want["bias"] = (torch.float32, TILE)
        have = self.arrays()
        if set(have) != set(want):
            raise ValueError(f"a weight of kind {self.kind} has arrays {sorted(want)}, not {sorted(have)}")
        for name, (dtype, per_tile) in want.items():
            t = have[name]
            if t.dtype != dtype or t.numel() != tiles * per_tile or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(f"{name}: {t.dtype} x {t.numel()}, not {dtype} x {tiles * per_tile} contiguous on CPU")


def _legacy_part(q: QuantizedWeight, bias: torch.Tensor | None) -> Part:
    """``QuantizedWeight`` codes (4 or 8 bits, a scale and offset per group) in the U4/U8 layout.

    Codes are stored unsigned: 8-bit codes c become c + 128 with an offset of -128 * scale (the same
    weights). A weight quantized per row runs as groups of 32 with the row's scale repeated."""
    out, cols = q.shape
    if cols % GROUP or q.group % GROUP:
        raise ValueError(f"the group kernel needs input sizes and groups divisible by {GROUP}")
    rep = q.group // GROUP
    scale = q.scale.float().repeat_interleave(rep, dim=1)  # [out, cols / 32]
    offset = None if q.offset is None else q.offset.float().repeat_interleave(rep, dim=1)
    if q.bits == 8:
        codes = (q.codes.to(torch.int16) + 128).to(torch.uint8)
        offset = -128 * scale if offset is None else offset - 128 * scale
    else:
        codes = q.codes.to(torch.uint8)
    pad = -out % TILE
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad, cols)])
        scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
        offset = None if offset is None else torch.cat([offset, offset.new_zeros(pad, offset.shape[1])])
    n = out + pad
    tiles, groups = n // TILE, cols // GROUP
    # [tile, lane, group, quad, byte] → [tile, group, quad, lane, byte]: vector j of a group holds,
    # for each of the tile's 16 outputs, the 4 codes that meet one broadcast quad of activations
    c = codes.view(tiles, TILE, groups, 8, 4).permute(0, 2, 3, 1, 4)
    if q.bits == 4:  # quads 2j and 2j + 1 share vector j: low and high nibbles
        c = c.reshape(tiles, groups, 4, 2, TILE, 4)
        c = c[:, :, :, 0] | (c[:, :, :, 1] << 4)
    # fp16 where it holds every scale and offset exactly (a GGUF's Q4_0/Q4_1/Q8_0 blocks): fewer bytes
    half = all(t is None or torch.equal(t.half().float(), t) for t in (scale, offset))
    kind = torch.float16 if half else torch.float32
    return Part(U4 if q.bits == 4 else U8, out, n, c.contiguous(),
                scale.view(tiles, TILE, groups).transpose(1, 2).to(kind).contiguous(),  # [tiles, groups, TILE]
                None if offset is None else offset.view(tiles, TILE, groups).transpose(1, 2).to(kind).contiguous(),
                None, _padded_bias(bias, n), half)


def _padded_bias(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if bias is None:
        return None
    b = bias.detach().float().contiguous()
    return torch.cat([b, b.new_zeros(n - b.numel())]) if n > b.numel() else b


def _merge_legacy(parts: list[Part], bias: torch.Tensor | None) -> Part:
    """Row chunks of one weight (``_legacy_part`` of consecutive multiples of 16 rows) as one part:
    tiles are independent, so stacking them gives the layout of the whole weight at once."""
    if len(parts) == 1:
        parts[0].bias = _padded_bias(bias, parts[0].n)
        return parts[0]
    half = all(p.half for p in parts)

    def cat(name: str) -> torch.Tensor | None:
        ts = [getattr(p, name) for p in parts]
        if ts[0] is None:
            return None
        return torch.cat([t if half else t.float() for t in ts])  # fp16 → fp32 is exact

    out = sum(p.n for p in parts[:-1]) + parts[-1].out
    n = sum(p.n for p in parts)
    return Part(parts[0].kind, out, n, torch.cat([p.codes for p in parts]), cat("scale"),  # type: ignore[arg-type]
                cat("offset"), None, _padded_bias(bias, n), half)


def _fp16(raw: np.ndarray) -> np.ndarray:
    """Little-endian fp16 bytes [..., 2k] → fp16 values [..., k]."""
    return np.ascontiguousarray(raw).view(np.float16)


# The layouts below move codes in runs of 4 bytes (the 4 codes of one output that meet one quad of
# activations), so they work on uint32 words: a quarter of the elements that bytes would be.
_NIB = np.uint32(0x0F0F0F0F)


def _words(raw: np.ndarray) -> np.ndarray:
    """Bytes [..., 4k] → little-endian uint32 words [..., k] (an aligned copy)."""
    return np.ascontiguousarray(raw).view(np.uint32)


def _pair_nibbles(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Words [..., 2k] of bytes each holding a code in either nibble → the C side's 4-bit vector words
    [..., k] of the low nibbles' codes and of the high nibbles' codes: word j holds codes 8j..8j+3 in
    its low nibbles and codes 8j+4..8j+7 in its high nibbles (before the 16 outputs' words interleave)."""
    a, b = x[..., 0::2], x[..., 1::2]
    return (a & _NIB) | ((b & _NIB) << np.uint32(4)), ((a >> np.uint32(4)) & _NIB) | (b & ~_NIB)


def _put(dst: np.ndarray, src: np.ndarray, order: tuple[int, ...]) -> None:
    """Write ``src`` [tiles, lanes, ...] transposed by ``order`` into ``dst`` (a view, split to the
    same shape without a copy): one pass."""
    view = np.reshape(dst, tuple(src.shape[i] for i in order), copy=False)
    view[...] = src.transpose(order)


def _layout_q4_k(blocks: np.ndarray, codes: np.ndarray, scale: np.ndarray, sup: np.ndarray) -> None:
    """Q4_K super-blocks [R, S, 144] (R = 16 T rows) → codes [T, G, 256], sc and m [T, G, 32] (uint8)
    and d, dmin [T, S, 32] (fp16). Block: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins of its
    8 groups, 128 bytes of codes (each 32 bytes hold two groups: the low nibbles, then the high)."""
    r, s = blocks.shape[:2]
    t, g = r // TILE, s * 8
    a, m, both = np.moveaxis(_words(blocks[..., 4:16]), -1, 0)  # 4 groups' bytes a word
    # groups 0-3: the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); groups 4-7: a nibble of
    # bytes 8-11 and the top 2 bits of bytes 0-3 (scales) or 4-7 (mins)
    six, top = np.uint32(0x3F3F3F3F), np.uint32(0x30303030)
    sc = np.stack([a & six, (both & _NIB) | ((a >> np.uint32(2)) & top)], axis=-1).view(np.uint8)  # [R, S, 8]
    mn = np.stack([m & six, ((both >> np.uint32(4)) & _NIB) | ((m >> np.uint32(2)) & top)], axis=-1).view(np.uint8)
    lo, hi = _pair_nibbles(_words(blocks[..., 16:144]).reshape(r, s, 4, 8))
    low = np.stack([lo, hi], axis=3)  # [R, S, 4, 2, 4 words]: group 2c + nibble
    _put(codes.view(np.uint32), low.reshape(t, TILE, g, 4), (0, 2, 3, 1))
    _put(scale, np.stack([sc, mn], axis=-1).reshape(t, TILE, g, 2), (0, 2, 3, 1))
    _put(sup, _fp16(blocks[..., 0:4]).reshape(t, TILE, s, 2), (0, 2, 3, 1))


def _layout_q5_0(blocks: np.ndarray, codes: np.ndarray, scale: np.ndarray, sup: None) -> None:
    """Q5_0 blocks [R, G, 22] → codes [T, G, 320] (4-bit vectors, then a vector of fifth bits) and d
    [T, G, 16] (fp16). Block: fp16 d, 4 bytes of fifth bits (bit c of the little-endian word: code
    c), 16 bytes of low nibbles (codes 0-15) and high nibbles (codes 16-31)."""
    r, g = blocks.shape[:2]
    t = r // TILE
    words = codes.view(np.uint32)
    lo, hi = _pair_nibbles(_words(blocks[..., 6:22]))
    _put(words[..., :64], np.concatenate([lo, hi], axis=-1).reshape(t, TILE, g, 4), (0, 2, 3, 1))
    # fifth bits: byte b of the word, bit i = code 4i + b, i.e. bit 8b + i = bit 4i + b of the file's
    qh = _words(blocks[..., 2:6])[..., 0]
    fifth = np.zeros_like(qh)
    for i in range(8):
        for b in range(4):
            fifth |= ((qh >> np.uint32(4 * i + b)) & np.uint32(1)) << np.uint32(8 * b + i)
    _put(words[..., 64:], fifth.reshape(t, TILE, g), (0, 2, 1))
    _put(scale, _fp16(blocks[..., 0:2]).reshape(t, TILE, g), (0, 2, 1))


def _layout_q6_k(blocks: np.ndarray, codes: np.ndarray, scale: np.ndarray, sup: np.ndarray) -> None:
    """Q6_K super-blocks [R, S, 210] → codes [T, G, 384] (4-bit vectors, then two vectors of the top 2
    bits), int8 scales [T, G, 32] (each half group's) and d [T, S, 16] (fp16). Block: 128 bytes of low
    nibbles, 64 of top bits, 16 int8 scales (one per 16 codes), fp16 d. Code 128h + 32s + l: low
    nibble of byte 64h + 32 (s % 2) + l (the high nibble where s >= 2), top bits 2s, 2s + 1 of byte
    128 + 32h + l."""
    r, s = blocks.shape[:2]
    t, g = r // TILE, s * 8
    words = codes.view(np.uint32)
    lo, hi = _pair_nibbles(_words(blocks[..., 0:128]).reshape(r, s, 2, 2, 8))  # [R, S, h, s % 2, 4]
    low = np.stack([lo, hi], axis=3)  # [R, S, h, s // 2, s % 2, 4 words]: group 4h + s
    _put(words[..., :64], low.reshape(t, TILE, g, 4), (0, 2, 3, 1))
    qh = _words(blocks[..., 128:192]).reshape(r, s, 2, 1, 2, 4)  # [R, S, h, -, half, i]: l = 16 half + 4 i + b
    top = (qh >> np.arange(0, 8, 2, dtype=np.uint32).reshape(4, 1, 1)) & np.uint32(0x03030303)  # [.., s, half, i]
    packed = top[..., 0] | (top[..., 1] << np.uint32(2)) | (top[..., 2] << np.uint32(4)) | (top[..., 3] << np.uint32(6))
    _put(words[..., 64:], packed.reshape(t, TILE, g, 2), (0, 2, 3, 1))
    _put(scale, blocks[..., 192:208].view(np.int8).reshape(t, TILE, g, 2), (0, 2, 3, 1))
    _put(sup, _fp16(blocks[..., 208:210]).reshape(t, TILE, s), (0, 2, 1))


_LAYOUTS = {"Q4_K": (Q4K, 256, np.uint8, 32, _layout_q4_k, 2 * TILE),
            "Q5_0": (Q5, 320, np.float16, 16, _layout_q5_0, 0),
            "Q6_K": (Q6K, 384, np.int8, 32, _layout_q6_k, TILE)}  # kind, code bytes, scale dtype/count, super


def _native_part(type_name: str, raw: np.ndarray, rows: int, cols: int, bias: torch.Tensor | None) -> Part:
    """A Q4_K, Q5_0 or Q6_K tensor's bytes laid out as stored (see the C source), in chunks of rows."""
    per_block, nbytes = BLOCKS[type_name]
    kind, per_group, small, per_scale, layout, per_super = _LAYOUTS[type_name]
    if cols % per_block or cols % SUPER and kind != Q5:
        raise ValueError(f"{type_name} needs input sizes divisible by {per_block}")
    blocks_per_row = cols // per_block
    n = rows + -rows % TILE
    tiles, groups = n // TILE, cols // GROUP
    codes = np.empty((tiles, groups, per_group), np.uint8)
    scale = np.empty((tiles, groups, per_scale), small)
    sup = np.empty((tiles, cols // SUPER, per_super), np.float16) if per_super else None
    view = np.asarray(raw).reshape(rows, blocks_per_row, nbytes)  # read only: never written
    for r0 in range(0, rows, _CHUNK):
        r1 = min(rows, r0 + _CHUNK)
        blocks = view[r0:r1]
        if (r1 - r0) % TILE:  # zero blocks: fp16 factors 0, so the padded outputs are 0
            blocks = np.concatenate([blocks, np.zeros((-(r1 - r0) % TILE, blocks_per_row, nbytes), np.uint8)])
        t0, t1 = r0 // TILE, r0 // TILE + blocks.shape[0] // TILE
        layout(blocks, codes[t0:t1], scale[t0:t1], None if sup is None else sup[t0:t1])
    return Part(kind, rows, n, torch.from_numpy(codes), torch.from_numpy(scale),
                None, None if sup is None else torch.from_numpy(sup), _padded_bias(bias, n))


class GroupKernel:
    """A ``LinearKernel`` running low-bit weights on joey's VNNI kernel, with activations quantized
    to 8 bits per group of 32 (as llama.cpp runs a GGUF): ``GroupKernel(q, bias)`` for
    ``QuantizedWeight`` codes (4 or 8 bits), ``from_blocks`` for a GGUF tensor's blocks as stored,
    ``concat`` for weights of different kinds side by side, ``from_state`` for a cached layout.

    ``format``: "int4", "int5", "int6" or "int8" by the bits of the codes ("int6+int4" for a mix);
    ``nbytes``: the bytes of weight data one call reads."""

    parts: list[Part]

    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None) -> None:
        self._setup([_legacy_part(q, bias)], q.shape[1])

    @classmethod
    def _of(cls, parts: list[Part], cols: int) -> GroupKernel:
        kernel = cls.__new__(cls)
        kernel._setup(parts, cols)
        return kernel

    def _setup(self, parts: list[Part], cols: int) -> None:
        lib = library()
        if lib is None:
            raise RuntimeError("joey's group kernel is not available on this machine")
        if not 0 < len(parts) <= SEGMENTS:
            raise ValueError(f"a kernel runs 1 to {SEGMENTS} weights side by side, not {len(parts)}")
        if any(p.n != p.out for p in parts[:-1]):
            raise ValueError("only the last weight of a kernel may have padded outputs")
        for p in parts:
            p.check(cols)
        self.parts, self.cols = parts, cols
        self.n = sum(p.n for p in parts)
        self.out = self.n - parts[-1].n + parts[-1].out
        self.bits = max(BITS[p.kind] for p in parts)
        self.half = all(p.half for p in parts)
        self.format = "+".join(f"int{b}" for b in sorted({BITS[p.kind] for p in parts}, reverse=True))
        self.nbytes = sum(p.nbytes for p in parts)
        # the C structure and its address, once: every call's Python overhead counts at decode time
        self._lin = _Linear(len(parts), self.n)
        for i, p in enumerate(parts):
            ptr = [None if t is None else t.data_ptr() for t in (p.codes, p.scale, p.offset, p.super, p.bias)]
            self._lin.seg[i] = _Segment(*ptr, p.n, p.kind, int(p.half))
        self._addr = ctypes.addressof(self._lin)
        self._gemm = lib.linear_gemm

    @classmethod
    def from_blocks(cls, type_name: str, raw: np.ndarray, rows: int, cols: int,
                    bias: torch.Tensor | None = None) -> GroupKernel:
        """A GGUF tensor's blocks (``raw``: uint8 [rows, bytes per row], possibly a read-only memory
        map, which is only read) → a kernel on exactly the file's numbers. Q4_K, Q5_0 and Q6_K keep
        their own layout; Q4_0, Q4_1 and Q8_0 become ``QuantizedWeight`` codes (``GroupKernel(q)``'s
        layout and bits), both a chunk of rows at a time."""
        if type_name in BLOCKS:
            return cls._of([_native_part(type_name, raw, rows, cols, bias)], cols)
        if type_name not in LEGACY:
            raise ValueError(f"no layout for {type_name} blocks")
        view = np.asarray(raw).reshape(rows, -1)
        chunks = [_legacy_part(decode_tensor(type_name, view[r0 : r0 + _CHUNK], min(_CHUNK, rows - r0), cols), None)
                  for r0 in range(0, rows, _CHUNK)]
        return cls._of([_merge_legacy(chunks, bias)], cols)

    @classmethod
    def concat(cls, kernels: list[GroupKernel]) -> GroupKernel:
        """One kernel for ``kernels`` side by side along the outputs (their outputs concatenated), of
        any kinds: a fused q/k/v whose v has more bits than q and k runs as one call, with one
        quantization of the activations. Shares their arrays; every kernel but the last must have
        whole tiles of 16 outputs, and together at most ``SEGMENTS`` weights (else ValueError)."""
        if any(k.cols != kernels[0].cols for k in kernels):
            raise ValueError("kernels side by side need the same input size")
        if any(k.n != k.out for k in kernels[:-1]):
            raise ValueError("only the last kernel may have padded outputs")
        return cls._of([p for k in kernels for p in k.parts], kernels[0].cols)

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able description, tensors by name) from which ``from_state`` rebuilds this kernel."""
        names = {v: k for k, v in KIND_NAMES.items()}
        meta = {"cols": self.cols, "parts": [{"kind": names[p.kind], "out": p.out, "n": p.n, "half": p.half}
                                             for p in self.parts]}
        tensors = {f"{i}.{name}": t for i, p in enumerate(self.parts) for name, t in p.arrays().items()}
        return meta, tensors

    @classmethod
    def from_state(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> GroupKernel:
        """The kernel ``state()`` described, on ``tensors`` themselves (no copy: they may be views of
        a memory-mapped file, which the kernel keeps alive). ValueError where they do not fit."""
        parts = []
        for i, pm in enumerate(meta["parts"]):
            get = tensors.get
            codes, scale = get(f"{i}.codes"), get(f"{i}.scale")
            if codes is None or scale is None:
                raise ValueError(f"weight {i} of the kernel has no codes or scales")
            parts.append(Part(KIND_NAMES[pm["kind"]], int(pm["out"]), int(pm["n"]), codes, scale,
                              get(f"{i}.offset"), get(f"{i}.super"), get(f"{i}.bias"), bool(pm["half"])))
        return cls._of(parts, int(meta["cols"]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
        y = torch.empty(xs.shape[0], self.n)
        self._gemm(xs.data_ptr(), xs.shape[0], self.cols, self._addr, y.data_ptr())
        if self.n != self.out:
            y = y[:, : self.out]
        return y if x.dtype == torch.float32 else y.to(x.dtype)
