"""The work every system runs. Module-level functions, so each system can send
them by reference (the runner puts the repository on ``PYTHONPATH``)."""

from __future__ import annotations

import time


def ident(x):
    """A tiny job: return the argument."""
    return x


def spin(n):
    """CPU-bound pure-Python loop of ``n`` iterations."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def calibrate(seconds: float) -> int:
    """Iterations of :func:`spin` that take about ``seconds`` here (best of 3)."""
    n = 200_000
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        spin(n)
        best = min(best, time.perf_counter() - t)
    return max(1000, int(n * seconds / best))
