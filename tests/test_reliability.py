"""Nothing lost: real kill -9 of monitors and the broker, kills, timeouts, limits,
crashes, slot recycling, graceful stops, and late results (issue 3)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dsage
from dsage.cluster import ManagedProcess
from dsage.brokerstate import ACK_DELAY, ANNOUNCE_DELAY, BrokerConfig, BrokerState
from dsage.protocol import MONITOR_REQUESTS, M, Message, Status, decode, encode, make
from dsage.store import Outcome, Store

from .conftest import HEARTBEAT, Procs, alive, done, skip_or_fail, wait_for

#: a longer liveness window where a spurious "lost" on a busy machine would change
#: the failure count a test asserts
STEADY = {"heartbeat": HEARTBEAT, "liveness": 15}


def _first_run_hangs(marker: Path, value: str = "42") -> str:
    """Job code that hangs on its first run (leaving ``marker``) and returns at once after."""
    return (f"import os, time\np = {str(marker)!r}\nfirst = not os.path.exists(p)\n"
            f"open(p, 'a').write(str(os.getpid()) + '\\n')\n"
            f"if first: time.sleep(300)\n{value}")


def _gated(gate: Path, value: str) -> str:
    """Job code that waits for the file ``gate`` to exist, then evaluates ``value``."""
    return (f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.02)\n"
            f"{value}")


def _processing(j: dsage.JobWrapper) -> bool:
    return j.status == "processing" and j.worker is not None


def _one_running_one_queued(procs: Procs, gate: Path, running: str, queued: str
                            ) -> tuple[dsage.DSage, dsage.JobWrapper, dsage.JobWrapper]:
    """A client of a one-slot cluster with a job running until ``gate`` exists and
    another queued behind it, both stored."""
    D = procs.client()
    procs.wait_workers(D, 1)
    first, second = D(_gated(gate, running)), D(queued)
    wait_for(lambda: _processing(first) and len(D.get_my_jobs()) == 2, 30, "jobs stored")
    return D, first, second


def _first_run_hanging(procs: Procs, marker: Path
                       ) -> tuple[dsage.DSage, ManagedProcess, dsage.JobWrapper, int]:
    """A broker, a one-slot monitor (returned) and a client whose job hangs on its
    first run there; also the pid of the slot running it."""
    procs.broker(**STEADY)
    monitor = procs.worker(1, **STEADY)
    D = procs.client()
    procs.wait_workers(D, 1)
    j = D(_first_run_hangs(marker))
    wait_for(lambda: _processing(j) and marker.exists() and marker.read_text().endswith("\n"),
             60, "the job's first run going")
    return D, monitor, j, int(marker.read_text().split()[0])


# --- lost monitors


def test_monitor_killed_mid_job_requeues_it_once(procs: Procs, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    D, a, j, _ = _first_run_hanging(procs, marker)
    assert j.worker is not None
    first_monitor = j.worker.id
    procs.worker(1, **STEADY)
    procs.wait_workers(D, 2)
    procs.kill9(a)
    assert done(j, 60).status == "completed", j.error
    assert j.result() == 42
    assert j.failures == 1
    assert j.worker is not None and j.worker.id != first_monitor
    assert len(marker.read_text().split()) == 2  # one lost run, one completed run
    assert [x.job_id for x in D.get_my_jobs("completed")] == [j.job_id]


def test_hung_monitor_is_lost_and_its_stale_copy_cancelled_when_it_wakes(
        procs: Procs, tmp_path: Path) -> None:
    """A monitor that stops answering (SIGSTOP) while its slot goes on running."""
    marker = tmp_path / "runs"
    D, a, j, stale_slot = _first_run_hanging(procs, marker)
    procs.worker(1, **STEADY)
    os.kill(a.pid, signal.SIGSTOP)
    try:
        assert j.result(60) == 42  # re-queued and run on the other monitor
        assert j.failures == 1
    finally:
        os.kill(a.pid, signal.SIGCONT)
    # A wakes, registers again listing the job; the broker has it final: cancel it
    wait_for(lambda: not alive(stale_slot), 30, "the stale copy killed")
    assert j.status == "completed" and D.job(j.job_id).result() == 42
    assert len(D.get_my_jobs()) == 1


def test_failure_limit_stops_a_job_that_kills_its_workers(procs: Procs) -> None:
    procs.broker(failure_limit=2, **STEADY)
    procs.worker(1, **STEADY)
    procs.worker(1, **STEADY)
    D = procs.client()
    procs.wait_workers(D, 2)
    # A poison job: it SIGKILLs the monitor running it (its slot follows).
    j = D("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
    assert done(j, 60).status == "failed"
    assert j.failures == 2
    assert "lost its worker 2 times" in (j.error or "")
    assert D.job(j.job_id).status == "failed"


# --- broker restart


def test_broker_kill9_and_restart_loses_nothing(procs: Procs, tmp_path: Path) -> None:
    broker = procs.broker(**STEADY)
    procs.worker(2, **STEADY)
    D = procs.client()
    procs.wait_workers(D, 2)
    gate1, gate2 = tmp_path / "gate1", tmp_path / "gate2"
    finishes_in_outage = D(_gated(gate1, "'one'"))
    adopted = D(_gated(gate2, "'two'"))
    wait_for(lambda: _processing(finishes_in_outage) and _processing(adopted), 30,
             "two running jobs")
    queued = [D(f"{i} * 10") for i in range(3)]
    # stored by the broker (one may be on its way to the monitor already: prefetched)
    wait_for(lambda: len(D.get_my_jobs()) == 5, 30, "the queued jobs acknowledged")
    procs.kill9(broker)
    gate1.touch()  # finishes while the broker is down: its result waits on the monitor
    late = D("'submitted while the broker was down'")
    procs.broker(**STEADY)
    procs.wait_workers(D, 2, timeout=60)
    wait_for(lambda: adopted.status == "processing" and adopted.failures == 0, 30,
             "the running job adopted by its re-registered monitor")
    gate2.touch()
    for j in [finishes_in_outage, adopted, late, *queued]:
        assert done(j, 60).status == "completed", (j.status, j.error)
    assert finishes_in_outage.result() == "one"
    assert adopted.result() == "two" and adopted.failures == 0
    assert [j.result() for j in queued] == [0, 10, 20]
    assert late.result() == "submitted while the broker was down"
    assert len(D.get_my_jobs("completed")) == 6


def test_hung_broker_resumes_and_nothing_is_lost(procs: Procs, tmp_path: Path) -> None:
    """The broker stops answering (SIGSTOP) long enough for its monitor to give up on
    the connection, then wakes: the running job is kept, the queued one runs."""
    broker = procs.broker()
    monitor = procs.worker(1)
    D, running, queued = _one_running_one_queued(procs, tmp_path / "gate", "'kept'", "'next'")
    gate = tmp_path / "gate"
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: "no word from the broker" in monitor.log.read_text(), 30,
                 "the monitor noticing the silent broker")
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    gate.touch()
    assert running.result(60) == "kept"
    assert queued.result(60) == "next"
    assert running.failures == 0


def test_broker_sigterm_commits_and_exits(procs: Procs, tmp_path: Path) -> None:
    broker = procs.broker(**STEADY)
    procs.worker(1, **STEADY)
    D, running, queued = _one_running_one_queued(procs, tmp_path / "gate", "1", "2")
    gate = tmp_path / "gate"
    os.kill(broker.pid, signal.SIGTERM)
    assert broker.proc.wait(15) == 0
    procs.broker(**STEADY)
    gate.touch()
    assert running.result(60) == 1
    assert queued.result(60) == 2


def test_final_jobs_survive_a_broker_restart_with_wall_clock_times(procs: Procs) -> None:
    """Killed and failed-by-limit jobs keep real timestamps, so the retention pruning
    at the next start does not take them for ancient."""
    broker = procs.broker(failure_limit=1, **STEADY)
    D = procs.client()
    before = time.time()
    queued = D("1")
    wait_for(lambda: len(D.get_my_jobs()) == 1, 30, "the job stored")
    queued.kill()
    procs.worker(1, **STEADY)
    procs.wait_workers(D, 1)
    poison = done(D("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"), 60)
    assert poison.status == "failed"
    for j in (queued, poison):
        assert j.created is not None and j.finished is not None
        assert before - 5 < j.created <= j.finished < time.time() + 5, (j.created, j.finished)
    procs.kill9(broker)
    procs.broker(failure_limit=1, **STEADY)
    D2 = procs.client()
    assert D2.job(queued.job_id).status == "killed"
    assert D2.job(poison.job_id).status == "failed"


# --- clients


def test_a_dropped_event_is_noticed_and_the_result_still_arrives(procs: Procs,
                                                                  tmp_path: Path) -> None:
    """The events connection alone is cut (``ss -K``) just before a job finishes, so
    its result event is dropped while the client's request connection stays up.
    The subscription comes back with a gap in the event sequence, and the client
    asks for the state it missed. Waiting here is on the wrapper only (no wait()
    timeouts, which would query by themselves)."""
    if os.geteuid() != 0 or shutil.which("ss") is None:
        skip_or_fail("cutting one TCP connection needs root and `ss` (iproute2)")
    D = procs.up(1)
    gate = tmp_path / "gate"
    j = D(_gated(gate, "'arrived'"))
    wait_for(lambda: _processing(j), 30, "the job running")
    cut = subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{procs.port + 2}"],
                         capture_output=True, text=True, timeout=30)
    assert cut.returncode == 0 and str(procs.port + 2) in cut.stdout, cut.stderr
    gate.touch()
    wait_for(j.done, 20, "the result despite the dropped event")
    assert j.result() == "arrived"


# --- clients (disconnects)


def test_results_wait_for_a_client_that_disconnected(procs: Procs, tmp_path: Path) -> None:
    D = procs.up(1)
    gate = tmp_path / "gate"
    j = D(_gated(gate, "'kept'"))
    job_id = j.job_id
    wait_for(lambda: _processing(j), 30, "the job running")
    D.close()
    gate.touch()
    D2 = procs.client()
    again = wait_for(lambda: (w := D2.job(job_id)).done() and w, 30, "the result in the store")
    assert again.result() == "kept"
    assert [w.job_id for w in D2.get_my_jobs("completed")] == [job_id]


def test_bad_arguments_are_clear_errors_and_nothing_is_sent(procs: Procs) -> None:
    """Arguments the broker would refuse fail at the call, never as a hanging job."""
    procs.broker()
    D = procs.client()
    with pytest.raises(ValueError, match="timeout"):
        D("1", timeout=-1)
    with pytest.raises(ValueError, match="kind"):
        D("1", kind="fortran")
    with pytest.raises(ValueError, match="name is 5000 characters"):
        D("1", name="n" * 5000)
    with pytest.raises(TypeError, match="list of tags"):
        D("1", requires="sage")
    with pytest.raises(ValueError, match="at most 64 tags"):
        D("1", requires=[f"t{i}" for i in range(65)])
    with pytest.raises(ValueError, match="not a job id"):
        D.kill("not-a-job")
    with pytest.raises(TypeError, match=r"keyword argument 'items'.*generator"):
        D.eval_function(print, ("fine",), {"items": (x for x in [])})
    assert D.get_my_jobs() == []


# --- kill, timeout, memory, crashes


def _slot_pid_job(D: dsage.DSage) -> int:
    return int(D("import os; os.getpid()").result(60))


def test_kill_ends_the_process_within_a_second_and_the_slot_returns(
        procs: Procs, tmp_path: Path) -> None:
    D = procs.up(1)
    marker = tmp_path / "pid"
    j = D(f"import os, time\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\n"
          f"time.sleep(300)")
    queued = D("'never runs'")
    wait_for(lambda: marker.exists() and marker.read_text(), 30, "the job running")
    pid = int(marker.read_text())
    t0 = time.monotonic()
    queued.kill()
    assert queued.status == "killed"
    j.kill()
    wait_for(lambda: j.done() and not alive(pid), 1.0, "the job's process dead")
    assert time.monotonic() - t0 < 1.0
    assert j.status == "killed"
    assert done(queued, 1).status == "killed"
    assert _slot_pid_job(D) != pid  # a fresh slot process runs the next job


def test_timeout_fails_the_job_and_the_slot_returns(cluster: dsage.DSage) -> None:
    t0 = time.monotonic()
    j = done(cluster("import time; time.sleep(300)", timeout=0.5), 60)
    assert j.status == "failed"
    assert "timed out after 0.5 s" in (j.error or "")
    assert time.monotonic() - t0 < 30
    assert cluster("'next'").result(60) == "next"


def test_memory_limit_fails_with_memory_error(cluster: dsage.DSage) -> None:
    j = done(cluster("x = b'x' * (400 * 10**6)\nlen(x)", memory="200MB"), 60)
    assert j.status == "failed"
    assert "MemoryError" in j.output
    assert "MemoryError" in (j.error or "")
    # the limit is per job: the same slots can use more memory afterwards
    big = [cluster("len(b'x' * (250 * 10**6))") for _ in range(2)]
    assert [b.result(60) for b in big] == [250 * 10**6] * 2


@pytest.mark.parametrize("code, says", [
    ("import ctypes; ctypes.string_at(0)", "SIGSEGV"),
    ("import os; os._exit(3)", "exited with status 3"),
])
def test_crashing_job_fails_saying_so_and_the_slot_returns(
        cluster: dsage.DSage, code: str, says: str) -> None:
    j = done(cluster(code), 60)
    assert j.status == "failed"
    assert says in (j.error or "")
    assert says in j.output
    assert [cluster(f"{i} + 1").result(60) for i in range(3)] == [1, 2, 3]


def test_slot_killed_from_outside_requeues_its_job(procs: Procs, tmp_path: Path) -> None:
    """An outside SIGKILL of a slot (the OOM killer, say) is a lost worker, not the
    job's failure: the job runs again and completes, with one failure counted."""
    marker = tmp_path / "runs"
    _, _, j, slot = _first_run_hanging(procs, marker)
    os.kill(slot, signal.SIGKILL)
    assert j.result(60) == 42
    assert j.failures == 1
    assert len(marker.read_text().split()) == 2


def test_job_that_keeps_killing_its_slot_hits_the_failure_limit(procs: Procs) -> None:
    procs.broker(failure_limit=2, **STEADY)
    procs.worker(1, **STEADY)
    D = procs.client()
    procs.wait_workers(D, 1)
    j = done(D("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"), 60)
    assert j.status == "failed"
    assert "killed (SIGKILL)" in (j.error or "") and "2 times" in (j.error or "")
    assert D("1 + 1").result(60) == 2


# --- slot hygiene


def test_max_jobs_per_slot_recycles_the_slot(procs: Procs) -> None:
    procs.broker()
    procs.worker(1, max_jobs_per_slot=2)
    D = procs.client()
    procs.wait_workers(D, 1)
    pids = [_slot_pid_job(D) for _ in range(4)]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[1] != pids[2]


def test_memory_growth_recycles_the_slot(procs: Procs) -> None:
    D = procs.up(1)
    small = [_slot_pid_job(D) for _ in range(2)]
    assert small[0] == small[1]  # no growth, no recycling
    grown = done(D("import os, sys\nsys.dsage_keep = b'x' * (100 * 10**6)\nos.getpid()"), 60)
    assert grown.result() == small[1]
    assert _slot_pid_job(D) != grown.result()


# --- graceful stop


def test_monitor_sigterm_finishes_running_jobs_and_gives_back_the_rest(
        procs: Procs, tmp_path: Path) -> None:
    procs.broker(**STEADY)
    m1 = procs.worker(2, grace=3, **STEADY)
    D = procs.client()
    procs.wait_workers(D, 2)
    marker = tmp_path / "runs"
    short = D("import time; time.sleep(1); 'short'")
    long = D(_first_run_hangs(marker, "'long'"))
    wait_for(lambda: _processing(short) and _processing(long) and marker.exists(), 30,
             "both jobs running on the first monitor")
    assert short.worker is not None
    first = short.worker.id
    os.kill(m1.pid, signal.SIGTERM)
    assert m1.proc.wait(20) == 0
    assert short.result(10) == "short"
    assert short.worker is not None and short.worker.id == first
    wait_for(lambda: long.status == "new", 10, "the unfinished job back in the queue")
    procs.worker(1, **STEADY)
    assert long.result(60) == "long"
    assert long.failures == 0  # given back, not lost


# --- start_all at interpreter exit


def _processes_using(home: Path) -> list[int]:
    """Pids (not ours) whose command line or environment mentions ``home``."""
    needle = str(home).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except OSError:
            continue
        if not zombie and (needle in cmd or needle in env):
            found.append(int(entry))
    return found


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_start_all_leaves_no_orphans(home: Path, tmp_path: Path, ending: str) -> None:
    """A script that calls start_all and ends without close (normally, or killed)."""
    script = (
        "import os, sys, dsage\n"
        f"D = dsage.start_all(workers=2, port=0, home={str(home)!r}, heartbeat=0.2)\n"
        "assert D('2+2').result(60) == 4\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n")  # then ends without D.close()
    cwd = tmp_path / "cwd"  # not tmp_path, where the home folder 'dsage' would shadow the package
    cwd.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, env={**os.environ, "DSAGE_HOME": str(home)},
                            cwd=str(cwd))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        wait_for(lambda: len(_processes_using(home)) >= 4, 20,  # broker, monitor, two slots
                 "the cluster's processes in the process table")
        if ending == "sigkill":
            proc.kill()
        else:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        assert proc.wait(30) == (0 if ending == "exit" else -signal.SIGKILL)
        wait_for(lambda: not _processes_using(home), 20, "no process left behind")
        if ending == "sigkill":  # each monitor said why it stopped, once
            for log in (home / "logs").glob("worker-*.log"):
                assert log.read_text().count("parent process is gone") == 1
    finally:
        proc.kill()
        proc.wait()
        for pid in _processes_using(home):
            os.kill(pid, signal.SIGKILL)


# --- late results (pure state, real store)


OWNER = "A" * 40
MON_KEY = "B" * 40


def _job_id(n: int) -> str:
    return f"{n:032x}"


class _World:
    """A BrokerState on a real store, driven by hand with a fake clock."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = Store(tmp_path / "db" / "dsage.db")
        self.now = 1000.0
        self.state = BrokerState(self.store, BrokerConfig(heartbeat=1.0, liveness=3),
                                 self.now, lambda k: True)
        self.sent_to: dict[bytes, list[Message]] = {}

    def submit(self, job_id: str) -> None:
        spec = {"id": job_id, "name": None, "kind": "python", "timeout": None, "priority": 5,
                "memory": None, "anonymous_ok": False, "requires": [], "isolate": False,
                "retries": 0, "retry_on": [], "shared": []}
        self.state.on_client(self.now, b"client", OWNER, make(M.SUBMIT, [b"1"], req=1, shared=[],
                                                              jobs=[spec]))
        self.flush()

    def monitor(self, rid: bytes, msg: Message) -> list[Message]:
        msg = decode(encode(msg), MONITOR_REQUESTS)  # only what could come off the wire
        self.state.on_monitor(self.now, rid, MON_KEY, False, msg)
        return self.flush(rid)

    def register(self, rid: bytes, monitor_id: str, running: list[str] = ()) -> list[Message]:
        return self.monitor(rid, make(M.REGISTER, monitor=monitor_id, host="h", pid=1, slots=1,
                                      tags=[], running=list(running), version=dsage.__version__))

    def result(self, rid: bytes, job_id: str, value: bytes) -> list[Message]:
        item = {"id": job_id, "status": "completed", "error": None, "encoding": "data",
                "result_from": "expression", "sealed": False, "started": None,
                "finished": 1.0, "staged": False, "attempt": 1, "retry": False}
        sent = self.monitor(rid, make(M.RESULT, [value, b""], results=[item]))
        self.now += 2 * ACK_DELAY  # its acknowledgement, when no RUN to that monitor took it
        return sent + self.flush(rid)

    def flush(self, rid: bytes | None = None) -> list[Message]:
        """Flush; record what went to each routing id; return what went to ``rid``."""
        outs = self.state.flush(self.now)
        for o in outs:
            self.sent_to.setdefault(o.to, []).append(o.msg)
        return [o.msg for o in outs if rid is None or o.to == rid]

    def lose(self, rid: bytes) -> None:
        """Let the liveness window pass, ticking, with only the other monitors heard from."""
        for _ in range(20):
            self.now += 0.5
            for other in self.state.monitors:
                if other != rid:
                    self.state.monitors[other].last_seen = self.now
            self.state.tick(self.now)
            self.flush()

    def lose_to_another(self, job_id: str) -> None:
        """Monitor ``a`` runs the job and is lost; the job is re-run on monitor ``b``."""
        self.register(b"a", "mon-a")
        self.submit(job_id)
        self.register(b"b", "mon-b")
        self.lose(b"a")

    def record(self, job_id: str) -> tuple[dict[str, object], list[bytes]]:
        return self.store.records([job_id])[job_id]


def test_pong_names_the_last_event_sent_to_the_key(tmp_path: Path) -> None:
    """So that a client notices events dropped with no later event to show a gap."""
    w = _World(tmp_path)
    w.submit("a" * 32)
    w.submit("b" * 32)
    w.state.on_client(w.now, b"client", OWNER, make(M.PING))
    [pong] = [m for m in w.flush(b"client") if m.type is M.PONG]
    assert pong.header["seq"] == w.state.event_seq[OWNER] == 2
    assert pong.header["epoch"] == w.state.config.epoch


def test_late_result_is_accepted_while_the_job_is_open(tmp_path: Path) -> None:
    w = _World(tmp_path)
    jid = _job_id(1)
    w.register(b"a", "mon-a")
    w.submit(jid)
    assert w.record(jid)[0]["status"] == "new"  # its start is stored once due
    w.now += ANNOUNCE_DELAY
    w.flush()
    assert w.record(jid)[0]["worker"]["id"] == "mon-a"  # type: ignore[index]
    w.lose(b"a")
    assert w.record(jid)[0]["status"] == "new" and w.record(jid)[0]["failures"] == 1
    assert w.state.sched.queued == 1
    # the lost monitor comes back (new connection) and delivers its result
    w.register(b"a2", "mon-a")
    sent = w.result(b"a2", jid, b"late")
    assert any(m.type is M.RESULT_ACK and m.header["ids"] == [jid] for m in sent)
    rec, blobs = w.record(jid)
    assert rec["status"] == "completed" and blobs[0] == b"late"
    assert w.state.sched.queued == 0  # taken back out of the queue, not run again
    w.register(b"b", "mon-b")
    assert not any(m.type is M.RUN for m in w.flush())


def test_late_result_cancels_the_rerun_on_another_monitor(tmp_path: Path) -> None:
    w = _World(tmp_path)
    jid = _job_id(2)
    w.lose_to_another(jid)
    assert w.record(jid)[0]["worker"]["id"] == "mon-b"  # type: ignore[index]
    w.register(b"a2", "mon-a")
    w.result(b"a2", jid, b"late")
    assert w.record(jid)[0]["status"] == "completed"
    assert w.record(jid)[1][0] == b"late"
    assert any(m.type is M.CANCEL and m.header["ids"] == [jid] for m in w.sent_to[b"b"])
    # b's own result for the job is now ignored: one final state
    w.result(b"b", jid, b"second")
    assert w.record(jid)[1][0] == b"late"


def test_late_result_is_ignored_when_the_job_is_already_final(tmp_path: Path) -> None:
    w = _World(tmp_path)
    jid = _job_id(3)
    w.lose_to_another(jid)
    w.result(b"b", jid, b"from-b")
    assert w.record(jid)[0]["status"] == "completed"
    w.register(b"a2", "mon-a")
    sent = w.result(b"a2", jid, b"from-a")
    assert any(m.type is M.RESULT_ACK for m in sent)  # acknowledged, so not resent forever
    rec, blobs = w.record(jid)
    assert blobs[0] == b"from-b" and rec["worker"]["id"] == "mon-b"  # type: ignore[index]


def test_retention_prunes_only_old_final_jobs(tmp_path: Path) -> None:
    w = _World(tmp_path)
    old, recent, open_ = _job_id(10), _job_id(11), _job_id(12)
    for jid in (old, recent, open_):
        w.submit(jid)
    day = 86400.0
    for jid, finished in ((old, time.time() - 8 * day), (recent, time.time() - 6 * day)):
        w.store.finish(jid, Outcome(Status.COMPLETED, None, "none", "none", False, None,
                                    finished, b"", b""))
    w.store.commit()
    w.state.tick(w.now)  # the first tick after a start prunes (then once an hour)
    w.flush()
    assert set(w.store.records([old, recent, open_])) == {recent, open_}
