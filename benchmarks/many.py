"""Many jobs (issue "Many jobs"): ``D.map`` and the seed's Example 2 against the
local pool, paired in one process (``python -m benchmarks`` runs it as the child
``many`` whenever dsage and the pool are both among the systems).

1. **map of tiny items**: ``ident`` over ``items`` integers with ``D.map`` (chunk
   sizes chosen by dsage), with the pool's ``map(chunksize=1)``, and with the
   pool's map at chunk sizes 100, 1,000 and ``items / 8`` (what
   ``multiprocessing.Pool`` picks by default), the best of which is reported;
2. **Example 2**: ``factor`` over ``numbers`` integers of 10-11 digits (the seed
   factors 1,000), as a list comprehension of ``D.eval_function`` jobs, as
   ``D.map``, and with the pool's ``map(chunksize=1)``; each round runs the
   three back to back and the best of ``rounds`` is kept for each.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from .tasks import example2_numbers, factor, ident

WORKERS = 2


def _timed(f: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = f()
    return time.perf_counter() - t, out


def log(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def bench_many(items: int = 50_000, numbers: int = 1000, rounds: int = 2,
               listed: int = 10_000) -> dict[str, Any]:
    import dsage

    xs = list(range(items))
    ns = example2_numbers(numbers)
    expected = [factor(n) for n in ns[:20]]
    home = tempfile.mkdtemp(prefix="dsage-bench-many-")
    out: dict[str, Any] = {"map_items": items, "example2_numbers": numbers}
    D = None
    try:
        D = dsage.start_all(workers=WORKERS, port=0, home=home)
        with ProcessPoolExecutor(WORKERS) as pool:
            list(pool.map(ident, range(WORKERS * 4)))  # start its processes
            D.map(ident, range(100))  # and dsage's slots, and its function cache
            # 1. map of tiny items
            maps: dict[str, list[float]] = {"dsage": [], "pool1": []}
            chunked: dict[int, list[float]] = {100: [], 1000: [], max(1, items // 8): []}
            for _ in range(rounds):
                s, r = _timed(lambda: D.map(ident, xs))
                assert r == xs
                maps["dsage"].append(s)
                s, r = _timed(lambda: list(pool.map(ident, xs, chunksize=1)))
                assert r == xs
                maps["pool1"].append(s)
                for size in chunked:
                    s, r = _timed(lambda: list(pool.map(ident, xs, chunksize=size)))
                    assert r == xs
                    chunked[size].append(s)
            best_size = min(chunked, key=lambda k: min(chunked[k]))
            out.update(map_s=min(maps["dsage"]), map_pool1_s=min(maps["pool1"]),
                       map_pool_best_s=min(chunked[best_size]), map_pool_best_chunksize=best_size,
                       map_pool_chunked_s={str(k): min(v) for k, v in chunked.items()})
            out["map_vs_pool1"] = out["map_pool1_s"] / out["map_s"]
            out["map_vs_pool_best"] = out["map_pool_best_s"] / out["map_s"]
            log(f"map of {items:,} tiny items: dsage {out['map_s']:.3f} s, pool chunksize=1 "
                f"{out['map_pool1_s']:.2f} s ({out['map_vs_pool1']:.1f}x), pool best "
                f"(chunksize={best_size}) {out['map_pool_best_s']:.3f} s "
                f"({out['map_vs_pool_best']:.2f}x)")
            # 2. the seed's Example 2
            ex2: dict[str, list[float]] = {"jobs": [], "map": [], "pool": []}
            for _ in range(rounds):
                s, r = _timed(lambda: list(pool.map(factor, ns, chunksize=1)))
                assert r[:20] == expected
                ex2["pool"].append(s)

                def comprehension() -> list[Any]:
                    jobs = [D.eval_function(factor, (n,)) for n in ns]
                    return [j.result() for j in jobs]

                s, r = _timed(comprehension)
                assert r[:20] == expected
                ex2["jobs"].append(s)
                s, r = _timed(lambda: D.map(factor, ns))
                assert r[:20] == expected
                ex2["map"].append(s)
            out.update(example2_pool_s=min(ex2["pool"]), example2_jobs_s=min(ex2["jobs"]),
                       example2_map_s=min(ex2["map"]), example2_all=ex2)
            out["example2_jobs_vs_pool"] = out["example2_jobs_s"] / out["example2_pool_s"]
            out["example2_map_vs_pool"] = out["example2_map_s"] / out["example2_pool_s"]
            log(f"Example 2, {numbers:,} factorings: pool chunksize=1 {out['example2_pool_s']:.2f} s,"
                f" D.eval_function jobs {out['example2_jobs_s']:.2f} s "
                f"({out['example2_jobs_vs_pool']:.3f}x), D.map {out['example2_map_s']:.2f} s "
                f"({out['example2_map_vs_pool']:.3f}x)")
        # 3. listing: this key's jobs, topped up to `listed`, by a client that has
        # none of them yet (every wrapper made anew), in pages
        have = len(D.get_my_jobs(limit=None))
        fill = [D("0") for _ in range(max(0, listed - have))]
        for j in fill:
            j.result(timeout=600)
        with dsage.DSage("127.0.0.1", D.port, home=home) as reader:
            s, jobs = _timed(lambda: reader.get_my_jobs(limit=None))
        out.update(list_jobs=len(jobs), list_s=s)
        log(f"listing {len(jobs):,} jobs (get_my_jobs(limit=None), a fresh client): {s:.2f} s")
    finally:
        if D is not None:
            D.close()
        shutil.rmtree(home, ignore_errors=True)
    return out
