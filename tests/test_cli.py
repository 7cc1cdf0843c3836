"""The command line: output formats and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "joey", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["generate", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "hi", "--top-p", "1.5"], "top_p"),
        (["generate", "hi", "--top-k", "-1"], "top_k"),
        (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
        (["generate", "  "], "empty"),
        (["generate", "hi", "--model", "/no/such/model"], "not found"),
        (["generate", "hi", "--model", "nobody/nothing"], "cannot download"),
        (["generate", "hi", "--method", "magic"], "invalid choice"),
        (["generate", "hi", "--max-new-tokens", "ten"], "invalid int"),
        (["generate", "hi", "--method", "pld", "--max-draft", "0"], "max-draft"),
        (["generate", "hi", "--tree-nodes", "-1"], "tree_nodes"),
        (["generate", "hi", "--tree-topk", "99"], "tree_topk"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle):
    proc = run(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("joey: error:"), proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr


def test_corrupt_gguf_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    proc = subprocess.run(
        [sys.executable, "-m", "joey", "generate", "hi", "--model", str(bad)],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "JOEY_CACHE": str(tmp_path)},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("joey: error:")
    assert "Traceback" not in proc.stderr


def test_generate_json_on_default_model(default_source):
    proc = run("generate", "Say hello.", "--max-new-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"text", "token_ids", "new_tokens", "wall_time_s", "tokens_per_s", "method", "steps",
                "mean_accepted_tokens"}
    assert expected <= out.keys()
    assert out["method"] == "pld" and 1 <= out["new_tokens"] <= 8 and len(out["token_ids"]) == out["new_tokens"]


def test_info_on_default_model(default_source):
    proc = run("info")
    assert proc.returncode == 0, proc.stderr
    assert "smollm2-135m" in proc.stdout and "float32" in proc.stdout and "llama" in proc.stdout
    assert "verify cost (ms)" in proc.stdout and "k=64" in proc.stdout and "tree nodes (auto)" in proc.stdout


def test_chat_keeps_history_and_quits(default_source):
    proc = subprocess.run(
        [sys.executable, "-m", "joey", "chat", "-n", "6"],
        input="My name is Ada.\nWhat is my name?\n/exit\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("> ") >= 3  # a prompt per turn, then the one answered by /exit
    assert proc.stderr.count("tokens/s]") == 2


def test_rejection_sampling_is_an_explicit_option():
    from joey.cli import _params, build_parser

    args = build_parser().parse_args(["generate", "hi", "-t", "0.8", "--rejection-sampling"])
    assert _params(args).rejection and not _params(args).exact
    plain = build_parser().parse_args(["generate", "hi", "-t", "0.8"])
    assert not _params(plain).rejection and _params(plain).exact
