"""Broker memory with a million small queued jobs (opt-in: ``--million``).

A broker alone (no monitor, so nothing runs), a fresh DSAGE_HOME, one client
that submits ``count`` tiny jobs (``D('0')``) in batches and waits after each
batch until the broker has acknowledged all of it (a submit is acknowledged
after it is committed to the store). Then the broker's VmRSS and VmHWM are
read from ``/proc/PID/status``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .procs import proc_status_kb

BATCH = 10_000


def _wait_acked(D: Any, timeout: float) -> None:
    """Until the broker acknowledged every submitted job."""
    io = D._io
    deadline = time.monotonic() + timeout
    if hasattr(io, "unacked"):
        while io.unacked:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(io.unacked)} jobs still unacknowledged")
            time.sleep(0.05)
    else:  # requests follow earlier submits, and the broker answers in order
        D.workers(timeout=timeout)


def bench_million(count: int = 1_000_000) -> dict[str, Any]:
    import dsage
    from dsage.cluster import free_port

    home = tempfile.mkdtemp(prefix="dsage-million-")
    broker = D = None
    try:
        port = free_port()
        dsage.setup(home)
        broker = dsage.server(port, blocking=False, home=home,
                              max_queued_per_client=count + 1000)
        D = dsage.DSage("127.0.0.1", port, home=home, connect_timeout=60)
        base_kb = proc_status_kb(broker.pid, "VmRSS")
        t0 = time.perf_counter()
        done = 0
        while done < count:
            n = min(BATCH, count - done)
            for _ in range(n):
                D("0")  # the wrapper is dropped; the client tracks it weakly
            _wait_acked(D, 600)
            done += n
            if done % 100_000 == 0 or done == count:
                print(f"  {done:,} queued, broker RSS "
                      f"{proc_status_kb(broker.pid, 'VmRSS') / 1024:.0f} MB, "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        elapsed = time.perf_counter() - t0
        time.sleep(1.0)  # let the broker finish its loop iteration
        rss_kb = proc_status_kb(broker.pid, "VmRSS")
        hwm_kb = proc_status_kb(broker.pid, "VmHWM")
        db = Path(home) / "db"
        db_bytes = sum(p.stat().st_size for p in db.iterdir() if p.is_file())
        return {"million_jobs": count, "million_submit_s": elapsed,
                "million_submit_per_s": count / elapsed,
                "broker_rss_idle_mb": base_kb / 1024, "broker_rss_mb": rss_kb / 1024,
                "broker_hwm_mb": hwm_kb / 1024, "store_mb": db_bytes / 2**20}
    finally:
        if D is not None:
            D.close()
        if broker is not None:
            broker.stop()
        shutil.rmtree(home, ignore_errors=True)
