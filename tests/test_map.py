"""Many jobs (issue "Many jobs"): ``D.map``, ``D.imap`` and ``D.executor()``.

A map sends its function once (by content address, cached by the slots), packs
many items per job and many jobs per message, sizes chunks from measured item
times, reports a failing item by its index with the worker's traceback, and
kills what is left when its iterator is closed or times out. The executor is
checked against the semantics of CPython's own executor tests
(Lib/test/test_concurrent_futures/executor.py and test_shutdown.py).
"""

from __future__ import annotations

import gc
import itertools
import math
import operator
import sys
import threading
import time
import weakref
from collections import Counter
from pathlib import Path

import pytest

import dsage
from dsage import keys
from dsage.chunks import MAX_IN_FLIGHT, ChunkSizer
from dsage.protocol import Status

from .conftest import HEARTBEAT, LIVENESS, Procs, wait_for


def inverse(x: float) -> float:
    return 1 / x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def capture(*args: object, **kwargs: object) -> tuple[tuple[object, ...], dict[str, object]]:
    return args, kwargs


class Dummy:
    pass


def make_dummy(_: object) -> Dummy:
    return Dummy()


def chunk_names(d: dsage.DSage, prefix: str) -> list[str]:
    return [j.name for j in d.get_my_jobs(limit=None)
            if j.name and j.name.startswith(prefix + " [")]


def chunk_sizes(names: list[str]) -> list[int]:
    out = []
    for name in names:
        start, stop = name[name.index("[") + 1:-1].split(":")
        out.append(int(stop) - int(start))
    return out


# --- the chunk size policy (pure)


def test_chunks_start_at_one_item_then_hold_a_target_time_of_work_and_shrink_at_the_end() -> None:
    s = ChunkSizer(slots=2)
    assert s.size(10_000) == 1 and s.in_flight(1) == 5
    s.sent(1, 10)
    s.done(1, 0.005, 10)  # 5 ms an item: 20 items make the 0.1 s target
    assert s.size(10_000) == 8  # at most 8 times the largest chunk measured
    s.sent(8, 80)
    s.done(8, 0.04, 80)
    assert s.size(10_000) == 20
    assert s.size(40) == 5  # a quarter of each slot's share of what is left
    assert s.size(1) == 1 and s.size(8) == 2  # not below 10 ms of work
    assert s.size(None) == 20
    tiny = ChunkSizer(slots=2)
    tiny.sent(10_000, 50_000)
    tiny.done(10_000, 1e-2, 50_000)  # 1 us and 5 bytes an item: bounded by bytes
    assert tiny.size(None) == 192 * 1024 // 5
    assert tiny.size(1_000_000) == 192 * 1024 // 5 and tiny.size(100_000) == 12_500
    assert tiny.size(40_000) == 10_000  # 10 ms of work: no smaller at the end
    given = ChunkSizer(slots=2, given=1)
    given.done(10, 1e-5, 50)
    assert given.size(None) == 1 and given.in_flight(1) == MAX_IN_FLIGHT


# --- map and imap


def test_map_keeps_order_and_packs_many_items_per_job_and_many_jobs_per_message(
        cluster: dsage.DSage) -> None:
    before = cluster._io.sent_messages[b"submit"]
    assert cluster.map(math.factorial, range(3000), chunksize=30) == [
        math.factorial(i) for i in range(3000)]
    messages = cluster._io.sent_messages[b"submit"] - before
    names = chunk_names(cluster, "factorial")
    # a chunk that met a new slot (one recycled for its memory growth, say) without
    # the function goes again, under the same name
    resent = len(names) - len(set(names))
    assert sorted(chunk_sizes(sorted(set(names)))) == [30] * 100
    assert messages <= 100 / 4 + resent, f"{messages} submit messages for 100 chunks"

    # sized from measured times: tiny items go thousands to a job
    before = cluster._io.sent_messages[b"submit"]
    assert cluster.map(abs, range(-20_000, 0)) == list(range(20_000, 0, -1))
    jobs = len(chunk_names(cluster, "abs"))
    assert jobs <= 100, f"{jobs} jobs for 20,000 tiny items"
    assert cluster._io.sent_messages[b"submit"] - before <= jobs


def test_map_over_several_iterables_stops_at_the_shortest_and_reads_generators(
        cluster: dsage.DSage) -> None:
    assert cluster.map(pow, [2, 3, 4], [5, 6, 7, 8]) == [32, 729, 16384]
    assert cluster.map(operator.add, (i for i in range(500)), itertools.count(1000)) == [
        i + 1000 + i for i in range(500)]
    assert cluster.map(abs, []) == [] and cluster.map(pow) == []
    assert cluster.map(str.upper, "abc", chunksize=2, ordered=False) in (
        ["A", "B", "C"], ["C", "A", "B"])
    with pytest.raises(ValueError, match="chunksize"):
        cluster.map(abs, [1], chunksize=0)
    with pytest.raises(TypeError, match="unknown job option"):
        cluster.map(abs, [1], colour="red")


def test_a_failing_item_raises_job_error_naming_its_index_with_the_remote_traceback(
        cluster: dsage.DSage) -> None:
    items = [1.0] * 40 + [0] + [2.0] * 9
    with pytest.raises(dsage.JobError) as e:
        cluster.map(inverse, items, chunksize=7)
    err = e.value
    assert err.index == 40 and isinstance(err.exception, ZeroDivisionError)
    assert str(err).startswith("item 40 failed: ZeroDivisionError: division by zero")
    assert "in inverse" in err.output and "return 1 / x" in err.output
    assert "in run_chunk" not in err.output
    assert isinstance(err.__cause__, ZeroDivisionError)

    out = cluster.map(inverse, items, chunksize=7, return_exceptions=True)
    assert out[:40] == [1.0] * 40 and out[41:] == [0.5] * 9
    assert isinstance(out[40], ZeroDivisionError)
    assert "return 1 / x" in str(out[40].__cause__)

    # a chunk that fails as a whole (its process exits) fails each of its items
    out = cluster.map(sys.exit, [3, 4], chunksize=2, return_exceptions=True)
    assert [type(x) for x in out] == [dsage.ItemError, dsage.ItemError]
    assert [x.index for x in out] == [0, 1]
    assert "the job exited: sys.exit(3)" in str(out[1]) and out[1].job.status == "failed"
    with pytest.raises(dsage.JobError, match=r"item 0 failed: its job .* the job exited"):
        cluster.map(sys.exit, [3])
    # an item that cannot be sent is named in the call
    with pytest.raises(TypeError, match=r"cannot send item 1: it \(lock\) cannot be pickled"):
        cluster.map(abs, [1, threading.Lock()])

    # imap hands out every result before the failing one
    it = cluster.imap(inverse, [1, 2, 0, 4], chunksize=1)
    assert [next(it), next(it)] == [1.0, 0.5]
    with pytest.raises(dsage.JobError, match="item 2 failed"):
        next(it)


def test_imap_yields_in_order_or_as_chunks_complete(cluster: dsage.DSage) -> None:
    times = [1.5, 0.0, 0.0]
    assert list(cluster.imap(nap, times, chunksize=1)) == times
    t = time.monotonic()
    it = cluster.imap(nap, times, chunksize=1, ordered=False)
    assert next(it) == 0.0 and time.monotonic() - t < 1.4  # not after the slow one
    assert sorted(it) == [0.0, 1.5]
    assert sorted(cluster.map(nap, times, chunksize=1, ordered=False)) == sorted(times)


def test_a_map_that_times_out_raises_and_kills_its_jobs(cluster: dsage.DSage) -> None:
    t = time.monotonic()
    with pytest.raises(TimeoutError):
        cluster.map(nap, [0.0, 30.0, 30.0], chunksize=1, timeout=1.0)
    assert time.monotonic() - t < 10
    wait_for(lambda: not cluster.get_my_jobs("processing") and not cluster.get_my_jobs("new"),
             20, "the map's jobs to be killed")
    killed = [j for j in cluster.get_my_jobs(Status.KILLED.value)
              if j.name and j.name.startswith("nap [")]
    assert len(killed) >= 2  # (three if the quick one was not back within the second)


def test_closing_an_imap_early_kills_what_it_sent_and_reads_items_lazily(
        cluster: dsage.DSage) -> None:
    taken = []

    def numbers():  # an endless input: the map reads only what its chunks need
        for i in itertools.count():
            taken.append(i)
            yield i

    it = cluster.imap(nap, (0.0 if i < 5 else 30.0 for i in numbers()))
    assert [next(it) for _ in range(5)] == [0.0] * 5
    it.close()
    assert len(taken) < 200
    wait_for(lambda: not cluster.get_my_jobs("processing") and not cluster.get_my_jobs("new"),
             20, "the map's jobs to be killed")


def test_a_slot_without_the_function_gets_it_again(procs: Procs) -> None:
    """Later maps of a function name it by digest; new slots (the monitor replaced)
    do not have it, and get the chunk again with the function."""
    procs.broker()
    monitor = procs.worker(2)
    d = procs.client()
    procs.wait_workers(d, 2)
    assert d.map(inverse, [1, 2, 4]) == [1.0, 0.5, 0.25]
    monitor.stop(timeout=10)
    wait_for(lambda: not d.workers(), 20, "the monitor to leave")
    procs.worker(2)
    procs.wait_workers(d, 2)
    assert d.map(inverse, range(1, 41), chunksize=4) == [1 / i for i in range(1, 41)]
    counts = Counter(chunk_names(d, "inverse"))
    assert max(counts.values()) == 2  # some chunks went twice: once by digest, once in full


def test_a_chunk_whose_monitor_is_lost_runs_again(procs: Procs) -> None:
    procs.broker()
    first = procs.worker(2)
    d = procs.client()
    procs.wait_workers(d, 2)
    it = d.imap(nap, [0.5] * 8, chunksize=2)
    wait_for(lambda: d.get_my_jobs("processing"), 20, "chunks to start")
    procs.kill9(first)
    procs.worker(2)
    assert list(it) == [0.5] * 8
    assert any(j.failures for j in d.get_my_jobs() if j.name and j.name.startswith("nap ["))


def test_progress_shows_a_bar_and_changes_nothing(cluster: dsage.DSage,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cluster.map(abs, range(-50, 0), progress=True) == list(range(50, 0, -1))
    err = capsys.readouterr().err  # not a terminal here: the view's final line
    assert "map abs: 50/50 done, 0 failed, 0 running, 0 queued" in err, err


# --- the executor, as CPython's executor tests check ProcessPoolExecutor


def test_executor_submit_and_map_as_the_standard_library_has_them(cluster: dsage.DSage) -> None:
    with cluster.executor() as ex:
        assert ex.submit(pow, 2, 8).result() == 256
        assert ex.submit(operator.mul, 2, 8).result() == 16
        assert ex.submit(capture, 1, self=2, fn=3).result() == ((1,), {"self": 2, "fn": 3})
        with pytest.raises(TypeError):
            ex.submit(fn=capture, arg=1)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            ex.submit(arg=1)  # type: ignore[call-arg]
        assert list(ex.map(pow, range(10), range(10))) == list(map(pow, range(10), range(10)))
        assert list(ex.map(pow, range(10), range(10), chunksize=3)) == list(
            map(pow, range(10), range(10)))
        i = ex.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
        assert next(i) == (0, 1) and next(i) == (0, 1)
        with pytest.raises(ZeroDivisionError):
            next(i)
        results = []
        with pytest.raises(TimeoutError):
            for r in ex.map(nap, [0, 0, 30], timeout=5, chunksize=1):
                results.append(r)
        assert results == [0, 0]
        for obj in ex.map(make_dummy, range(10)):  # the iterator keeps no result alive
            wr = weakref.ref(obj)
            del obj
            gc.collect()
            assert wr() is None
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pow, 2, 5)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.map(abs, [1])


def test_an_executor_checks_its_job_options_when_made(cluster: dsage.DSage) -> None:
    """D.executor(colour=1) or (priority=42) was made, and failed at each submit."""
    with pytest.raises(TypeError, match="unknown job option.*colour"):
        cluster.executor(colour=1)
    with pytest.raises(TypeError, match="unknown job option.*user_vars"):
        cluster.executor(user_vars={"a": 1})
    with pytest.raises(ValueError, match="priority"):
        cluster.executor(priority=42)
    with cluster.executor(priority=1, timeout=30, name="ex", retries=1) as ex:
        assert ex.submit(pow, 2, 3).result(60) == 8


def test_executor_shutdown_waits_or_cancels_queued_jobs(cluster: dsage.DSage) -> None:
    ex = cluster.executor()
    fs = [ex.submit(nap, 0.05) for _ in range(20)]
    ex.shutdown()
    assert all(f.done() and f.result() == 0.05 for f in fs)

    ex = cluster.executor(priority=9)
    fs = [ex.submit(nap, 1.0) for _ in range(12)]
    wait_for(lambda: sum(f.status == "processing" for f in fs) >= 2, 20, "two jobs to run")
    t = time.monotonic()
    ex.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - t < 5
    states = Counter(f.status for f in fs)
    assert states["completed"] >= 2 and states["killed"] >= 6, states

    ex = cluster.executor()  # a map left unread does not keep shutdown waiting
    ex.map(str, [2] * 5)
    ex.shutdown()

    ex = cluster.executor()
    f = ex.submit(nap, 1.0)
    t = time.monotonic()
    ex.shutdown(wait=False)
    assert time.monotonic() - t < 0.5 and f.result(timeout=30) == 1.0


def test_a_map_never_loads_results_from_an_anonymous_worker(procs: Procs, home: Path,
                                                            tmp_path: Path) -> None:
    """A chunk's results travel as a pickle inside its result: from an anonymous
    worker it is not loaded, and the chunk's items fail saying why."""
    procs.broker(allow_anonymous=True)
    anon = dsage.worker("127.0.0.1", procs.port, 1, blocking=False, home=tmp_path / "anon",
                        anonymous=True, server_key=str(keys.public_key_file(home)),
                        heartbeat=HEARTBEAT, liveness=LIVENESS, priority=0)
    assert anon is not None
    procs.started.append(anon)
    d = procs.client()
    procs.wait_workers(d, 1)
    out = d.map(abs, [-1, -2], anonymous_ok=True, return_exceptions=True)
    assert [type(x) for x in out] == [dsage.ItemError, dsage.ItemError]
    assert "ran on an anonymous worker" in str(out[0]) and not out[0].job.trusted


def test_a_slots_first_chunk_does_not_import_the_client(cluster: dsage.DSage) -> None:
    """A chunk's call names dsage.chunks, which the slot has loaded: its first chunk
    (every chunk, with ``isolate``) does not import the whole package (~130 ms)."""
    loaded = cluster.map(lambda _: "dsage.client" in sys.modules, [0, 1], isolate=True)
    assert loaded == [False, False]
