"""What seeded sampling costs per step, against one AR decoding step of the model (issue 32's budget: <= 2 %).

For each model: the AR step (median ms of one greedy decoding step, from a timed AR generation), then the sampler's
own work on the model's own logits (the rows of a teacher-forced pass over the prompt and the model's 64-token
answer: real distributions, whose nucleus is what top-p's cost depends on), each the median over the rows:
  * ``greedy``: argmax of one row (what T = 0 costs);
  * ``keyed``: joey's sampler at T = 0.7, top-p 0.9 (warp + softmax + one keyed uniform + inverse CDF), one row;
  * ``tree-8``: verification of an 8-node tree at the same settings, its deepest chain holding the answer's next
    tokens (rows are warped and drawn only along the accepted path), also per committed token;
  * ``gumbel``: the alternative issue 32 weighed, Gumbel-max with a keyed noise vector over the whole vocabulary
    (counter-based splitmix64 per token id, then argmax(log p + g)), one row.

    python benchmarks/sampling_cost.py [--models smollm2-135m-instruct qwen2.5-coder-1.5b-instruct]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import joey
from joey.batching import depths_of
from joey.config import SamplingParams
from joey.measurements import cpu_name
from joey.sampling import next_tokens
from joey.target_runner import TargetRunner
from joey.verify import verify_keyed

PARAMS = SamplingParams(temperature=0.7, top_p=0.9, seed=1234)
TREE = (-1, 0, 0, 1, 1, 2, 3, 4)  # 8 nodes, depth 4
COLUMNS = ("greedy", "keyed", "tree-8", "tree-8 per token", "gumbel")


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


_M1, _M2, _GOLD = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _lshr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def gumbel_tokens(logp: torch.Tensor, seed: int, position: int) -> torch.Tensor:
    """Gumbel-max with noise keyed by (seed, position, token id): splitmix64 in wrapping int64 arithmetic."""
    ids = torch.arange(logp.shape[-1], dtype=torch.int64)
    x = ids ^ _signed((seed * 0x100000001B3 + position) & ((1 << 64) - 1))
    x = x + _signed(_GOLD)
    x = (x ^ _lshr(x, 30)) * _signed(_M1)
    x = (x ^ _lshr(x, 27)) * _signed(_M2)
    x = x ^ _lshr(x, 31)
    u = (_lshr(x, 11).double() + 0.5) * 2.0**-53
    return (logp.double() - torch.log(-torch.log(u))).argmax(-1)


def measure(name: str, repeats: int) -> dict[str, float]:
    engine = joey.load(name, progress=False)
    model, vocab = engine.model, engine.model.cfg.vocab_size
    question = "Write a short story about a lighthouse keeper."
    prompt = engine.encode(question)
    g = engine.generate(question, method="ar", max_new_tokens=64, ignore_eos=True)
    step_ms = 1000 * g.wall_time_s / g.stats.steps
    answer = list(g.token_ids)
    text = prompt + answer
    cache = model.new_cache(1, len(text))
    with torch.inference_mode():
        features = TargetRunner(model).prefill(cache, [text], padded=False)[0][0][len(prompt) - 1:]
        rows = model.head(features)  # [answer positions, vocab]: the logits AR sampled from
    # 8-node trees whose deepest chain (nodes 0, 1, 3, 6) holds the answer's next tokens and whose
    # rows are the answer's logits at each node's depth: what a tree step verifies when its drafts are good
    depth = depths_of(TREE)
    trees = []
    for i in range(0, len(rows) - 5, 4):
        tokens = [answer[i + depth[j + 1] - 1] if j in (0, 1, 3, 6) else (answer[i] + 1 + j) % vocab
                  for j in range(len(TREE))]
        trees.append((tokens, rows[[i + d for d in depth]], len(prompt) + i))
    per_row = max(1, repeats // len(rows))

    def median_over(items, fn) -> float:
        return statistics.median(_median_ms(lambda item=item: fn(item), per_row) for item in items)

    costs = {
        "greedy": median_over(rows, lambda r: r[None].argmax(-1)),
        "keyed": median_over(rows, lambda r: next_tokens(r[None], PARAMS, [100])),
        "tree-8": median_over(trees, lambda t: verify_keyed(t[0], TREE, t[1], PARAMS, t[2])),
        "gumbel": median_over(rows, lambda r: gumbel_tokens(torch.log_softmax(r / PARAMS.temperature, -1),
                                                            PARAMS.seed, 100)),
    }
    committed = statistics.mean(verify_keyed(t[0], TREE, t[1], PARAMS, t[2]).accepted + 1 for t in trees)
    costs["tree-8 per token"] = costs["tree-8"] / committed
    return {"vocab": vocab, "step_ms": step_ms, "committed": committed, **costs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"])
    ap.add_argument("--repeats", type=int, default=400, help="calls per measure, spread over the rows")
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; T={PARAMS.temperature}, top-p {PARAMS.top_p}\n")
    print("| model | vocab | AR step ms | greedy | keyed (1 row) | tree-8 verify | tokens per tree | tree-8 per token "
          "| Gumbel-max (1 row) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        r = measure(name, args.repeats)
        cell = {k: f"{r[k]:.3f} ms ({100 * r[k] / r['step_ms']:.1f} %)" for k in COLUMNS}
        print(f"| {name} | {r['vocab']} | {r['step_ms']:.1f} | {cell['greedy']} | {cell['keyed']} | {cell['tree-8']} "
              f"| {r['committed']:.2f} | {cell['tree-8 per token']} | {cell['gumbel']} |")


if __name__ == "__main__":
    main()
