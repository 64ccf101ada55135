"""What a worker with Sage runs for DistributedFactor: Sage's ``factor``, which
is PARI's ``factorint`` (Pollard rho, SQUFOF, ECM and MPQS) with every prime
factor proven prime. It lives in an importable module, so a job names it by
reference; only workers that offer the ``sage`` tag are sent it.
"""

from __future__ import annotations

__all__ = ["PROVEN_SAGE", "sage_factor_job"]

PROVEN_SAGE = "proven: Sage's factor with proof=True (PARI's factorint, then isprime)"


def sage_factor_job(n: int) -> list[tuple[int, int]]:
    """The factorisation of ``n`` as ``(prime, exponent)`` pairs of plain ints (so
    that a client without Sage reads them), each prime proven (see PROVEN_SAGE)."""
    from ..sage import sage_namespace

    sage = sage_namespace()
    return [(int(p), int(e)) for p, e in sage["factor"](sage["ZZ"](n), proof=True)]
