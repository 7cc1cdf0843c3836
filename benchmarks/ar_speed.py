"""Compare greedy autoregressive (AR) decoding speed on a model (default: SmolLM2-135M-Instruct; --model).

Methods, all fed the same chat-templated prompt token ids and asked for exactly N new tokens (EOS ignored):
  * joey AR [format]        -- ``joey.load(weights=format).generate(...)``, one engine per weight format
                               (``--weights fp32,int4,auto``; the first is the reference the others are
                               compared with);
  * joey PLD [format]       -- with ``--pld``: prompt lookup on the same engine (checked against its AR);
  * transformers generate() -- greedy, same float32 weights (its token ids should equal joey's);
  * llama.cpp               -- llama-cpp-python on the original (quantized) GGUF, 2 threads (optional).

Runs are interleaved per prompt and repeated (method order rotates) so machine noise hits all methods alike.
Timings include the prompt prefill and exclude tokenization. Prints a Markdown table for the README.

    python benchmarks/ar_speed.py [--model NAME] [--weights fp32,auto] [--max-new-tokens 64] [--repeats 3]
                                  [--json results.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

import joey
from joey.measurements import cpu_name

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome, with a short docstring.",
    "Explain in simple terms why the sky looks blue during the day and red at sunset.",
    "Tell a short story about a lighthouse keeper who finds a message in a bottle.",
    "List five practical tips for staying focused while studying, one sentence each.",
]

# A runner takes (prompt text, prompt ids, N) and returns (new token ids, seconds).
Runner = Callable[[str, list[int], int], tuple[list[int], float]]


def joey_runner(eng: joey.Engine, method: str = "ar") -> Runner:
    def run(prompt: str, ids: list[int], n: int) -> tuple[list[int], float]:
        gen = eng.generate(prompt, max_new_tokens=n, ignore_eos=True, temperature=0.0, method=method)
        return list(gen.token_ids), gen.wall_time_s

    return run


def hf_runner(eng: joey.Engine) -> Runner:
    from transformers import GenerationConfig

    model = eng.source.transformers_model(dtype=torch.float32).eval()

    def run(prompt: str, ids: list[int], n: int) -> tuple[list[int], float]:
        # An explicit config: no EOS (so exactly n tokens), no sampling settings inherited from the folder.
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
        x = torch.tensor([ids])
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=cfg)
            seconds = time.perf_counter() - start
        return out[0, len(ids):].tolist(), seconds

    return run


def llamacpp_runner(eng: joey.Engine) -> Runner | str:
    """A runner, or the reason llama.cpp is skipped."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return "skipped (pip install llama-cpp-python)"
    if eng.source is None or eng.source.gguf is None:
        return "skipped (the model was not loaded from a GGUF file)"
    llm = Llama(model_path=str(eng.source.gguf), n_threads=2, n_ctx=2048, verbose=False)

    def run(prompt: str, ids: list[int], n: int) -> tuple[list[int], float]:
        llm.reset()  # forget the KV cache, so every run pays its own prefill (as the others do)
        out: list[int] = []
        start = time.perf_counter()
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            out.append(tok)
            if len(out) == n:
                break
        return out, time.perf_counter() - start

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a known name, .gguf file or HF folder (default: the default model)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", nargs="+", default=PROMPTS, help="prompt strings (default: 4 built-in)")
    ap.add_argument("--weights", default="fp32,auto",
                    help="comma-separated weight formats, one joey engine each (default fp32,auto)")
    ap.add_argument("--pld", action="store_true", help="also time joey's prompt-lookup speculative decoding")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    args = ap.parse_args()
    n, prompts = args.max_new_tokens, args.prompts

    runners: dict[str, Runner] = {}
    same_as: dict[str, str] = {}  # runner → the runner whose tokens it must equal (lossless methods)
    formats = [w.strip() for w in args.weights.split(",") if w.strip()]
    for fmt in formats:
        e = joey.load(args.model, progress=False, weights=fmt)
        label = f"joey AR [{e.model.weight_format}]"
        runners[label] = joey_runner(e)
        if args.pld:
            runners[f"joey PLD [{e.model.weight_format}]"] = joey_runner(e, "pld")
            same_as[f"joey PLD [{e.model.weight_format}]"] = label
        if fmt == formats[0]:
            eng, reference = e, label
    notes: dict[str, str] = {}
    if not args.skip_hf:
        runners["transformers"] = hf_runner(eng)
    if not args.skip_llamacpp:
        r = llamacpp_runner(eng)
        if isinstance(r, str):
            notes["llama.cpp"] = r
            print(f"llama.cpp: {r}")
        else:
            runners["llama.cpp"] = r
    try:
        llama_version = md.version("llama-cpp-python")
    except md.PackageNotFoundError:
        llama_version = "not installed"
    env = {"cpu": cpu_name(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "transformers": transformers.__version__, "llama_cpp_python": llama_version, "model": eng.name,
           "reference": reference}
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    print(f"{len(prompts)} prompts x {args.repeats} repeats, {n} new tokens each, greedy\n")

    ids = [eng.encode(p) for p in prompts]
    names = list(runners)
    for name in names:  # warm-up, untimed
        runners[name](prompts[0], ids[0], n)

    runs: list[dict] = []
    for rep in range(args.repeats):
        for i, (prompt, pids) in enumerate(zip(prompts, ids, strict=True)):
            k = (rep + i) % len(names)
            for name in names[k:] + names[:k]:  # rotate the order so no method always goes first
                toks, seconds = runners[name](prompt, pids, n)
                runs.append({"method": name, "prompt": i, "repeat": rep, "tokens": toks,
                             "seconds": seconds, "tokens_per_s": len(toks) / seconds})
                print(f"  rep {rep} prompt {i} {name:<13} {len(toks)} tok  {len(toks) / seconds:7.1f} tok/s")

    ref = {r["prompt"]: r["tokens"] for r in runs if r["method"] == reference and r["repeat"] == 0}
    for r in runs:
        theirs = ref[r["prompt"]]
        if r["method"] in same_as:
            theirs = next(x["tokens"] for x in runs if x["method"] == same_as[r["method"]]
                          and x["prompt"] == r["prompt"] and x["repeat"] == 0)
        r["identical_to_joey"] = r["tokens"] == theirs
        r["agreement_with_joey"] = sum(a == b for a, b in zip(r["tokens"], theirs, strict=False)) / max(
            len(r["tokens"]), len(theirs), 1)

    def mean_per_prompt(name: str) -> float:
        """Mean over prompts of the mean tok/s over repeats: every prompt weighs the same."""
        by_prompt = [[r["tokens_per_s"] for r in runs if r["method"] == name and r["prompt"] == i]
                     for i in range(len(prompts))]
        return statistics.mean(statistics.mean(v) for v in by_prompt)

    summary: dict[str, dict] = {}
    for name in names:
        mine = [r for r in runs if r["method"] == name]
        speeds = [r["tokens_per_s"] for r in mine]
        summary[name] = {
            "median_tokens_per_s": statistics.median(speeds),
            "min_tokens_per_s": min(speeds),
            "max_tokens_per_s": max(speeds),
            "mean_per_prompt_tokens_per_s": mean_per_prompt(name),
            "vs_reference": mean_per_prompt(name) / mean_per_prompt(reference),
            "identical_to_joey": [all(r["identical_to_joey"] for r in mine if r["prompt"] == i)
                                  for i in range(len(prompts))],
            "agreement_with_joey": statistics.mean(r["agreement_with_joey"] for r in mine),
        }

    print(f"\nToken ids vs {reference} (speculative methods: vs AR on the same weights), per prompt:")
    for name in names[1:]:
        s = summary[name]
        per = ", ".join(f"p{i}: {'identical' if same else 'differs'}" for i, same in enumerate(s["identical_to_joey"]))
        print(f"  {name:<13} {per}; positions agreeing: {s['agreement_with_joey']:.1%}")

    print(f"\n{env['cpu']}, torch {env['torch']} ({env['torch_threads']} threads), llama.cpp 2 threads; "
          f"{n} new tokens, {len(prompts)} prompts x {args.repeats} repeats\n")
    print(f"| Method | median tok/s | min – max tok/s | speed vs {reference} | tokens |")
    print("|---|---:|---:|---:|---|")
    for name in names:
        s = summary[name]
        same = "(reference)" if name == reference else (
            f"{sum(s['identical_to_joey'])}/{len(prompts)} prompts identical to {same_as.get(name, reference)}, "
            f"{s['agreement_with_joey']:.0%} of positions")
        print(f"| {name} | {s['median_tokens_per_s']:.1f} | {s['min_tokens_per_s']:.1f} – {s['max_tokens_per_s']:.1f}"
              f" | {s['vs_reference']:.2f}× | {same} |")
    for name, why in notes.items():
        print(f"| {name} | – | – | – | {why} |")

    if args.json:
        out = {"env": env, "max_new_tokens": n, "repeats": args.repeats, "prompts": prompts,
               "summary": summary, "skipped": notes, "runs": runs}
        args.json.write_text(json.dumps(out, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
