"""``dsage demo``: start a local cluster, run the seed's examples, shut it down."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from rich.console import Console

from .cluster import start_all
from .words import plural

FILE_JOB = """\
import random

def factor(n):
    out, d = [], 2
    while d * d <= n:
        while n % d == 0:
            out.append(d)
            n //= d
        d += 1
    return out + ([n] if n > 1 else [])

n = random.randint(10**11, 10**13)
DSAGE_RESULT = (n, factor(n))
"""


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
        console.print("\n[bold]>>> jobs = [D(f'sum(range({n}))') for n in range(10)][/]")
        jobs = [D(f"sum(range({n}))") for n in range(10)]
        console.print([j.wait(60).result() for j in jobs])
        console.print("\n[bold]>>> D('1/0')[/]  (a failing job)")
        bad = D("1/0").wait(60)
        console.print(f"status: {bad.status}, error: {bad.error}")
        console.print(f"\nworkers: {[(w.host, w.slots) for w in D.workers()]}")
    console.print("cluster stopped. [green]demo passed[/]")
    return 0
