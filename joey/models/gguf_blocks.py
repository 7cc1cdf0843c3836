"""A GGUF's 4- and 8-bit blocks as ``QuantizedWeight`` codes plus per-group scales: what PyTorch's
int4/int8 kernels run (where joey's own kernel does not, or int4/int8 is asked for), so those run
on the GGUF's own numbers too. Block layouts follow ggml's (see the gguf package's reference
dequantizers, which the tests compare against):

- Q4_0, 18 bytes per 32 weights: fp16 d, 16 bytes of nibbles (low nibbles = weights 0-15); w = d (q - 8)
- Q4_1, 20 bytes per 32: fp16 d, fp16 m, 16 bytes of nibbles; w = d q + m
- Q8_0, 34 bytes per 32: fp16 d, 32 int8; w = d q
- Q4_K, 144 bytes per 256: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for 8 groups of
  32, 128 bytes of nibbles (each 32-byte run holds two groups: low nibbles, then high nibbles);
  w = d sc q - dmin m

Other types have no PyTorch kernel: joey.models.gguf_load widens them to int8 with a scale per
row, so no weight is stored below its source's bits (joey's own kernel runs Q5_0 and Q6_K as stored).
"""

from __future__ import annotations

import numpy as np
import torch

from joey.models.quantized import GROUP, QuantizedWeight


def _f16(raw: np.ndarray) -> torch.Tensor:
    """Little-endian fp16 bytes [..., 2] → fp32 tensor [...]."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes → [..., 32] codes: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode_q4_0(blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _f16(blocks[..., 0:2])
    return torch.from_numpy(_nibbles(blocks[..., 2:18])), d, -8 * d


def decode_q4_1(blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.from_numpy(_nibbles(blocks[..., 4:20])), _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])


def decode_q8_0(blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, None]:
    codes = np.ascontiguousarray(blocks[..., 2:34]).view(np.int8)
    return torch.from_numpy(codes), _f16(blocks[..., 0:2]), None


def decode_q4_k(blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., 144] super-blocks → codes [..., 8, 32], scale and offset [..., 8]."""
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    s = blocks[..., 4:16].astype(np.int32)
    # groups 0-3: low 6 bits of bytes 0-3 (scales) and 4-7 (mins); groups 4-7: a nibble of bytes
    # 8-11 plus the top 2 bits of bytes 0-3 (scales) or 4-7 (mins)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    qs = blocks[..., 16:144].reshape(*blocks.shape[:-1], 4, 32)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*blocks.shape[:-1], 8, 32)
    scale = d.unsqueeze(-1) * torch.from_numpy(sc.astype(np.float32))
    offset = -(dmin.unsqueeze(-1) * torch.from_numpy(mn.astype(np.float32)))
    return torch.from_numpy(np.ascontiguousarray(codes)), scale, offset


# type name → (weights per block, bytes per block, decoder, bits)
DECODERS = {
    "Q4_0": (32, 18, decode_q4_0, 4),
    "Q4_1": (32, 20, decode_q4_1, 4),
    "Q8_0": (32, 34, decode_q8_0, 8),
    "Q4_K": (256, 144, decode_q4_k, 4),
}


def decode_tensor(type_name: str, raw: np.ndarray, rows: int, cols: int) -> QuantizedWeight:
    """One quantized tensor's bytes ([rows, bytes per row]) → ``QuantizedWeight`` [rows, cols]."""
    per_block, nbytes, decode, bits = DECODERS[type_name]
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // per_block, nbytes)
    codes, scale, offset = decode(blocks)
    groups = cols // GROUP
    codes = codes.reshape(rows, cols).to(torch.uint8 if bits == 4 else torch.int8)
    scale = scale.reshape(rows, groups).contiguous()
    offset = None if offset is None else offset.reshape(rows, groups).contiguous()
    return QuantizedWeight(bits, codes, scale, offset, GROUP)
