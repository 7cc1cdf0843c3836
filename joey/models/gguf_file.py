"""A GGUF file read in place: its tensor table parsed in a fraction of a second, every tensor a
memory-mapped view of the file's own bytes, and their Hugging Face names.

Why not the gguf package's ``GGUFReader``: it decodes every metadata array into Python objects (a
152 k-token vocabulary and its merges took 5.6 s for Qwen2.5-Coder-1.5B on the Xeon), and a load
needs none of them. Config and tokenizer come from the metadata once, through transformers, and
are cached (joey.models.registry); this module only finds the tensors. The layout (GGUF v2/v3):
magic, version, tensor and key/value counts, the key/value pairs, one record per tensor (name,
dimensions fastest-varying first, type, offset), then the data, aligned to ``general.alignment``.

Float values read from blocks use the gguf package's reference dequantizers (what transformers'
float conversion used before, so the numbers are the same).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from joey.errors import ModelFormatError

# key/value types of the GGUF format: struct codes of the fixed-size ones
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Llama-style files: the MLP's input norm; Gemma's sandwich norms name the same tensors differently
_NORMS = {"ffn_norm": "post_attention_layernorm"}
_SANDWICH_NORMS = {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                   "post_ffw_norm": "post_feedforward_layernorm"}
# architectures whose tensors this module names; others are converted through transformers' float path
NAMED_ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's record: its GGUF name and type, its shape as [rows, cols] (cols = the
    fastest-varying dimension) and where its bytes lie in the file."""

    name: str
    type_name: str  # "F32", "Q4_K", ...
    rows: int
    cols: int
    offset: int  # bytes from the start of the file
    nbytes: int


class GGUFFile:
    """The tensors of a GGUF file, memory-mapped (nothing is read until a tensor is used)."""

    def __init__(self, path: str | Path) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{self.path}: cannot read ({exc.__class__.__name__})")
        buf = memoryview(self._map)
        self.metadata: dict[str, object] = {}  # scalar and string values (arrays are skipped)
        self.tensors: dict[str, GGUFTensor] = {}
        try:
            if bytes(buf[:4]) != b"GGUF":
                raise ValueError("no GGUF magic")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version}")
            pos = 24
            for _ in range(n_kv):
                key, pos = _string(buf, pos)
                (kind,), pos = struct.unpack_from("<I", buf, pos), pos + 4
                value, pos = _value(buf, pos, kind)
                if value is not None:
                    self.metadata[key] = value
            records = []
            for _ in range(n_tensors):
                name, pos = _string(buf, pos)
                (dims,), pos = struct.unpack_from("<I", buf, pos), pos + 4
                shape = struct.unpack_from(f"<{dims}Q", buf, pos)
                pos += 8 * dims
                kind, offset = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                records.append((name, shape, kind, offset))
            align = int(self.metadata.get("general.alignment", 32))  # type: ignore[call-overload]
            start = -(-pos // align) * align
            for name, shape, kind, offset in records:
                qtype = GGMLQuantizationType(kind)
                per_block, block_bytes = GGML_QUANT_SIZES[qtype]
                cols = int(shape[0])
                rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
                nbytes = rows * cols // per_block * block_bytes
                if cols % per_block or start + offset + nbytes > len(buf):
                    raise ValueError(f"tensor {name} does not fit the file (truncated?)")
                self.tensors[name] = GGUFTensor(name, qtype.name, rows, cols, start + offset, nbytes)
        except (ValueError, struct.error, UnicodeDecodeError, KeyError, OverflowError) as exc:
            raise ModelFormatError(f"{self.path}: not a readable GGUF file ({exc})")
        self.arch = str(self.metadata.get("general.architecture", ""))

    def field(self, key: str, default: object = None) -> object:
        """A metadata value; ``{arch}`` in ``key`` stands for the file's architecture."""
        return self.metadata.get(key.format(arch=self.arch), default)

    def raw(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's bytes as stored, a read-only view of the mapping: [rows, bytes per row]
        uint8, or [rows, cols] of the float type for F32/F16/BF16 tensors."""
        flat = np.frombuffer(self._map, dtype=np.uint8, count=tensor.nbytes, offset=tensor.offset)
        float_types = {"F32": np.float32, "F16": np.float16}
        if tensor.type_name in float_types:
            return flat.view(float_types[tensor.type_name]).reshape(tensor.rows, tensor.cols)
        return flat.reshape(tensor.rows, tensor.nbytes // tensor.rows)

    def floats(self, tensor: GGUFTensor, rows: np.ndarray | None = None) -> torch.Tensor:
        """The tensor (or these rows of it) as fp32 [rows, cols], by the gguf package's reference
        dequantizer; squeezed to 1-D for vectors (norms, biases)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        data = self.raw(tensor)
        if rows is not None:
            data = data[rows]
        if tensor.type_name == "F32":
            out = np.array(data, dtype=np.float32)
        else:
            out = dequantize(data, GGMLQuantizationType[tensor.type_name]).astype(np.float32, copy=False)
        t = torch.from_numpy(out.reshape(-1, tensor.cols))
        return t[0] if tensor.rows == 1 and rows is None else t

    def hf_names(self) -> dict[str, str]:
        """Hugging Face state-dict name → GGUF tensor name, for every tensor of a named architecture."""
        if self.arch not in NAMED_ARCHS:
            raise ModelFormatError(f"{self.path}: joey does not read '{self.arch}' GGUF tensors natively")
        norms = _SANDWICH_NORMS if self.arch.startswith("gemma") else _NORMS
        out: dict[str, str] = {}
        for name in self.tensors:
            if name == "token_embd.weight":
                out["model.embed_tokens.weight"] = name
            elif name == "output.weight":
                out["lm_head.weight"] = name
            elif name == "output_norm.weight":
                out["model.norm.weight"] = name
            else:
                parts = name.split(".")  # blk.<i>.<kind>.<weight|bias>
                kind = _LAYER_NAMES.get(parts[2], norms.get(parts[2])) if len(parts) == 4 else None
                if parts[0] != "blk" or kind is None:
                    raise ModelFormatError(f"{self.path}: unexpected tensor {name}")
                out[f"model.layers.{parts[1]}.{kind}.{parts[3]}"] = name
        return out

    def row_order(self, gguf_name: str) -> np.ndarray | None:
        """The row order that undoes llama.cpp's interleaving of the two RoPE halves of each head's
        q/k rows in ``llama`` files (the reordering transformers applies to the float weights), or
        None where rows are stored in order."""
        if self.arch != "llama" or not (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            return None
        heads = int(self.field("{arch}.attention.head_count"))  # type: ignore[arg-type]
        if ".attn_k." in gguf_name:
            heads = int(self.field("{arch}.attention.head_count_kv", heads))  # type: ignore[arg-type]
        rows = self.tensors[gguf_name].rows
        return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(rows)

    def float_tensor(self, gguf_name: str) -> torch.Tensor:
        """A tensor as fp32 in Hugging Face's convention (rows reordered, Gemma's norms stored as
        1 + w made w, both as transformers' converter does)."""
        w = self.floats(self.tensors[gguf_name], self.row_order(gguf_name))
        if self.arch.startswith("gemma") and gguf_name.endswith("norm.weight"):
            w = torch.from_numpy(w.numpy() - np.float32(1))  # numpy's subtraction, as the converter's
        return w


def _string(buf: memoryview, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    if n > len(buf):
        raise ValueError("string length past the end of the file")
    return bytes(buf[pos + 8: pos + 8 + n]).decode("utf-8"), pos + 8 + n


def _value(buf: memoryview, pos: int, kind: int) -> tuple[object, int]:
    """A key's value (None for arrays, which are skipped) and the position after it."""
    if kind in _SCALARS:
        code = _SCALARS[kind]
        return struct.unpack_from("<" + code, buf, pos)[0], pos + struct.calcsize(code)
    if kind == _STRING:
        return _string(buf, pos)
    if kind == _ARRAY:
        elem, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if elem in _SCALARS:
            return None, pos + count * struct.calcsize(_SCALARS[elem])
        for _ in range(count):  # strings or nested arrays: walk them
            _, pos = _value(buf, pos, elem)
        return None, pos
    raise ValueError(f"unknown metadata type {kind}")


class BlockRows:
    """Rows of a quantized [rows, cols] tensor read on demand (an embedding lookup, a draft
    vocabulary's slice of the LM head): the table stays in the GGUF's blocks, and only the rows
    asked for are dequantized, to exactly the values a float copy would hold."""

    def __init__(self, file: GGUFFile, gguf_name: str) -> None:
        self.file = file
        self.tensor = file.tensors[gguf_name]

    @property
    def shape(self) -> tuple[int, int]:
        return self.tensor.rows, self.tensor.cols

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        """index [n] → fp32 [n, cols]."""
        return self.file.floats(self.tensor, index.detach().cpu().numpy().astype(np.int64))


class BlockEmbedding(nn.Module):
    """An embedding table kept in a GGUF's blocks (a 152 k x 1536 table is 933 MB in fp32 and 131 MB
    as Q4_K): a lookup dequantizes the distinct tokens it needs, and keeps the last ``MEMO`` rows it
    made. The gguf package dequantizes through numpy at ~0.5 ms a call, paid by every decoding step
    and every Jakiro draft depth of the 1.5B (~1 % of its step), while decoding reuses few tokens."""

    MEMO = 8192  # rows kept: 50 MB at hidden 1536

    def __init__(self, rows: BlockRows) -> None:
        super().__init__()
        self.rows = rows
        self._memo: dict[int, torch.Tensor] = {}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [...] → [..., hidden] fp32."""
        flat = tokens.reshape(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        if len(uniq) and (int(uniq[0]) < 0 or int(uniq[-1]) >= self.rows.shape[0]):
            raise IndexError(f"token id out of range for a vocabulary of {self.rows.shape[0]}")
        ids = uniq.tolist()
        if not ids or len(ids) > self.MEMO:
            table = self.rows(uniq)
        else:
            missing = [t for t in ids if t not in self._memo]
            if missing:
                if len(self._memo) + len(missing) > self.MEMO:
                    # start over with this lookup's rows: simpler than LRU order, and rare in a request
                    self._memo, missing = {}, ids
                self._memo.update(zip(missing, self.rows(torch.tensor(missing))))
            table = torch.stack([self._memo[t] for t in ids])
        return table[inverse].view(*tokens.shape, self.rows.shape[1]).to(tokens.device)
