"""PNG plots of a bench run (matplotlib, optional: ``pip install 'joey[plots]'``).

Three figures: speedup by category and method, mean accepted tokens τ by category and method, and
the acceptance rate by draft position. Without matplotlib the run still writes everything else.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MISSING_NOTE = "plots skipped: matplotlib is not installed (pip install 'joey[plots]')"


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_plots(folder: Path, results: dict[str, Any]) -> list[str]:
    """Write the PNGs into ``folder``; returns their file names (empty without matplotlib)."""
    if not available():
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no GUI backend is started
    import matplotlib.pyplot as plt

    summary, methods, cats = results["summary"], results["methods"], results["categories"]
    names = []

    def bars(key: str, file: str, title: str, ylabel: str, baseline: float | None) -> None:
        shown = [m for m in methods if all(summary[m][c][key] is not None for c in cats)]
        if not shown:
            return
        fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(cats) * len(shown)), 4.5))
        width = 0.8 / len(shown)
        for i, m in enumerate(shown):
            xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(cats))]
            vals = [summary[m][c][key] for c in cats]
            ax.bar(xs, vals, width, label=m)
            if key == "speedup" and results["settings"]["repeats"] > 1:
                lo = [v - summary[m][c]["speedup_spread"]["min"] for v, c in zip(vals, cats)]
                hi = [summary[m][c]["speedup_spread"]["max"] - v for v, c in zip(vals, cats)]
                ax.errorbar(xs, vals, yerr=[lo, hi], fmt="none", ecolor="black", capsize=2, linewidth=0.8)
        if baseline is not None:
            ax.axhline(baseline, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(cats)), cats, rotation=20)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        # Below the axes, so the legend never hides a bar.
        ax.legend(fontsize="small", ncol=min(6, len(shown)), loc="upper center", bbox_to_anchor=(0.5, -0.2))
        fig.tight_layout()
        fig.savefig(folder / file, dpi=110)
        plt.close(fig)
        names.append(file)

    model = results["environment"]["model"]
    bars("speedup", "speedup_by_category.png", f"Speedup vs joey AR ({model})", "speedup (×)", 1.0)
    bars("mean_accepted_tokens", "mean_accepted_tokens.png", f"Mean accepted tokens τ ({model})", "τ", 1.0)
    _acceptance(plt, folder, results, names)
    return names


def _acceptance(plt: Any, folder: Path, results: dict[str, Any], names: list[str]) -> None:
    curves: Sequence[tuple[str, list[float]]] = [
        (m, results["summary"][m]["overall"]["acceptance_by_position"]) for m in results["methods"]
    ]
    curves = [(m, acc) for m, acc in curves if acc]
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for m, acc in curves:
        ax.plot(range(1, len(acc) + 1), acc, marker="o", label=m)
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1.05)
    ax.set_title("Acceptance rate by draft position (all questions)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    file = "acceptance_by_position.png"
    fig.savefig(folder / file, dpi=110)
    plt.close(fig)
    names.append(file)


def write_batch_plot(folder: Path, results: dict[str, Any]) -> list[str]:
    """Speedup over batched AR against batch size, one line per method, packed solid and padded
    dashed (the EMS-SD paper's comparison), with the 1.0 line; beside it the same for decoding alone
    (each batch's prefill left out). Returns the file name (empty without matplotlib)."""
    if not available():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, sizes = results["table"], results["settings"]["batch_sizes"]
    methods = list(dict.fromkeys(r["method"] for r in table))  # AR's own padded line: what padding costs
    if not any(r["method"] != "ar" or r["mode"] != "packed" for r in table):
        return []
    panels = [("speedup", "end to end"), ("decode_speedup", "decoding alone")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes[0], panels):
        for i, m in enumerate(methods):
            for mode, style in (("packed", "-"), ("padded", "--")):
                rows = sorted((r for r in table if r["method"] == m and r["mode"] == mode),
                              key=lambda r: r["batch_size"])
                if not rows or (m, mode) == ("ar", "packed"):  # the reference: the dotted line at 1
                    continue
                xs = [r["batch_size"] for r in rows]
                ys = [r[key] for r in rows]
                lo = [y - r[key + "_spread"]["min"] for y, r in zip(ys, rows)]
                hi = [r[key + "_spread"]["max"] - y for y, r in zip(ys, rows)]
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, marker="o", color=colors[i % len(colors)],
                            capsize=2, label=f"{m} ({mode})")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlabel("batch size")
        ax.set_title(title)
    axes[0][0].set_ylabel("speedup over batched AR (×)")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"Batched speculative decoding ({results['environment']['model']})")
    fig.tight_layout()
    file = "speedup_vs_batch_size.png"
    fig.savefig(folder / file, dpi=110)
    plt.close(fig)
    return [file]
