"""``joey serve --replicas 2`` on a local Ray Serve, run as the command itself in its own session
(a fresh Ray temp dir, dashboard and usage stats off, HTTP on 127.0.0.1 at a free port) with a tiny
model: answers equal the engine's own greedy output, streamed = whole, both replicas serve, a
client that leaves frees its row, overload gets 429, the API key guards /v1; Ctrl-C stops it and
no process of its session is left. Every wait is bounded. Plus the one-line errors, without Ray.
Only the live tests need Ray; they skip (saying why) where it cannot be imported."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import make_tiny

import joey
from joey.cli import main
from joey.errors import InvalidArgumentError

openai = pytest.importorskip("openai")

WAIT_S = 60  # every wait in this file gives up after this long
KEY = "sesame"
PROMPTS = ["Hi there", "one two three one two three", "Write a poem about cats."]
LONG = 4000  # tokens of a request that must still be running while the test acts (the tiny model allows 4096)


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("joey: error:") and "Traceback" not in err
    return err


def test_replicas_without_ray_is_a_one_line_error_naming_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    err = _one_line_error(capsys, ["serve", "--replicas", "2"])
    assert 'pip install "joey[ray]"' in err


@pytest.mark.parametrize("argv,says", [
    (["--replicas", "0"], "--replicas must be at least 1"),
    (["--replicas", "-2"], "--replicas must be at least 1"),
    (["--replicas", "2", "--cpus-per-replica", "-1"], "--cpus-per-replica"),
    (["--address", "auto"], "--address needs --replicas"),
    (["--gpus-per-replica", "1"], "--gpus-per-replica needs --replicas"),
])
def test_bad_replica_options_are_one_line_errors(capsys, argv, says):
    assert says in _one_line_error(capsys, ["serve", *argv])


# -- the live server ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session(sid: int) -> list[tuple[int, str]]:
    """(pid, command) of every process in session ``sid``: all that the server started."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True, timeout=WAIT_S).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    return [(int(r[0]), r[2] if len(r) > 2 else "") for r in rows if len(r) >= 2 and int(r[1]) == sid]


class Server:
    """``joey serve --replicas 2`` in a new session; ``stop`` is Ctrl-C, then kills whatever is left."""

    def __init__(self, model: Path, tmp: Path) -> None:
        self.port, self.tmp = _free_port(), tmp
        self.log = (tmp / "serve.log").open("w")
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "JOEY_API_KEY")}
        env["RAY_TMPDIR"] = str(tmp)  # a fresh Ray temp dir: nothing of another Ray session is seen or joined
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "joey", "serve", "--replicas", "2", "--model", str(model), "--method", "ar",
             "--host", "127.0.0.1", "--port", str(self.port), "--api-key", KEY, "--max-batch", "2",
             "--max-queue", "0", "--cpus-per-replica", "0.5", "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.host = f"127.0.0.1:{self.port}"
        self.leftovers: list[tuple[int, str]] | None = None
        self.model = ""  # the id it serves, once up

    def tail(self) -> str:
        return (self.tmp / "serve.log").read_text()[-3000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 2 * WAIT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"joey serve exited ({self.proc.returncode}):\n{self.tail()}"
            try:
                if call(self.host, "GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the replicas did not come up:\n{self.tail()}")

    def stop(self) -> int | None:
        if self.leftovers is not None:
            return self.proc.returncode
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
            try:
                self.proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(1)  # processes that exit on their own as the session ends
        self.leftovers = _session(self.proc.pid)
        for pid, _ in self.leftovers:  # whatever is left of the session it started: nothing may outlive the test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(WAIT_S)
        self.log.close()
        return self.proc.returncode


def call(host: str, method: str, path: str, body=None, key: str | None = KEY):
    """One HTTP request; returns (status, parsed JSON or text, headers)."""
    conn = http.client.HTTPConnection(host, timeout=WAIT_S)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text), resp.headers
    except json.JSONDecodeError:
        return resp.status, text, resp.headers


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, default_source) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny-ray"), "llama", default_source.folder, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def live(request):
    pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "joey[ray]")')
    tiny_model = request.getfixturevalue("tiny_model")
    tmp = Path(tempfile.mkdtemp(prefix="joey-ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    server = Server(tiny_model, tmp)
    try:
        server.wait_ready()
        server.model = client(server.host).models.list().data[0].id
        yield server
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def client(host: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{host}/v1", api_key=key, max_retries=0, timeout=WAIT_S)


def _chat(live: Server, prompt: str, max_tokens: int, stream: bool = False):
    return client(live.host).chat.completions.create(
        model=live.model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=stream, extra_body={"ignore_eos": True})


def _metrics(host: str) -> dict[tuple[str, str, str], float]:
    """(sample name, replica, finished_reason) → value, from the merged /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text, _ = call(host, "GET", "/metrics", key=None)
    assert status == 200
    return {(s.name, s.labels.get("replica", ""), s.labels.get("finished_reason", "")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name.startswith("joey:")}


def _wait(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def served_engine(tiny_model) -> joey.Engine:
    return joey.load(str(tiny_model), progress=False)  # as `joey serve --model` loads it


def test_answers_through_ray_equal_the_engine_and_streams_equal_whole_answers(live, served_engine):
    for prompt in PROMPTS:
        want = served_engine.generate([{"role": "user", "content": prompt}], max_new_tokens=12, ignore_eos=True).text
        whole = _chat(live, prompt, 12)
        assert whole.choices[0].message.content == want and whole.usage.completion_tokens == 12
        streamed = "".join(c.choices[0].delta.content or "" for c in _chat(live, prompt, 12, stream=True)
                           if c.choices)
        assert streamed == want
    raw = served_engine.generate(PROMPTS[1], chat=False, max_new_tokens=10, ignore_eos=True).text
    comp = client(live.host).completions.create(model=live.model, prompt=PROMPTS[1], max_tokens=10,
                                                temperature=0, extra_body={"ignore_eos": True})
    assert comp.choices[0].text == raw


def test_both_replicas_serve_the_same_answers_and_metrics_show_each(live, served_engine):
    want = served_engine.generate("Hi", chat=False, max_new_tokens=4, ignore_eos=True).text
    seen: set[str] = set()
    for _ in range(40):  # Ray picks a replica per request; bounded
        status, body, headers = call(live.host, "POST", "/v1/completions",
                                     {"prompt": "Hi", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert status == 200 and body["choices"][0]["text"] == want
        seen.add(headers["x-joey-replica"])
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen

    def both_counted() -> bool:  # any replica answers /metrics with all of them (others' as of their last push)
        tokens = {r for (name, r, _), v in _metrics(live.host).items() if name == "joey:generation_tokens_total"
                  and v > 0}
        return tokens >= seen

    _wait(both_counted, "both replicas' counters in /metrics")


def test_a_client_that_leaves_mid_stream_frees_its_row(live):
    def cancelled(replica: str) -> float:
        return _metrics(live.host).get(("joey:request_success_total", replica, "cancelled"), 0.0)

    stream = _chat(live, PROMPTS[2], LONG, stream=True)
    replica = stream.response.headers["x-joey-replica"]
    before = cancelled(replica)
    it = iter(stream)
    next(it), next(it), next(it)
    stream.close()  # the client goes away; the proxy cancels the request and the replica its row
    _wait(lambda: cancelled(replica) == before + 1, "the row to be cancelled")
    _wait(lambda: _metrics(live.host)[("joey:num_requests_running", replica, "")] == 0, "the row to leave")


def test_past_every_replica_and_the_proxy_queue_requests_get_429(live):
    # 2 replicas x (max batch 2 + queue 0) run 4 streams; the proxy holds max(1, --max-queue) = 1 more; the
    # rest get 429 at once. Sent one by one, so each finds the queue as the one before left it (Ray checks
    # its bound as a request arrives; it may refuse the first as well, never admit more than one).
    streams = [_chat(live, PROMPTS[i % 3], LONG, stream=True) for i in range(4)]
    results: list[tuple] = []

    def one() -> None:
        start = time.monotonic()
        status, body, headers = call(live.host, "POST", "/v1/chat/completions",
                                     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        results.append((status, body, headers, time.monotonic() - start))

    extra = [threading.Thread(target=one, daemon=True) for _ in range(4)]
    try:
        for s in streams:
            next(iter(s))  # all 4 rows run
        for t in extra:
            t.start()
            time.sleep(0.2)
        _wait(lambda: len(results) >= 3, "the requests past the queue to be refused")
    finally:
        for s in streams:
            s.close()
    for t in extra:
        t.join(WAIT_S)
    assert len(results) == 4
    refused = [r for r in results if r[0] == 429]
    assert len(refused) >= 3, [r[:2] for r in results]
    for _, body, headers, took in refused:
        assert took < 5 and headers["Retry-After"] == "1"
        assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "rate_limit_error"
    for status, body, _, _ in results:  # the one the proxy held was served once rows were free
        assert status == 429 or (status == 200 and body["choices"][0]["finish_reason"] == "length")


def test_the_api_key_guards_every_replica(live):
    for _ in range(6):  # several requests: Ray spreads them over both replicas
        status, body, _ = call(live.host, "GET", "/v1/models", key=None)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert call(live.host, "POST", "/v1/chat/completions", {}, key="wrong")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        client(live.host, "nope").models.list()
    assert call(live.host, "GET", "/health", key=None)[0] == 200


def test_ctrl_c_stops_it_and_leaves_no_ray_process(live):
    assert live.stop() == 0, live.tail()
    assert live.leftovers == [], f"processes left behind (now killed): {live.leftovers}"
    ps = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True, timeout=WAIT_S).stdout
    assert str(live.tmp) not in ps  # no raylet, gcs_server or worker of this Ray session anywhere


def test_the_documented_serve_config_builds_the_app():
    serve = pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "joey[ray]")')
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from joey.server.ray_serve import app_builder

    config = yaml.safe_load((Path(__file__).parent.parent / "docs" / "ray_serve_config.yaml").read_text())
    app = ServeDeploySchema.model_validate(config).applications[0]
    assert app.import_path == "joey.server.ray_serve:app_builder"
    assert isinstance(app_builder(app.args), serve.Application)
    with pytest.raises(InvalidArgumentError, match="Ray's"):
        app_builder({"model": "default", "port": 8000})
    with pytest.raises(InvalidArgumentError, match="--replicas"):
        app_builder({"replicas": 0})
