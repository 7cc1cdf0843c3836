"""Files of trained draft networks (Kangaroo adapters, Jakiro heads): safetensors with the weights
in fp16, the draft vocabulary, and joey metadata naming the target they were trained for.

Both kinds share the rules here: the metadata's ``format`` says what the file is, the target's
shape and embedding fingerprint are checked on load (a file for another model is refused with a
one-line error), and shipped files are found inside the package by that fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from joey.errors import ModelFormatError
from joey.models.llama import LlamaModel


def model_fingerprint(model: LlamaModel) -> str:
    """A short hash of the first embedding rows, rounded to bf16 so fp32 and bf16 loads agree."""
    with torch.no_grad():
        rows = model.model.embed_tokens(torch.arange(64, device=model.device)).float().cpu().to(torch.bfloat16)
    return hashlib.sha256(rows.view(torch.int16).numpy().tobytes()).hexdigest()[:16]


def model_cache_key(model: LlamaModel) -> str:
    """Names a model in joey's measurement caches: its shape and ``model_fingerprint``."""
    cfg = model.cfg
    return f"{cfg.architecture}-{cfg.num_layers}x{cfg.hidden_size}:{model_fingerprint(model)}"


def save_draft_file(
    state: dict[str, torch.Tensor], vocab: torch.Tensor, model: LlamaModel, path: str | Path, meta: dict
) -> None:
    """Weights (fp16 on disk: drafting precision cannot change the output, the target verifies),
    the draft vocabulary and ``meta`` plus the target's shape and fingerprint."""
    from safetensors.torch import save_file

    cfg = model.cfg
    full = {**meta, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "num_layers": cfg.num_layers,
            "fingerprint": model_fingerprint(model)}
    tensors = {k: v.detach().half().cpu().contiguous() for k, v in state.items() if k != "vocab"}
    tensors["vocab"] = vocab.cpu().to(torch.int32)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"joey": json.dumps(full)})


def read_meta(path: str | Path, fmt: str, kind: str) -> dict:
    """The joey metadata of a draft file of format ``fmt``; ModelFormatError for anything else."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("joey")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFormatError(f"{path}: not a readable {kind} file ({str(exc).splitlines()[0][:120]})")
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise ModelFormatError(f"{path}: not a joey {kind} (no '{fmt}' metadata)")
    return meta


def load_checked(path: str | Path, model: LlamaModel, fmt: str, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, fp32 tensors with a long ``vocab``) of a draft file made for ``model``."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ModelFormatError(f"{kind} file not found: {p}")
    meta = read_meta(p, fmt, kind)
    cfg = model.cfg
    for key, have in (("hidden_size", cfg.hidden_size), ("vocab_size", cfg.vocab_size), ("num_layers", cfg.num_layers)):
        if meta.get(key) != have:
            raise ModelFormatError(
                f"{p}: {kind} was trained for a model with {key}={meta.get(key)}, this model has {have}"
            )
    if meta.get("fingerprint") != model_fingerprint(model):
        raise ModelFormatError(f"{p}: {kind} was trained for a different model ({meta.get('base_model', 'unknown')})")
    try:
        state = load_file(str(p))
    except Exception as exc:  # a truncated or corrupt body raises several types
        raise ModelFormatError(f"{p}: damaged {kind} file ({str(exc).splitlines()[0][:120]})")
    vocab = state.get("vocab")
    if vocab is None or vocab.ndim != 1 or int(vocab.max()) >= cfg.vocab_size or int(vocab.min()) < 0:
        raise ModelFormatError(f"{p}: missing or invalid draft vocabulary")
    state = {k: v.float() for k, v in state.items()}
    state["vocab"] = vocab.long()
    return meta, state


def find_shipped(model: LlamaModel, folder: Path, fmt: str, kind: str) -> Path | None:
    """The file in ``folder`` (shipped inside joey) made for ``model``, if any."""
    if not folder.is_dir():
        return None
    fp = model_fingerprint(model)
    for path in sorted(folder.glob("*.safetensors")):
        try:
            meta = read_meta(path, fmt, kind)
        except ModelFormatError:
            continue
        if meta.get("fingerprint") == fp and meta.get("hidden_size") == model.cfg.hidden_size:
            return path
    return None
