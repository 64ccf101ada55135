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


def factor(n: int) -> list[int]:
    """The prime factors of ``n`` by trial division (the seed's Example 2 factors
    integers; 10-11 digits take from microseconds to ~20 ms each here)."""
    out = []
    while n % 2 == 0:
        out.append(2)
        n //= 2
    d = 3
    while d * d <= n:
        while n % d == 0:
            out.append(d)
            n //= d
        d += 2
    if n > 1:
        out.append(n)
    return out


def example2_numbers(count: int, seed: int = 2007) -> list[int]:
    """``count`` integers of 10 or 11 digits, the same on every run."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(10**9, 10**11) for _ in range(count)]
