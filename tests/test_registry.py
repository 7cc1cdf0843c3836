"""Model sources and the GGUF conversion cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import joey
from joey.errors import ModelFormatError, ModelNotFoundError, UnsupportedArchitectureError
from joey.models import registry


def test_default_cache_entry_is_valid_and_fast(default_source):
    assert registry.entry_is_valid(default_source.folder)
    start = time.perf_counter()
    joey.load(None, device="cpu", progress=False)
    assert time.perf_counter() - start < 10  # generous bound for a loaded machine; ~1 s when idle


def _fake_convert(gguf: Path, out: Path) -> None:
    (out / "config.json").write_text('{"from": "' + gguf.read_bytes().hex() + '"}')
    files = list(out.iterdir())
    manifest = {
        "version": 2,
        "sizes": {p.name: p.stat().st_size for p in files},
        "sha256": {p.name: registry.file_sha256(p) for p in files},
    }
    (out / "joey-manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JOEY_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(gguf, out):
        calls.append(gguf)
        _fake_convert(gguf, out)

    monkeypatch.setattr(registry, "_convert", convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake model bytes")
    return gguf, calls


def test_cache_is_reused(fake_cache):
    gguf, calls = fake_cache
    a = registry.gguf_to_folder(gguf, progress=False)
    b = registry.gguf_to_folder(gguf, progress=False)
    assert a == b and len(calls) == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "older-joey"])
def test_corrupt_or_partial_cache_entry_is_rebuilt(fake_cache, damage):
    gguf, calls = fake_cache
    folder = registry.gguf_to_folder(gguf, progress=False)
    config = folder / "config.json"
    if damage == "truncate":
        config.write_bytes(config.read_bytes()[:5])
    elif damage == "flip":
        data = bytearray(config.read_bytes())
        data[-3] ^= 0x01
        config.write_bytes(bytes(data))
    elif damage == "manifest":
        (folder / "joey-manifest.json").unlink()
    else:  # made by a joey that kept a float copy of every GGUF: rebuilt once, in place
        manifest = json.loads((folder / "joey-manifest.json").read_text())
        del manifest["version"]
        (folder / "joey-manifest.json").write_text(json.dumps(manifest))
    assert not registry.entry_is_valid(folder)
    again = registry.gguf_to_folder(gguf, progress=False)
    assert len(calls) == 2 and registry.entry_is_valid(again)


def test_unknown_sources_fail_clearly(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        registry.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="config.json"):
        registry.resolve(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        registry.resolve("not-a-model")


def test_hub_id_fails_fast_without_network():
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="cannot download"):
        registry.resolve("someone/some-model")
    assert time.perf_counter() - start < 15


def test_corrupt_gguf_is_a_format_error(tmp_path, monkeypatch):
    monkeypatch.setenv("JOEY_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelFormatError):
        registry.resolve(str(bad))


def test_corrupt_safetensors_and_unsupported_arch(tiny_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFormatError):
        joey.load(str(broken), device="cpu", progress=False)
    other = tmp_path / "other"
    shutil.copytree(tiny_folder, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2"):
        joey.load(str(other), device="cpu", progress=False)
