"""What one target forward costs as it verifies more tokens, per weight format, and batched AR throughput.

Speculative decoding on a CPU lives or dies on the ratio cost(forward of k tokens) / cost(forward
of 1 token): this prints it after 128 cached tokens (joey.budget.measure, the curve the engine
sizes its drafts from) for each weight format and for plain PyTorch (MKL) fp32 linears, then the
total tokens/s of batched greedy AR in the default format.

    python benchmarks/step_cost.py [--weights fp32,bf16,int8,int4,auto] [--repeats 9]
"""

from __future__ import annotations

import argparse
import time

import torch

import joey
from joey.budget import CONTEXT, cpu_name, measure

TOKENS = (1, 2, 4, 8, 16, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="fp32,bf16,int8,int4,auto", help="comma-separated weight formats")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    rows = []
    for fmt in ["plain", *(w.strip() for w in args.weights.split(",") if w.strip())]:
        eng = joey.load(progress=False, prepack=fmt != "plain", weights="fp32" if fmt == "plain" else fmt)
        m = eng.model
        name = m.weight_format + (" (auto)" if fmt == "auto" else "")
        if fmt == "plain":
            name = "plain torch fp32 linears (MKL)"
        rows.append((name, m.weight_bytes() / 1e6, measure(m, TOKENS, args.repeats).ms))
        del eng
    print(f"Forward of k new tokens after {CONTEXT} cached, default model, {cpu_name()}, "
          f"{torch.get_num_threads()} threads (median of {args.repeats})\n")
    print("| weights | MB read per token | " + " | ".join(f"k={k}" for k in TOKENS) + " |")
    print("|---|---:|" + "---:|" * len(TOKENS))
    for name, mb, ms in rows:
        print(f"| {name} | {mb:.0f} | " + " | ".join(f"{v:.1f} ms ({v / ms[0]:.2f}×)" for v in ms) + " |")

    eng = joey.load(progress=False)
    prompts = ["Write a short poem about the sea.", "Explain how vaccines work.", "List five fruits.",
               "Describe a cat.", "What is gravity?", "Give me a recipe for pancakes.",
               "Why do leaves change color?", "Tell a joke about computers."]
    eng.generate(prompts[:2], max_new_tokens=4, ignore_eos=True)  # warm-up
    print("\n| batch | total tok/s (greedy AR, 64 new tokens per row) |\n|---:|---:|")
    for b in args.batches:
        batch = [prompts[i % len(prompts)] for i in range(b)]
        start = time.perf_counter()
        gens = eng.generate(batch, max_new_tokens=64, ignore_eos=True)
        seconds = time.perf_counter() - start
        print(f"| {b} | {sum(g.new_tokens for g in gens) / seconds:.1f} |")


if __name__ == "__main__":
    main()
