"""JobWrappers as concurrent.futures Futures (issue "Many jobs"): the standard
library's wait and as_completed, cancel of a queued job, done callbacks, asyncio
(await, gather, wrap_future), D.as_completed / block_on_jobs / job_results_iter,
and results that cannot be loaded on the client. Real processes throughout."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dsage

from .conftest import Procs, wait_for


def gated(gate: Path, value: Any, marker: Path | None = None) -> str:
    """Code that waits for ``gate`` to exist (writing ``marker`` once it runs), then
    gives ``value``."""
    mark = f"open({str(marker)!r}, 'w').close()\n" if marker else ""
    return (f"import os, time\n{mark}while not os.path.exists({str(gate)!r}): "
            f"time.sleep(0.01)\n{value!r}")


@pytest.fixture
def one_slot(procs: Procs) -> Iterator[dsage.DSage]:
    """A broker, a monitor with one slot (and the default prefetch of one job), a client."""
    d = procs.up(1)
    yield d


def test_concurrent_futures_wait_and_as_completed_accept_wrappers(cluster: dsage.DSage,
                                                                  tmp_path: Path) -> None:
    D = cluster
    gate = tmp_path / "gate"
    slow = D(gated(gate, "slow"))
    fast = D("'fast'")
    assert isinstance(slow, cf.Future)
    done, not_done = cf.wait([slow, fast], 60, return_when=cf.FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    assert fast.done() and not slow.done() and fast.exception() is None

    failing = D("1/0")
    done, not_done = cf.wait([slow, failing], 60, return_when=cf.FIRST_EXCEPTION)
    assert done == {failing} and not_done == {slow}
    assert isinstance(failing.exception(), dsage.JobError)
    with pytest.raises(dsage.JobError, match="ZeroDivisionError"):
        failing.result()

    with pytest.raises(cf.TimeoutError):
        list(cf.as_completed([slow], timeout=0.3))
    order = []
    later = D(gated(gate, "later"))
    for f in cf.as_completed([fast, slow, later], timeout=60):
        order.append(f)
        if f is fast:
            gate.touch()  # the others end only now
    assert order[0] is fast and set(order[1:]) == {slow, later}
    done, not_done = cf.wait([slow, later, fast], 60)  # ALL_COMPLETED
    assert not not_done and [slow.result(), later.result()] == ["slow", "later"]


def test_cancel_removes_a_queued_job_and_leaves_a_running_one(one_slot: dsage.DSage,
                                                               tmp_path: Path) -> None:
    D = one_slot
    gate = tmp_path / "gate"
    running = D(gated(gate, "a", tmp_path / "a-ran"))
    wait_for(lambda: (tmp_path / "a-ran").exists(), 60, "the first job to run")
    prefetched = D(gated(gate, "b"))  # the monitor holds it: a worker has it
    wait_for(prefetched.running, 60, "the second job to reach the monitor")
    queued = D(gated(gate, "c", tmp_path / "c-ran"))  # no credit left: it stays queued
    called: list[tuple[cf.Future[Any], bool]] = []
    queued.add_done_callback(lambda f: called.append((f, f.cancelled())))

    assert running.running() and not running.cancel() and running.running()
    assert queued.cancel() is True
    assert queued.cancelled() and queued.done() and not queued.running()
    assert queued.status == "killed" and "cancelled" in (queued.error or "")
    with pytest.raises(cf.CancelledError):
        queued.result()
    with pytest.raises(dsage.JobError):  # a JobCancelled is both
        queued.exception()
    assert queued.cancel() is True  # as a cancelled Future answers
    done, _ = cf.wait([queued], 0)
    assert done == {queued}
    wait_for(lambda: called == [(queued, True)], 30, "the done callback")

    gate.touch()
    assert [running.result(60), prefetched.result(60)] == ["a", "b"]
    assert not running.cancel() and not running.cancelled()  # finished: False
    assert not (tmp_path / "c-ran").exists()
    assert D("'after'").result(60) == "after"  # the slot went on


def test_done_callbacks_come_from_the_io_thread_and_raising_ones_are_logged(
        cluster: dsage.DSage, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    D = cluster
    gate = tmp_path / "gate"
    j = D(gated(gate, 7))
    calls: list[tuple[str, Any]] = []

    def bad(f: cf.Future[Any]) -> None:
        raise RuntimeError("a broken callback")

    def exits(f: cf.Future[Any]) -> None:
        raise SystemExit(3)

    j.add_done_callback(lambda f: calls.append((threading.current_thread().name, f.result())))
    j.add_done_callback(bad)
    j.add_done_callback(exits)
    j.add_done_callback(lambda f: calls.append(("second", f.result())))
    with caplog.at_level(logging.ERROR, logger="dsage.client"):
        gate.touch()
        j.wait(60)
        wait_for(lambda: len(calls) == 2, 30, "the callbacks")
    assert calls == [("dsage-client-io", 7), ("second", 7)]
    logged = [r for r in caplog.records if "done callback" in r.getMessage()]
    assert len(logged) == 2 and {r.exc_info[0] for r in logged if r.exc_info} == {
        RuntimeError, SystemExit}
    j.add_done_callback(lambda f: calls.append((threading.current_thread().name, "late")))
    assert calls[-1] == (threading.current_thread().name, "late")  # at once, here
    assert D("8").result(60) == 8  # the I/O thread goes on


def test_asyncio_awaits_and_gathers_wrappers_without_blocking_the_loop(
        cluster: dsage.DSage, tmp_path: Path) -> None:
    D = cluster
    gate = tmp_path / "gate"

    async def main() -> tuple[list[Any], int, Any]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                if ticks == 20:
                    gate.touch()  # the jobs end only after the loop ran meanwhile
                await asyncio.sleep(0.01)

        t = asyncio.create_task(ticker())
        results = await asyncio.gather(*[D(gated(gate, i)) for i in range(4)])
        single = await D("'one'")
        wrapped = await asyncio.wrap_future(D("5"))
        t.cancel()
        with pytest.raises(dsage.JobError, match="ZeroDivisionError"):
            await D("1/0")
        return results, ticks, (single, wrapped)

    results, ticks, others = asyncio.run(asyncio.wait_for(main(), 120))
    assert results == [0, 1, 2, 3] and ticks >= 20 and others == ("one", 5)


def test_as_completed_block_on_jobs_and_job_results_iter(cluster: dsage.DSage,
                                                         tmp_path: Path) -> None:
    D = cluster
    gate = tmp_path / "gate"
    slow, fast = D(gated(gate, "slow")), D("'fast'")
    with pytest.raises(TimeoutError, match="of 2 jobs are not finished"):
        for _ in D.as_completed([slow, fast], timeout=0.5):
            pass
    seen = []
    for j in D.as_completed([slow, fast, fast], timeout=60):  # each job once
        seen.append(j)
        gate.touch()
    assert seen == [fast, slow]
    jobs = [D(f"{i} * {i}") for i in range(6)]
    assert D.block_on_jobs(jobs, timeout=60) == jobs and all(j.done() for j in jobs)
    assert sorted(D.job_results_iter([D(f"{i}") for i in range(5)], timeout=60)) == \
        [0, 1, 2, 3, 4]
    it = D.job_results_iter([D("1/0")], timeout=60)
    with pytest.raises(dsage.JobError, match="ZeroDivisionError"):
        next(it)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        D.block_on_jobs([D(gated(tmp_path / "never", 0))], timeout=0.3)
    assert time.monotonic() - start < 10


def test_a_result_the_client_cannot_load_raises_job_error_and_stays_completed(
        cluster: dsage.DSage) -> None:
    D = cluster
    # a class that exists on the worker only (a module made there)
    code = ("import sys, types\nm = types.ModuleType('dsage_worker_only')\n"
            "exec('class Thing:\\n    pass', m.__dict__)\n"
            "sys.modules['dsage_worker_only'] = m\nDSAGE_RESULT = m.Thing()\n")
    j = D(code)
    with pytest.raises(dsage.JobError, match="cannot be loaded here.*dsage_worker_only") as e:
        j.result(60)
    assert j.status == "completed" and e.value.status == "completed"
    assert j.exception() is e.value  # the same error every time
    with pytest.raises(dsage.JobError):
        j.result()

    async def awaited() -> None:
        await D(code)

    with pytest.raises(dsage.JobError, match="cannot be loaded here"):
        asyncio.run(asyncio.wait_for(awaited(), 60))  # raises, does not hang


def test_a_wrapper_refuses_outside_state_changes(cluster: dsage.DSage) -> None:
    j = cluster("1")
    for call in (lambda: j.set_result(2), lambda: j.set_exception(ValueError()),
                 j.set_running_or_notify_cancel):
        with pytest.raises(RuntimeError, match="comes from its job"):
            call()
    assert j.result(60) == 1


def test_a_job_the_broker_forgot_or_refused_ends_awaits_and_waits_with_its_error() -> None:
    """exception() gives the error result() raises (it never raises it: asyncio's
    wrap_future calls it from the event loop, and a raise there would hang the await)."""
    forgotten = dsage.JobWrapper(None, "0" * 32, None, "python")
    forgotten._end("the broker no longer knows this job", unknown=True)
    refused = dsage.JobWrapper(None, "1" * 32, None, "python")
    refused._end("refused by the broker: too many", refused="quota")
    assert isinstance(forgotten.exception(), dsage.UnknownJob)
    assert isinstance(refused.exception(), dsage.SubmitRejected)
    done, _ = cf.wait([forgotten, refused], 0)
    assert done == {forgotten, refused}

    async def awaited(j: dsage.JobWrapper) -> Any:
        return await j

    with pytest.raises(dsage.UnknownJob):
        asyncio.run(asyncio.wait_for(awaited(forgotten), 10))
    with pytest.raises(dsage.SubmitRejected):
        asyncio.run(asyncio.wait_for(awaited(refused), 10))
    with pytest.raises(dsage.UnknownJob):
        forgotten.result()


def test_a_sage_result_without_sage_says_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Sage job's result once raised a bare AttributeError from deep in Sage's
    imports; without Sage it says what is missing and how to get it."""
    import pickle
    import sys
    import types

    from dsage.job import JobWrapper

    sage = types.ModuleType("sage")
    rings = types.ModuleType("sage.rings_of_a_test")

    class Integer:  # a stand-in for sage.rings.integer.Integer
        pass

    Integer.__module__ = rings.__name__
    Integer.__qualname__ = "Integer"
    rings.Integer = Integer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sage", sage)
    monkeypatch.setitem(sys.modules, rings.__name__, rings)
    blob = pickle.dumps(Integer())
    monkeypatch.delitem(sys.modules, rings.__name__)
    monkeypatch.delitem(sys.modules, "sage")
    monkeypatch.setitem(sys.modules, "sage.all", None)  # and no Sage installed
    w = JobWrapper(None, "5" * 32, None, "sage")
    w._update({"id": w.job_id, "name": None, "kind": "sage", "status": "completed",
               "priority": 5, "created": 1.0, "started": 1.0, "finished": 2.0,
               "failures": 0, "error": None, "worker": None, "encoding": "dill",
               "result_from": "dsage_result", "sealed": False, "reason": None,
               "attempt": 1}, [blob, b""])
    w._settle_hostless()
    with pytest.raises(dsage.JobError, match=r"Sage object.*pip install 'dsage\[sage\]'"):
        w.result(0)
    assert w.status == "completed"
