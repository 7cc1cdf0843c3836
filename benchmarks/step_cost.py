"""What one target forward costs as it verifies more tokens, per weight format; prefill and batched AR throughput.

Speculative decoding on a CPU lives or dies on the ratio cost(forward of k tokens) / cost(forward
of 1 token): this prints it after 128 cached tokens (joey.budget.measure, the curve the engine
sizes its drafts from) for each weight format ("plain": PyTorch's MKL fp32 linears), the prefill
speed of a long prompt, then the total tokens/s of batched greedy AR in the default format.

    python benchmarks/step_cost.py [--model NAME] [--weights plain,fp32,bf16,int8,int4,auto] [--repeats 9]
"""

from __future__ import annotations

import argparse
import time

import torch

import joey
from joey.budget import CONTEXT, measure
from joey.measurements import cpu_name

TOKENS = (1, 2, 4, 8, 16, 32)


def prefill_speed(model: torch.nn.Module, n: int, repeats: int = 3) -> float:
    """Tokens/s of one prefill of an ``n``-token prompt (the median of ``repeats``)."""
    ids = torch.randint(100, model.cfg.vocab_size - 1, (1, n), generator=torch.Generator().manual_seed(1))
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            cache = model.new_cache(1, n)
            start = time.perf_counter()
            hidden = model.run_layers(model.embed(ids), torch.arange(n)[None], cache, 0, n)
            model.logits(hidden[:, -1:])  # as a prefill does: the head for the last position only
            times.append(time.perf_counter() - start)
    return n / sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a known name, .gguf file or HF folder (default: the default model)")
    ap.add_argument("--weights", default="plain,fp32,bf16,int8,int4,auto",
                    help="comma-separated weight formats (plain = PyTorch's own fp32 linears)")
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    rows = []
    for fmt in (w.strip() for w in args.weights.split(",") if w.strip()):
        eng = joey.load(args.model, progress=False, prepack=fmt != "plain", weights="fp32" if fmt == "plain" else fmt,
                        adapter=False, head=False)
        m = eng.model
        name = m.weight_format + (" (auto)" if fmt == "auto" else "")
        if fmt == "plain":
            name = "plain torch fp32 linears (MKL)"
        rows.append((name, m.weight_bytes() / 1e6, measure(m, TOKENS, args.repeats).ms, prefill_speed(m, args.prefill)))
        model_name = eng.name
        del eng
    print(f"Forward of k new tokens after {CONTEXT} cached, {model_name}, {cpu_name()}, "
          f"{torch.get_num_threads()} threads (median of {args.repeats})\n")
    print("| weights | MB read per token | " + " | ".join(f"k={k}" for k in TOKENS) + f" | prefill of {args.prefill} |")
    print("|---|---:|" + "---:|" * (len(TOKENS) + 1))
    for name, mb, ms, pre in rows:
        print(f"| {name} | {mb:.0f} | " + " | ".join(f"{v:.1f} ms ({v / ms[0]:.2f}×)" for v in ms)
              + f" | {pre:.0f} tok/s |")

    eng = joey.load(args.model, progress=False, adapter=False, head=False)
    prompts = ["Write a short poem about the sea.", "Explain how vaccines work.", "List five fruits.",
               "Describe a cat.", "What is gravity?", "Give me a recipe for pancakes.",
               "Why do leaves change color?", "Tell a joke about computers."]
    eng.generate(prompts[:2], max_new_tokens=4, ignore_eos=True, method="ar")  # warm-up
    print("\n| batch | total tok/s (greedy AR, 64 new tokens per row) |\n|---:|---:|")
    for b in args.batches:
        batch = [prompts[i % len(prompts)] for i in range(b)]
        start = time.perf_counter()
        gens = eng.generate(batch, max_new_tokens=64, ignore_eos=True, method="ar")
        seconds = time.perf_counter() - start
        print(f"| {b} | {sum(g.new_tokens for g in gens) / seconds:.1f} |")


if __name__ == "__main__":
    main()
