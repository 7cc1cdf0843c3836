"""GGUF blocks as stored (Q4_K, Q5_0, Q6_K) on joey's VNNI kernel against Q6_K widened to int8 with a
scale per row (how joey read Q6_K/Q5_0 before): median time of one call with 1 and 8 rows of
activations for a 1536 x 8960 weight (a 1.5B model's down projection), and the bytes of weights per
second that makes. The weight is cycled through enough copies to exceed the CPU's caches, so a call
streams its weights from memory as a decode step does.

    python benchmarks/gguf_kernels.py [--repeats 50] [--mb 384]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from joey.measurements import cpu_name
from joey.models.group_kernel import BLOCKS, GroupKernel, available
from joey.models.weight_formats import quantize_int8

OUT, COLS = 1536, 8960
ROWS = (1, 8)


def blocks(type_name: str, rng: np.random.Generator) -> np.ndarray:
    """Random blocks with small finite fp16 factors."""
    per, nbytes = BLOCKS[type_name]
    raw = rng.integers(0, 256, size=(OUT, COLS // per, nbytes), dtype=np.uint8)
    at, count = {"Q4_K": (0, 2), "Q5_0": (0, 1), "Q6_K": (208, 1)}[type_name]
    halves = (rng.random((OUT, COLS // per, count)) * 0.02 + 1e-3).astype(np.float16)
    raw[..., at : at + 2 * count] = halves.view(np.uint8).reshape(OUT, COLS // per, 2 * count)
    return raw.reshape(OUT, -1)


def copies(kernel: GroupKernel, total_mb: int) -> list[GroupKernel]:
    """Enough copies of ``kernel`` (own arrays) to hold ``total_mb`` MB of weights."""
    meta, tensors = kernel.state()
    n = max(1, total_mb * 2**20 // kernel.nbytes)
    return [GroupKernel.from_state(meta, {k: v.clone() for k, v in tensors.items()}) for _ in range(n)]


def timed(kernels: list[GroupKernel], x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one call, each call on the next copy (cold in the caches)."""
    for k in kernels[:3]:
        k(x)
    times = []
    for i in range(max(repeats, 2 * len(kernels))):
        k = kernels[i % len(kernels)]
        t = time.perf_counter()
        k(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--mb", type=int, default=384, help="MB of weight copies cycled through")
    args = ap.parse_args()
    if not available():
        raise SystemExit("joey's kernel does not run here (it needs AVX512-VNNI and a C compiler)")
    rng = np.random.default_rng(0)
    q6 = blocks("Q6_K", rng)
    widened = quantize_int8(torch.from_numpy(dequantize(q6, GGMLQuantizationType.Q6_K).reshape(OUT, COLS)))
    cases = {"Q4_K": GroupKernel.from_blocks("Q4_K", blocks("Q4_K", rng), OUT, COLS),
             "Q5_0": GroupKernel.from_blocks("Q5_0", blocks("Q5_0", rng), OUT, COLS),
             "Q6_K": GroupKernel.from_blocks("Q6_K", q6, OUT, COLS),
             "Q6_K widened to int8": GroupKernel(widened, None)}
    print(f"{cpu_name()}, {torch.get_num_threads()} threads; {OUT}x{COLS} weight, median of one call "
          f"(weights cycled through {args.mb} MB)\n")
    print("| weight | bits/weight | " + " | ".join(f"{m} row{'s' if m > 1 else ''}" for m in ROWS) + " |")
    print("|---|---:|" + "---:|" * len(ROWS))
    for name, kernel in cases.items():
        ks = copies(kernel, args.mb)
        cells = []
        for m in ROWS:
            x = torch.randn(m, COLS)
            s = timed(ks, x, args.repeats)
            cells.append(f"{s * 1e6:.0f} µs, {kernel.nbytes / s / 1e9:.1f} GB/s")
        print(f"| {name} | {kernel.nbytes * 8 / (OUT * COLS):.3f} | " + " | ".join(cells) + " |")
        del ks


if __name__ == "__main__":
    main()
