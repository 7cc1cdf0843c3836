"""Two versions of joey's code, same machine, same run: decoding speed of each and whether their
tokens agree. For changes that must not change speed or output (a restructuring): the revisions run
interleaved (A, B, A, B, ...) in fresh processes, each loading the default model and generating for
fixed prompts with every method at batch 1 and batch 4.

    python benchmarks/code_ab.py --before c772153 --after WORKTREE --repeats 3

``--before`` / ``--after``: a git revision (checked out into a temporary worktree) or ``WORKTREE``
(the files as they are now). Prints per method and batch size: tok/s of each side (median of the
repeats, with min-max), the after/before ratio, and whether the greedy tokens were identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Explain in three sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Summarize: The city council met on Tuesday to discuss the new park. Residents asked for more trees, "
    "benches and a playground; the council agreed to fund the trees this year and the rest next year.",
    "Translate to French: The weather is nice today and we are going to the beach.",
    "What is 17 times 23? Think step by step.",
    "List five uses of a paperclip.",
    "Give a short definition of photosynthesis.",
    "Write a haiku about autumn leaves.",
]
METHODS = ("ar", "pld", "jakiro", "kangaroo")
BATCHES = (1, 4)


def child(max_new: int) -> None:
    """Run in a fresh process with the version under test first on sys.path; prints one JSON line."""
    import joey

    engine = joey.load(progress=False)
    engine.generate(PROMPTS[0], max_new_tokens=8, method="ar")  # warm-up: kernels, curve cache
    out = {"joey": str(Path(joey.__file__).parent)}
    for method in METHODS:
        for b in BATCHES:
            start = time.perf_counter()
            tokens = 0
            digest = hashlib.sha256()
            for i in range(0, len(PROMPTS), b):
                gens = engine.generate(PROMPTS[i : i + b], max_new_tokens=max_new, method=method)
                for g in gens:
                    tokens += g.new_tokens
                    digest.update(repr(g.token_ids).encode())
            out[f"{method}@{b}"] = {"tok_s": tokens / (time.perf_counter() - start), "tokens": digest.hexdigest()[:16]}
    print(json.dumps(out))


def checkout(rev: str, tmp: Path) -> Path:
    """A folder holding revision ``rev`` of this repository (``WORKTREE``: this checkout itself)."""
    if rev == "WORKTREE":
        return ROOT
    folder = tmp / rev
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), rev], check=True,
                   capture_output=True)
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", default="WORKTREE")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.max_new_tokens)
        return 0
    from joey.measurements import cpu_name

    results: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"before": checkout(args.before, Path(tmp)), "after": checkout(args.after, Path(tmp))}
        try:
            for r in range(args.repeats):
                for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                    env = {**os.environ, "PYTHONPATH": str(folders[side])}
                    run = subprocess.run([sys.executable, __file__, "--child", "--before", "-",
                                          "--max-new-tokens", str(args.max_new_tokens)],
                                         env=env, capture_output=True, text=True, check=True)
                    results[side].append(json.loads(run.stdout.strip().splitlines()[-1]))
                    print(f"repeat {r + 1} {side}: {results[side][-1]['joey']}", file=sys.stderr)
        finally:
            for folder in folders.values():
                if folder != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)],
                                   capture_output=True)
    print(f"# {args.before} → {args.after}, {cpu_name()}, {os.cpu_count()} cores, {args.repeats} repeats "
          f"interleaved, {len(PROMPTS)} prompts x {args.max_new_tokens} tokens, default model")
    print("| method | batch | before tok/s (min-max) | after tok/s (min-max) | after/before | same tokens |")
    print("|---|---:|---:|---:|---:|---|")
    for method in METHODS:
        for b in BATCHES:
            key = f"{method}@{b}"
            before = [r[key]["tok_s"] for r in results["before"]]
            after = [r[key]["tok_s"] for r in results["after"]]
            same = len({r[key]["tokens"] for side in results.values() for r in side}) == 1
            print(f"| {method} | {b} | {statistics.median(before):.1f} ({min(before):.1f}-{max(before):.1f}) | "
                  f"{statistics.median(after):.1f} ({min(after):.1f}-{max(after):.1f}) | "
                  f"{statistics.median(after) / statistics.median(before):.3f} | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
