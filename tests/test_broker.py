"""The broker under hostile values, a full disk, tags, fairness, a second broker on
the same store, and monitors that change identity: live tests against real
processes, and pure-state tests of the scheduler (a hypothesis state machine)."""

from __future__ import annotations

import hashlib
import json
import operator
import os
import shutil
import subprocess
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import pytest
import zmq
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dsage import JobError, __version__, keys
from dsage.auth import make_client
from dsage.brokerstate import (
    ACK_DELAY, ANNOUNCE_DELAY, MAX_PREFETCH, STALE_AFTER, BrokerConfig, BrokerState,
    moving_average, prefetch,
)
from dsage.monitor import HOLD_TIME, holding
from dsage.protocol import (
    CLIENT_REPLIES, MAX_BATCH, MAX_FRAMES, MAX_HEADER, MIN_MESSAGE_SIZE, VERSION, M, Message,
    decode, encode, make, version_problem,
)
from dsage.scheduler import Job, Scheduler, Taker, Where, size_class, waiting_reason
from dsage.store import Store, StoreLocked

from .conftest import Procs, done, raw_dealer as _dealer, run_python, skip_or_fail, wait_for

ALL = frozenset(M)
OWNER = "o" * 40


def _spec(job_id: str, **change: Any) -> dict[str, Any]:
    return {"id": job_id, "name": None, "kind": "python", "timeout": None, "priority": 5,
            "memory": None, "anonymous_ok": False, "requires": [], "isolate": False,
            "retries": 0, "retry_on": [], "shared": [],
            **change}


def _raw(type_: str, header: dict[str, Any], *blobs: bytes) -> list[bytes]:
    """Frames as any peer could send them: json.dumps writes a lone surrogate as an
    escape, which is valid JSON."""
    return [VERSION, type_.encode(), json.dumps(header).encode(), *blobs]


def _register(monitor_id: str, running: list[str] = (), host: str = "h") -> list[bytes]:
    return _raw("register", {"monitor": monitor_id, "host": host, "pid": 1, "slots": 1,
                             "tags": [], "running": list(running), "version": __version__})


def _register_msg(monitor: str, slots: int = 1, tags: Sequence[str] = (),
                  running: Sequence[str] = (), version: str = __version__) -> Message:
    """A monitor's REGISTER, as the broker's state takes it."""
    return make(M.REGISTER, monitor=monitor, host="h", pid=1, slots=slots, tags=list(tags),
                running=list(running), version=version)


def _registered(ctx: zmq.Context[zmq.Socket[bytes]], home: Path, port: int,
                monitor_id: str) -> zmq.Socket[bytes]:
    """A monitor spoken by hand, registered with the broker on ``port``."""
    mon = _dealer(ctx, home, port)
    mon.send_multipart(_register(monitor_id))
    _replies(mon, M.REGISTERED)
    return mon


def _replies(sock: zmq.Socket[bytes], want: M) -> Message:
    """The next message of type ``want`` (skipping heartbeats and the like)."""
    while True:
        msg = decode(sock.recv_multipart(), ALL)
        if msg.type is want:
            return msg


# --- values that once killed the broker (and kept it down: the sender resends)


def test_values_that_once_killed_the_broker_are_refused(procs: Procs, home: Path) -> None:
    broker = procs.broker(allow_anonymous=True)
    procs.worker(1)
    D = procs.client()
    procs.wait_workers(D, 1)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        client = _dealer(ctx, home, procs.port)
        for change in ({"name": "x\udcff"}, {"memory": 10_000_000 * 10**12},
                       {"requires": ["\ud800"]}):
            client.send_multipart(_raw("submit", {"req": 1, "jobs": [_spec("a" * 32, **change)], "shared": []},
                                       b"1"))
            assert _replies(client, M.ERROR).header["code"] == "header"
        # an anonymous worker whose host name holds a lone surrogate
        stranger = keys.Keypair(*zmq.curve_keypair())
        anon = _dealer(ctx, home, procs.port + 1, stranger)
        anon.send_multipart(_register("m" * 8, host="host\udcff"))
        assert _replies(anon, M.ERROR).header["code"] == "header"
        # a trusted monitor whose job's error text holds one
        mon = _registered(ctx, home, procs.port + 1, "raw-monitor")
        j = D("1 + 1")
        wait_for(lambda: j.status == "processing" or j.done(), 30, "the job dispatched")
        item = {"id": j.job_id, "status": "failed", "error": "KeyError: '\udcff'",
                "encoding": "none", "result_from": "none", "sealed": False, "started": None,
                "finished": 1.0, "staged": False, "attempt": 1, "retry": False}
        mon.send_multipart(_raw("result", {"results": [item]}, b"", b""))
        assert _replies(mon, M.ERROR).header["code"] == "header"
        assert broker.alive()
    finally:
        ctx.destroy(linger=0)
    assert D("6 * 7").result(60) == 42
    assert broker.alive()


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        skip_or_fail("a full-disk test mounts a small tmpfs: needs root and mount")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs: {r.stderr.strip()}")


def test_a_full_disk_loses_nothing_and_does_not_stop_the_broker(procs: Procs,
                                                                   tmp_path: Path) -> None:
    db = tmp_path / "small"
    _tmpfs(db, "2m")
    try:
        broker = procs.broker(store=db / "dsage.db")
        D = procs.client()
        big = "x" * 200_000
        jobs = [D(f"len({big!r}) + {i}") for i in range(30)]  # ~6 MB: more than the disk
        wait_for(lambda: "could not store" in broker.log_tail(200)
                 or "could not commit" in broker.log_tail(200), 60, "the disk to fill up")
        assert broker.alive()
        subprocess.run(["mount", "-o", "remount,size=64m", str(db)], check=True)
        procs.worker(2)
        for i, j in enumerate(jobs):
            assert j.result(120) == 200_000 + i
        assert broker.alive()
        assert len(D.get_my_jobs("completed")) == 30
    finally:
        procs.stop_all()
        subprocess.run(["umount", "-l", str(db)], capture_output=True)


# --- scheduling: tags, reasons, fairness


def test_requires_is_honoured_and_a_waiting_job_says_why(procs: Procs) -> None:
    D = procs.up(1)
    gpu = D("'ran on gpu'", requires=["gpu"])
    plain = D("'plain'")
    assert plain.result(60) == "plain"
    assert gpu.status == "new"
    [rec] = [w for w in D.get_my_jobs("new") if w.job_id == gpu.job_id]
    assert "gpu" in (rec.reason or "")
    procs.worker(1, tags=["gpu", "cuda"])
    assert gpu.result(60) == "ran on gpu"
    assert gpu.worker is not None
    assert gpu.worker.id in {w.id for w in D.workers() if "gpu" in w.tags}


def test_a_job_larger_than_a_monitor_takes_waits_for_one_that_takes_it(procs: Procs) -> None:
    """A monitor started with a smaller --max-message-size than a job's payload was sent
    it anyway: libzmq dropped the connection, the monitor registered again and was sent
    the job again, forever, with the job 'processing' and every other job stuck behind
    it. Now the monitor says its limit when it registers, and the job waits, saying why,
    for a monitor that takes it; smaller jobs run meanwhile."""
    limit = 1 << 20
    procs.broker()
    D = procs.client()
    procs.worker(1, max_message_size=limit)
    procs.wait_workers(D, 1)
    big = D(f"s = '{'a' * (2 * limit)}'\nlen(s)")
    small = D("'small'")
    assert small.result(60) == "small"
    wait_for(lambda: big.reason is not None, 30, "the large job to say why it waits")
    assert big.status == "new"
    assert f"at most {limit} bytes" in (big.reason or "") and "--max-message-size" in big.reason
    procs.worker(1)
    assert big.result(60) == 2 * limit
    assert D("'after'").result(60) == "after"


def _take_all(s: Scheduler, taker: Taker, n: int = 1) -> list[Job]:
    out: list[Job] = []
    while True:
        got = s.take(taker, n)
        if not got:
            return out
        out += got


def _job(i: int, owner: str = OWNER, priority: int = 5, requires: frozenset[str] = frozenset(),
         anonymous_ok: bool = False) -> Job:
    return Job(f"{i:032x}", owner, None, "python", priority, None, None, anonymous_ok,
               requires, 0.0, 0, i, b"")


def test_owners_take_turns_and_priorities_come_first() -> None:
    s = Scheduler()
    for i in range(100):
        s.add(_job(i, owner="A"))
    for i in range(100, 105):
        s.add(_job(i, owner="B"))
    s.add(_job(200, owner="C", priority=1))
    taker = Taker("m", frozenset(), False)
    order = [j.owner for j in _take_all(s, taker)]
    assert order[0] == "C"
    assert order[1:11] in (["A", "B"] * 5, ["B", "A"] * 5)  # B is not starved by A's 100
    assert len(order) == 106 and s.queued == 0


def test_tags_and_anonymous_eligibility() -> None:
    s = Scheduler()
    s.add(_job(1, requires=frozenset({"gpu"})))
    s.add(_job(2, anonymous_ok=True))
    s.add(_job(3))
    assert [j.seq for j in s.take(Taker("anon", frozenset({"gpu"}), True), 10)] == [2]
    assert [j.seq for j in s.take(Taker("cpu", frozenset(), False), 10)] == [3]
    assert [j.seq for j in s.take(Taker("gpu", frozenset({"gpu", "x"}), False), 10)] == [1]


def test_a_job_goes_only_to_monitors_that_take_its_largest_frame() -> None:
    """Jobs are classed by size, so a large job waits in a lane of its own and the
    owner's smaller jobs behind it still go to a monitor with a small frame limit."""
    s = Scheduler()
    big = _job(1)
    big.frame = 3 * MIN_MESSAGE_SIZE
    s.add(big)
    s.add(_job(2))
    small = Taker("small", frozenset(), False, max_frame=MIN_MESSAGE_SIZE)
    assert [j.seq for j in _take_all(s, small)] == [2]
    reason = waiting_reason(big, [small])
    assert reason is not None and f"{big.frame} bytes" in reason
    assert f"at most {MIN_MESSAGE_SIZE} bytes" in reason
    assert waiting_reason(big, [small, Taker("large", frozenset(), False)]) is None
    assert [j.seq for j in s.take(Taker("large", frozenset(), False), 10)] == [1]
    assert size_class(MIN_MESSAGE_SIZE) == 0  # every monitor takes that much
    for frame in (MIN_MESSAGE_SIZE + 1, 3 * MIN_MESSAGE_SIZE + 5, 10**9):
        assert frame <= size_class(frame) <= frame * 1.125


class SchedulerMachine(RuleBasedStateMachine):
    """Random submits, dispatches, releases, losses, re-registrations, late and
    duplicate results and kills against a BrokerState on a real store."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="dsage-sm-")
        self.store = Store(Path(self.dir) / "dsage.db")
        self.now = 1000.0
        self.state = BrokerState(self.store, BrokerConfig(heartbeat=1.0, liveness=3,
                                                          failure_limit=3),
                                 self.now, lambda k: True)
        self.n = 0
        self.final: dict[str, str] = {}
        self.rids = {"m1": b"r1", "m2": b"r2"}

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _flush(self) -> None:
        for out in self.state.flush(self.now):
            msg = decode(encode(out.msg), ALL)  # every message must be a valid one
            if out.dest == "event":
                for i, rec in enumerate(msg.header["jobs"]):
                    if rec["status"] in ("completed", "failed", "killed"):
                        # one final state, never changed
                        assert self.final.setdefault(rec["id"], rec["status"]) == rec["status"]
                        # announced as the store gives it back
                        stored, blobs = self.store.records([rec["id"]])[rec["id"]]
                        assert decode(encode(make(M.EVENT, blobs, jobs=[stored], seq=1,
                                                  epoch="e")), ALL).header["jobs"] == [rec]
                        assert blobs == msg.blobs[2 * i:2 * i + 2]

    def _monitor(self, mid: str, msg: Message) -> None:
        msg = decode(encode(msg), ALL)
        self.state.on_monitor(self.now, self.rids[mid], "k" * 40, False, msg)
        self._flush()

    @rule(count=st.integers(1, 5), owner=st.sampled_from(["a" * 40, "b" * 40]),
          tags=st.sampled_from([[], ["gpu"]]), retries=st.integers(0, 2))
    def submit(self, count: int, owner: str, tags: list[str], retries: int) -> None:
        specs = []
        for _ in range(count):
            self.n += 1
            specs.append(_spec(f"{self.n:032x}", requires=tags, retries=retries,
                               retry_on=["Exception"] if retries else []))
        msg = make(M.SUBMIT, [b"1"] * count, req=1, jobs=specs, shared=[])
        self.state.on_client(self.now, b"c", owner, msg)
        self._flush()

    @rule(mid=st.sampled_from(["m1", "m2"]), gpu=st.booleans())
    def register(self, mid: str, gpu: bool) -> None:
        held = self.state.sched.of_monitor(mid)
        self._monitor(mid, _register_msg(mid, slots=2, tags=["gpu"] if gpu else [],
                                         running=held[:1]))

    @rule(mid=st.sampled_from(["m1", "m2"]), data=st.data())
    def result(self, mid: str, data: st.DataObject) -> None:
        known = sorted(self.state.sched.jobs) + sorted(self.final)
        if not known or self.rids[mid] not in self.state.monitors:
            return
        jid = data.draw(st.sampled_from(known))  # its own, another's, or a final one
        job = self.state.sched.jobs.get(jid)
        current = job.attempt if job is not None else 1
        # a failure the job may be retried for, or any other outcome; of this attempt
        # or (sent again after a reconnection) an earlier one
        failed, retry = data.draw(st.sampled_from([(False, False), (True, False), (True, True)]))
        attempt = data.draw(st.sampled_from(sorted({current, max(1, current - 1)})))
        item = {"id": jid, "status": "failed" if failed else "completed", "error": None,
                "encoding": "data", "result_from": "expression", "sealed": False,
                "started": None, "finished": 1.0, "staged": False, "attempt": attempt,
                "retry": retry}
        mine = job is not None and job.monitor == mid and job.where is Where.ASSIGNED
        left = job.retries_left if job is not None else 0
        self._monitor(mid, make(M.RESULT, [b"1", b""], results=[item]))
        # (a job back in the queue may at once be dispatched again)
        if job is None or not mine:
            return
        if attempt == current and retry and left:
            assert self.state.sched.jobs.get(jid) is job and job.attempt == current + 1
        elif attempt == current:
            assert jid not in self.state.sched.jobs  # final
        else:  # a stale result from the monitor that has the job: it goes on
            assert self.state.sched.jobs.get(jid) is job and job.attempt == current

    @rule(mid=st.sampled_from(["m1", "m2"]), count_failure=st.booleans())
    def release(self, mid: str, count_failure: bool) -> None:
        if self.rids[mid] in self.state.monitors:
            ids = self.state.sched.of_monitor(mid)[:2]
            self._monitor(mid, make(M.RELEASE, ids=ids, reason="r", count_failure=count_failure,
                                         missing_blobs=[]))

    @rule(mid=st.sampled_from(["m1", "m2"]))
    def lose(self, mid: str) -> None:
        self.state.lose_monitor(self.now, self.rids[mid], "test")
        self._flush()

    @rule(data=st.data())
    def kill(self, data: st.DataObject) -> None:
        if self.state.sched.jobs:
            jid = data.draw(st.sampled_from(sorted(self.state.sched.jobs)))
            owner = self.state.sched.jobs[jid].owner
            self.state.on_client(self.now, b"c", owner, make(M.KILL, req=2, ids=[jid], queued_only=False))
            self._flush()

    @rule()
    def tick(self) -> None:
        self.now += 0.7
        self.state.tick(self.now)
        self._flush()

    @invariant()
    def queues_match_the_store(self) -> None:
        sched = self.state.sched
        rows = dict(self.store.db.execute(
            "SELECT id, status FROM jobs WHERE status IN ('new', 'processing')").fetchall())
        assert set(rows) == set(sched.jobs)
        queued = [j for j in sched.jobs.values() if j.where is Where.QUEUED]
        assert sched.queued == len(queued) == sum(sched.queued_by_owner.values())
        attempts = dict(self.store.db.execute(
            "SELECT id, attempt FROM jobs WHERE status IN ('new', 'processing')").fetchall())
        for j in sched.jobs.values():
            # an assigned job's start is stored once it has run ANNOUNCE_DELAY
            assert rows[j.id] == "new" if j.where is Where.QUEUED else (
                rows[j.id] == "processing" or j.id in self.state.starting)
            # retries are counted apart from lost workers, kept, and bounded
            assert attempts[j.id] == j.attempt and 1 <= j.attempt <= j.retries + 1
            # each job in at most one place
            holders = [m for m, ids in sched.assigned.items() if j.id in ids]
            assert holders == ([] if j.where is Where.QUEUED else [j.monitor])
        assert not set(self.final) & set(sched.jobs)


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_every_flushed_message_is_within_the_protocol_limits(tmp_path: Path) -> None:
    """6,000 jobs submitted at once once made one EVENT of 24,003 frames, which the
    client refused; every message the broker sends must decode."""
    store = Store(tmp_path / "dsage.db")
    state = BrokerState(store, BrokerConfig(), 0.0, lambda k: True)
    for start in range(0, 6000, 1000):
        specs = [_spec(f"{i:032x}") for i in range(start, start + 1000)]
        state.on_client(0.0, b"c", OWNER, make(M.SUBMIT, [b"x"] * 1000, req=1, jobs=specs,
                                               shared=[]))
    state.on_client(0.0, b"c", OWNER, make(M.LIST, req=2, status=None, name=None,
                                                   since=None, after=0, limit=10_000))
    outs = state.flush(0.0)
    assert outs
    for out in outs:
        frames = encode(out.msg)
        assert len(frames) <= MAX_FRAMES and len(frames[2]) <= MAX_HEADER
        decode(frames, CLIENT_REPLIES | {M.EVENT})
    listed = [o.msg for o in outs if o.msg.type is M.JOBS]
    assert sum(len(m.header["jobs"]) for m in listed) == 6000
    assert [m.header["more"] for m in listed] == [True] * 5 + [False]
    assert max(len(o.msg.header.get("jobs", [])) for o in outs) <= MAX_BATCH
    store.close()


# --- a monitor that changes identity on its connection


def test_a_monitor_re_registering_under_a_new_id_strands_nothing(procs: Procs,
                                                                  home: Path) -> None:
    procs.broker()
    D = procs.client()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        mon = _registered(ctx, home, procs.port + 1, "first-id")
        j = D("'done'")
        run = _replies(mon, M.RUN)
        assert run.header["jobs"][0]["id"] == j.job_id
        mon.send_multipart(_register("second-id"))  # the same connection, a new id
        _replies(mon, M.REGISTERED)
        procs.worker(1)
        assert j.result(60) == "done"
    finally:
        ctx.destroy(linger=0)


def test_a_result_the_broker_cannot_read_fails_its_job_and_is_acknowledged(
        procs: Procs, home: Path) -> None:
    """A monitor of another dsage version sends a result whose header this broker
    refuses (an encoding it does not know): the job fails saying so, and the monitor
    is told to drop the result, instead of the job staying 'processing' forever."""
    procs.broker()
    D = procs.client()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        mon = _registered(ctx, home, procs.port + 1, "newer")
        j = D("'done'")
        run = _replies(mon, M.RUN)
        item = {"id": j.job_id, "status": "completed", "error": None,
                "encoding": "a-future-encoding", "result_from": "expression", "sealed": True,
                "started": 1.0, "finished": 2.0, "staged": False, "attempt": 1, "retry": False}
        mon.send_multipart(_raw("result", {"results": [item]}) + [b"x", b""])
        assert _replies(mon, M.ERROR).header["code"] == "header"
        with pytest.raises(JobError, match="cannot read .*the broker.s version"):
            j.result(30)
        assert j.status == "failed"
        ack = _replies(mon, M.RESULT_ACK)
        assert ack.header["ids"] == [j.job_id]
        assert ack.header["attempts"] == [run.header["jobs"][0]["attempt"]]
    finally:
        ctx.destroy(linger=0)


# --- one broker per store


def test_a_second_broker_on_the_same_home_refuses_and_names_the_first(
        procs: Procs, home: Path) -> None:
    first = procs.broker()
    D = procs.client()
    from dsage.cluster import free_port

    other = free_port()
    r = subprocess.run([sys.executable, "-m", "dsage.cli", "broker", "--port", str(other)],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DSAGE_HOME": str(home)})
    assert r.returncode == 2
    assert "in use by another broker" in r.stderr
    assert f"pid {first.pid}" in r.stderr and f"ports {procs.port}-" in r.stderr
    assert "Traceback" not in r.stderr
    assert first.alive() and D.workers() == []  # the first broker is unharmed
    with pytest.raises(StoreLocked):
        Store(home / "db" / "dsage.db")


def test_start_all_in_a_second_script_gets_a_cluster_of_its_own(home: Path) -> None:
    code = ("import dsage, sys\n"
            "D = dsage.start_all(workers=1, port=0)\n"
            "print(D('2 + 2').result(120), D.port, flush=True)\n"
            "sys.stdin.readline()\n"
            "D.close()\n")
    env = {**os.environ, "DSAGE_HOME": str(home)}
    first = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
    try:
        assert first.stdout is not None and first.stdin is not None
        line = first.stdout.readline().split()
        assert line and line[0] == "4", first.stderr.read() if first.stderr else ""
        second = run_python(code.replace("sys.stdin.readline()\n", ""), env=env, timeout=120)
        assert second.returncode == 0, second.stderr
        answer, port = second.stdout.split()
        assert answer == "4" and port != line[1]
        assert "own job store" in second.stderr
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(60) == 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, 9)
            first.wait()



# --- the hot path cannot regress: messages and SQL statements per job


def test_messages_and_sql_statements_per_job(tmp_path: Path) -> None:
    """100 jobs through submit, dispatch and results: the broker sends a handful of
    messages for the whole batch and runs at most 2 SQL statements per job (insert,
    finish: a job done within ANNOUNCE_DELAY has no start stored) plus a constant
    number per loop turn."""
    store = Store(tmp_path / "dsage.db")
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    state = BrokerState(store, BrokerConfig(prefetch=0), 0.0, lambda k: True)
    n = 100
    register = _register_msg("m", slots=n)
    state.on_monitor(0.0, b"m", "k" * 40, False, decode(encode(register), ALL))
    state.flush(0.0)
    statements.clear()
    specs = [_spec(f"{i:032x}") for i in range(n)]
    state.on_client(0.0, b"c", OWNER, make(M.SUBMIT, [b"1"] * n, req=1, jobs=specs, shared=[]))
    sent = state.flush(0.0)
    items = [{"id": s["id"], "status": "completed", "error": None, "encoding": "data",
              "result_from": "expression", "sealed": False, "started": None, "finished": 1.0, "staged": False, "attempt": 1, "retry": False}
             for s in specs]
    state.on_monitor(0.0, b"m", "k" * 40, False,
                     decode(encode(make(M.RESULT, [b"1", b""] * n, results=items)), ALL))
    sent += state.flush(0.0)
    sent += state.flush(ACK_DELAY)  # the results' acknowledgement: no RUN took it
    kinds = sorted(o.msg.type.value for o in sent)
    # one event: the jobs were done before their "processing" records were due
    assert kinds == ["ack", "event", "result_ack", "run"], kinds
    writes = [s for s in statements if not s.startswith(("BEGIN", "COMMIT"))]
    assert len(writes) <= 2 * n, writes[:5]
    assert sum(s.startswith("COMMIT") for s in statements) <= 2
    state.tick(0.0)  # idle now, but only just: the WAL is not emptied after every job
    state.tick(0.5)
    assert not [s for s in statements if "wal_checkpoint" in s]
    state.tick(1.5)
    assert [s for s in statements if "wal_checkpoint" in s]
    store.close()


def test_a_monitor_of_another_minor_version_is_refused_saying_why(tmp_path: Path) -> None:
    """A monitor whose dsage differs in its major or minor version is refused at
    REGISTER, with both versions named (its messages may differ, and once only some
    of them failed to parse); another patch version registers."""
    assert version_problem("0.1.7", "worker", "0.1.0") is None
    problem = version_problem("0.2.0", "worker", "0.1.3")
    assert problem is not None and "0.1.3" in problem and "0.2.0" in problem
    assert version_problem("1.1.0", "worker", "0.1.0") is not None
    assert version_problem("garbage", "worker", "0.1.0") is not None
    store = Store(tmp_path / "dsage.db")
    state = BrokerState(store, BrokerConfig(), 0.0, lambda k: True)
    major, minor, _ = __version__.split(".")
    for version, accepted in ((f"{major}.{int(minor) + 1}.0", False),
                              (f"{major}.{minor}.99", True)):
        register = _register_msg(version, version=version)
        state.on_monitor(0.0, b"m" + version.encode(), "k" * 40, False,
                         decode(encode(register), ALL))
        [reply] = [o.msg for o in state.flush(0.0)]
        if accepted:
            assert reply.type is M.REGISTERED
        else:
            assert reply.type is M.ERROR and reply.header["code"] == "version"
            assert version in reply.header["message"]
            assert __version__ in reply.header["message"]
    assert [m.monitor_id for m in state.monitors.values()] == [f"{major}.{minor}.99"]
    store.close()


def test_prefetch_grows_for_short_jobs_only() -> None:
    """Before any result, and for long jobs, a monitor gets the configured prefetch;
    for short jobs, enough to keep its slots busy for a few milliseconds, capped."""
    assert prefetch(2, None, 1) == 1
    assert prefetch(2, 10.0, 1) == prefetch(2, 0.05, 1) == 1
    assert prefetch(2, 10.0, 3) == 3
    assert 1 < prefetch(2, 0.001, 1) < prefetch(2, 0.0001, 1) <= MAX_PREFETCH
    assert prefetch(1000, 0.0, 1) == MAX_PREFETCH
    assert prefetch(2, -1.0, 1) == prefetch(2, 0.0, 1)  # a clock that went back
    assert moving_average(None, 2.0) == 2.0
    assert 1.0 < moving_average(1.0, 2.0) < 1.5


def test_results_wait_for_more_only_while_jobs_queued_keep_the_slots_busy() -> None:
    """A monitor holds finished results while more jobs are queued there than results
    held, for HOLD_TIME at most; idle, or about to be, it sends each result at once."""
    assert holding(1, 10, since=0.0, now=0.0)
    assert not holding(1, 0, since=0.0, now=0.0)  # nothing queued: the round trip matters
    assert not holding(5, 5, since=0.0, now=0.0)  # the broker is to send more now
    assert not holding(1, 10, since=0.0, now=HOLD_TIME)
    assert not holding(MAX_BATCH, 10 * MAX_BATCH, since=0.0, now=0.0)


def test_a_monitor_of_short_jobs_is_sent_many_at_a_time(tmp_path: Path) -> None:
    """Once its results show that its jobs are short, a monitor's credit grows: one
    RUN carries many jobs, not one per free slot."""
    store = Store(tmp_path / "dsage.db")
    state = BrokerState(store, BrokerConfig(prefetch=1), 0.0, lambda k: True)
    register = _register_msg("m", slots=2)
    state.on_monitor(0.0, b"m", "k" * 40, False, decode(encode(register), ALL))
    specs = [_spec(f"{i:032x}") for i in range(200)]
    state.on_client(0.0, b"c", OWNER, make(M.SUBMIT, [b"1"] * 200, req=1, jobs=specs,
                                           shared=[]))
    first = [o.msg for o in state.flush(0.0) if o.msg.type is M.RUN]
    assert [len(m.header["jobs"]) for m in first] == [3]  # 2 slots and 1 prefetched
    items = [{"id": j["id"], "status": "completed", "error": None, "encoding": "data",
              "result_from": "expression", "sealed": False, "started": 1.0,
              "finished": 1.0001, "staged": False, "attempt": 1, "retry": False}
             for j in first[0].header["jobs"]]
    state.on_monitor(0.0, b"m", "k" * 40, False,
                     decode(encode(make(M.RESULT, [b"1", b""] * 3, results=items)), ALL))
    then = [o.msg for o in state.flush(0.0) if o.msg.type is M.RUN]
    assert sum(len(m.header["jobs"]) for m in then) >= 20
    store.close()


def test_a_monitor_whose_jobs_turn_long_is_sent_no_more_than_its_prefetch(
        tmp_path: Path) -> None:
    """Short results let a monitor's credit grow; once it has had jobs out for
    STALE_AFTER without sending a result, it is back to its slots and the configured
    prefetch, whatever its average says."""
    store = Store(tmp_path / "dsage.db")
    state = BrokerState(store, BrokerConfig(prefetch=1), 0.0, lambda k: True)
    register = _register_msg("m")
    state.on_monitor(0.0, b"m", "k" * 40, False, decode(encode(register), ALL))
    [entry] = state.monitors.values()
    entry.run_time = 0.0001  # as after short jobs
    state.on_client(0.0, b"c", OWNER, make(M.SUBMIT, [b"1"] * 100, req=1, shared=[],
                                           jobs=[_spec(f"{i:032x}") for i in range(100)]))
    [run] = [o.msg for o in state.flush(0.0) if o.msg.type is M.RUN]
    assert len(run.header["jobs"]) > 2
    later = STALE_AFTER * 2  # and no result since
    release = make(M.RELEASE, ids=[j["id"] for j in run.header["jobs"][2:]],
                   reason="given back", count_failure=False, missing_blobs=[])
    state.on_monitor(later, b"m", "k" * 40, False, decode(encode(release), ALL))
    assert not [o for o in state.flush(later) if o.msg.type is M.RUN]  # 1 slot, 1 prefetched
    assert len(state.sched.of_monitor("m")) == 2
    store.close()


def test_jobs_queued_on_a_monitor_busy_with_long_jobs_go_to_an_idle_one(
        procs: Procs) -> None:
    """Two monitors of one slot, whose short jobs made the broker send them many at a
    time; then four jobs of a second each. All four go to the first monitor with
    credit; it keeps one queued beyond its busy slot and gives the others back, so
    the idle monitor runs them."""
    procs.broker()
    procs.worker(1)
    procs.worker(1)
    d = procs.client()
    procs.wait_workers(d, 2)
    for _ in range(3):  # each monitor's average: short
        assert [j.result(60) for j in [d.eval_function(operator.neg, (i,))
                                       for i in range(200)]] == [-i for i in range(200)]
    jobs = [d("import time; time.sleep(1)") for _ in range(4)]
    for j in jobs:
        j.wait(60)
    assert all(j.status == "completed" for j in jobs)
    assert len({j.worker.id for j in jobs if j.worker is not None}) == 2


def test_a_busy_monitor_sends_results_many_to_a_message(procs: Procs) -> None:
    """2,000 tiny jobs: their results reach the client in far fewer events than jobs,
    as the monitor sends them many to a message while it has jobs queued (one event
    per job or nearly, before)."""
    d = procs.up(2)
    assert d.eval_function(operator.neg, (1,)).result(60) == -1
    before = d._io.last_seq
    jobs = [d.eval_function(operator.neg, (i,)) for i in range(2000)]
    assert [j.result(120) for j in jobs] == [-i for i in range(2000)]
    events = d._io.last_seq - before
    assert events <= len(jobs) / 2, events


def test_acknowledgements_ride_on_the_next_run_or_leave_after_a_delay(tmp_path: Path) -> None:
    """A monitor's stored results are acknowledged on the next RUN to it, committed
    first; with no RUN going, a RESULT_ACK leaves after ACK_DELAY; an empty RESULT
    (a stopping monitor's) is answered at once, after the acknowledgements."""
    store = Store(tmp_path / "dsage.db")
    state = BrokerState(store, BrokerConfig(prefetch=0), 0.0, lambda k: True)
    state.on_monitor(0.0, b"m", "k" * 40, False, _register_msg("m"))
    ids = [f"{i:032x}" for i in range(3)]
    state.on_client(0.0, b"c", OWNER, make(M.SUBMIT, [b"1"] * 3, req=1, shared=[],
                                           jobs=[_spec(i) for i in ids]))
    [run] = [o.msg for o in state.flush(0.0) if o.msg.type is M.RUN]
    assert [j["id"] for j in run.header["jobs"]] == ids[:1] and run.header["acked"] == []

    def result(jid: str) -> Message:
        return make(M.RESULT, [b"1", b""], results=[{
            "id": jid, "status": "completed", "error": None, "encoding": "data",
            "result_from": "expression", "sealed": False, "started": None, "finished": 1.0,
            "staged": False, "attempt": 1, "retry": False}])

    # the result frees the slot: the next RUN goes before the commit, so without the ack
    state.on_monitor(0.01, b"m", "k" * 40, False, result(ids[0]))
    out = state.flush(0.01)
    assert [o.msg.type for o in out if o.to == b"m"] == [M.RUN]
    assert out[0].msg.header["acked"] == []
    # the one after carries it, committed since
    state.on_monitor(0.02, b"m", "k" * 40, False, result(ids[1]))
    [run] = [o.msg for o in state.flush(0.02) if o.to == b"m"]
    assert run.header["acked"] == ids[:1] and run.header["attempts"] == [1]
    # no job left to send: the last result's acknowledgement waits, then goes alone
    state.on_monitor(0.03, b"m", "k" * 40, False, result(ids[2]))
    assert [o for o in state.flush(0.03) if o.to == b"m"] == []
    assert 0 < state.next_wakeup(0.04) <= ACK_DELAY
    [ack] = [o.msg for o in state.flush(0.021 + ACK_DELAY) if o.to == b"m"]
    assert ack.type is M.RESULT_ACK and ack.header["ids"] == ids[1:]
    # a stopping monitor's empty RESULT is answered at once, acknowledgements first
    state.on_client(0.1, b"c", OWNER, make(M.SUBMIT, [b"1"], req=2, shared=[],
                                           jobs=[_spec("e" * 32)]))
    state.flush(0.1)
    state.on_monitor(0.1, b"m", "k" * 40, False, result("e" * 32))
    state.on_monitor(0.1, b"m", "k" * 40, False, make(M.STOPPING))
    state.on_monitor(0.1, b"m", "k" * 40, False, make(M.RESULT, results=[]))
    answers = [o.msg.header for o in state.flush(0.1) if o.to == b"m"]
    assert answers == [{"ids": ["e" * 32], "attempts": [1]}, {"ids": [], "attempts": []}]
    store.close()


def test_a_running_job_is_announced_processing_after_a_delay_and_a_quick_one_only_final(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "dsage.db")
    state = BrokerState(store, BrokerConfig(prefetch=0), 0.0, lambda k: True)
    state.on_monitor(0.0, b"m", "k" * 40, False, _register_msg("m", slots=2))
    slow, quick = "a" * 32, "b" * 32
    state.on_client(0.0, b"c", OWNER, make(M.SUBMIT, [b"1"] * 2, req=1, shared=[],
                                           jobs=[_spec(slow), _spec(quick)]))

    def events(now: float) -> list[tuple[str, str]]:
        return [(r["id"], r["status"]) for o in state.flush(now) if o.dest == "event"
                for r in o.msg.header["jobs"]]

    assert events(0.0) == []
    assert 0 < state.next_wakeup(0.01) <= ANNOUNCE_DELAY
    state.on_monitor(0.05, b"m", "k" * 40, False, make(M.RESULT, [b"1", b""], results=[{
        "id": quick, "status": "completed", "error": None, "encoding": "data",
        "result_from": "expression", "sealed": False, "started": None, "finished": 1.0,
        "staged": False, "attempt": 1, "retry": False}]))
    assert events(0.05) == [(quick, "completed")]
    assert store.db.execute("SELECT status FROM jobs WHERE id=?", (slow,)).fetchone() == ("new",)
    assert events(ANNOUNCE_DELAY * 1.01) == [(slow, "processing")]
    assert events(ANNOUNCE_DELAY * 3) == []  # once
    # its start is stored with the record: the worker, and the time it was sent there
    row = store.db.execute("SELECT status, worker_id, started FROM jobs WHERE id=?",
                           (slow,)).fetchone()
    assert row[:2] == ("processing", "m") and row[2] == state.sched.jobs[slow].started
    store.close()


def test_large_results_are_announced_by_reference_and_fetched_in_chunks(tmp_path: Path) -> None:
    store = Store(tmp_path / "dsage.db")
    state = BrokerState(store, BrokerConfig(), 0.0, lambda k: True)
    register = _register_msg("m")
    state.on_monitor(0.0, b"m", "k" * 40, False, register)
    jid = "f" * 32
    state.on_client(0.0, b"c", OWNER, make(M.SUBMIT, [b"1"], req=1, jobs=[_spec(jid)], shared=[]))
    state.flush(0.0)
    big = os.urandom(3 * 1024 * 1024 + 5)
    item = {"id": jid, "status": "completed", "error": None, "encoding": "data",
            "result_from": "expression", "sealed": False, "started": None, "finished": 1.0, "staged": False, "attempt": 1, "retry": False}
    state.on_monitor(0.0, b"m", "k" * 40, False, make(M.RESULT, [big, b"out"], results=[item]))
    [event] = [o.msg for o in state.flush(0.0) if o.dest == "event"]
    [rec] = event.header["jobs"]
    assert rec["by_ref"] and rec["status"] == "completed" and event.blobs == [b"", b""]
    got, offset = b"", 0
    while True:
        state.on_client(0.0, b"c", OWNER, make(M.FETCH, req=2, id=jid, part="result",
                                                offset=offset))
        [chunk] = [o.msg for o in state.flush(0.0) if o.msg.type is M.CHUNK]
        assert chunk.header["total"] == len(big) and len(chunk.blobs[0]) <= 1024 * 1024
        got += chunk.blobs[0]
        offset += len(chunk.blobs[0])
        if offset >= chunk.header["total"]:
            break
    assert got == big
    # only the owner may fetch
    state.on_client(0.0, b"c", "x" * 40, make(M.FETCH, req=3, id=jid, part="result", offset=0))
    [reply] = [o.msg for o in state.flush(0.0) if o.msg.type is M.JOBS]
    assert reply.header["missing"] == [jid] and reply.header["jobs"] == []
    store.close()


def test_a_large_result_reaches_its_client_by_reference(cluster: Any) -> None:
    """25 MB results are fetched in chunks, not pushed through the events socket."""
    jobs = [cluster(f"DSAGE_RESULT = bytes([{i}]) * 25_000_000") for i in range(3)]
    for i, j in enumerate(jobs):
        value = j.result(120)
        assert len(value) == 25_000_000 and value[:1] == bytes([i]) and value[-1] == i
    small = done(cluster("'x' * 10"), 60)
    assert small.result() == "x" * 10
    again = cluster.job(jobs[0].job_id)
    assert again.result(60)[:1] == b"\x00"


def test_jobs_leave_for_monitors_before_the_commit_and_acks_after_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "dsage.db")
    order: list[str] = []
    store.db.set_trace_callback(lambda sql: order.append("commit") if sql == "COMMIT" else None)
    state = BrokerState(store, BrokerConfig(), 0.0, lambda k: True)
    register = _register_msg("m")
    state.on_monitor(0.0, b"m", "k" * 40, False, register)
    state.flush(0.0)
    order.clear()
    state.on_client(0.0, b"c", OWNER, make(M.SUBMIT, [b"1"], req=1, jobs=[_spec("e" * 32)], shared=[]))
    late = state.flush(0.0, lambda outs: order.extend(o.msg.type.value for o in outs))
    assert order == ["run", "commit"]
    assert sorted(o.msg.type.value for o in late) == ["ack"]  # "processing" comes later
    store.close()


def test_uploaded_chunks_make_the_result_and_are_fetched_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "dsage.db")
    state = BrokerState(store, BrokerConfig(), 0.0, lambda k: True)
    for rid, mid in ((b"m", "m"), (b"n", "n")):
        state.on_monitor(0.0, rid, "k" * 40, False, _register_msg(mid))
    jid = "d" * 32
    state.on_client(0.0, b"c", OWNER, make(M.SUBMIT, [b"1"], req=1, jobs=[_spec(jid)], shared=[]))
    state.flush(0.0)
    runner = state.sched.jobs[jid].monitor
    rid, other = (b"m", b"n") if runner == "m" else (b"n", b"m")
    big = os.urandom(2_500_000)

    def put(who: bytes, offset: int, data: bytes, part: str = "result") -> dict[str, Any]:
        state.on_monitor(0.0, who, "k" * 40, False, make(
            M.PUT, [data], id=jid, part=part, offset=offset, total=len(big)))
        [ack] = [o.msg for o in state.flush(0.0) if o.msg.type is M.PUT_ACK]
        return ack.header

    assert put(other, 0, big[:1000])["gone"]  # not the monitor that runs it
    assert put(rid, 0, big[:1_000_000])["next"] == 1_000_000
    assert put(rid, 2_000_000, big[2_000_000:])["next"] == 1_000_000  # a gap: resend
    assert put(rid, 1_000_000, big[1_000_000:2_000_000])["next"] == 2_000_000
    assert put(rid, 2_000_000, big[2_000_000:])["next"] == len(big)
    item = {"id": jid, "status": "completed", "error": None, "encoding": "data",
            "result_from": "expression", "sealed": False, "started": None, "finished": 1.0,
            "staged": True, "attempt": 1, "retry": False}
    state.on_monitor(0.0, rid, "k" * 40, False, make(M.RESULT, [b"", b""], results=[item]))
    [event] = [o.msg for o in state.flush(0.0) if o.dest == "event"]
    assert event.header["jobs"][0]["by_ref"]
    got = b""
    while len(got) < len(big):
        state.on_client(0.0, b"c", OWNER, make(M.FETCH, req=2, id=jid, part="result",
                                                offset=len(got)))
        [chunk] = [o.msg for o in state.flush(0.0) if o.msg.type is M.CHUNK]
        assert chunk.header["total"] == len(big)
        got += chunk.blobs[0]
    assert got == big
    state.on_client(0.0, b"c", OWNER, make(M.FETCH, req=3, id=jid, part="output", offset=0))
    [chunk] = [o.msg for o in state.flush(0.0) if o.msg.type is M.CHUNK]
    assert chunk.header["total"] == 0 and chunk.blobs == [b""]
    store.close()


def test_a_message_is_capped_as_a_whole_not_only_per_frame(procs: Procs, home: Path) -> None:
    """An anonymous peer once sent 60 frames of ~1 MiB under a 1 MiB frame limit and the
    broker copied and parsed all of it; now the whole message has a budget, checked
    before anything is copied, and the broker goes on."""
    broker = procs.broker(allow_anonymous=True, max_message_size=1024 * 1024)
    procs.worker(1, max_message_size=1024 * 1024)
    D = procs.client(max_message_size=1024 * 1024)
    procs.wait_workers(D, 1)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        anon = _dealer(ctx, home, procs.port + 1, keys.Keypair(*zmq.curve_keypair()))
        items = [{"id": f"{i:032x}", "status": "completed", "error": None, "encoding": "data",
                  "result_from": "expression", "sealed": False, "started": None,
                  "finished": 1.0, "staged": False, "attempt": 1, "retry": False} for i in range(30)]
        blob = b"z" * (1024 * 1024 - 100)
        anon.send_multipart(_raw("result", {"results": items}, *[blob] * 60))
        assert _replies(anon, M.ERROR).header["code"] == "size"
    finally:
        ctx.destroy(linger=0)
    assert broker.alive()
    # trusted peers keep within the budget by themselves: many jobs near the limit
    jobs = [D(f"len({'y' * 300_000!r}) + {i}") for i in range(12)]
    assert [j.result(60) for j in jobs] == [300_000 + i for i in range(12)]


def test_a_dead_authentication_thread_stops_the_broker_with_a_reason(home: Path,
                                                                      port: int) -> None:
    """Without its ZAP thread every handshake would hang while the broker carries on."""
    from dsage.broker import Broker
    from dsage.options import BrokerOptions

    broker = Broker(BrokerOptions(port=port, home=home))
    try:
        broker.step(0.01)
        assert not broker.stopping
        thread = broker.auth.thread
        broker.auth.stop()  # the thread ends, as if it had died ...
        broker.auth.thread = thread  # ... and the broker still holds it
        broker._last_key_check = 0.0
        broker.step(0.01)
        assert broker.stopping and broker.failed == "the authentication thread died"
    finally:
        broker.close()


def test_a_key_that_loses_the_client_role_loses_its_events(procs: Procs, home: Path,
                                                           tmp_path: Path) -> None:
    bob = tmp_path / "bob"
    keys.setup(bob)
    keys.add_key("bob", keys.public_key_file(bob), home)
    procs.broker()
    own = keys.load_keypair(bob)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sub = ctx.socket(zmq.SUB)
        make_client(sub, own, keys.load_keypair(home).public)
        sub.setsockopt(zmq.SUBSCRIBE, own.public)
        sub.connect(f"tcp://127.0.0.1:{procs.port + 2}")
        wait_for(lambda: sub.poll(100), 30, "bob's subscription live (its first event)")
        sub.recv_multipart()
        keys.add_key("bob", keys.public_key_file(bob), home, role="worker")
        wait_for(lambda: "dropped the events subscription" in procs.started[0].log_tail(50),
                 30, "the broker to drop bob's subscription")
        # bob's topic is gone from the events socket: a job of the owner does not
        # reach it, and neither would bob's
        D = procs.client()
        procs.worker(1)
        assert D("1").result(60) == 1
        assert not sub.poll(500)
    finally:
        ctx.destroy(linger=0)


def test_anonymous_peers_have_a_message_rate_and_a_count() -> None:
    from dsage.limits import RateLimit

    limit = RateLimit(rate=10.0, burst=20.0, max_keys=3)
    assert sum(limit.allow("a", 0.0) for _ in range(100)) == 20  # a burst, then nothing
    assert not limit.allow("a", 0.05)
    assert sum(limit.allow("a", 1.0) for _ in range(100)) == 10  # refilled at the rate
    assert limit.allow("b", 1.0) and limit.allow("c", 1.0)
    assert not limit.allow("d", 1.0)  # too many keys at once
    assert limit.allow("d", 100.0)  # the quiet ones are forgotten

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "dsage.db")
        state = BrokerState(store, BrokerConfig(allow_anonymous=True, max_anonymous=1), 0.0,
                            lambda k: True)

        def register(rid: bytes, mid: str, anonymous: bool) -> Message:
            state.on_monitor(0.0, rid, mid * 40, anonymous, _register_msg(mid))
            [reply] = [o.msg for o in state.flush(0.0) if o.to == rid]
            return reply

        assert register(b"a1", "a", True).type is M.REGISTERED
        refused = register(b"a2", "b", True)
        assert refused.type is M.ERROR and refused.header["code"] == "busy"
        assert register(b"t", "t", False).type is M.REGISTERED  # trusted ones unaffected
        state.lose_monitor(0.0, b"a1", "test")
        assert register(b"a2", "b", True).type is M.REGISTERED
        store.close()


# --- retries: the attempt is kept in the store


def test_a_retried_job_keeps_its_attempt_across_a_broker_restart(tmp_path: Path) -> None:
    """A job whose code raised goes back to the queue for attempt 2, counting no
    failure; the store keeps the attempt, so after a restart the next RUN says 2
    and, its one retry used, asks the slot to match no exception."""
    path = tmp_path / "dsage.db"
    store = Store(path)
    state = BrokerState(store, BrokerConfig(), 0.0, lambda k: True)
    spec = _spec("a" * 32, retries=1, retry_on=["KeyError"])
    state.on_client(0.0, b"c", OWNER, make(M.SUBMIT, [b"1"], req=1, jobs=[spec], shared=[]))
    state.on_monitor(0.0, b"m", "k" * 40, False, _register_msg("m"))
    runs = [o.msg for o in state.flush(0.0) if o.msg.type is M.RUN]
    assert [r.header["jobs"][0]["attempt"] for r in runs] == [1]
    assert runs[0].header["jobs"][0]["retry_on"] == ["KeyError"]
    item = {"id": "a" * 32, "status": "failed", "error": "KeyError", "encoding": "error",
            "result_from": "none", "sealed": False, "started": 0.0, "finished": 1.0,
            "staged": False, "attempt": 1, "retry": True}
    state.on_monitor(0.0, b"m", "k" * 40, False, make(M.RESULT, [b"", b""], results=[item]))
    state.on_monitor(0.0, b"m", "k" * 40, False, make(M.STOPPING))  # no credit: stays queued
    outs = state.flush(0.0)
    acks = [o.msg.header for o in outs if o.msg.type is M.RESULT_ACK]
    assert acks == [{"ids": ["a" * 32], "attempts": [1]}]
    events = [r for o in outs if o.dest == "event" for r in o.msg.header["jobs"]]
    assert [(r["status"], r["attempt"], r["failures"]) for r in events] == [("new", 2, 0)]
    store.close()

    store = Store(path)  # a restart
    state = BrokerState(store, BrokerConfig(), 0.0, lambda k: True)
    assert state.sched.jobs["a" * 32].attempt == 2
    state.on_monitor(0.0, b"m2", "k" * 40, False, _register_msg("m2"))
    runs = [o.msg for o in state.flush(0.0) if o.msg.type is M.RUN]
    assert [(r.header["jobs"][0]["attempt"], r.header["jobs"][0]["retry_on"])
            for r in runs] == [(2, [])]
    assert store.records(["a" * 32])["a" * 32][0]["attempt"] == 2
    store.close()


def test_a_store_made_before_retries_and_isolate_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    from dsage.store import _ADDED_COLUMNS, _SCHEMA

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    table = _SCHEMA.split(";")[0]
    for column, kind in _ADDED_COLUMNS:  # the first schema had none of them
        table = table.replace(f",\n    {column} {kind}", "")
    assert "isolate" not in table and "attempt" not in table
    db.execute(table)
    db.execute("INSERT INTO jobs (id, owner, kind, status, priority, anonymous_ok, created,"
               " payload) VALUES (?, ?, 'python', 'new', 5, 0, 1.0, x'31')", ("b" * 32, OWNER))
    db.commit()
    db.close()
    store = Store(path)
    [job] = store.open_jobs(1 << 20)
    assert (job.attempt, job.retries, job.retry_on, job.isolate) == (1, 0, (), False)
    store.retry(job.id, 2)
    assert store.records([job.id])[job.id][0]["attempt"] == 2
    store.close()


def test_a_jobs_largest_frame_is_known_again_after_a_restart(tmp_path: Path) -> None:
    """The scheduler's size class of a job (its payload or an attached file, whichever
    is larger) comes back from the store when the broker starts again."""
    store = Store(tmp_path / "dsage.db")
    state = BrokerState(store, BrokerConfig(), 0.0, lambda k: True)
    blob = b"f" * 3_000_000
    digest = hashlib.sha256(blob).hexdigest()
    specs = [_spec("a" * 32, shared=[digest]), _spec("b" * 32, shared=[digest]), _spec("c" * 32)]
    state.on_client(0.0, b"c", OWNER, make(M.SUBMIT, [b"1", b"2", b"x" * 2_000_000, blob],
                                           req=1, jobs=specs, shared=[digest]))
    state.flush(0.0)
    frames = {j.id[0]: j.frame for j in state.sched.jobs.values()}
    assert frames == {"a": 3_000_000, "b": 3_000_000, "c": 2_000_000}
    store.close()
    store = Store(tmp_path / "dsage.db")
    assert {j.id[0]: j.frame for j in store.open_jobs(1 << 30)} == frames
    store.close()


# --- shared blobs (attached files): once per message, kept once per owner


def test_shared_blobs_are_kept_once_and_sent_once_per_run(tmp_path: Path) -> None:
    import hashlib

    data = b"a file many jobs attach" * 1000
    digest = hashlib.sha256(data).hexdigest()
    path = tmp_path / "dsage.db"
    store = Store(path)
    state = BrokerState(store, BrokerConfig(), 0.0, lambda k: True)

    def submit(ids: list[str], blobs: dict[str, bytes], uses: str = digest) -> dict[str, Any]:
        specs = [_spec(i, shared=[uses]) for i in ids]
        state.on_client(0.0, b"c", OWNER, make(M.SUBMIT, [b"1"] * len(ids) + list(blobs.values()),
                                               req=1, jobs=specs, shared=list(blobs)))
        [ack] = [o.msg.header for o in state.flush(0.0) if o.msg.type is M.ACK]
        return ack

    assert submit([f"{i:032x}" for i in range(10)], {digest: data})["ids"] != []
    ack = submit(["a" * 32], {})  # its content came in an earlier message: kept
    assert ack["ids"] == ["a" * 32] and ack["errors"] == []
    # a content that does not match its hash is not taken: the kept copy serves
    assert submit(["b" * 32], {digest: b"not the content"})["ids"] == ["b" * 32]
    other = "c" * 64
    bad = submit(["c" * 32], {other: b"not the content"}, uses=other)
    assert bad["errors"][0]["code"] == "shared" and not bad["ids"]
    assert submit(["e" * 32], {}, uses=other)["errors"][0]["code"] == "shared"
    assert store.db.execute("SELECT count(*) FROM shared_blobs").fetchone() == (1,)
    store.close()

    store = Store(path)  # a restart: the blob is kept with the jobs
    state = BrokerState(store, BrokerConfig(), 0.0, lambda k: True)
    state.on_monitor(0.0, b"m", "k" * 40, False, _register_msg("m", slots=20))
    runs = [decode(encode(o.msg), ALL) for o in state.flush(0.0) if o.msg.type is M.RUN]
    assert sum(len(r.header["jobs"]) for r in runs) == 12
    assert [r.header["shared"] for r in runs] == [[digest]] * len(runs) and len(runs) == 1
    assert runs[0].blobs[12:] == [data]
    assert all(s["shared"] == [digest] for s in runs[0].header["jobs"])
    for s in runs[0].header["jobs"]:  # all finish: nothing uses the blob any more
        item = {"id": s["id"], "status": "completed", "error": None, "encoding": "none",
                "result_from": "none", "sealed": False, "started": 0.0, "finished": 1.0,
                "staged": False, "attempt": 1, "retry": False}
        state.on_monitor(0.0, b"m", "k" * 40, False, make(M.RESULT, [b"", b""],
                                                          results=[item]))
    state.flush(0.0)
    store.prune(0.0)
    assert store.db.execute("SELECT count(*) FROM shared_blobs").fetchone() == (0,)
    assert submit(["d" * 32], {})["errors"][0]["code"] == "shared"  # the client resends
    store.close()


def test_a_run_lost_in_a_broker_crash_is_sent_again_when_its_monitor_registers(
        tmp_path: Path) -> None:
    """The broker dispatched a job (committed as processing on monitor m, as it would
    be once it ran ANNOUNCE_DELAY) and died before the RUN left. Restarted, it learns
    from m's registration that m does not hold the job: the job goes back to the
    queue, counting no failure, and runs. (It once stayed 'processing' on m for ever,
    as m was registered.)"""
    path = tmp_path / "dsage.db"
    store = Store(path)
    state = BrokerState(store, BrokerConfig(), 0.0, lambda k: True)
    register = _register_msg("m")
    state.on_client(0.0, b"c", OWNER, make(M.SUBMIT, [b"1"], req=1, jobs=[_spec("f" * 32)],
                                           shared=[]))
    state.on_monitor(0.0, b"m", "k" * 40, False, register)
    assert [o.msg.type for o in state.flush(0.0) if o.msg.type is M.RUN] == [M.RUN]
    state.flush(ANNOUNCE_DELAY)
    store.close()  # the RUN is lost with the broker

    store = Store(path)
    state = BrokerState(store, BrokerConfig(), 0.0, lambda k: True)
    assert state.sched.jobs["f" * 32].monitor == "m"
    state.on_monitor(0.0, b"m2", "k" * 40, False, register)  # holds nothing
    runs = [o.msg for o in state.flush(0.0) if o.msg.type is M.RUN]
    assert [r.header["jobs"][0]["id"] for r in runs] == ["f" * 32]
    assert state.sched.jobs["f" * 32].failures == 0
    store.close()


def test_a_job_whose_start_was_not_stored_is_kept_by_the_monitor_that_holds_it(
        tmp_path: Path) -> None:
    """The broker died within ANNOUNCE_DELAY of a dispatch, so the store has the job
    queued. Restarted, the monitor that got the RUN lists it when it registers: it
    keeps the job (no second RUN, no failure), and the start is stored then."""
    path = tmp_path / "dsage.db"
    store = Store(path)
    state = BrokerState(store, BrokerConfig(), 0.0, lambda k: True)
    jid = "e" * 32
    state.on_client(0.0, b"c", OWNER, make(M.SUBMIT, [b"1"], req=1, jobs=[_spec(jid)],
                                           shared=[]))
    state.on_monitor(0.0, b"m", "k" * 40, False, _register_msg("m"))
    assert [o.msg.type for o in state.flush(0.0) if o.msg.type is M.RUN] == [M.RUN]
    store.close()

    store = Store(path)
    state = BrokerState(store, BrokerConfig(), 0.0, lambda k: True)
    assert state.sched.jobs[jid].where is Where.QUEUED
    state.on_monitor(0.0, b"m", "k" * 40, False, _register_msg("m", running=[jid]))
    assert [o for o in state.flush(0.0) if o.msg.type is M.RUN] == []
    job = state.sched.jobs[jid]
    assert (job.where, job.monitor, job.failures) == (Where.ASSIGNED, "m", 0)
    assert store.db.execute("SELECT status, worker_id FROM jobs WHERE id=?",
                            (jid,)).fetchone() == ("processing", "m")
    store.close()


def test_a_monitor_gets_a_shared_blob_once_until_it_says_it_dropped_it(tmp_path: Path) -> None:
    import hashlib

    data = b"attached" * 100
    digest = hashlib.sha256(data).hexdigest()
    store = Store(tmp_path / "dsage.db")
    state = BrokerState(store, BrokerConfig(prefetch=0), 0.0, lambda k: True)
    ids = [f"{i:032x}" for i in range(3)]
    state.on_client(0.0, b"c", OWNER, make(M.SUBMIT, [b"1"] * 3 + [data], req=1, shared=[digest],
                                           jobs=[_spec(i, shared=[digest]) for i in ids]))
    state.on_monitor(0.0, b"m", "k" * 40, False, _register_msg("m"))

    def run() -> Message:
        [msg] = [decode(encode(o.msg), ALL) for o in state.flush(0.0) if o.msg.type is M.RUN]
        return msg

    def finish(jid: str) -> None:
        item = {"id": jid, "status": "completed", "error": None, "encoding": "none",
                "result_from": "none", "sealed": False, "started": 0.0, "finished": 1.0,
                "staged": False, "attempt": 1, "retry": False}
        state.on_monitor(0.0, b"m", "k" * 40, False, make(M.RESULT, [b"", b""],
                                                          results=[item]))

    first = run()
    assert first.header["shared"] == [digest] and first.blobs[1:] == [data]
    finish(first.header["jobs"][0]["id"])
    second = run()  # the monitor has it: left out
    assert second.header["shared"] == [] and second.header["jobs"][0]["shared"] == [digest]
    jid = second.header["jobs"][0]["id"]
    state.on_monitor(0.0, b"m", "k" * 40, False, make(
        M.RELEASE, ids=[jid], reason="dropped", count_failure=False, missing_blobs=[digest]))
    again = run()  # sent again, with the blob
    assert again.header["jobs"][0]["id"] == jid and again.blobs[1:] == [data]
    assert state.sched.jobs[jid].failures == 0
    store.close()
