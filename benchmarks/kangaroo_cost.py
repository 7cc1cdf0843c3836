"""What a Kangaroo step costs on this machine: drafting k tokens vs verifying them, against one AR step.

A step drafts k tokens (layers [0, l) + adapter + draft-vocabulary head, k times) and verifies
1 + k tokens from layer l. It pays off when  τ × cost(AR step) > cost(draft k) + cost(verify 1 + k),
so the table also prints the mean accepted tokens τ needed to break even at each k.

    python benchmarks/kangaroo_cost.py [--context 200] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import joey
from joey.batching import causal_mask
from joey.config import SamplingParams
from joey.drafters import KangarooDrafter


def median_ms(fn, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        fn()
        if i >= 2:  # warm-up calls pick oneDNN kernels for the shape
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--adapter", default=None)
    args = ap.parse_args()
    eng = joey.load(progress=False, adapter=args.adapter)
    if eng.kangaroo is None:
        raise SystemExit("no Kangaroo adapter for this model")
    model, kd = eng.model, eng.kangaroo
    n = args.context
    ids = torch.randint(100, 10000, (1, n + 8), generator=torch.Generator().manual_seed(0))
    ctx = ids[0, :n].tolist()
    rows = []
    with torch.inference_mode():
        cache = model.new_cache(1, n + 8)
        model(ids[:, :n], torch.arange(n)[None], cache, 0, n, None)
        ar = median_ms(lambda: model(ids[:, n : n + 1], torch.tensor([[n]]), cache, n, n + 1, None), args.repeats)
        drafter = KangarooDrafter(kd, SamplingParams(), None, n + 16, threshold=0.0)
        drafter.propose(ctx, 1)
        for k in range(1, 7):
            # the same context each time: the drafter reuses its caches and recomputes only the
            # pending token, exactly as in a step after a rejection
            draft = median_ms(lambda k=k: drafter.propose(ctx, k), args.repeats)
            hidden = torch.randn(1, k + 1, model.cfg.hidden_size)
            mask = causal_mask([n], k + 1, n + k + 1, "cpu")
            pos = torch.arange(n, n + k + 1)[None]
            def verify_pass(hidden=hidden, pos=pos, mask=mask, k=k):
                model.forward_from(hidden, pos, cache, n, n + k + 1, mask, kd.exit_layer)

            verify = median_ms(verify_pass, args.repeats)
            rows.append((k, draft, verify))
    print(f"Default model, fp32, {torch.get_num_threads()} threads, context {n}, exit layer {kd.exit_layer}, "
          f"draft vocabulary {kd.adapter.vocab.numel()}, adapter MLP: {kd.adapter.mlp is not None}; "
          f"median of {args.repeats}\n")
    print(f"AR step (1 token, all layers): {ar:.1f} ms\n")
    print("| k drafts | draft k tokens | verify 1+k from layer l | step total | break-even τ |")
    print("|---:|---:|---:|---:|---:|")
    for k, d, v in rows:
        print(f"| {k} | {d:.1f} ms ({d / k:.1f}/token) | {v:.1f} ms | {d + v:.1f} ms | {(d + v) / ar:.2f} |")


if __name__ == "__main__":
    main()
