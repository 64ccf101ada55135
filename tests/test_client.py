"""The client (issue "Core v2", client part): errors live in their own module,
wrappers share one condition, and show why a queued job waits."""

from __future__ import annotations

import ast
import threading
import time
from pathlib import Path
from typing import Any

import dsage

from .conftest import wait_for


def record(job_id: str, status: str, result_from: str = "none") -> dict[str, Any]:
    """A job record as the broker sends it (no result: encoding 'none')."""
    final = status in ("completed", "failed", "killed")
    return {"id": job_id, "name": None, "kind": "python", "status": status, "priority": 5,
            "created": 1.0, "started": 1.0, "finished": 2.0 if final else None,
            "failures": 0, "error": None, "worker": None, "encoding": "none",
            "result_from": result_from, "sealed": False, "reason": None}


def test_wrappers_share_one_condition_and_waiters_wake_at_once(cluster: dsage.DSage,
                                                               tmp_path: Path) -> None:
    D = cluster
    gates = [tmp_path / "a", tmp_path / "b"]
    jobs = [D(f"import os, time\nwhile not os.path.exists({str(g)!r}): time.sleep(0.01)\n"
              f"{i}") for i, g in enumerate(gates)]
    for j in jobs:
        assert not any(isinstance(v, (threading.Event, threading.Condition))
                       for v in vars(j).values()), "a wrapper has its own Event"
    woke: dict[int, float] = {}

    def waiter(i: int) -> None:
        jobs[i].wait(60)
        woke[i] = time.monotonic()

    threads = [threading.Thread(target=waiter, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    gates[0].touch()
    wait_for(lambda: 0 in woke, 30, "the first waiter")
    assert 1 not in woke and not jobs[1].done()
    gates[1].touch()
    wait_for(lambda: 1 in woke, 30, "the second waiter")
    assert [j.result for j in jobs] == [0, 1]


# --- 4. errors in their own module; 5. the reason a job waits


def test_errors_have_their_own_module_and_job_does_not_import_client() -> None:
    from dsage import errors

    for name in ("DSageError", "BrokerUnreachable", "KeyRejected", "UnknownJob",
                 "SubmitRejected", "JobError", "UntrustedResultError"):
        assert getattr(dsage, name) is getattr(errors, name)
    from dsage.client import SubmitRejected, UnknownJob  # the old import path still works

    assert SubmitRejected is errors.SubmitRejected and UnknownJob is errors.UnknownJob
    source = Path(dsage.__file__).with_name("job.py").read_text()
    imported = {node.module for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom)}
    assert not imported & {"client", "dsage.client"}, imported
    e = errors.UnknownJob("no such job", "0" * 32)
    assert e.job_id == "0" * 32 and str(e) == "no such job"
    assert isinstance(e, KeyError) and isinstance(e, dsage.DSageError)


def test_reason_is_exposed_and_older_records_without_it_still_work() -> None:
    w = dsage.JobWrapper(None, "0" * 32, None, "python")
    rec = record("0" * 32, "new")
    rec["reason"] = "no connected worker offers the tag 'gpu'"
    w._update(rec, [b"", b""])
    assert w.reason == "no connected worker offers the tag 'gpu'" and not w.done()
    del rec["reason"]
    rec["status"] = "processing"
    w._update(rec, [b"", b""])
    assert w.reason is None and w.status == "processing"
