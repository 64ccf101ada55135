"""Watching and steering a cluster: status, jobs, kill, purge (Python and shell), and
sessions that end cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import dsage
from dsage import running
from dsage.brokerstate import BrokerConfig, BrokerState
from dsage.protocol import M, make
from dsage.shell import parse_when, plural
from dsage.store import Store

from .conftest import HEARTBEAT, Procs, alive, wait_for

SLEEP = "import time; time.sleep(60)"


def shell(home: Path, *args: str, port: int | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dsage.cli", *args]
    if port is not None:
        cmd += ["--port", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DSAGE_HOME": str(home)})


def shell_json(home: Path, *args: str, port: int | None = None) -> Any:
    r = shell(home, *args, "--json", port=port)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# --- pure parts


def test_plurals_and_times() -> None:
    assert plural(1, "slot") == "1 slot" and plural(2, "slot") == "2 slots"
    assert plural(0, "job") == "0 jobs"
    assert parse_when("10m", now=1000.0) == 400.0
    assert parse_when("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_when("1.5d", now=200_000.0) == 200_000.0 - 1.5 * 86400
    assert parse_when("2026-11-25T14:00") > 0
    with pytest.raises(Exception, match="neither a duration"):
        parse_when("yesterday")


def test_listing_pages_by_sequence_with_filters(tmp_path: Path) -> None:
    """LIST answers a page and says where the next one starts; name and since filter."""
    store = Store(tmp_path / "dsage.db")
    state = BrokerState(store, BrokerConfig(), 0.0, lambda k: True)
    owner = "A" * 40
    specs = [{"id": f"{i:032x}", "name": "even" if i % 2 == 0 else "odd", "kind": "python",
              "timeout": None, "priority": 5, "memory": None, "anonymous_ok": False,
              "requires": [], "isolate": False, "retries": 0, "retry_on": [], "shared": []}
             for i in range(25)]
    state.on_client(0.0, b"c", owner, make(M.SUBMIT, [b"x"] * 25, req=1, jobs=specs, shared=[]))
    state.flush(0.0)

    def page(after: int, limit: int, **f: Any) -> tuple[list[str], int | None]:
        state.on_client(0.0, b"c", owner, make(M.LIST, req=2, status=f.get("status"),
                                               name=f.get("name"), since=f.get("since"),
                                               after=after, limit=limit))
        [reply] = [o.msg for o in state.flush(0.0) if o.msg.type is M.JOBS]
        return [r["id"] for r in reply.header["jobs"]], reply.header["next"]

    seen: list[str] = []
    after: int | None = 0
    while after is not None:
        ids, after = page(after, 10)
        assert len(ids) <= 10
        seen += ids
    assert seen == [s["id"] for s in specs]
    evens, nxt = page(0, 100, name="even")
    assert evens == [s["id"] for s in specs if s["name"] == "even"] and nxt is None
    assert page(0, 100, since=time.time() + 3600) == ([], None)
    assert page(0, 100, status="completed") == ([], None)
    state.on_client(0.0, b"c", "B" * 40, make(M.LIST, req=3, status=None, name=None, since=None,
                                               after=0, limit=100))
    [other] = [o.msg for o in state.flush(0.0) if o.msg.type is M.JOBS]
    assert other.header["jobs"] == []  # another key's jobs are not listed
    store.close()


def test_running_brokers_are_recorded_and_stale_records_dropped(tmp_path: Path) -> None:
    path = running.record(tmp_path, 4242)
    assert (path.stat().st_mode & 0o777) == 0o600
    [me] = running.brokers(tmp_path)
    assert me.port == 4242 and me.pid == os.getpid()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"port": 4343, "pid": dead.pid, "host": socket.gethostname(),
                                "started": 0.0}))
    assert running.brokers(tmp_path) == [] and not path.exists()
    running.record(tmp_path, 4444)
    running.forget(tmp_path, 4444)
    assert running.brokers(tmp_path) == []


# --- Python API on a live cluster


@pytest.fixture
def one_slot(procs: Procs) -> dsage.DSage:
    """A broker, a monitor with one slot, and a connected client."""
    d = procs.up(1)
    return d


def test_status_lists_jobs_by_state_and_monitors(one_slot: dsage.DSage) -> None:
    d = one_slot
    done = d("1 + 1")
    done.wait(60)
    busy = d(SLEEP)
    queued = [d(SLEEP) for _ in range(3)]
    wait_for(lambda: busy.status == "processing", 60, "the first job to run")
    # after the short first job, the monitor may have been sent all four; it keeps one
    # beyond its busy slot, and gives the others back once they have waited a while
    wait_for(lambda: d.status().jobs["new"] == 2, 60,
             "the jobs beyond the prefetch queued at the broker")
    st = d.status()
    assert st.jobs["completed"] == 1 and st.jobs["processing"] == 2
    assert st.slots == 1 and st.busy == 1 and st.uptime > 0 and st.version == dsage.__version__
    [w] = st.workers
    assert 0 <= w.quiet < 60
    assert d.kill_all("new") >= 2
    assert busy.status == "processing"
    assert d.kill_all() >= 1
    for j in [busy, *queued]:
        j.wait(60)
        assert j.status == "killed"
    assert d.purge() == 5
    assert d.get_my_jobs(limit=None) == []
    with pytest.raises(dsage.UnknownJob):
        done.kill()  # purged: the broker no longer knows it


def test_kill_all_kills_thousands_of_queued_jobs_a_page_at_a_time(procs: Procs) -> None:
    """kill_all once listed every unfinished job into wrappers before killing any."""
    procs.broker()  # no monitor: the jobs stay queued
    d = procs.client()
    jobs = [d("1") for _ in range(3500)]
    wait_for(lambda: d.status().jobs["new"] == 3500, 60, "the jobs stored")
    other = procs.client()  # as `dsage kill --all` in a shell: a client with no wrappers
    before = other._io.sent_messages.copy()
    assert other.kill_all() == 3500
    sent = other._io.sent_messages - before
    assert sent[b"list"] == 4 + 1 and sent[b"kill"] == 4  # pages of 1,000 (and "processing")
    assert not other._io.jobs  # nothing held per job
    wait_for(lambda: all(j.status == "killed" for j in jobs), 60, "the submitter's wrappers")
    assert d.status().jobs["killed"] == 3500 and d.status().jobs["new"] == 0
    assert other.kill_all() == 0


def test_get_my_jobs_pages_through_thousands(cluster: dsage.DSage) -> None:
    jobs = [cluster("0", name="n1" if i < 1500 else "n2", priority=9) for i in range(2500)]
    for j in jobs:
        j.wait(120)
    listed = cluster.get_my_jobs(limit=None)
    assert [j.job_id for j in listed] == [j.job_id for j in jobs]
    assert len(cluster.get_my_jobs()) == 1000  # the default limit
    assert len(cluster.get_my_jobs(name="n2", limit=None)) == 1000
    assert len(cluster.get_my_jobs(since=time.time() + 60, limit=None)) == 0
    with pytest.raises(ValueError):
        cluster.get_my_jobs(limit=0)


# --- the shell commands


def test_shell_commands_find_the_broker_and_print_json(procs: Procs,
                                                      one_slot: dsage.DSage) -> None:
    d = one_slot
    done = d("6 * 7", name="answer")
    done.wait(60)
    slow = d(SLEEP, name="slow")
    wait_for(lambda: slow.status == "processing", 60, "the slow job to run")

    st = shell_json(procs.home, "status")  # no --port: the broker this home runs
    assert st["port"] == procs.port and st["jobs"]["completed"] == 1 and st["slots"] == 1
    listed = shell_json(procs.home, "jobs")
    assert [j["id"] for j in listed] == [done.job_id, slow.job_id]
    assert shell_json(procs.home, "jobs", "--name", "answer")[0]["status"] == "completed"
    assert [j["id"] for j in shell_json(procs.home, "jobs", "--status", "processing")] \
        == [slow.job_id]
    shown = shell_json(procs.home, "jobs", "show", done.job_id)
    assert shown["status"] == "completed" and shown["name"] == "answer"

    table = shell(procs.home, "jobs")
    assert table.returncode == 0 and done.job_id in table.stdout  # ids whole, not cut
    top = shell(procs.home, "top", "--count", "2", "--interval", "0.05")
    assert top.returncode == 0 and slow.job_id in top.stdout and "1 monitor" in top.stdout

    r = shell(procs.home, "kill", "--all")
    assert r.returncode == 0 and "killed 1 job" in r.stdout
    slow.wait(60)
    assert slow.status == "killed"
    r = shell(procs.home, "kill", "0" * 32)
    assert r.returncode == 1 and "no job" in r.stderr
    r = shell(procs.home, "purge")
    assert r.returncode == 0 and "dropped 2 finished jobs" in r.stdout
    assert shell_json(procs.home, "jobs") == []


def test_shell_commands_without_a_broker_say_so(home: Path, port: int) -> None:
    r = shell(home, "status", "--timeout", "1", port=port)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{port}" in r.stderr


@pytest.mark.parametrize("cmd", [["status"], ["top"], ["jobs"], ["kill"], ["purge"]])
def test_shell_commands_have_help(cmd: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "dsage.cli", *cmd, "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--port" in r.stdout and "usage:" in r.stdout


# --- sessions


def test_close_returns_soon_and_wakes_every_waiter(home: Path) -> None:
    """close() with running jobs once froze ~10 s (the monitor's grace period), left
    unfinished wrappers 'new' forever and a thread waiting on one blocked."""
    d = dsage.start_all(workers=1, port=0, home=home, heartbeat=HEARTBEAT)
    pids = [p.pid for p in d._cluster.processes()]
    running_job = d(SLEEP)
    queued = d(SLEEP)
    wait_for(lambda: running_job.status == "processing", 60, "the job to run")
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            queued.result()
        except BaseException as e:  # noqa: BLE001 - what the waiter saw
            errors.append(e)

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    began = time.monotonic()
    d.close()
    took = time.monotonic() - began
    assert took < 8, f"close took {took:.1f} s: the monitors' 10 s grace was not cut"
    t.join(30)
    assert not t.is_alive()
    assert isinstance(errors[0], dsage.DSageError) and "closed" in str(errors[0])
    with pytest.raises(dsage.DSageError, match="closed"):
        running_job.result(timeout=1)
    with pytest.raises(dsage.DSageError):
        d.workers()
    with pytest.raises(dsage.DSageError):
        d("1")
    for pid in pids:
        assert not alive(pid, group=True)


def test_start_all_says_when_earlier_jobs_are_queued(home: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    """Jobs a closed session left once ran silently ahead of a new session's."""
    d = dsage.start_all(workers=1, port=0, home=home, heartbeat=HEARTBEAT)
    [d(SLEEP) for _ in range(3)]
    d.close()
    assert "3 unfinished jobs" in capfd.readouterr().err
    d = dsage.start_all(workers=1, port=0, home=home, heartbeat=HEARTBEAT)
    try:
        err = capfd.readouterr().err
        assert "3 unfinished jobs from an earlier session" in err and "kill_all" in err
        assert d.kill_all() == 3
    finally:
        d.close()


def test_start_all_does_not_join_a_broker_on_the_default_port(home: Path) -> None:
    """start_all() on a busy 8081 once connected to whatever held it."""
    holder = socket.socket()
    try:
        try:
            holder.bind(("127.0.0.1", 8081))
            holder.listen()
        except OSError:
            pass  # taken already: the same situation
        d = dsage.start_all(workers=1, home=home, heartbeat=HEARTBEAT)
        try:
            assert d.port != 8081
            assert [b.port for b in running.brokers(home)] == [d.port]
            assert d("2 + 2").result(60) == 4
        finally:
            d.close()
        assert running.brokers(home) == []
    finally:
        holder.close()


# --- logging


def test_repeated_log_lines_are_folded(tmp_path: Path) -> None:
    """The monitor once logged the same line ~100 times per shutdown."""
    import logging

    from dsage import logs

    path = tmp_path / "logs" / "x.log"
    logs.setup("INFO", path, to_stderr=False)
    try:
        log = logging.getLogger("dsage.test")
        for _ in range(100):
            log.warning("the same thing again")
        log.info("something else")
        for h in logging.getLogger().handlers:
            h.flush()
        lines = path.read_text().splitlines()
        assert [ln.split(" ", 2)[-1] for ln in lines] == [
            "dsage.test WARNING the same thing again",
            "dsage.test WARNING (the last message repeated 99 more times)",
            "dsage.test INFO something else"]
        assert path.stat().st_mode & 0o777 == 0o600
        assert logs.tail(path, 2).splitlines()[-1].endswith("something else")
    finally:
        for h in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(h)
            h.close()


def test_launchers_log_to_the_home_and_logs_are_readable_from_python(
        home: Path, port: int) -> None:
    env = {**os.environ, "DSAGE_HOME": str(home)}
    broker = subprocess.Popen([sys.executable, "-m", "dsage.cli", "broker", "--port", str(port),
                               "--heartbeat", "0.2"], env=env, start_new_session=True,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: "serving" in (home / "logs" / "broker.log").read_text()
                 if (home / "logs" / "broker.log").exists() else False, 30, "the broker's log")
        d = dsage.DSage("127.0.0.1", port, home=home, connect_timeout=30)
        try:
            assert "dsage-broker serving" in d.server_log(10)
            with pytest.raises(dsage.DSageError, match="worker.log does not exist"):
                d.worker_log(10)
        finally:
            d.close()
    finally:
        os.killpg(broker.pid, 9)
        broker.wait()
    s = dsage.start_all(workers=1, port=0, home=home, heartbeat=HEARTBEAT)
    try:
        wait_for(lambda: "registered" in s.server_log(20), 30, "the registration in the log")
        assert "1 slot," in s.worker_log(20)  # plurals right: not "1 slots"
    finally:
        s.close()


# --- the progress view


class _RecordingHost:
    """A JobHost that only records its watchers (the I/O thread's part, by hand)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.watchers: list[Any] = []

    def watch(self, watcher: Any) -> None:
        self.watchers.append(watcher)

    def unwatch(self, watcher: Any) -> None:
        self.watchers.remove(watcher)


def _rec(job_id: str, status: str) -> dict[str, Any]:
    final = status in ("completed", "failed", "killed")
    return {"id": job_id, "name": None, "kind": "python", "status": status, "priority": 5,
            "created": 1.0, "started": 1.0, "finished": 2.0 if final else None,
            "failures": 0, "error": "boom" if status == "failed" else None, "worker": None,
            "encoding": "none", "result_from": "none", "sealed": False, "reason": None}


def _event(host: _RecordingHost, w: Any, status: str) -> None:
    """Apply a record of ``status`` to ``w`` as the I/O thread does, and tell the
    watchers."""
    if w._update(_rec(w.job_id, status), [b"", b""]):
        with host.changed:
            w._settle()
    for watcher in list(host.watchers):
        watcher([w])


def test_progress_counts_follow_recorded_events() -> None:
    import io

    from rich.console import Console

    from dsage.job import JobWrapper

    host = _RecordingHost()
    jobs = [JobWrapper(host, f"{i:032x}", None, "python") for i in range(4)]  # type: ignore[arg-type]
    out = io.StringIO()
    p = dsage.progress(jobs, console=Console(file=out, width=200), interval=3600)
    assert len(host.watchers) == 1
    assert (p.counts.total, p.counts.queued) == (4, 4)

    _event(host, jobs[0], "processing")
    _event(host, jobs[1], "processing")
    assert (p.counts.running, p.counts.queued) == (2, 2)
    _event(host, jobs[0], "completed")
    _event(host, jobs[1], "failed")
    _event(host, jobs[2], "completed")
    assert "3/4 done, 1 failed, 0 running, 1 queued" in p.line()
    assert not p.wait(0)
    _event(host, jobs[3], "killed")  # over, but no failure (a DistributedFunction's leftovers)
    assert p.wait(10)
    wait_for(lambda: not host.watchers, 10, "the view to end and stop watching")
    assert "4/4 done, 1 failed, 1 killed, 0 running, 0 queued" in out.getvalue()
    assert out.getvalue().count("\n") == 1  # not a terminal: one final line here


def test_progress_prints_no_line_before_there_are_jobs_nor_at_every_batch_done() -> None:
    """Without a terminal, a line every ``interval`` seconds once there are jobs, and
    the last one: a computation that adds jobs as it goes (and is done with each batch
    before the next) printed a line per batch, and '0/0 done' before its first."""
    import io

    from rich.console import Console

    from dsage.job import JobWrapper

    host = _RecordingHost()
    out = io.StringIO()
    p = dsage.progress([], console=Console(file=out, width=200), interval=3600,
                       until_closed=True)

    for batch in range(3):
        jobs = [JobWrapper(host, f"{batch}{i:031x}", None, "python")  # type: ignore[arg-type]
                for i in range(2)]
        p.add(jobs)
        for w in jobs:
            _event(host, w, "completed")
        assert p.wait(10)
    p.close()
    assert out.getvalue().count("\n") == 1, out.getvalue()
    assert "6/6 done, 0 failed, 0 running, 0 queued" in out.getvalue()


def test_progress_on_a_live_cluster_and_in_a_pty(home: Path, tmp_path: Path) -> None:
    import pty

    (tmp_path / "scripts").mkdir()  # not beside the home folder 'dsage', which would shadow
    script = tmp_path / "scripts" / "watch.py"  # the package on the script's sys.path
    script.write_text(
        "import dsage\n"
        f"D = dsage.start_all(workers=2, port=0, home={str(home)!r}, heartbeat=0.2)\n"
        "jobs = [D(f'{i} * 2') for i in range(40)] + [D('1/0')]\n"
        "with dsage.progress(jobs, title='doubling') as p:\n"
        "    p.wait(120)\n"
        "D.close()\n")
    pid, fd = pty.fork()
    if pid == 0:  # the child: a script on a terminal
        os.environ["DSAGE_HOME"] = str(home)
        os.environ["COLUMNS"] = "160"
        os.execv(sys.executable, [sys.executable, str(script)])
    chunks: list[bytes] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break  # the child closed the terminal
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(fd)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(pid, 0)
    from dsage.job import strip_control

    raw = b"".join(chunks).decode("utf-8", "replace")
    text = strip_control(raw)
    assert "doubling" in text and "41/41 done, 1 failed" in text, text[-2000:]
    assert "\x1b[" in raw  # drawn as a live terminal view, not plain lines


# --- live output


TICKER = ("import time\n"
          "for i in range(8):\n"
          "    print('tick', i, flush=True)\n"
          "    time.sleep(0.3)\n"
          "'done'")


def test_a_running_jobs_output_streams_to_its_wrapper(one_slot: dsage.DSage) -> None:
    """2.5 s into a job that printed every second, j.output was once ''."""
    d = one_slot
    first = d("print('from the job before')")
    first.wait(60)
    j = d(TICKER)
    seen: list[str] = []
    wait_for(lambda: seen.append(j.output) or "tick 2" in j.output, 60,
             "the first ticks while the job runs")
    assert j.status == "processing"
    assert all("from the job before" not in s for s in seen)  # a fresh capture per job
    pieces: list[str] = []
    j.tail(callback=pieces.append, timeout=60)
    assert j.status == "completed" and j.result() == "done"
    assert "".join(pieces).startswith("tick 0\n")  # all of it, in order, no repeats
    assert "".join(pieces) == j.output == "".join(f"tick {i}\n" for i in range(8))


def test_live_output_only_from_the_jobs_own_monitor(tmp_path: Path) -> None:
    from dsage.scheduler import Where

    store = Store(tmp_path / "dsage.db")
    state = BrokerState(store, BrokerConfig(prefetch=0), 0.0, lambda k: True)
    for mid in ("m1", "m2"):
        state.on_monitor(0.0, mid.encode(), "k" * 40, False,
                         make(M.REGISTER, monitor=mid, host="h", pid=1, slots=1, tags=[],
                              running=[], version=dsage.__version__))
    owner = "o" * 40
    spec = {"id": "a" * 32, "name": None, "kind": "python", "timeout": None, "priority": 5,
            "memory": None, "anonymous_ok": False, "requires": [], "isolate": False,
            "retries": 0, "retry_on": [], "shared": []}
    state.on_client(0.0, b"c", owner, make(M.SUBMIT, [b"x"], req=1, jobs=[spec], shared=[]))
    state.flush(0.0)
    job = state.sched.jobs[spec["id"]]
    assert job.where is Where.ASSIGNED
    runner = job.monitor
    other = "m2" if runner == "m1" else "m1"
    for mid in (other, runner):
        state.on_monitor(0.0, mid.encode(), "k" * 40, False,
                         make(M.OUTPUT, [b"sealed"], id=spec["id"], offset=0))
    outs = [o for o in state.flush(0.0) if o.msg.type is M.OUTPUT]
    assert len(outs) == 1 and outs[0].dest == "event" and outs[0].to == owner.encode()
    store.close()


def test_the_demo_runs_the_seeds_session_with_progress(home: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "dsage.cli", "demo", "--home", str(home)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "DSAGE_HOME": str(home)})
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "demo passed" in out and "all agree: True" in out
    assert "factor: 1000/1000 done" in out and "map factor: 1000/1000 done" in out
    assert "1000000007^2 * 10000000000037 * 300000000000089" in out  # a DistributedFactor


def test_a_second_ctrl_c_while_the_session_closes_ends_it_quietly(home: Path,
                                                                  tmp_path: Path) -> None:
    """A second Ctrl-C while start_all's cluster closed at exit once printed a traceback
    from the atexit callback. The broker is frozen (SIGSTOP) so that closing the
    session takes seconds; the second Ctrl-C comes once the monitor's log shows it
    giving its job back, a step of that close."""
    (tmp_path / "scripts").mkdir()  # not beside the home folder 'dsage' (it would shadow)
    script = tmp_path / "scripts" / "session.py"
    script.write_text(
        "import dsage, time\n"
        f"D = dsage.start_all(workers=1, port=0, home={str(home)!r}, heartbeat=0.2)\n"
        "j = D('import time; time.sleep(60)')\n"
        "while j.status != 'processing':\n"
        "    time.sleep(0.05)\n"
        "print('running', flush=True)\n"
        "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DSAGE_HOME": str(home)})
    broker_pid = 0
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "running\n"
        [broker] = running.brokers(home)
        broker_pid = broker.pid
        [monitor_log] = (home / "logs").glob("worker-*.log")
        os.kill(broker_pid, signal.SIGSTOP)  # a broker slow to stop: the close waits 3 s
        proc.send_signal(signal.SIGINT)  # the script ends; its cluster closes at exit
        wait_for(lambda: "giving 1 running job back" in monitor_log.read_text(), 30,
                 "the session's close to stop its monitor")
        assert proc.poll() is None  # still closing (its broker gets 3 s)
        proc.send_signal(signal.SIGINT)  # a second Ctrl-C while it does
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
        if broker_pid and alive(broker_pid):
            os.kill(broker_pid, signal.SIGKILL)  # not left frozen when the test fails
    assert "atexit" not in err and "Exception ignored" not in err, err
    wait_for(lambda: not running.brokers(home), 20, "the session's broker gone")
