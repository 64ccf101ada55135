"""The number theory of DistributedFactor, in pure Python: sieving, trial
division, perfect powers, primality (proven below 3.3e24, BPSW above) and the
elliptic curve method (Montgomery curves, Suyama's parametrisation, stage 1
and a baby-step giant-step stage 2).

:func:`ecm_job` is what a worker runs: a few curves on one number with given
bounds. It lives in an importable module, so a job names it by reference.
"""

from __future__ import annotations

import math
from functools import lru_cache

__all__ = ["certify", "ecm_job", "ecm_curve", "is_probable_prime", "perfect_power",
           "primes_up_to", "trial_division"]

#: below this bound, Miller-Rabin with the 13 prime bases 2..41 proves primality
#: (Sorenson and Webster, 2015: the least strong pseudoprime to them all is 3.317e24)
MR_PROVEN_BELOW = 3_317_044_064_679_887_385_961_981
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)

PROVEN_TRIAL = "proven: trial division"
PROVEN_MR = "proven: deterministic Miller-Rabin (bases 2 to 41, valid below 3.3e24)"
PROBABLE_BPSW = "probable: BPSW (strong base-2 and strong Lucas tests; no counterexample known)"


@lru_cache(maxsize=3)  # a slot keeps them between jobs: few, as B2 may be large
def _sieve(limit: int) -> bytearray:
    """A byte per integer up to ``limit``: 1 where it is prime."""
    s = bytearray([1]) * (limit + 1)
    s[0:2] = b"\0\0"[:min(2, limit + 1)]
    for i in range(2, math.isqrt(limit) + 1):
        if s[i]:
            s[i * i::i] = bytes(len(range(i * i, limit + 1, i)))
    return s


def primes_up_to(limit: int) -> list[int]:
    """The primes up to ``limit``."""
    if limit < 2:
        return []
    s = _sieve(limit)
    return [i for i in range(2, limit + 1) if s[i]]


def trial_division(n: int, bound: int) -> tuple[dict[int, int], int]:
    """The prime factors of ``n`` up to ``bound`` (prime to exponent) and the
    cofactor left, which has no prime factor up to ``bound``."""
    found: dict[int, int] = {}
    for p in primes_up_to(bound):
        if p * p > n:
            break
        while n % p == 0:
            found[p] = found.get(p, 0) + 1
            n //= p
    if 1 < n <= bound * bound:  # no factor up to its square root: prime
        found[n] = found.get(n, 0) + 1
        n = 1
    return found, n


def iroot(n: int, k: int) -> int:
    """The integer ``k``-th root of ``n`` (the largest r with r**k <= n)."""
    if n < 2:
        return n
    r = 1 << ((n.bit_length() + k - 1) // k)  # above the root
    while True:
        s = ((k - 1) * r + n // r ** (k - 1)) // k
        if s >= r:
            return r
        r = s


def perfect_power(n: int) -> tuple[int, int]:
    """``(r, k)`` with ``r**k == n`` and ``k`` as large as possible (``(n, 1)`` if
    ``n`` is not a perfect power)."""
    for k in reversed(primes_up_to(max(2, n.bit_length()))):
        r = iroot(n, k)
        if r > 1 and r ** k == n:
            root, more = perfect_power(r)
            return root, k * more
    return n, 1


def _strong_probable_prime(n: int, a: int) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    x = pow(a, d, n)
    if x in (1, n - 1):
        return True
    for _ in range(s - 1):
        x = x * x % n
        if x == n - 1:
            return True
    return False


def _jacobi(a: int, n: int) -> int:
    a %= n
    result = 1
    while a:
        while a % 2 == 0:
            a //= 2
            if n % 8 in (3, 5):
                result = -result
        a, n = n, a
        if a % 4 == 3 and n % 4 == 3:
            result = -result
        a %= n
    return result if n == 1 else 0


def _strong_lucas_probable_prime(n: int) -> bool:
    """The strong Lucas test with Selfridge's parameters (method A)."""
    r = math.isqrt(n)
    if r * r == n:
        return False
    d = 5
    while True:
        j = _jacobi(d, n)
        if j == -1:
            break
        if j == 0 and abs(d) != n:
            return False
        d = -d - 2 if d > 0 else -d + 2
    p, q = 1, (1 - d) // 4
    k, s = n + 1, 0
    while k % 2 == 0:
        k //= 2
        s += 1
    # U_k, V_k and Q^k by the binary method, from the top bit of k
    u, v, qk = 1, p, q % n
    inv2 = (n + 1) // 2
    for bit in bin(k)[3:]:
        u, v = u * v % n, (v * v - 2 * qk) % n
        qk = qk * qk % n
        if bit == "1":
            u, v = (p * u + v) * inv2 % n, (d * u + p * v) * inv2 % n
            qk = qk * q % n
    if u == 0 or v == 0:
        return True
    for _ in range(s - 1):
        v = (v * v - 2 * qk) % n
        qk = qk * qk % n
        if v == 0:
            return True
    return False


def is_probable_prime(n: int) -> bool:
    """Whether ``n`` is prime: exact below 3.3e24, BPSW above."""
    return certify(n) is not None


def certify(n: int) -> str | None:
    """How ``n`` is known to be prime (one of ``PROVEN_*`` or ``PROBABLE_BPSW``),
    or None if it is not prime."""
    if n < 2:
        return None
    for p in _MR_BASES:
        if n % p == 0:
            return PROVEN_TRIAL if n == p else None
    if n < 43 * 43:
        return PROVEN_TRIAL
    if n < MR_PROVEN_BELOW:
        return PROVEN_MR if all(_strong_probable_prime(n, a) for a in _MR_BASES) else None
    if _strong_probable_prime(n, 2) and _strong_lucas_probable_prime(n):
        return PROBABLE_BPSW
    return None


# --- the elliptic curve method


def _add(xp: int, zp: int, xq: int, zq: int, xd: int, zd: int, n: int) -> tuple[int, int]:
    """P+Q from P, Q and P-Q (x and z only)."""
    u = (xp - zp) * (xq + zq)
    v = (xp + zp) * (xq - zq)
    s, t = u + v, u - v
    return zd * s * s % n, xd * t * t % n


def _double(x: int, z: int, a24: int, n: int) -> tuple[int, int]:
    s, t = (x + z) * (x + z) % n, (x - z) * (x - z) % n
    four_xz = s - t
    return s * t % n, four_xz * (t + a24 * four_xz) % n


def _multiply(k: int, x: int, z: int, a24: int, n: int) -> tuple[int, int]:
    """k*P by the Montgomery ladder."""
    if k == 1:
        return x, z
    x1, z1 = x, z
    x2, z2 = _double(x, z, a24, n)
    for bit in bin(k)[3:]:
        if bit == "1":
            x1, z1 = _add(x2, z2, x1, z1, x, z, n)
            x2, z2 = _double(x2, z2, a24, n)
        else:
            x2, z2 = _add(x1, z1, x2, z2, x, z, n)
            x1, z1 = _double(x1, z1, a24, n)
    return x1, z1


#: stage 2's giant step (2*3*5*7*11): the baby steps are the j < D/2 prime to it
_D = 2310


def ecm_curve(n: int, sigma: int, b1: int, b2: int) -> int:
    """One curve (Suyama's parametrisation with ``sigma``) on ``n``: a factor found,
    or 1 (none, or all of ``n`` at once)."""
    u, v = (sigma * sigma - 5) % n, 4 * sigma % n
    x, z = pow(u, 3, n), pow(v, 3, n)
    num, den = pow(v - u, 3, n) * (3 * u + v) % n, 16 * x * v % n
    g = math.gcd(den, n)
    if g != 1:
        return g if g != n else 1
    a24 = num * pow(den, -1, n) % n
    # stage 1: multiply by every prime power up to b1
    for p in primes_up_to(b1):
        q = p
        while q * p <= b1:
            q *= p
        x, z = _multiply(q, x, z, a24, n)
    g = math.gcd(z, n)
    if g != 1:
        return g if g != n else 1
    # stage 2: one more prime q in (b1, b2], q = m*D +- j
    baby = [j for j in range(1, _D // 2, 2) if math.gcd(j, _D) == 1]
    xs: dict[int, int] = {}
    x2, z2 = _double(x, z, a24, n)
    j_pts = {1: (x, z)}
    cur, prev = _add(x2, z2, x, z, x, z, n), (x, z)  # 3P and P: odd multiples, by 2P steps
    for j in range(3, _D // 2, 2):
        j_pts[j] = cur
        cur, prev = _add(cur[0], cur[1], x2, z2, prev[0], prev[1], n), cur
    # normalise the baby steps' x (one inversion for all, Montgomery's trick)
    zs = [j_pts[j][1] for j in baby]
    acc = [1]
    for zj in zs:
        acc.append(acc[-1] * zj % n)
    g = math.gcd(acc[-1], n)
    if g != 1:
        return g if g != n else 1
    inv = pow(acc[-1], -1, n)
    for i in range(len(baby) - 1, -1, -1):
        xs[baby[i]] = j_pts[baby[i]][0] * (inv * acc[i] % n) % n
        inv = inv * zs[i] % n
    sieve = _sieve(b2 + _D)
    acc_g = 1
    for q in range(b1 + 1, min(b2, _D // 2) + 1):  # below the first giant step's reach
        if sieve[q] and q in j_pts:
            acc_g = acc_g * j_pts[q][1] % n
    dx, dz = _multiply(_D, x, z, a24, n)
    m = max(1, b1 // _D)
    gx, gz = _multiply(m * _D, x, z, a24, n)
    px, pz = _multiply((m - 1) * _D, x, z, a24, n) if m > 1 else (x, z)
    if m == 1:
        # (m-1)*D*P is the point at infinity: step from D*P to 2D*P by doubling
        px, pz = 0, 0
    while m * _D - _D // 2 <= b2:
        base = m * _D
        for j in baby:
            if (b1 < base - j <= b2 and sieve[base - j]) or (b1 < base + j <= b2 and sieve[base + j]):
                acc_g = acc_g * (gx - xs[j] * gz) % n
        if pz == 0:
            nx, nz = _double(gx, gz, a24, n)
        else:
            nx, nz = _add(gx, gz, dx, dz, px, pz, n)
        px, pz, gx, gz = gx, gz, nx, nz
        m += 1
    g = math.gcd(acc_g, n)
    return g if g != n else 1


def ecm_job(n: int, b1: int, b2: int, curves: int, seed: int) -> tuple[int, int]:
    """What a worker runs: up to ``curves`` curves on ``n`` with bounds ``b1`` and
    ``b2`` (sigmas from ``seed``); ``(factor, curves run)``, factor 1 if none."""
    for i in range(curves):
        sigma = 6 + (seed * 1_000_003 + i * 7919) % max(1, n - 7)
        f = ecm_curve(n, sigma, b1, b2)
        if 1 < f < n:
            return f, i + 1
    return 1, curves
