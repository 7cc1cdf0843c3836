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
    lib.quantize_rows.restype = lib.group_gemm.restype = None
    lib.quantize_rows.argtypes = [p, i, i, p, p, p]
    lib.group_gemm.argtypes = [p, p, p, i, i, p, ctypes.c_int, i, p, p, p, p]
    lib.rms_norm.restype = None
    lib.rms_norm.argtypes = [p, i, i, p, ctypes.c_float, p]
    return lib


def available() -> bool:
    """Whether joey's kernel runs on this machine (it is compiled on first call)."""
    return library() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of fp32 CPU rows in one C call (decode-time overhead), or None where the kernel does
    not run or the tensors do not fit (the caller then uses PyTorch's)."""
    lib = library()
    if lib is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
        return None
    xs = x.contiguous()
    k = xs.shape[-1]
    y = torch.empty_like(xs)
    lib.rms_norm(xs.data_ptr(), xs.numel() // k, k, weight.data_ptr(), eps, y.data_ptr())
    return y


class GroupKernel:
    """A ``LinearKernel`` running ``QuantizedWeight`` codes (4- or 8-bit) on joey's VNNI kernel, with
    activations quantized to 8 bits per group of 32 (as llama.cpp runs a GGUF).

    Codes are stored unsigned: 8-bit codes c become c + 128 with an offset of -128 * scale (the same
    weights). A weight quantized per row runs as groups of 32 with the row's scale repeated."""

    activations = "int8"

    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None) -> None:
        lib = library()
        if lib is None:
            raise RuntimeError("joey's group kernel is not available on this machine")
        self._lib = lib
        self.format = f"int{q.bits}"
        self.bits = q.bits
        out, cols = q.shape
        if cols % GROUP or q.group % GROUP:
            raise ValueError(f"the group kernel needs input sizes and groups divisible by {GROUP}")
        self.out, self.cols = out, cols
        rep = q.group // GROUP
        scale = q.scale.float().repeat_interleave(rep, dim=1)  # [out, cols / 32]
        if q.bits == 8:
            codes = (q.codes.to(torch.int16) + 128).to(torch.uint8)
            offset = -128 * scale if q.offset is None else q.offset.float().repeat_interleave(rep, dim=1) - 128 * scale
        else:
            codes = q.codes.to(torch.uint8)
            offset = None if q.offset is None else q.offset.float().repeat_interleave(rep, dim=1)
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
        self.scale = scale.view(tiles, TILE, groups).transpose(1, 2).contiguous()  # [tiles, groups, TILE]
        self.offset = None if offset is None else offset.view(tiles, TILE, groups).transpose(1, 2).contiguous()
        self.bias = None
        if bias is not None:
            b = bias.detach().float()
            self.bias = torch.cat([b, b.new_zeros(pad)]) if pad else b.contiguous()
        self.n = n
        self.nbytes = self.codes.numel() + 4 * self.scale.numel() * (1 if self.offset is None else 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
        m, groups = xs.shape[0], self.cols // GROUP
        q = torch.empty(m, self.cols, dtype=torch.int8)
        dx = torch.empty(m, groups)
        dsum = torch.empty(m, groups)
        self._lib.quantize_rows(xs.data_ptr(), m, self.cols, q.data_ptr(), dx.data_ptr(), dsum.data_ptr())
        y = torch.empty(m, self.n)
        self._lib.group_gemm(q.data_ptr(), dx.data_ptr(), dsum.data_ptr(), m, self.cols, self.codes.data_ptr(),
                             self.bits, self.n, self.scale.data_ptr(),
                             None if self.offset is None else self.offset.data_ptr(),
                             None if self.bias is None else self.bias.data_ptr(), y.data_ptr())
        if self.n != self.out:
            y = y[:, : self.out]
        return y if x.dtype == torch.float32 else y.to(x.dtype)
