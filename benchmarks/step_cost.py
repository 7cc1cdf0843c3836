"""What one target forward costs as it verifies more tokens, and batched AR throughput.

Speculative decoding on a CPU lives or dies on the ratio cost(forward of k tokens) / cost(forward
of 1 token): this prints it for k = 1..8 after a cached prefix, for joey's oneDNN pre-packed
weights and for plain PyTorch (MKL) linears, then the total tokens/s of batched greedy AR.

    python benchmarks/step_cost.py [--context 100] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import joey
from joey.batching import causal_mask
from joey.models.llama import LlamaModel


def forward_ms(model: LlamaModel, context: int, k: int, repeats: int) -> float:
    """Median ms of a forward of k new tokens after ``context`` cached ones (the cache is reused)."""
    cache = model.new_cache(1, context + k)
    ids = torch.randint(100, 10000, (1, context + k), generator=torch.Generator().manual_seed(0))
    model(ids[:, :context], torch.arange(context)[None], cache, 0, context, None)
    mask = None if k == 1 else causal_mask([context], k, context + k, "cpu")
    pos = torch.arange(context, context + k)[None]
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        model(ids[:, context:], pos, cache, context, context + k, mask)
        if i >= 2:  # the first two calls warm up oneDNN's kernels for this shape
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    rows = []
    with torch.inference_mode():
        for prepack in (True, False):
            eng = joey.load(progress=False, prepack=prepack)
            ms = [forward_ms(eng.model, args.context, k, args.repeats) for k in range(1, 9)]
            rows.append(("oneDNN pre-packed (joey default)" if prepack else "plain torch linears (MKL)", ms))
            del eng
    print(f"Forward of k new tokens after {args.context} cached, default model, fp32, "
          f"{torch.get_num_threads()} threads (median of {args.repeats})\n")
    print("| weights | " + " | ".join(f"k={k}" for k in range(1, 9)) + " |")
    print("|---|" + "---:|" * 8)
    for name, ms in rows:
        print(f"| {name} | " + " | ".join(f"{m:.1f} ms ({m / ms[0]:.2f}×)" for m in ms) + " |")

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
