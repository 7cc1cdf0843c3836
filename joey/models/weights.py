"""Build a ``LlamaModel`` and its tokenizer from a local Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from joey.errors import ModelFormatError
from joey.models.llama import LlamaModel, ModelConfig


def read_config(folder: Path) -> tuple[ModelConfig, dict]:
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{folder / 'config.json'}: unreadable ({exc.__class__.__name__})")
    if not isinstance(hf, dict):
        raise ModelFormatError(f"{folder / 'config.json'}: not a JSON object")
    try:
        return ModelConfig.from_hf(hf), hf
    except KeyError as exc:
        raise ModelFormatError(f"{folder / 'config.json'}: missing field {exc}")


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{folder}: no .safetensors weights found")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelFormatError(f"{f}: corrupt safetensors file ({str(exc).splitlines()[0][:160]})")
    return state


def load_model(folder: Path, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    """Weights from ``folder`` into a fresh ``LlamaModel`` on ``device`` in ``dtype``, eval mode."""
    cfg, _ = read_config(folder)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    state = _read_state(folder)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state))
    unexpected = sorted(k for k in set(state) - expected if "rotary_emb" not in k)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelFormatError(f"{folder}: weights do not match a {cfg.architecture} model ({detail})")
    for name, tensor in state.items():
        if name in expected and tuple(tensor.shape) != tuple(model.get_parameter(name).shape):
            raise ModelFormatError(f"{folder}: weight {name} has shape {tuple(tensor.shape)}, config says otherwise")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Parameters keep requires_grad=True: generation runs under inference_mode anyway, and
    # inductor's weight freezing (which enables its fast CPU GEMM kernels) skips no-grad params.
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(folder: Path):
    """The folder's tokenizer (transformers' fast tokenizer, which carries the chat template)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        detail = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}"
        raise ModelFormatError(f"{folder}: cannot load tokenizer ({detail})")
