"""Bad input to the public API and the CLI: a JoeyError (a one-line message naming the argument) or
exit status 2 with one line on stderr, never a raw TypeError or a traceback. The server's malformed
requests have their own table (tests/test_server.py: BAD)."""

from __future__ import annotations

import pytest

import joey
from joey.cli import main
from joey.config import SamplingParams
from joey.continuous import ContinuousBatch
from joey.errors import InvalidArgumentError, JoeyError, PromptError

NAN = float("nan")
# (keywords of generate("Hi", ...), the error's type, its exact message or a prefix ending in "...")
GENERATE = [
    ({"temperature": "hot"}, InvalidArgumentError, "temperature must be a number >= 0, got 'hot'"),
    ({"temperature": -1}, InvalidArgumentError, "temperature must be a number >= 0, got -1"),
    ({"temperature": NAN}, InvalidArgumentError, "temperature must be a number >= 0, got nan"),
    ({"top_p": 0}, InvalidArgumentError, "top_p must be a number in (0, 1], got 0"),
    ({"top_p": "x"}, InvalidArgumentError, "top_p must be a number in (0, 1], got 'x'"),
    ({"top_k": -1}, InvalidArgumentError, "top_k must be an integer >= 0 (0 disables it), got -1"),
    ({"top_k": 1.5}, InvalidArgumentError, "top_k must be an integer >= 0 (0 disables it), got 1.5"),
    ({"max_new_tokens": 0}, InvalidArgumentError, "max_new_tokens must be an integer >= 1, got 0"),
    ({"max_new_tokens": "5"}, InvalidArgumentError, "max_new_tokens must be an integer >= 1, got '5'"),
    ({"max_new_tokens": True}, InvalidArgumentError, "max_new_tokens must be an integer >= 1, got True"),
    ({"stop": 5}, InvalidArgumentError, "stop must be a non-empty string or a list of them, got 5"),
    ({"stop": [""]}, InvalidArgumentError, "stop must be a non-empty string or a list of them, got ['']"),
    ({"seed": "x"}, InvalidArgumentError, "seed must be a 64-bit integer or None, got 'x'"),
    ({"seed": 2**70}, InvalidArgumentError, f"seed must be a 64-bit integer or None, got {2**70}"),
    ({"ignore_eos": "yes"}, InvalidArgumentError, "ignore_eos must be true or false, got 'yes'"),
    ({"foo": 1}, InvalidArgumentError, "unknown keyword 'foo'; sampling keywords are ignore_eos, max_new_tokens, "
     "rejection, seed, stop, temperature, top_k, top_p"),
    ({"method": "medusa"}, InvalidArgumentError, "unknown method 'medusa'; choose from ar, pld, sps, ..."),
    ({"batch_mode": "diagonal"}, InvalidArgumentError, "unknown batch mode 'diagonal'; choose from packed, padded"),
    ({"max_draft": 0}, InvalidArgumentError, "max_draft must be an integer in [1, 64], got 0"),
    ({"threshold": 2}, InvalidArgumentError, "threshold must be a number in [0, 1], got 2"),
    ({"tree_nodes": -1}, InvalidArgumentError, "tree_nodes must be an integer in [0, 128], got -1"),
    ({"tree_topk": 99}, InvalidArgumentError, "tree_topk must be an integer in [0, 16], got 99"),
    ({"adaptive": "no"}, InvalidArgumentError, "adaptive must be true or false, got 'no'"),
    ({"chat": "yes"}, InvalidArgumentError, "chat must be true or false, got 'yes'"),
    ({"params": "greedy"}, InvalidArgumentError, "params must be a SamplingParams, got str"),
    ({"method": "sps"}, InvalidArgumentError, "method 'sps' needs a draft model: joey.load(..., draft_model=...)"),
]
PROMPTS = [
    (5, InvalidArgumentError, "a prompt must be a string, a list of messages or a list of prompts, got int"),
    ("", PromptError, "the prompt is empty"),
    ("   ", PromptError, "the prompt is empty"),
    ([], PromptError, "no prompt given"),
    ([5], InvalidArgumentError, "a prompt must be a string or a list of messages, got int"),
    ([{"role": "wizard", "content": "hi"}], InvalidArgumentError,
     "message 0 has role 'wizard'; roles are system, user, assistant"),
    ([{"role": "user"}], InvalidArgumentError, "each message needs string 'role' and 'content' fields"),
    ([{"role": "user", "content": ""}], PromptError, "the prompt is empty"),
]
LOAD = [
    ({"weights": "int3"}, InvalidArgumentError,
     "unknown weight format 'int3'; choose from auto, fp32, bf16, int8, int4"),
    ({"adapter": 5}, InvalidArgumentError, "adapter must be a file path, None or True (the shipped one) or False "
     "(none), got 5"),
    ({"prepack": "yes"}, InvalidArgumentError, "prepack must be true or false, got 'yes'"),
    ({"device": "gpu9"}, InvalidArgumentError, "unknown device 'gpu9'"),
    ({"dtype": "fp8"}, InvalidArgumentError, "unknown dtype 'fp8'; choose from ..."),
    ({"model": 5}, InvalidArgumentError, "model must be a model name, a folder or a .gguf path, got int"),
    ({"model": "no-such-model-anywhere"}, JoeyError, "..."),
    ({"head": "/nonexistent/head.safetensors", "model": None}, JoeyError, "Jakiro head file not found: ..."),
]


def _matches(message: str, want: str) -> bool:
    return message.startswith(want[:-3]) if want.endswith("...") else message == want


@pytest.mark.parametrize("kwargs,kind,want", GENERATE, ids=[repr(k) for k, _, _ in GENERATE])
def test_generate_refuses_bad_arguments(tiny_engine, kwargs, kind, want):
    with pytest.raises(kind) as err:
        tiny_engine.generate("Hi", **kwargs)
    assert _matches(str(err.value), want) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("prompt,kind,want", PROMPTS, ids=[repr(p) for p, _, _ in PROMPTS])
def test_generate_refuses_bad_prompts(tiny_engine, prompt, kind, want):
    with pytest.raises(kind) as err:
        tiny_engine.generate(prompt, max_new_tokens=2)
    assert _matches(str(err.value), want), str(err.value)


@pytest.mark.parametrize("kwargs,kind,want", LOAD, ids=[repr(k) for k, _, _ in LOAD])
def test_load_refuses_bad_arguments(kwargs, kind, want):
    with pytest.raises(kind) as err:
        joey.load(**{"progress": False, **kwargs})
    assert _matches(str(err.value), want) and "\n" not in str(err.value), str(err.value)


def test_continuous_batch_refuses_bad_requests(tiny_engine):
    batch = ContinuousBatch(tiny_engine, "ar")
    vocab = tiny_engine.model.cfg.vocab_size
    cases = [
        (([],), PromptError, "the prompt is empty"),
        ((["a"],), InvalidArgumentError, "prompt_ids must be a list of token ids (ints); Engine.encode makes one"),
        (("abc",), InvalidArgumentError, "prompt_ids must be a list of token ids (ints); Engine.encode makes one"),
        (([vocab],), InvalidArgumentError, f"prompt_ids holds a token id outside the vocabulary [0, {vocab})"),
        (([1], SamplingParams(), [1]), InvalidArgumentError, "key must be hashable, got list"),
        (([1], {"temperature": 1}), InvalidArgumentError, "params must be a SamplingParams, got dict"),
    ]
    for args, kind, want in cases:
        with pytest.raises(kind) as err:
            batch.add(*args)
        assert str(err.value) == want
    assert not batch.busy  # nothing was queued


CLI = [
    (["generate", "Hi", "--temperature", "-1"], "temperature must be a number >= 0, got -1.0"),
    (["generate", ""], "the prompt is empty"),
    (["generate", "Hi", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
    (["generate", "Hi", "--method", "medusa"], "argument --method: invalid choice: 'medusa' ..."),
    (["generate", "Hi", "--weights", "int3"], "argument --weights: invalid choice: 'int3' ..."),
    (["info", "--model", "no-such-model-anywhere"], "..."),
]


@pytest.mark.parametrize("argv,want", CLI, ids=[" ".join(a) for a, _ in CLI])
def test_cli_refuses_bad_input_in_one_line(argv, want, capsys, tiny_folder):
    if argv[0] == "generate":
        argv = [*argv, "--model", str(tiny_folder)]
    with pytest.raises(SystemExit) as code:
        raise SystemExit(main(argv))
    assert code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1]
    assert last.startswith("joey: error: ") or "error:" in last, err
    message = last.split("error: ", 1)[1]
    assert _matches(message, want), last
    assert not any("Traceback" in line for line in err)
