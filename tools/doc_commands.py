"""Run every command that README.md and docs/ show, as written, and report what each did.

``tests/test_docs.py`` checks in CI that these commands parse; this script runs them, for the
issue's "every command in README and docs runs". A command runs in the repository root with the
project's virtual environment first on PATH, for at most ``--cap`` seconds: past that it is
stopped and reported as *running at the cap* (a benchmark or training run of hours started and
went on without an error; its result is not waited for). Servers (``joey serve``, ``serve run``)
run until ``/health`` answers, the page's ``curl`` lines are sent to them, and they are stopped.
Commands that cannot run on one CPU machine as written (placeholders such as ``FOLDER`` or
``HEAD_IP``, a Ray cluster, GPUs) are listed as *not run* with the reason.

    python tools/doc_commands.py [--cap 60] [--only PATTERN] [--out bench_out/doc_commands.md]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import serve_load  # noqa: E402 (benchmarks/ is not a package: its server start and stop)

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# words that stand for something the reader supplies
PLACEHOLDERS = ("FOLDER", "data.jsonl", "path/to/", "HEAD_IP", "NODE_RANK", "HOST:", "$KEY", "alpaca.json")
TRAINED = ("runs/adapter/adapter.safetensors", "runs/head/head.safetensors")
NOT_HERE = {  # a prefix of the command line → why it does not run on one CPU machine as written
    "ray start": "starts a Ray cluster node",
    "serve deploy": "needs a running Ray cluster",
    "./run.sh test": "the test suite itself (run by CI)",
    ". .venv/bin/activate": "a shell setting, not a command",
    "torchrun --nproc_per_node 8": "8 training processes",
    "torchrun --nnodes": "several machines",
    "accelerate launch": "8 training processes",
    "joey serve --replicas 4 --cpus-per-replica 4": "needs 16 CPU cores (joey refuses it on fewer, in one line)",
}
SLOW_START = ("pip install", "joey install")  # downloads: they get --install-cap
NEEDS_GPU = "--gpus-per-replica"


def commands(page: Path) -> list[list[str]]:
    """The command lines of a page's bash blocks (continuations joined, comments and env settings dropped)."""
    found = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", page.read_text(), re.S):
        if lang not in ("bash", "sh"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                argv = argv[1:]
            if argv:
                found.append(argv)
    return found


@dataclass(frozen=True)
class Outcome:
    page: str
    command: str
    result: str  # ok | running at the cap | needs a package | failed | not run
    seconds: float
    detail: str


def why_not(line: str) -> str | None:
    for prefix, reason in NOT_HERE.items():
        if line.startswith(prefix):
            return reason
    if any(p in line for p in TRAINED):
        return "reads what a training command above (a template) writes"
    if any(p in line for p in PLACEHOLDERS):
        return "a template: its placeholders are the reader's to fill"
    if NEEDS_GPU in line:
        return "needs GPUs"
    return None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env['PATH']}"
    return env


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:160] if lines else ""


def run_one(argv: list[str], cap: float, stdin: str = "") -> tuple[str, float, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=cap)
    except subprocess.TimeoutExpired:
        # Ctrl-C first: a benchmark stops the servers it started in sessions of their own
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return "running at the cap", time.perf_counter() - start, _last_line(err or out)
    took = time.perf_counter() - start
    if proc.returncode == 0:
        return "ok", took, _last_line(out or err)
    last = _last_line(err or out)
    if "pip install" in last:  # an optional package, named by joey's one-line error
        return "needs a package", took, last
    return "failed", took, f"exit {proc.returncode}: {last}"


def run_server(argv: list[str], curls: list[list[str]], start_cap: float) -> list[tuple[str, float, str]]:
    """Start a server, wait for /health, send it the page's curl lines, stop it (its whole process
    group), with the load benchmark's own helpers for the last two."""
    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else 8000
    log = ROOT / "bench_out" / "doc_commands_server.log"
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        serve_load.wait_ready(proc, f"http://127.0.0.1:{port}", "/health", start_cap, log)
        results = [("ok", time.perf_counter() - start, f"/health answered on port {port}")]
        results += [run_one(curl, 120) for curl in curls]
    except serve_load.ServerFailed as exc:
        results = [("failed", time.perf_counter() - start, str(exc))]
    finally:
        serve_load.stop(proc)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cap", type=float, default=60, help="seconds a command may run before it is stopped")
    ap.add_argument("--server-cap", type=float, default=240, help="seconds a server may take to answer /health")
    ap.add_argument("--install-cap", type=float, default=600, help="seconds for pip install / joey install")
    ap.add_argument("--only", default=None, help="run only commands containing this text")
    ap.add_argument("--out", default="bench_out/doc_commands.md")
    args = ap.parse_args()
    (ROOT / "bench_out").mkdir(exist_ok=True)
    outcomes: list[Outcome] = []
    done = 0  # outcomes printed
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        cmds = commands(page)
        curls = [c for c in cmds if c[0] == "curl"]
        for argv in cmds:
            line = shlex.join(argv)
            if argv[0] == "curl" or (args.only and args.only not in line):
                continue
            reason = why_not(line)
            if reason:
                outcomes.append(Outcome(name, line, "not run", 0.0, reason))
            elif argv[:2] == ["joey", "serve"] or argv[:2] == ["serve", "run"]:
                sent = curls if "--port" not in argv or "8000" in argv else []
                for i, (result, took, detail) in enumerate(run_server(argv, sent, args.server_cap)):
                    outcomes.append(Outcome(name, line if i == 0 else shlex.join(sent[i - 1]), result, took, detail))
            else:
                stdin = "Hi\n" if argv[:2] == ["joey", "chat"] else ""
                cap = args.install_cap if line.startswith(SLOW_START) else args.cap
                outcomes.append(Outcome(name, line, *run_one(argv, cap, stdin)))
            for o in outcomes[done:]:
                print(f"{o.result:>18}  {o.seconds:6.1f} s  {name}: {o.command[:100]}", flush=True)
            done = len(outcomes)
    rows = [f"| {o.page} | `{o.command[:140]}` | {o.result} | {o.seconds:.0f} s | {o.detail.replace('|', '/')} |"
            for o in outcomes]
    kinds = ("ok", "running at the cap", "needs a package", "failed", "not run")
    counts = {r: sum(o.result == r for o in outcomes) for r in kinds}
    text = "\n".join([
        f"# Commands of README.md and docs/, run as written (cap {args.cap:.0f} s)", "",
        ", ".join(f"{n} {r}" for r, n in counts.items()), "",
        "| page | command | result | time | detail |", "|---|---|---|---:|---|", *rows, ""])
    Path(ROOT / args.out).write_text(text)
    print(f"\n{text.splitlines()[2]}\nwrote {args.out}")


if __name__ == "__main__":
    main()
