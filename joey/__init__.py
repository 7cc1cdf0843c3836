"""joey: lossless speculative decoding for Llama-family models.

``joey.load()`` returns an ``Engine`` on the embedded default model (SmolLM2-135M-Instruct);
``Engine.generate()`` / ``Engine.stream()`` produce text exactly as the model alone would.
"""

from __future__ import annotations

import os

import torch

from joey.config import Generation, GenerationStats, SamplingParams
from joey.engine import Engine, StreamEvent
from joey.errors import JoeyError

__all__ = ["Engine", "Generation", "GenerationStats", "JoeyError", "SamplingParams", "StreamEvent", "load"]
__version__ = "0.1.0"


def pick_device(device: str | torch.device | None) -> torch.device:
    from joey.errors import InvalidArgumentError

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"unknown device '{device}'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("device 'cuda' requested but no CUDA GPU is available")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are ~100x slower on CPUs without AMX), bf16 on CUDA."""
    from joey.errors import InvalidArgumentError

    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise InvalidArgumentError(f"unknown dtype '{dtype}'; choose from {', '.join(table)}")
    return table[dtype]


def _check_load_args(model, prepack, progress, draft_model, adapter, head, weights) -> None:
    """``load``'s arguments by type and value: a one-line error naming the argument."""
    from joey.errors import InvalidArgumentError
    from joey.models.weights import check_weights

    for name, value in (("model", model), ("draft_model", draft_model)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise InvalidArgumentError(
                f"{name} must be a model name, a folder or a .gguf path, got {type(value).__name__}"
            )
    for name, value in (("adapter", adapter), ("head", head)):
        if value is not None and not isinstance(value, (bool, str, os.PathLike)):
            raise InvalidArgumentError(
                f"{name} must be a file path, None or True (the shipped one) or False (none), got {value!r}"
            )
    for name, value in (("prepack", prepack), ("progress", progress)):
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"{name} must be true or false, got {value!r}")
    check_weights(weights)


def load(
    model: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    prepack: bool = True,
    progress: bool = True,
    draft_model: str | os.PathLike | None = None,
    adapter: str | os.PathLike | bool | None = None,
    head: str | os.PathLike | bool | None = None,
    weights: str = "auto",
) -> Engine:
    """Load a model (default: the embedded SmolLM2-135M-Instruct) and return an ``Engine``.

    ``model`` is a local Hugging Face folder, a ``.gguf`` file, a hub id, or None for the default.
    ``draft_model`` (same kinds of source) is a smaller model sharing the tokenizer, for method "sps".
    ``adapter`` is a Kangaroo adapter file (``joey train-adapter``); None picks the adapter shipped
    with joey for this model when there is one (the default model has one); False loads none.
    ``head`` is a Jakiro draft head file (``joey train-drafter``), found and refused the same way.
    ``weights`` is the format the linear layers run in on a CPU: "fp32", "bf16", "int8", "int4", or
    "auto" (default): the fastest, timed once per model and machine, of the formats that keep the
    source's precision (a 4-bit GGUF → int4 on its own codes, or fp32; a bf16 checkpoint → bf16 or
    fp32; an fp32 one → fp32). Float sources are quantized only when int8/int4 is asked for.
    ``prepack=False`` keeps plain torch float linears (the reference path; no kernels, 'auto' = float).
    """
    from joey.models.adapter import find_adapter, load_adapter
    from joey.models.jakiro_head import find_head, load_head
    from joey.models.loading import load_source
    from joey.models.registry import resolve
    from joey.models.weights import load_tokenizer

    _check_load_args(model, prepack, progress, draft_model, adapter, head, weights)
    dev = pick_device(device)
    fmt = weights if prepack or weights in ("int8", "int4") else None
    source = resolve(model, progress=progress)
    net = load_source(source, dev, pick_dtype(dtype, dev), fmt, progress)
    draft_source = None if draft_model is None else resolve(draft_model, progress=progress)
    draft = None if draft_source is None else load_source(draft_source, dev, pick_dtype(dtype, dev), fmt, progress)
    path = find_adapter(net) if adapter is None or adapter is True else (None if adapter is False else adapter)
    kangaroo = load_adapter(path, net) if path else None
    path = find_head(net) if head is None or head is True else (None if head is False else head)
    jakiro = load_head(path, net) if path else None
    tokenizer = load_tokenizer(source.folder)
    return Engine(net, tokenizer, source, draft_model=draft, adapter=kangaroo, head=jakiro)
