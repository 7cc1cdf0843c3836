"""``QuantizedWeight``: a low-bit weight as integer codes with a scale (and offset) per group of
input columns, the one representation of quantized weights in joey. joey's own int4/int8
quantizations (``joey.models.weight_formats``) and a GGUF's blocks (``joey.models.gguf_blocks``)
produce it; PyTorch's low-bit kernels (``weight_formats``) and joey's C kernel
(``joey.models.group_kernel``) run it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32  # columns per int4 scale group: what Q4_0/Q4_1/Q4_K/Q8_0 blocks use


@dataclass(frozen=True)
class QuantizedWeight:
    """A low-bit [out, in] weight: ``w = scale * codes + offset`` per group of ``group`` columns.

    int4: codes in [0, 15] (uint8), ``offset`` the group's minimum (Q4_0's is -8 * scale);
    int8: codes in [-128, 127] (int8), no offset (symmetric, like Q8_0); ``group`` is 32 for a
    GGUF's blocks or the whole row for a per-channel quantization.
    """

    bits: int
    codes: torch.Tensor  # [out, in]
    scale: torch.Tensor  # [out, in // group], fp32
    offset: torch.Tensor | None  # [out, in // group], fp32 (int4 only)
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """The float weight these codes stand for, fp32 [out, in]."""
        out, cols = self.codes.shape
        w = self.codes.float().view(out, cols // self.group, self.group) * self.scale.unsqueeze(-1)
        if self.offset is not None:
            w = w + self.offset.unsqueeze(-1)
        return w.view(out, cols)

    def rows(self, index: torch.Tensor) -> QuantizedWeight:
        """These output rows only (a permutation or a subset), codes untouched."""
        off = None if self.offset is None else self.offset[index]
        return QuantizedWeight(self.bits, self.codes[index], self.scale[index], off, self.group)
