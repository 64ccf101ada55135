"""``dsage demo``: start a local cluster, run the seed's examples, shut it down."""

from __future__ import annotations

import inspect
import os
import random
import tempfile
import time
from pathlib import Path

from rich.console import Console

from .cluster import start_all
from .dist_functions import DistributedFactor
from .progress import progress
from .words import plural

def factor(n: int) -> list[int]:
    """Trial division: the prime factors of ``n``, smallest first."""
    out, d = [], 2
    while d * d <= n:
        while n % d == 0:
            out.append(d)
            n //= d
        d += 1
    return out + ([n] if n > 1 else [])


#: the original's Example 1 as a file: a job of its own, so ``factor`` goes as source
FILE_JOB = ("import random\n\n" + inspect.getsource(factor)
            + "\nn = random.randint(10**11, 10**13)\nDSAGE_RESULT = (n, factor(n))\n")


def run_demo(workers: int = 2, home: str | os.PathLike[str] | None = None) -> int:
    console = Console()
    t0 = time.perf_counter()
    console.print(f"[bold]dsage demo[/]: starting a broker and a monitor with "
                  f"{plural(workers, 'slot')}")
    with start_all(workers=workers, port=0, home=home) as D:
        console.print(f"cluster up in {time.perf_counter() - t0:.2f} s: {D!r}")
        console.print("\n[bold]>>> j = D('2+2'); j.wait(); j[/]")
        j = D("2+2")
        j.wait(60)
        console.print(repr(j))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "dsage.py"
            path.write_text(FILE_JOB)
            console.print("\n[bold]>>> j = D.eval_file('dsage.py', 'test_job'); j.wait(); j[/]")
            j = D.eval_file(path, "test_job")
            j.wait(60)
            console.print(repr(j))
            console.print("[bold]>>> j.result()[/]")
            n, factors = j.result()
            console.print(f"{n} = {' * '.join(map(str, factors))}")
        numbers = [random.Random(i).randint(10**9, 10**11) for i in range(1000)]
        console.print("\n[bold]>>> jobs = [D.eval_function(factor, (n,)) for n in numbers]"
                      "[/]")
        console.print("(Example 2: 1,000 factorings)")
        console.print("[bold]>>> with dsage.progress(jobs) as p: p.wait()[/]")
        jobs = [D.eval_function(factor, (n,)) for n in numbers]
        with progress(jobs, title="factor", console=console) as p:
            p.wait(300)
        console.print(f"{numbers[0]} = {' * '.join(map(str, jobs[0].result()))}")
        console.print("\n[bold]>>> D.map(factor, numbers, progress=True)[/]  (the same, "
                      "many items per job)")
        t = time.perf_counter()
        factored = D.map(factor, numbers, progress=True)
        console.print(f"{len(factored):,} factorings in {time.perf_counter() - t:.2f} s; "
                      f"all agree: {factored == [j.result() for j in jobs]}")
        n = 10000000000037 * 300000000000089 * 1000000007 ** 2  # primes of 14, 15, 10 digits
        console.print(f"\n[bold]>>> with DistributedFactor(D, {n}, progress=True) as f: "
                      f"f.wait()[/]  (ECM jobs in parallel)")
        t = time.perf_counter()
        with DistributedFactor(D, n, progress=True) as f:
            factored_n = f.wait(300)
        console.print(f"{' * '.join(f'{p}^{e}' if e > 1 else str(p) for p, e in factored_n)}"
                      f"  ({time.perf_counter() - t:.2f} s)")
        console.print("\n[bold]>>> D('1/0')[/]  (a failing job)")
        bad = D("1/0")
        bad.wait(60)
        console.print(f"status: {bad.status}, error: {bad.error}")
        console.print(f"\nworkers: {[(w.host, w.slots) for w in D.workers()]}")
    console.print("cluster stopped. [green]demo passed[/]")
    return 0
