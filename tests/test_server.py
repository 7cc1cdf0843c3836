"""``joey serve`` on loopback, started by each test and stopped at its end (bounded waits everywhere):
the official ``openai`` client for chat and completions, streaming and not; concurrent greedy
requests each identical to the request run alone; cancellation, 429, 401, bad requests in OpenAI's
error shape, a failing request that leaves the others alone, /health while loading, /metrics."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import uvicorn  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from joey.config import SpecConfig  # noqa: E402
from joey.detokenize import IncrementalText  # noqa: E402
from joey.server import JoeyServer, ServerSettings  # noqa: E402

PROMPTS = ["one two three one two three one two", "Repeat: the cat sat on the mat, the cat sat", "Hi there",
           "Write a poem about cats.", "alpha beta gamma delta"]
WAIT_S = 60  # every wait in this file gives up after this long


@contextmanager
def running(load, **settings) -> Iterator[tuple[str, JoeyServer]]:
    """A live server on 127.0.0.1 (a free port) in a thread; yields its base URL once /health is 200."""
    server = JoeyServer(load, ServerSettings(**settings))
    runner = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not (runner.started and runner.servers) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert runner.started, "the server did not start"
        port = runner.servers[0].sockets[0].getsockname()[1]
        yield f"127.0.0.1:{port}", server
    finally:
        runner.should_exit = True
        thread.join(WAIT_S)


def wait_ready(server: JoeyServer) -> None:
    assert server.ready.wait(WAIT_S), server.load_error


def call(host: str, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """One HTTP request with the standard library; returns (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection(host, timeout=WAIT_S)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except json.JSONDecodeError:
        return resp.status, text


def client(host: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{host}/v1", api_key=key, max_retries=0, timeout=WAIT_S)


@pytest.fixture(scope="module")
def live(engine):
    # Kangaroo trees with no confidence stop nor budget: every step drafts, so the speculative counters move
    spec = SpecConfig(threshold=0.0, tree_nodes=6, tree_topk=2, adaptive=False)
    with running(lambda: engine, method="kangaroo", spec=spec, max_batch=8, max_queue=64) as (host, server):
        wait_ready(server)
        yield host, server


def test_chat_and_completions_through_the_openai_client(live, engine):
    host, server = live
    model = client(host).models.list().data[0].id
    messages = [{"role": "user", "content": PROMPTS[1]}]
    want = engine.generate(messages, max_new_tokens=12, ignore_eos=True)
    chat = client(host).chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == want.text and chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 12 and chat.usage.prompt_tokens == want.prompt_tokens
    spec = chat.model_extra["speculative"]
    assert spec["method"] == "kangaroo" and spec["draft_tokens"] > 0 and spec["steps"] <= 12
    assert 0 < len(spec["acceptance_by_position"]) <= 6

    stream = client(host).chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12

    raw = engine.generate(PROMPTS[0], chat=False, max_new_tokens=10, ignore_eos=True)
    comp = client(host).completions.create(model=model, prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert comp.choices[0].text == raw.text and comp.usage.completion_tokens == 10
    pieces = client(host).completions.create(model=model, prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in pieces if c.choices) == raw.text


def _model(host: str) -> str:
    return client(host).models.list().data[0].id


def _stream_text(host: str, prompt: str, max_tokens: int, **kw) -> str:
    stream = client(host).chat.completions.create(
        model=_model(host), messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, extra_body={"ignore_eos": True}, **kw)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_32_concurrent_streams_each_equal_the_request_alone(live):
    host, _ = live
    cases = [(PROMPTS[i % 5], 6 + i % 7) for i in range(32)]
    alone = {case: _stream_text(host, *case) for case in set(cases)}
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda case: _stream_text(host, *case), cases))
    assert together == [alone[case] for case in cases]
    assert all(together)


def _metrics(host: str) -> dict[str, float]:
    status, text = call(host, "GET", "/metrics")
    assert status == 200
    return {f"{s.name}{sorted(s.labels.items())}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("joey:")}


def _value(metrics: dict[str, float], name: str, **labels) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(name + "[")
               and all(f"('{a}', '{b}')" in k for a, b in labels.items()))


def test_metrics_parse_and_move(live):
    host, _ = live
    before = _metrics(host)
    _stream_text(host, PROMPTS[0], 16)
    after = _metrics(host)
    for name in ("joey:generation_tokens_total", "joey:prompt_tokens_total", "joey:spec_decode_num_drafts_total",
                 "joey:spec_decode_num_draft_tokens_total", "joey:time_to_first_token_seconds_count",
                 "joey:inter_token_latency_seconds_count", "joey:e2e_request_latency_seconds_count"):
        assert _value(after, name) > _value(before, name), name
    assert _value(after, "joey:generation_tokens_total") - _value(before, "joey:generation_tokens_total") == 16
    assert _value(after, "joey:request_success_total", finished_reason="length") == \
        _value(before, "joey:request_success_total", finished_reason="length") + 1
    accepted = _value(after, "joey:spec_decode_num_accepted_tokens_total")
    assert accepted == _value(after, "joey:spec_decode_num_accepted_tokens_per_pos_total")
    assert _value(after, "joey:num_requests_running") == 0


def _wait(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_client_that_disconnects_frees_its_row(live, monkeypatch):
    host, server = live
    # steps slowed to >= 50 ms: the 400 tokens then take seconds, so on a loaded machine the row cannot
    # finish by length before the server notices the client left
    step = server.worker.batch.step

    def slow_step():
        time.sleep(0.05)
        return step()
    monkeypatch.setattr(server.worker.batch, "step", slow_step)
    before = _value(_metrics(host), "joey:request_success_total", finished_reason="cancelled")
    stream = client(host).chat.completions.create(
        model=_model(host), messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=400, temperature=0,
        stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it), next(it)
    _wait(lambda: len(server.worker.batch.active) == 1, "the row to run")
    stream.close()  # the client goes away mid-stream
    # in_flight drops after the metrics saw the row's last event (batch.active empties before that)
    _wait(lambda: server.worker.in_flight == 0, "the row to leave")
    after = _value(_metrics(host), "joey:request_success_total", finished_reason="cancelled")
    assert after == before + 1 and not server.worker.batch.active


def test_past_the_batch_and_queue_a_request_gets_429_at_once(engine):
    with running(lambda: engine, method="ar", max_batch=1, max_queue=1) as (host, server):
        wait_ready(server)
        streams = [client(host).chat.completions.create(
            model=_model(host), messages=[{"role": "user", "content": p}], max_tokens=450, temperature=0,
            stream=True, extra_body={"ignore_eos": True}) for p in PROMPTS[2:3]]
        next(iter(streams[0]))  # running
        waiting = threading.Thread(target=lambda: _stream_text(host, PROMPTS[4], 2), daemon=True)
        waiting.start()
        _wait(lambda: server.worker.in_flight == 2, "the second request to queue")
        start = time.monotonic()
        status, body = call(host, "POST", "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded" and time.monotonic() - start < 5
        streams[0].close()
        waiting.join(WAIT_S)
        assert not waiting.is_alive()


def test_an_api_key_guards_every_v1_route(engine):
    with running(lambda: engine, method="ar", api_key="sesame") as (host, server):
        wait_ready(server)
        for path, method in (("/v1/models", "GET"), ("/v1/chat/completions", "POST"), ("/v1/completions", "POST")):
            status, body = call(host, method, path, {})
            assert status == 401 and body["error"]["code"] == "invalid_api_key"
            status, _ = call(host, method, path, {}, headers={"Authorization": "Bearer wrong"})
            assert status == 401
        assert call(host, "GET", "/health")[0] == 200
        with pytest.raises(openai.AuthenticationError):
            client(host, "nope").models.list()
        assert client(host, "sesame").models.list().data[0].id == server.model_name


def _chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **fields}


BAD = [  # (name, path, body or raw bytes, status, param, code)
    ("malformed JSON", "/v1/chat/completions", b'{"messages": [', 400, None, None),
    ("not an object", "/v1/chat/completions", [1, 2], 400, None, None),
    ("no messages", "/v1/chat/completions", {"max_tokens": 4}, 400, "messages", None),
    ("empty messages", "/v1/chat/completions", _chat(messages=[]), 400, "messages", None),
    ("messages not a list", "/v1/chat/completions", _chat(messages="hi"), 400, "messages", None),
    ("message without role", "/v1/chat/completions", _chat(messages=[{"content": "hi"}]), 400, "messages.0.role",
     None),
    ("unknown role", "/v1/chat/completions", _chat(messages=[{"role": "robot", "content": "hi"}]), 400,
     "messages.0.role", None),
    ("content of wrong type", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": 5}]), 400,
     "messages.0.content", None),
    ("blank content", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "  "}]), 400, "messages",
     None),
    ("temperature as a string", "/v1/chat/completions", _chat(temperature="0.5"), 400, "temperature", None),
    ("temperature too high", "/v1/chat/completions", _chat(temperature=5), 400, "temperature", None),
    ("top_p zero", "/v1/chat/completions", _chat(top_p=0), 400, "top_p", None),
    ("top_k below -1", "/v1/chat/completions", _chat(top_k=-2), 400, "top_k", None),
    ("max_tokens zero", "/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens", None),
    ("max_tokens as a string", "/v1/chat/completions", _chat(max_tokens="10"), 400, "max_tokens", None),
    ("n > 1", "/v1/chat/completions", _chat(n=2), 400, "n", None),
    ("logprobs", "/v1/chat/completions", _chat(logprobs=True), 400, "logprobs", None),
    ("stream not a bool", "/v1/chat/completions", _chat(stream="yes"), 400, "stream", None),
    ("empty stop string", "/v1/chat/completions", _chat(stop=[""]), 400, "stop", None),
    ("stream_options without stream", "/v1/chat/completions", _chat(stream_options={"include_usage": True}), 400,
     "stream_options", None),
    ("unknown model", "/v1/chat/completions", _chat(model="gpt-5"), 404, "model", "model_not_found"),
    ("prompt longer than the context", "/v1/completions", {"prompt": "word " * 600}, 400, "prompt",
     "context_length_exceeded"),
    ("no prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt", None),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt", None),
    ("two prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", None),
    ("token id out of range", "/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt", None),
    ("unknown route", "/v1/embeddings", {"input": "x"}, 404, None, "not_found"),
]


@pytest.mark.parametrize("name,path,body,status,param,code", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(live, name, path, body, status, param, code):
    host, _ = live
    raw = body if isinstance(body, bytes) else None
    got, reply = call(host, "POST", path, None if raw else body, raw=raw)
    assert got == status, reply
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    assert err["param"] == param and err["code"] == code
    assert err["type"] == "invalid_request_error"


def test_a_request_that_fails_in_the_engine_gets_500_and_the_others_go_on(live, monkeypatch):
    host, _ = live
    push = IncrementalText.push

    def failing_push(self, ids):  # a request whose detokenizer breaks (marked by its stop string)
        if "BOOM" in self.stop:
            raise RuntimeError("detokenizer broke")
        return push(self, ids)

    monkeypatch.setattr(IncrementalText, "push", failing_push)
    want = _stream_text(host, PROMPTS[1], 20)
    with ThreadPoolExecutor(2) as pool:
        other = pool.submit(_stream_text, host, PROMPTS[1], 20)
        status, body = call(host, "POST", "/v1/chat/completions", _chat(stop=["BOOM"], max_tokens=20))
        assert status == 500 and body["error"]["type"] == "server_error" and "detokenizer broke" in body["error"][
            "message"]
        assert other.result(WAIT_S) == want
    assert call(host, "GET", "/health")[0] == 200


def test_health_says_503_while_the_model_loads(engine):
    release = threading.Event()

    def slow_load():
        assert release.wait(WAIT_S)
        return engine

    with running(slow_load, method="ar") as (host, server):
        assert call(host, "GET", "/health") == (503, {"status": "loading"})
        status, body = call(host, "POST", "/v1/chat/completions", _chat())
        assert status == 503 and body["error"]["code"] == "model_loading"
        release.set()
        wait_ready(server)
        assert call(host, "GET", "/health")[0] == 200
        assert call(host, "POST", "/v1/chat/completions", _chat())[0] == 200


def test_joey_serve_refuses_bad_arguments_and_a_missing_model_in_one_line(capsys):
    from joey.cli import main

    assert main(["serve", "--max-batch", "0"]) == 2
    assert main(["serve", "--model", "/nonexistent/model.gguf", "--port", "0", "--log-level", "error"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("joey: error: --max-batch") and err[-1].startswith("joey: error:")
    assert "nonexistent" in err[-1] and "Traceback" not in "".join(err)
