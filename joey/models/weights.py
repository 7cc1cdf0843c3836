"""Build a ``LlamaModel`` and its tokenizer from a local Hugging Face folder, and choose the
format its linear layers run in (joey.models.weight_formats)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from joey.budget import measure
from joey.errors import InvalidArgumentError, ModelFormatError
from joey.measurements import cpu_name, measured_once
from joey.models.config import ModelConfig
from joey.models.llama import LlamaModel, RMSNorm
from joey.models.quantized import QuantizedWeight
from joey.models.weight_formats import FORMATS, low_bit_kernels_key


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
    state = to_decoder_layout(_read_state(folder), model)
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


def to_decoder_layout(state: dict[str, torch.Tensor], model: LlamaModel) -> dict[str, torch.Tensor]:
    """Hugging Face weights → the decoder's: fused projections (Phi-3's ``qkv_proj`` and
    ``gate_up_proj``) split into joey's separate linears, which fuse them again in their kernels;
    norm weights stored as an offset from ``norm_offset`` (Gemma's 1 + w) made plain scales, so one
    RMSNorm serves every family."""
    cfg = model.cfg
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(".self_attn.qkv_proj.weight") and tensor.shape[0] == q_rows + 2 * kv_rows:
            base = name[: -len("qkv_proj.weight")]
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows])
            out.update({f"{base}q_proj.weight": q, f"{base}k_proj.weight": k, f"{base}v_proj.weight": v})
        elif name.endswith(".mlp.gate_up_proj.weight") and tensor.shape[0] == 2 * cfg.intermediate_size:
            base = name[: -len("gate_up_proj.weight")]
            gate, up = tensor.chunk(2)
            out.update({f"{base}gate_proj.weight": gate, f"{base}up_proj.weight": up})
        else:
            out[name] = tensor
    if cfg.norm_offset:
        norms = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, RMSNorm)}
        for name in norms & set(out):
            # added in fp32 (a bf16 model then rounds the sum once, where the reference rounds
            # its product: equal in fp32, within bf16 rounding otherwise)
            out[name] = out[name].float() + cfg.norm_offset
    return out


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


WEIGHT_CHOICES = ("auto", *FORMATS)


def check_weights(weights: str) -> None:
    """A one-line error for a weight format joey does not know."""
    if weights not in WEIGHT_CHOICES:
        raise InvalidArgumentError(f"unknown weight format '{weights}'; choose from {', '.join(WEIGHT_CHOICES)}")


def set_format(model: LlamaModel, folder: Path, weights: str, progress: bool = True) -> str:
    """``apply_weights`` for a model loaded from ``folder``'s float weights: its config's dtype,
    and a cache key naming the model."""
    from joey.models.draft_files import model_cache_key
    from joey.models.registry import cache_dir

    _, hf = read_config(folder)
    return apply_weights(model, weights, {}, hf.get("torch_dtype") or hf.get("dtype"), model_cache_key(model),
                         cache_dir(), progress)


def source_formats(native: dict[str, QuantizedWeight], source_dtype: str | None) -> list[str]:
    """Formats that keep the source's own precision, best guess first: a quantized GGUF runs on its
    own codes ("native": int4 for 4-bit blocks, int8 for 8-bit ones) or in fp32 (their exact
    dequantization); a bf16 checkpoint as bf16 or fp32; others in fp32."""
    if native:
        return ["native", "fp32"]
    if source_dtype == "bfloat16" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return ["bf16", "fp32"]
    return ["fp32"]


def apply_weights(
    model: LlamaModel,
    weights: str,
    native: dict[str, QuantizedWeight],
    source_dtype: str | None,
    cache_key: str,
    cache_root: Path,
    progress: bool = True,
) -> str:
    """Put ``model``'s linear layers in format ``weights`` ('auto' = the fastest of the formats that
    keep the source's precision, timed once per model and machine and then cached) and free the
    float copies it no longer needs. Returns the format in use. CPU only; float models elsewhere
    keep their dtype."""
    check_weights(weights)
    dev = model.device
    if dev.type != "cpu":
        if weights in ("int8", "int4"):
            raise InvalidArgumentError(
                f"{weights} weights run on the CPU only (joey has no {dev.type} low-bit kernels yet)")
        return model.weight_format
    if weights == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise InvalidArgumentError("bf16 weights need a CPU with AVX-512 BF16 or AMX; this one has neither")
    dtype = model.dtype
    if weights == "auto" and dtype != torch.float32:  # the user chose a float dtype: keep it
        if dtype != torch.bfloat16 or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return model.weight_format  # plain torch linears
        weights = "bf16"
    if weights == "auto":
        weights = fastest_format(model, source_formats(native, source_dtype), native, cache_key, cache_root, progress)
    try:
        model.kernel_setup.set_weights(weights, native, keep_float=weights == "fp32")
    except RuntimeError as exc:  # a kernel this CPU or torch build lacks, or a shape it refuses
        raise InvalidArgumentError(f"{weights} weights cannot run this model here ({str(exc).splitlines()[0][:160]})")
    return model.weight_format


def fastest_format(
    model: LlamaModel,
    candidates: list[str],
    native: dict[str, QuantizedWeight],
    cache_key: str,
    cache_root: Path,
    progress: bool,
) -> str:
    """The candidate with the fastest one-token decoding step here (a kernel that fails is skipped)."""
    if len(candidates) == 1:
        return candidates[0]
    key = json.dumps([cache_key, candidates, cpu_name(), torch.get_num_threads(), torch.__version__,
                      low_bit_kernels_key()])

    def time_each() -> dict:
        if progress:
            print(f"joey: timing weight formats {', '.join(candidates)} on this CPU (once)", file=sys.stderr)
        timed: dict[str, float] = {}
        for fmt in candidates:
            try:
                model.kernel_setup.set_weights(fmt, native, keep_float=True)
                timed[fmt] = measure(model, tokens=(1,), repeats=5).ms[0]
            except RuntimeError:  # a kernel this CPU or build lacks
                continue
        return {"ms": timed, "best": min(timed, key=timed.__getitem__) if timed else "fp32"}

    def read(data: dict) -> str:
        if data["best"] not in candidates:
            raise KeyError(data["best"])
        return data["best"]

    return measured_once(cache_root, "weights", key, time_each, read)
