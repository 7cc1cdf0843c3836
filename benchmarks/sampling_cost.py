"""What seeded sampling costs per step, against one AR decoding step of the model (issue 32's budget: <= 2 %).

For each model: the AR step (median ms of one greedy decoding step, from a timed AR generation), then the sampler's
own work on logits of the model's vocabulary, each the median of ``--repeats`` calls:
  * ``greedy``: argmax of one row (what T = 0 costs);
  * ``keyed``: joey's sampler at T = 0.7, top-p 0.9 (warp + softmax + one keyed uniform + inverse CDF), one row;
  * ``tree-8``: verification of an 8-node tree at the same settings (warp + softmax over 9 rows, 9 keyed draws);
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
from joey.config import SamplingParams
from joey.measurements import cpu_name
from joey.sampling import next_tokens, probabilities
from joey.verify import verify_keyed

PARAMS = SamplingParams(temperature=0.7, top_p=0.9, seed=1234)
TREE = (-1, 0, 0, 1, 1, 2, 3, 4)  # 8 nodes, depth 4


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
    vocab = engine.model.cfg.vocab_size
    g = engine.generate("Write a short story about a lighthouse keeper.", method="ar", max_new_tokens=64,
                        ignore_eos=True)
    step_ms = 1000 * g.wall_time_s / g.stats.steps
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, vocab, generator=gen) * 4
    tree_logits = torch.randn(len(TREE) + 1, vocab, generator=gen) * 4
    tokens = [int(t) for t in torch.randint(0, vocab, (len(TREE),), generator=gen)]
    logp = torch.log_softmax(logits[0] / PARAMS.temperature, -1)
    costs = {
        "greedy": _median_ms(lambda: logits.argmax(-1), repeats),
        "keyed": _median_ms(lambda: next_tokens(logits, PARAMS, [100]), repeats),
        "tree-8": _median_ms(lambda: verify_keyed(tokens, TREE, probabilities(tree_logits, PARAMS), PARAMS, 100),
                             repeats),
        "gumbel": _median_ms(lambda: gumbel_tokens(logp, PARAMS.seed, 100), repeats),
    }
    return {"vocab": vocab, "step_ms": step_ms, **costs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; T={PARAMS.temperature}, top-p {PARAMS.top_p}\n")
    print("| model | vocab | AR step ms | greedy | keyed (1 row) | tree-8 verify | Gumbel-max (1 row) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        r = measure(name, args.repeats)
        cells = " | ".join(f"{r[k]:.3f} ms ({100 * r[k] / r['step_ms']:.1f} %)"
                           for k in ("greedy", "keyed", "tree-8", "gumbel"))
        print(f"| {name} | {r['vocab']} | {r['step_ms']:.1f} | {cells} |")


if __name__ == "__main__":
    main()
