"""DistributedFactor: integer factorisation as a DistributedFunction.

Locally: trial division, perfect powers, primality. Then elliptic curve
method jobs on the workers, many at once, with bounds that rise with the
curves run on each number (GMP-ECM's table: B1 = 2,000 for factors of ~15
digits, 11,000 for ~20, 50,000 for ~25 ...). Each factor found splits every
number left; a part that is prime (or a perfect power) leaves the ECM work,
and jobs on a number that was split are killed.

When a worker offers the ``sage`` tag (Sage is installed there), each number
left goes instead to one job on such a worker that factors it whole with Sage's
``factor`` (PARI's ``factorint``), its primes proven.
"""

from __future__ import annotations

import math
from typing import Any

from ..client import DSage
from ..distributed import DistributedFunction, Job
from ..job import JobWrapper
from ..protocol import Status
from ..sage import SAGE_TAG
from .ecm import PROVEN_TRIAL, certify, ecm_job, perfect_power, trial_division
from .sagefactor import PROVEN_SAGE, sage_factor_job

__all__ = ["DistributedFactor", "LEVELS"]

#: (B1, curves) per level of factor size, after GMP-ECM's recommendations; B2 is 100*B1
LEVELS = [(2_000, 25), (11_000, 90), (50_000, 300), (250_000, 700), (1_000_000, 1_800),
          (3_000_000, 5_100)]
#: the largest B2 (the stage 2 sieve takes a byte per integer up to it)
MAX_B2 = 50_000_000
#: how much work (B1 times curves) one job gets: a fraction of a second to a few seconds
JOB_WORK = 60_000


class DistributedFactor(DistributedFunction):
    """Factor ``n`` (a positive integer). ``result`` is the sorted list of
    ``(prime, exponent)`` pairs; ``certificates`` says, for each prime, how it is
    known to be prime (proven, or a probable prime and by which test).

    ``trial_bound`` is the local trial division's bound; ``parallel`` the ECM jobs
    in flight (default: twice the workers' slots); ``job_options`` apply to every
    job (``priority``, ``requires``...). ``sage`` factors each number left with
    Sage on a worker that offers the ``sage`` tag, instead of ECM in pure Python
    (default: when a connected worker offers it)."""

    def __init__(self, dsage: DSage, n: int, name: str | None = None, progress: bool = False,
                 trial_bound: int = 100_000, parallel: int | None = None,
                 sage: bool | None = None, **job_options: Any) -> None:
        super().__init__(dsage, name=name, progress=progress)
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        if n < 1:
            raise ValueError(f"n={n}: give a positive integer")
        self.n = n
        self.job_options = job_options
        #: prime -> exponent, and how each prime is known to be prime
        self.factors: dict[int, int] = {}
        self.certificates: dict[int, str] = {}
        #: numbers left to split -> (their exponent in n, curves run on them)
        self.composites: dict[int, list[int]] = {}
        self._jobs_sent = 0
        found, rest = trial_division(n, trial_bound)
        for p, e in found.items():
            self._add_prime(p, e, PROVEN_TRIAL if p <= trial_bound else None)
        if rest > 1:
            self._add(rest, 1)
        trusted = [w for w in dsage.workers() if not w.anonymous] if self.composites else []
        if parallel is None and self.composites:
            parallel = 2 * max(1, sum(w.slots for w in trusted))
        self.parallel = parallel or 1
        #: whether the numbers left go to Sage's factor on workers with Sage
        self.sage = any(SAGE_TAG in w.tags for w in trusted) if sage is None else bool(sage)
        # a restored run replays the same jobs
        self._init_args[1].update(parallel=self.parallel, sage=self.sage)
        self._fill()
        self._check_done()

    # --- the numbers

    def _add_prime(self, p: int, e: int, how: str | None = None) -> None:
        self.factors[p] = self.factors.get(p, 0) + e
        self.certificates[p] = how or certify(p) or "?"

    def _add(self, m: int, e: int, curves: int = 0) -> None:
        """Take in ``m**e``: a prime, a perfect power, or a number to split."""
        root, k = perfect_power(m)
        how = certify(root)
        if how is not None:
            self._add_prime(root, e * k, how)
            return
        m, e = root, e * k
        if m in self.composites:
            self.composites[m][0] += e
        else:
            self.composites[m] = [e, curves]

    def _split(self, f: int) -> None:
        """Split every number left by the factor ``f`` (of one of them)."""
        for m in list(self.composites):
            g = math.gcd(m, f)
            if 1 < g < m:
                e, curves = self.composites.pop(m)
                # m = g * (m // g); parts may share primes: _add merges them
                for part in _coprime_parts(g, m // g):
                    a, k = part
                    self._add(a, e * k, curves)

    # --- the jobs

    def _level(self, curves: int) -> tuple[int, int]:
        done = 0
        for b1, count in LEVELS:
            done += count
            if curves < done:
                return b1, count
        return LEVELS[-1]

    def _fill(self) -> None:
        """Keep ``parallel`` ECM jobs in flight, round-robin over the numbers left,
        smallest first; or, with Sage, one job per number left."""
        if self.sage:
            self._fill_sage()
            return
        open_count = len(self.open_jobs()) + len(self.outstanding_jobs)
        numbers = sorted(self.composites)
        i = 0
        while numbers and open_count < self.parallel:
            m = numbers[i % len(numbers)]
            i += 1
            entry = self.composites[m]
            b1, _ = self._level(entry[1])
            curves = max(1, JOB_WORK // b1)
            entry[1] += curves
            self._jobs_sent += 1
            self.outstanding_jobs.append(Job(
                func=ecm_job, args=(m, b1, min(100 * b1, MAX_B2), curves, self._jobs_sent),
                tag=m, **self.job_options))
            open_count += 1

    def _fill_sage(self) -> None:
        """One Sage factoring job for each number left that has none in flight."""
        busy = {self.job_of(w).tag for w in self.open_jobs()}
        busy.update(j.tag for j in self.outstanding_jobs if isinstance(j, Job))
        options = dict(self.job_options)
        options["requires"] = [*options.get("requires", ()), SAGE_TAG]
        for m in sorted(set(self.composites) - busy):
            self._jobs_sent += 1
            self.outstanding_jobs.append(Job(func=sage_factor_job, args=(m,), tag=m, **options))

    def _take_sage_factors(self, m: int, pairs: list[tuple[int, int]]) -> None:
        """Take in Sage's factorisation of the number left ``m``."""
        product = math.prod(p ** e for p, e in pairs)
        if product != m or any(p < 2 for p, _ in pairs):
            raise RuntimeError(f"Sage's factorisation of {m} is wrong: {pairs}")
        e = self.composites.pop(m)[0]
        for p, k in pairs:
            self._add_prime(p, e * k, PROVEN_SAGE)

    def _check_done(self) -> None:
        if not self.composites:
            self.result = sorted(self.factors.items())
            self.done = True

    def process_result(self, job: JobWrapper) -> None:
        m = self.job_of(job).tag
        sage = self.job_of(job).func is sage_factor_job
        if job.status == Status.COMPLETED:
            if sage:
                if m in self.composites:
                    self._take_sage_factors(m, job.result())
            else:
                f, _ = job.result()
                if f > 1:
                    self._split(f)
        elif job.status != Status.KILLED and m in self.composites:
            what = "a Sage factoring job" if sage else "an ECM job"
            raise RuntimeError(f"{what} failed: {job.error}")
        self._check_done()
        if self.done:
            return
        for w in self.open_jobs():  # work on numbers that were split is wasted: end it
            if self.job_of(w).tag not in self.composites:
                self._kill(w)
        self._fill()


def _coprime_parts(a: int, b: int) -> list[tuple[int, int]]:
    """Pairwise coprime numbers with exponents whose product is ``a*b`` (a
    coprime base: splitting ``m`` by ``g`` can leave ``g`` and ``m // g`` sharing
    primes, as ``p**2 * q`` split by ``p*q`` does)."""
    parts = [(a, 1), (b, 1)]
    while True:
        for i in range(len(parts)):
            for j in range(i + 1, len(parts)):
                (x, e), (y, k) = parts[i], parts[j]
                g = math.gcd(x, y)
                if g > 1:
                    rest = [parts[t] for t in range(len(parts)) if t not in (i, j)]
                    new = [(g, e + k), (x // g, e), (y // g, k)]
                    parts = rest + [p for p in new if p[0] > 1]
                    break
            else:
                continue
            break
        else:
            return parts
