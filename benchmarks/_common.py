"""Shared helpers of the performance benchmarks: fair timing on a shared machine and tables.

The CPU this project develops on is shared, so absolute timings drift by tens of
percent between minutes.  Every comparison therefore times the contenders in the
same run, alternating them (A, B, A, B, ...), and reports the median over repeats
of both the per-contender figure and the per-repeat ratio, with the load average
next to it so a reader can judge how noisy the figure was.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence


def loadavg() -> str:
    """The 1-minute load average (``/proc/loadavg``), or '?' where there is none."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def time_call(fn: Callable[[], object], iters: int) -> float:
    """Seconds per call of ``fn`` over ``iters`` calls."""
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of the per-repeat ratios ``b[i] / a[i]`` (a speed-up of ``a`` when both are times)."""
    return statistics.median(y / x for x, y in zip(a, b))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain, aligned text table (also valid Markdown)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))
