"""joey's AVX512-VNNI low-bit kernel against PyTorch's int4/int8 CPU kernels, per weight shape and rows.

For each of the default model's linear shapes (fused q/k/v, o, fused gate/up, down, LM head) and
each format (int4 groups of 32 as in Q4_1, int8 groups of 32 as in Q8_0), the median time of one
call with 1, 2, 4, 8 and 16 rows of activations, both kernels interleaved in one process. The
weights of one shape stay in cache between calls: this measures the kernels' arithmetic, not the
model's memory traffic (benchmarks/step_cost.py measures whole forwards).

    python benchmarks/group_kernel.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from joey.measurements import cpu_name
from joey.models.group_kernel import GroupKernel, available
from joey.models.quantized import QuantizedWeight
from joey.models.weight_formats import Int4Kernel, Int8Kernel

SHAPES = {"q/k/v": (960, 576), "o": (576, 576), "gate/up": (3072, 576), "down": (576, 1536),
          "LM head": (49152, 576)}
ROWS = (1, 2, 4, 8, 16)


def weights(fmt: str, out: int, cols: int, gen: torch.Generator) -> QuantizedWeight:
    """Random codes with fp16 scales (as a GGUF stores them)."""
    scale = (torch.rand(out, cols // 32, generator=gen) * 0.01 + 1e-3).half().float()
    if fmt == "int4":
        codes = torch.randint(0, 16, (out, cols), generator=gen, dtype=torch.uint8)
        return QuantizedWeight(4, codes, scale, (torch.randn(out, cols // 32, generator=gen) * 0.02).half().float(), 32)
    return QuantizedWeight(8, torch.randint(-128, 128, (out, cols), generator=gen, dtype=torch.int8), scale, None, 32)


def timed(kernel, x: torch.Tensor, repeats: int) -> float:
    """Median µs of one call."""
    for _ in range(5):
        kernel(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        kernel(x)
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    if not available():
        raise SystemExit("joey's kernel does not run here (it needs AVX512-VNNI and a C compiler)")
    gen = torch.Generator().manual_seed(0)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; median µs per call, "
          f"joey / PyTorch (ratio)\n")
    print("| weight | format | " + " | ".join(f"{m} row{'s' if m > 1 else ''}" for m in ROWS) + " |")
    print("|---|---|" + "---:|" * len(ROWS))
    for name, (out, cols) in SHAPES.items():
        for fmt in ("int4", "int8"):
            q = weights(fmt, out, cols, gen)
            ours, theirs = GroupKernel(q, None), (Int4Kernel if fmt == "int4" else Int8Kernel)(q, None)
            cells = []
            for m in ROWS:
                x = torch.randn(m, cols, generator=gen)
                a, b = timed(ours, x, args.repeats), timed(theirs, x, args.repeats)
                cells.append(f"{a:.0f} / {b:.0f} ({b / a:.1f}×)")
            print(f"| {name} {out}x{cols} | {fmt} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
