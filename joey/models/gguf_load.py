"""A ``LlamaModel`` built straight from a GGUF file, without a float copy of its weights.

Norms and biases are read as float; the embedding table stays in its blocks and a lookup
dequantizes only its rows (``gguf_file.BlockEmbedding``), and so does the LM head for the rows a
drafter slices. On a CPU where joey's low-bit kernel runs, the linear layers run on their stored
blocks (Q4_0/Q4_1/Q8_0/Q4_K/Q5_0/Q6_K natively, anything else widened to int8): laying a 1 GB file
out for the kernel takes a while, so the layout is written once to the model's cache entry and
read back whole on later loads.
Elsewhere (no AVX512-VNNI, a GPU, an explicit float or int4/int8 format) the linears are built from
the blocks as before: QuantizedWeight codes for PyTorch's low-bit kernels and the exact float
dequantization for float formats.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from joey.errors import ModelFormatError
from joey.models.gguf_file import BlockEmbedding, BlockRows, GGUFFile
from joey.models.llama import LlamaModel
from joey.models.quantized import QuantizedWeight
from joey.models.registry import ModelSource
from joey.models.weight_formats import LinearKernel, low_bit_kernels, quantize_int8
from joey.models.weights import apply_weights, read_config, to_decoder_layout

_PROJ = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
_MAGIC = b"JOEYKRN1"
_ALIGN = 64


def _aligned(n: int) -> int:
    """``n`` rounded up to the layout file's alignment."""
    return -(-n // _ALIGN) * _ALIGN


def load_gguf(source: ModelSource, device: torch.device, dtype: torch.dtype, weights: str | None,
              progress: bool = True) -> LlamaModel:
    """The model of ``source`` (a GGUF read in place) on ``device`` in ``dtype``; ``weights``: the
    linear layers' format as in ``joey.load`` ("auto" = the stored blocks on joey's kernel where it
    runs), or None for plain float linears (the reference path)."""
    assert source.gguf is not None
    cfg, _ = read_config(source.folder)
    file = GGUFFile(source.gguf)
    names = file.hf_names()  # HF name → GGUF name
    with torch.device("meta"):
        model = LlamaModel(cfg)
    linears = {f"model.layers.{i}.{part}.{p}.weight" for i in range(cfg.num_layers) for part, ps in _PROJ.items()
               for p in ps}
    embed = names.get("model.embed_tokens.weight")
    if embed is None or not linears <= set(names):
        missing = sorted({"model.embed_tokens.weight", *linears} - set(names))[:3]
        raise ModelFormatError(f"{source.gguf}: tensors missing for a {cfg.architecture} model ({missing})")
    head = names.get("lm_head.weight", embed)
    small = {hf: file.float_tensor(g) for hf, g in names.items()
             if hf not in linears and hf not in ("model.embed_tokens.weight", "lm_head.weight")}
    small = to_decoder_layout(small, model)
    expected = {n for n, p in model.named_parameters() if not n.endswith("proj.weight")
                and n not in ("model.embed_tokens.weight", "lm_head.weight")}
    if expected - set(small):
        raise ModelFormatError(f"{source.gguf}: tensors missing ({sorted(expected - set(small))[:3]})")
    for name, tensor in small.items():
        if tuple(tensor.shape) != tuple(model.get_parameter(name).shape):
            raise ModelFormatError(f"{source.gguf}: {name} has shape {tuple(tensor.shape)}, the config says otherwise")
    model.load_state_dict(small, strict=False, assign=True)
    on_cpu = device.type == "cpu"
    if on_cpu:
        model.model.embed_tokens = BlockEmbedding(BlockRows(file, embed))
    else:
        model.model.embed_tokens = nn.Embedding.from_pretrained(file.float_tensor(embed), freeze=False)
    if on_cpu and weights == "auto" and dtype == torch.float32 and low_bit_kernels() == "vnni":
        kernels = cached_kernels(source.folder, file, names, cfg.num_layers, progress)
        model.kernel_setup.use_kernels(kernels, BlockRows(file, head))
        return model.to(device=device).eval()
    # float linears, dequantized exactly (the formats below are then made from them or the blocks)
    for hf in sorted(linears) + ["lm_head.weight"]:
        gguf_name = names.get(hf, head)
        module = model.get_submodule(hf.rsplit(".", 1)[0])
        module.weight = nn.Parameter(file.float_tensor(gguf_name))
    if cfg.tie_word_embeddings and not on_cpu:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(device=device, dtype=dtype).eval()
    if weights is not None:
        from joey.models.draft_files import model_cache_key
        from joey.models.registry import cache_dir

        native = quantized_weights(file, names, head) if weights in ("auto", "int8", "int4") else {}
        apply_weights(model, weights, native, "float32", model_cache_key(model), cache_dir(), progress)
    return model


def quantized_weights(file: GGUFFile, names: dict[str, str], head: str) -> dict[str, QuantizedWeight]:
    """HF name → the stored codes of every linear layer, for PyTorch's int4/int8 kernels: 4- and
    8-bit blocks as they are, other types widened to int8 with a scale per row (no weight is stored
    below its source's bits)."""
    from joey.models.gguf_blocks import DECODERS, decode_tensor

    out: dict[str, QuantizedWeight] = {}
    for hf in [n for n in names if n.endswith("proj.weight")] + ["lm_head.weight"]:
        g = names.get(hf, head)
        t = file.tensors[g]
        order = file.row_order(g)
        if t.type_name in DECODERS:
            raw = file.raw(t)
            q = decode_tensor(t.type_name, raw if order is None else raw[order], t.rows, t.cols)
        else:
            q = quantize_int8(file.float_tensor(g))
        out[hf] = q
    return out


# -- the kernel layout cache -------------------------------------------------------------------


def _kernel_names(layers: int) -> list[tuple[str, list[str]]]:
    """Each kernel ``KernelSetup.use_kernels`` takes, with the HF linears it fuses."""
    out = []
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.self_attn.qkv", [f"{p}.self_attn.{n}_proj" for n in "qkv"]),
                (f"{p}.self_attn.o_proj", [f"{p}.self_attn.o_proj"]),
                (f"{p}.mlp.gate_up", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]),
                (f"{p}.mlp.down_proj", [f"{p}.mlp.down_proj"])]
    return out + [("lm_head", ["lm_head"])]


def _kernel(file: GGUFFile, gguf_name: str, bias_name: str | None) -> LinearKernel:
    """One linear on joey's kernel, from its stored blocks."""
    from joey.models.group_kernel import BLOCKS, LEGACY, GroupKernel

    t = file.tensors[gguf_name]
    order = file.row_order(gguf_name)
    bias = None if bias_name is None else file.float_tensor(bias_name)
    if t.type_name in BLOCKS or t.type_name in LEGACY:
        raw = file.raw(t)
        return GroupKernel.from_blocks(t.type_name, raw if order is None else raw[order], t.rows, t.cols, bias)
    return GroupKernel(quantize_int8(file.float_tensor(gguf_name)), bias)


def build_kernels(file: GGUFFile, names: dict[str, str], layers: int, progress: bool) -> dict[str, LinearKernel]:
    """Every linear of the model laid out for joey's kernel (q/k/v and gate/up fused)."""
    from tqdm import tqdm

    from joey.models.group_kernel import GroupKernel

    head = names.get("lm_head.weight", names["model.embed_tokens.weight"])
    out: dict[str, LinearKernel] = {}
    for key, parts in tqdm(_kernel_names(layers), desc="joey: laying out the GGUF's blocks", unit="kernel",
                           disable=not progress, file=sys.stderr):
        kernels = []
        for hf in parts:
            g = head if hf == "lm_head" else names[f"{hf}.weight"]
            kernels.append(_kernel(file, g, names.get(f"{hf}.bias")))
        out[key] = kernels[0] if len(kernels) == 1 else GroupKernel.concat(kernels)  # type: ignore[arg-type]
    return out


def cached_kernels(folder: Path, file: GGUFFile, names: dict[str, str], layers: int,
                   progress: bool = True) -> dict[str, LinearKernel]:
    """The model's kernels, read from ``folder``'s layout file for the current kernel source; built
    (and written there) when it is missing or damaged."""
    from joey.models import group_kernel

    path = folder / f"kernels-{group_kernel.source_digest()}.bin"
    kernels = read_kernels(path)
    if kernels is None:
        for old in folder.glob("kernels-*"):  # a layout for an older kernel source
            old.unlink(missing_ok=True)
        kernels = build_kernels(file, names, layers, progress)
        write_kernels(path, kernels)
    return kernels


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def write_kernels(path: Path, kernels: dict[str, LinearKernel]) -> None:
    """All kernels' arrays in one file (a JSON header, then each array 64-byte aligned), written
    whole or not at all; its size and SHA-256 go to a small file beside it, written last."""
    metas: dict[str, dict] = {}
    arrays: list[tuple[str, torch.Tensor]] = []
    for name, k in kernels.items():
        meta, tensors = k.state()  # type: ignore[attr-defined]
        metas[name] = meta
        arrays += [(f"{name}/{key}", t.contiguous()) for key, t in tensors.items()]
    table, offset = {}, 0
    for key, t in arrays:
        table[key] = [str(t.dtype).removeprefix("torch."), list(t.shape), offset]
        offset += _aligned(t.numel() * t.element_size())
    header = json.dumps({"kernels": metas, "arrays": table}).encode()
    start = _aligned(len(_MAGIC) + 8 + len(header))
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            def put(data: bytes | memoryview) -> None:
                digest.update(data)
                f.write(data)

            put(_MAGIC + len(header).to_bytes(8, "little") + header)
            put(b"\0" * (start - f.tell()))
            for key, t in arrays:
                data = t.view(torch.uint8).numpy().data if t.numel() else b""
                put(data)
                put(b"\0" * (start + table[key][2] + _aligned(len(data)) - f.tell()))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _sidecar(path).write_text(json.dumps({"size": path.stat().st_size, "sha256": digest.hexdigest()}))


def read_kernels(path: Path) -> dict[str, LinearKernel] | None:
    """What ``write_kernels`` wrote, its arrays views of one buffer read from the file; None when
    the file is missing, incomplete or damaged."""
    from joey.models.group_kernel import GroupKernel

    try:
        check = json.loads(_sidecar(path).read_text())
        size = path.stat().st_size
        if size != check["size"]:
            return None
        # Read into anonymous memory (huge pages where the kernel gives them), not a map of the file:
        # streaming the weights from page-cache pages measured 81 ms a decode step of the 1.5B
        # against 43 ms from anonymous memory, once the page cache had been refilled in 4 kB pages
        buf = mmap.mmap(-1, size)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            buf.madvise(mmap.MADV_HUGEPAGE)
        with open(path, "rb") as f:
            if f.readinto(buf) != size:  # type: ignore[arg-type]
                return None
        if hashlib.sha256(buf).hexdigest() != check["sha256"]:
            return None
        n = int.from_bytes(buf[len(_MAGIC): len(_MAGIC) + 8], "little")
        if buf[: len(_MAGIC)] != _MAGIC:
            return None
        head = json.loads(buf[len(_MAGIC) + 8: len(_MAGIC) + 8 + n])
        start = _aligned(len(_MAGIC) + 8 + n)
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, (dtype, shape, offset) in head["arrays"].items():
            name, _, part = key.rpartition("/")
            kind = getattr(torch, dtype)
            count = int(np.prod(shape)) if shape else 1
            t = (torch.frombuffer(buf, dtype=kind, count=count, offset=start + offset) if count
                 else torch.empty(0, dtype=kind))
            grouped.setdefault(name, {})[part] = t.view(shape)
        return {name: GroupKernel.from_state(meta, grouped.get(name, {})) for name, meta in head["kernels"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        return None
