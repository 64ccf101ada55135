"""Broker memory while a stopped client is owed large results (``--owed``).

A cluster from ``start_all(workers=2)`` in a fresh DSAGE_HOME. A client in a
separate process (``python -m benchmarks.owed --client ...``, same home, so the
same key) submits ``count`` jobs that each return ``size`` bytes
(``DSAGE_RESULT = b'x' * size``), makes one request (answered after the broker
has taken the submits before it), says so on stdout and SIGSTOPs itself, before
its results arrive. The runner's own client (``start_all``'s) then polls
``get_my_jobs('new')`` and ``get_my_jobs('processing')`` until neither lists a
job, checks that none failed or was killed, and reads the broker's ``VmRSS``
and ``VmHWM`` from ``/proc/PID/status``; the stopped client is killed after.
The completed jobs are not listed, so the measurement itself loads no result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from .procs import proc_status_kb, process_state

COUNT = 12
SIZE = 25_000_000


def client_main(home: str, port: int, count: int, size: int) -> None:
    """The client that is owed the results: submit, confirm, stop."""
    import dsage

    D = dsage.DSage("127.0.0.1", port, home=home, connect_timeout=30)
    jobs = [D(f"DSAGE_RESULT = b'x' * {size}", name="owed") for _ in range(count)]
    D.workers(timeout=60)  # answered in order: the broker has every submit before it
    print(json.dumps({"submitted": len(jobs), "done_before_stop": sum(j.done() for j in jobs)}),
          flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
    D.close()


def bench_owed(count: int = COUNT, size: int = SIZE, timeout: float = 120.0) -> dict[str, Any]:
    import dsage

    home = tempfile.mkdtemp(prefix="dsage-owed-")
    D = client = None
    try:
        D = dsage.start_all(workers=2, port=0, home=home)
        broker = D._cluster.broker.pid
        idle_kb = proc_status_kb(broker, "VmRSS")
        t0 = time.perf_counter()
        client = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.owed", "--client", home, str(D.port),
             str(count), str(size)], stdout=subprocess.PIPE, text=True)
        assert client.stdout is not None
        line = client.stdout.readline()
        if not line:
            raise RuntimeError(f"the owed client exited (status {client.wait()}) before submitting")
        said = json.loads(line)
        deadline = time.monotonic() + 10
        while process_state(client.pid) != "T":
            if time.monotonic() > deadline:
                raise RuntimeError("the owed client did not stop itself")
            time.sleep(0.01)
        t_stop = time.perf_counter() - t0
        peak_sampled_kb = 0
        deadline = time.monotonic() + timeout
        while True:
            peak_sampled_kb = max(peak_sampled_kb, proc_status_kb(broker, "VmRSS"))
            open_jobs = len(D.get_my_jobs("new")) + len(D.get_my_jobs("processing"))
            if not open_jobs:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{open_jobs} of {count} jobs still open after {timeout:g} s")
            time.sleep(0.2)
        t_done = time.perf_counter() - t0
        time.sleep(0.5)  # let the broker finish what it was doing
        rss_kb = proc_status_kb(broker, "VmRSS")
        hwm_kb = proc_status_kb(broker, "VmHWM")
        bad = len(D.get_my_jobs("failed")) + len(D.get_my_jobs("killed"))
        if bad:
            raise RuntimeError(f"{bad} of the {count} owed jobs failed or were killed")
        return {"owed_jobs": count, "owed_bytes_each": size,
                "owed_done_before_stop": said["done_before_stop"],
                "owed_stop_s": t_stop, "owed_completed_s": t_done,
                "owed_broker_idle_mb": idle_kb / 1024, "owed_broker_rss_mb": rss_kb / 1024,
                "owed_broker_hwm_mb": hwm_kb / 1024,
                "owed_broker_rss_sampled_peak_mb": max(peak_sampled_kb, rss_kb) / 1024}
    finally:
        if client is not None:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    client.send_signal(sig)
                except ProcessLookupError:
                    pass
            client.wait()
        if D is not None:
            D.close()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        client_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        print(json.dumps(bench_owed(), indent=2))
