"""Measurements of this machine that are worth doing once (the budget's cost curve, the fastest
weight format), cached as JSON files under ``JOEY_CACHE``, and the CPU's name that their keys and
the benchmarks' figures carry. What is measured, and what it decides, is the caller's business."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def cpu_name() -> str:
    """The CPU's model name (for figures and cache keys); the platform's string where /proc lacks it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measured_once(cache_root: Path, kind: str, key: str, measure: Callable[[], dict], read: Callable[[dict], T]) -> T:
    """``read`` of the record stored for ``key`` in ``cache_root/kind``; a missing, corrupt or
    foreign file (``read`` raising on it included) is measured again with ``measure`` and rewritten.
    For measurements of the machine that are worth doing once (cost curves, weight formats)."""
    path = cache_root / kind / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    try:
        data = json.loads(path.read_text())
        if data.get("key") == key:
            return read(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    data = {"key": key, **measure()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time
    return read(data)


def median_ms(run: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls, in ms, after one untimed warm-up call
    (its first call pays for allocations and cold caches that later ones do not)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[repeats // 2]
