"""Weight formats of the decoder's linear layers: fp32, bf16, int8 and int4, behind one kernel call.

A linear layer holds one ``LinearKernel``: a frozen, pre-laid-out weight and the CPU kernel that
multiplies by it. Low-bit weights are kept as ``QuantizedWeight`` codes (``joey.models.quantized``:
groups of ``GROUP`` input columns, each with its own scale and offset) so that a GGUF's
Q4_0/Q4_1/Q4_K/Q8_0 blocks load as they are, and so that nothing is rounded twice.

Why these kernels (measured on 2 cores; benchmarks/weight_formats.py):
- fp32: oneDNN with a pre-packed weight (``pack_weight``), flat in the number of rows.
- bf16: the same with a bf16 weight; on AMX CPUs it stays flat to 64 rows at half the bytes. Calls
  are split into blocks of 16 rows, the most for which a row's result never depends on the call.
- int4: ``_weight_int4pack_mm_for_cpu`` (bf16 activations; its fp32 path is ~20x slower), the
  fewest bytes per token but a cost that grows with the rows, so verifying many tokens costs more.
- int8: ``_weight_int8pack_mm`` when the weight has one scale per output row; a GGUF Q8_0 weight
  (a scale per 32 columns) runs exactly as two int4 planes, codes = 16 * high + low.
Activations stay in the model's dtype between layers; low-bit and bf16 kernels take bf16 inputs
and their outputs are cast back, so the residual stream and the KV cache keep full precision.
"""

from __future__ import annotations

from typing import Protocol

import torch

from joey.errors import InvalidArgumentError
from joey.models import group_kernel
from joey.models.quantized import GROUP, QuantizedWeight

FORMATS = ("fp32", "bf16", "int8", "int4")
BF16_ROWS = 16  # bf16 GEMM calls take at most this many rows (FloatKernel)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack weights along the output dimension (q/k/v or gate/up fused into one GEMM)."""
    first = parts[0]
    if any(p.bits != first.bits or p.group != first.group or (p.offset is None) != (first.offset is None)
           for p in parts):
        raise ValueError("cannot fuse weights of different formats")
    off = None if first.offset is None else torch.cat([p.offset for p in parts])  # type: ignore[misc]
    return QuantizedWeight(first.bits, torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                           off, first.group)


def quantize_int4(weight: torch.Tensor, group: int = GROUP) -> QuantizedWeight:
    """Asymmetric round-to-nearest int4 with a scale and minimum per group (Q4_1's scheme)."""
    out, cols = weight.shape
    if cols % group:
        raise InvalidArgumentError(f"int4 weights need input sizes divisible by {group}; this layer has {cols}")
    w = weight.detach().float().reshape(out, cols // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    codes = ((w - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15).to(torch.uint8)
    return QuantizedWeight(4, codes.view(out, cols), scale, lo, group)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric round-to-nearest int8 with one scale per output row (what ``_weight_int8pack_mm`` runs)."""
    w = weight.detach().float()
    scale = (w.abs().amax(-1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    codes = (w / scale).round().clamp(-128, 127).to(torch.int8)
    return QuantizedWeight(8, codes, scale, None, w.shape[1])


class LinearKernel(Protocol):
    """A weight laid out for one CPU kernel: ``kernel(x [N, in]) -> [N, out]`` in x's dtype."""

    format: str
    nbytes: int  # bytes of weight data read per call: what a decode step streams from memory

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


class FloatKernel:
    """oneDNN with a weight pre-packed into its blocked layout (fp32 or bf16)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.format = "fp32" if dtype == torch.float32 else "bf16"
        self.dtype = dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous(), None)
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.nbytes = weight.numel() * torch.finfo(dtype).bits // 8

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.to(self.dtype)
        if self.dtype == torch.bfloat16 and xs.shape[0] > BF16_ROWS:
            # oneDNN's bf16 GEMM computes a row differently once a call has more rows (~64 and
            # up), and bf16 outputs make that visible; in blocks of at most BF16_ROWS every row
            # comes out as it would alone, so big batches and prefills stay lossless
            y = torch.cat([self._mm(part) for part in xs.split(BF16_ROWS)])
        else:
            y = self._mm(xs)
        return y.to(x.dtype)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class Int4Kernel:
    """``_weight_int4pack_mm_for_cpu``: the kernel computes ``(code - 8) * scale + zero``, so a
    group's minimum m becomes zero = m + 8 * scale."""

    format = "int4"

    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None) -> None:
        if q.bits != 4 or q.group != GROUP:
            raise ValueError("Int4Kernel takes int4 codes in groups of 32")
        self.out = q.shape[0]
        codes, scale, zero = q.codes, q.scale, q.offset + 8 * q.scale  # type: ignore[operator]
        pad = -self.out % 16  # the packing wants whole blocks of 16 output rows: pad with zero rows
        if pad:
            codes = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])])
            scale, zero = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scale, zero))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        self.scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.bias = bias
        self.nbytes = codes.numel() // 2 + self.scales_zeros.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP, self.scales_zeros)
        if y.shape[1] != self.out:
            y = y[:, : self.out]
        return _add_bias(y.to(x.dtype), self.bias)


class Int8Kernel:
    """int8 codes: per-row scales run on ``_weight_int8pack_mm``; 32-column groups (GGUF Q8_0) run
    as two int4 planes, code = 16 * high + low, which is exact and streams the same 8 bits."""

    format = "int8"

    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None) -> None:
        if q.bits != 8:
            raise ValueError("Int8Kernel takes int8 codes")
        self.bias = bias
        self.planes: tuple[Int4Kernel, Int4Kernel] | None = None
        if q.group == q.shape[1]:
            self.codes = q.codes.contiguous()
            self.scale = q.scale[:, 0].to(torch.bfloat16).contiguous()
            self.nbytes = q.codes.numel() + self.scale.numel() * 2
            return
        c = q.codes.to(torch.int16)
        high, low = torch.div(c, 16, rounding_mode="floor"), c % 16  # high in [-8, 7], low in [0, 15]
        zeros = torch.zeros_like(q.scale)
        self.planes = (
            Int4Kernel(QuantizedWeight(4, (high + 8).to(torch.uint8), 16 * q.scale, -128 * q.scale, q.group), None),
            Int4Kernel(QuantizedWeight(4, low.to(torch.uint8), q.scale, zeros, q.group), None),
        )
        self.nbytes = self.planes[0].nbytes + self.planes[1].nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.planes is None:
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.codes, self.scale).to(x.dtype)
        else:
            y = self.planes[0](x) + self.planes[1](x)
        return _add_bias(y, self.bias)


def make_kernel(fmt: str, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> LinearKernel:
    """The kernel for ``weight`` in format ``fmt``: float weights are quantized when ``fmt`` is low-bit;
    quantized ones run on their own codes unless ``fmt`` is a float format. ``fmt="native"``: a
    quantized weight in its own format, a float one in fp32."""
    if fmt == "native":
        fmt = "fp32" if isinstance(weight, torch.Tensor) else f"int{weight.bits}"
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"unknown weight format '{fmt}'; choose from auto, {', '.join(FORMATS)}")
    if isinstance(weight, QuantizedWeight):
        if fmt in ("fp32", "bf16"):
            return FloatKernel(weight.dequantize(), bias, torch.float32 if fmt == "fp32" else torch.bfloat16)
        return _low_bit(weight, bias)
    if fmt == "int4":
        return _low_bit(quantize_int4(weight), bias)
    if fmt == "int8":
        return _low_bit(quantize_int8(weight), bias)
    return FloatKernel(weight, bias, torch.float32 if fmt == "fp32" else torch.bfloat16)


def low_bit_kernels() -> str:
    """Which kernels run int4/int8 weights here: "vnni" (joey's, 8-bit activations; see
    ``joey.models.group_kernel``) or "torch" (PyTorch's, bf16 activations). Part of every cache key
    of measured costs, since the two differ in speed and in numbers."""
    return "vnni" if group_kernel.available() else "torch"


def low_bit_kernels_key() -> str:
    """``low_bit_kernels()`` plus the version of joey's kernel source: measured costs (the budget's
    curve, the weight choice) are measured again when the kernel changes, not read from an old one's."""
    kind = low_bit_kernels()
    return f"{kind}:{group_kernel.source_digest()}" if kind == "vnni" else kind


def _low_bit(q: QuantizedWeight, bias: torch.Tensor | None) -> LinearKernel:
    """int4/int8 codes on joey's kernel where it runs, else on PyTorch's."""
    if low_bit_kernels() == "vnni" and q.shape[1] % GROUP == 0 and q.group % GROUP == 0:
        return group_kernel.GroupKernel(q, bias)
    return Int4Kernel(q, bias) if q.bits == 4 else Int8Kernel(q, bias)
