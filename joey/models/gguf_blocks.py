"""A GGUF's quantized linear weights read as they are stored: codes plus per-block scales.

transformers dequantizes a GGUF to float; joey keeps that float copy for everything else (config,
tokenizer, norms, the embedding table) and reads the linear layers' Q4_0, Q4_1, Q4_K and Q8_0
blocks here, so an int4 or int8 model runs on the GGUF's own numbers. Block layouts follow
ggml's (see the gguf package's reference dequantizers, which the tests compare against):

- Q4_0, 18 bytes per 32 weights: fp16 d, 16 bytes of nibbles (low nibbles = weights 0-15); w = d (q - 8)
- Q4_1, 20 bytes per 32: fp16 d, fp16 m, 16 bytes of nibbles; w = d q + m
- Q8_0, 34 bytes per 32: fp16 d, 32 int8; w = d q
- Q4_K, 144 bytes per 256: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for 8 groups of
  32, 128 bytes of nibbles (each 32-byte run holds two groups: low nibbles, then high nibbles);
  w = d sc q - dmin m

5- and 6-bit types (Q5_0, Q5_1, Q5_K, Q6_K: llama.cpp's Q4_K_M mixes some in) have no kernel of
their own; they become int8 with a scale per row, so no weight is stored below its source's bits.
Float tensors (F32, F16, BF16) are left to the float copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from joey.models.weight_formats import GROUP, QuantizedWeight, quantize_int8

NATIVE_FILE = "native-blocks.safetensors"
WIDER_TYPES = ("Q5_0", "Q5_1", "Q5_K", "Q6_K")  # read as int8 (see above)

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


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


def unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp's converter interleaves the two RoPE halves of each head's q/k rows; this is the
    row order that undoes it (the same reordering transformers applies to the float weights)."""
    idx = torch.arange(rows)
    return idx.view(heads, rows // heads // 2, 2).transpose(1, 2).reshape(rows)


def read_native(gguf: Path) -> dict[str, QuantizedWeight]:
    """Hugging Face name → quantized weight, for every linear layer stored in a natively read type."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf))

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    heads = field(f"{arch}.attention.head_count")
    kv_heads = field(f"{arch}.attention.head_count_kv") or heads
    names = {t.name for t in reader.tensors}
    out: dict[str, QuantizedWeight] = {}
    for t in reader.tensors:
        if t.tensor_type.name not in DECODERS and t.tensor_type.name not in WIDER_TYPES:
            continue
        cols, rows = (int(x) for x in t.shape)  # GGUF lists the fastest-varying dimension first
        kind = ""
        if t.name == "output.weight" or (t.name == "token_embd.weight" and "output.weight" not in names):
            name = "lm_head.weight"  # a tied model's embedding doubles as its LM head
        else:
            parts = t.name.split(".")  # blk.<i>.<kind>.weight
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _LAYER_NAMES:
                continue
            kind = parts[2]
            name = f"model.layers.{parts[1]}.{_LAYER_NAMES[kind]}.weight"
        if t.tensor_type.name in WIDER_TYPES:
            q = quantize_int8(torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(rows, cols)))
        else:
            q = decode_tensor(t.tensor_type.name, t.data, rows, cols)
        if arch == "llama" and kind in ("attn_q", "attn_k"):
            q = q.rows(unpermute_rows(rows, heads if kind == "attn_q" else kv_heads))
        out[name] = q
    return out


def save_native(weights: dict[str, QuantizedWeight], path: Path) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, list[int]] = {}
    for name, q in weights.items():
        tensors[f"{name}.codes"] = q.codes.contiguous()
        tensors[f"{name}.scale"] = q.scale.contiguous()
        if q.offset is not None:
            tensors[f"{name}.offset"] = q.offset.contiguous()
        meta[name] = [q.bits, q.group]
    save_file(tensors, str(path), metadata={"joey_native_blocks": json.dumps(meta)})


def load_native(path: Path) -> dict[str, QuantizedWeight]:
    """What ``save_native`` wrote; an empty dict when the file is absent."""
    from safetensors import safe_open

    if not path.exists():
        return {}
    out: dict[str, QuantizedWeight] = {}
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["joey_native_blocks"])
        keys = set(f.keys())
        for name, (bits, group) in meta.items():
            offset = f.get_tensor(f"{name}.offset") if f"{name}.offset" in keys else None
            out[name] = QuantizedWeight(bits, f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.scale"),
                                        offset, group)
    return out
