"""``joey bench``: a Spec-Bench runner.

Reads a question file in Spec-Bench's format, answers every question with each decoding method
(joey's own methods and external baselines: transformers, transformers prompt lookup, llama.cpp),
interleaved per question, and writes results.json, report.md, plots and Spec-Bench answer files.

Modules: ``questions`` (file → questions, selection), ``runners`` (one answer per method),
``metrics`` (pure functions: tokens/s, speedup, τ, agreement), ``store`` (incremental results and
resume), ``report`` (results.json, report.md, answer files), ``plots`` (PNGs), ``run`` (the loop).
"""

from __future__ import annotations

from joey.bench.run import BenchSettings, run_bench

__all__ = ["BenchSettings", "run_bench"]
