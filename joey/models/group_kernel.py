"""joey's own CPU kernel for 4- and 8-bit weights in groups of 32 (``kernels/group_gemm.c``).

PyTorch's int4/int8 CPU kernels turn every weight into a float for every row of activations: a
decode step is compute-bound and a forward of k tokens costs about k times one token, which leaves
speculative decoding little room. This kernel does what llama.cpp does with the same GGUF blocks:
activations are quantized to 8 bits per group of 32 and each group's dot products are integer sums
on the CPU's byte dot-product instruction (AVX512-VNNI), one load of the codes serving up to eight
rows. Every row gets the same bits however many rows share a call, which keeps verification
lossless (tests/test_weight_formats.py).

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
from functools import lru_cache
from pathlib import Path

import torch

from joey.models.weight_formats import GROUP, QuantizedWeight

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
    lib.group_gemm.restype = None
    lib.group_gemm.argtypes = [p, i, i, p, ctypes.c_int, i, p, p, ctypes.c_int, p, p]
    lib.rms_norm.restype = lib.attention.restype = None
    lib.rms_norm.argtypes = [p, i, i, p, ctypes.c_float, p]
    lib.attention.argtypes = [p, i, i, i, i, p, p, i, i, i, i, p, i, i, i, ctypes.c_float, p, p, p]
    lib.rope_store.restype = lib.silu_mul.restype = lib.decode_layer.restype = None
    lib.rope_store.argtypes = [p, i, i, i, i, p, p, p, p, p, i, i, p, p, i, i]
    lib.silu_mul.argtypes = [p, p, i, i, i, p]
    lib.decode_layer.argtypes = [ctypes.POINTER(LayerPlan), p, i, p, p, p, p, i, i, p, p, i, i, i, i, p, i, i, i, p, p]
    return lib


class _Linear(ctypes.Structure):
    """A ``GroupKernel``'s arrays as the C side's ``linear_t``."""

    _fields_ = [("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("offset", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("n", ctypes.c_int64), ("bits", ctypes.c_int64), ("half", ctypes.c_int64)]


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
    ``kernels``; None unless all four are ``GroupKernel``s without padded outputs and the norms are
    fp32 (the layer then runs module by module)."""
    if library() is None or not all(isinstance(k, GroupKernel) and k.n == k.out for k in kernels):
        return None
    if any(w.dtype != torch.float32 or not w.is_contiguous() or w.device.type != "cpu" for w in (norm1, norm2)):
        return None
    qkv, o, gate_up, down = kernels
    lin = [_Linear(k._codes, k._scale, k._offset, k._bias, k.n, k.bits, int(k.half))  # type: ignore[attr-defined]
           for k in kernels]
    return LayerPlan(norm1.data_ptr(), norm2.data_ptr(), eps, scale, qkv.cols, down.cols, heads,  # type: ignore[attr-defined]
                     kv_heads, head_dim, *lin)


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


class GroupKernel:
    """A ``LinearKernel`` running ``QuantizedWeight`` codes (4- or 8-bit) on joey's VNNI kernel, with
    activations quantized to 8 bits per group of 32 (as llama.cpp runs a GGUF).

    Codes are stored unsigned: 8-bit codes c become c + 128 with an offset of -128 * scale (the same
    weights). A weight quantized per row runs as groups of 32 with the row's scale repeated."""

    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None) -> None:
        lib = library()
        if lib is None:
            raise RuntimeError("joey's group kernel is not available on this machine")
        self.format = f"int{q.bits}"
        self.bits = q.bits
        out, cols = q.shape
        if cols % GROUP or q.group % GROUP:
            raise ValueError(f"the group kernel needs input sizes and groups divisible by {GROUP}")
        self.out, self.cols = out, cols
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
        if self.bits == 4:  # quads 2j and 2j + 1 share vector j: low and high nibbles
            c = c.reshape(tiles, groups, 4, 2, TILE, 4)
            c = c[:, :, :, 0] | (c[:, :, :, 1] << 4)
        self.codes = c.contiguous()
        # fp16 where it holds every scale and offset exactly (a GGUF's Q4_0/Q4_1/Q8_0 blocks): fewer bytes
        self.half = all(t is None or torch.equal(t.half().float(), t) for t in (scale, offset))
        kind = torch.float16 if self.half else torch.float32
        self.scale = scale.view(tiles, TILE, groups).transpose(1, 2).to(kind).contiguous()  # [tiles, groups, TILE]
        self.offset = None if offset is None else offset.view(tiles, TILE, groups).transpose(1, 2).to(kind).contiguous()
        self.bias = None
        if bias is not None:
            b = bias.detach().float()
            self.bias = torch.cat([b, b.new_zeros(pad)]) if pad else b.contiguous()
        self.n = n
        per_group = self.scale.element_size() * (1 if self.offset is None else 2)
        self.nbytes = self.codes.numel() + per_group * self.scale.numel()
        # the pointers, once: every call's Python overhead counts at decode time
        self._gemm = lib.group_gemm
        self._codes, self._scale = self.codes.data_ptr(), self.scale.data_ptr()
        self._offset = None if self.offset is None else self.offset.data_ptr()
        self._bias = None if self.bias is None else self.bias.data_ptr()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
        y = torch.empty(xs.shape[0], self.n)
        self._gemm(xs.data_ptr(), xs.shape[0], self.cols, self._codes, self.bits, self.n, self._scale, self._offset,
                   int(self.half), self._bias, y.data_ptr())
        if self.n != self.out:
            y = y[:, : self.out]
        return y if x.dtype == torch.float32 else y.to(x.dtype)
