"""Before/after table and plot of two batched ``joey bench`` runs: the wall-clock gate off, then on.

Each run's speedups are over packed AR *in the same run* (``joey bench --batch-size``), so the two runs are
compared ratio to ratio. Writes OUT/gate_ab.md and OUT/gate_ab.png (speedup against batch size, the gate off
dashed, on solid, with the 1.0 line).

    JOEY_PAYOFF=0 joey bench --limit 3 --max-new-tokens 128 --repeats 2 --batch-size 1 2 4 8 16 \\
        --methods ar,pld,jakiro,jakiro+pld,kangaroo --out bench_out/gate_off
    joey bench --limit 3 --max-new-tokens 128 --repeats 2 --batch-size 1 2 4 8 16 \\
        --methods ar,pld,jakiro,jakiro+pld,kangaroo --out bench_out/gate_on
    python benchmarks/gate_ab.py bench_out/gate_off bench_out/gate_on --out bench_out
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cells(folder: Path) -> tuple[dict, list[int]]:
    """(method, batch size) → the packed row of a batched run's table, and its batch sizes."""
    res = json.loads((folder / "results.json").read_text())
    table = {(r["method"], r["batch_size"]): r for r in res["table"] if r["mode"] == "packed"}
    return table, res["settings"]["batch_sizes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("off", type=Path, help="the run with JOEY_PAYOFF=0")
    ap.add_argument("on", type=Path, help="the run with the gate (the default)")
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    args = ap.parse_args()
    off, sizes = cells(args.off)
    on, _ = cells(args.on)
    methods = [m for m in dict.fromkeys(m for m, _ in on) if m != "ar"]

    def fmt(r: dict) -> str:
        s = r["speedup_spread"]
        return f"{r['speedup']:.2f}× [{s['min']:.2f}–{s['max']:.2f}]"

    lines = ["| method | gate | " + " | ".join(f"B={b}" for b in sizes) + " |",
             "|---|---|" + "---:|" * len(sizes)]
    for m in methods:
        for name, run in (("off", off), ("on", on)):
            lines.append(f"| {m} | {name} | " + " | ".join(fmt(run[m, b]) for b in sizes) + " |")
    lines.append("| ar (tok/s) | off / on | " + " | ".join(
        f"{off['ar', b]['tokens_per_s']:.0f} / {on['ar', b]['tokens_per_s']:.0f}" for b in sizes) + " |")
    same = all(r["identical_rows"] == r["rows"] for run in (off, on) for r in run.values())
    lines += ["", f"Every row equal to AR's tokens in both runs: {'yes' if same else 'NO'}."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gate_ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, m in enumerate(methods):
        color = f"C{i}"
        for run, style, label in ((off, "--", f"{m}, gate off"), (on, "-", f"{m}, gate on")):
            ax.plot(sizes, [run[m, b]["speedup"] for b in sizes], style, marker="o", color=color, label=label)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup over batched AR")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out / "gate_ab.png", dpi=120)


if __name__ == "__main__":
    main()
