"""The client (issue "Core v2", client part): nothing submitted is dropped, sends
have back-pressure and bounds, messages keep within the protocol's limits, jobs
the broker forgot end instead of hanging, wrappers come from the I/O thread,
forked children get a clear error, and errors live in their own module.

Some tests talk to a scripted stand-in for the broker (:class:`FakeBroker`) to
make a lost message or a race happen every time; the others use real processes.
"""

from __future__ import annotations

import ast
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import dsage
from dsage import keys
from dsage.protocol import (
    BATCH_BYTES, CLIENT_REQUESTS, DEFAULT_MAX_MESSAGE_SIZE, MAX_BATCH, M, Message, ProtocolError,
    decode, encode, make,
)

from .conftest import HEARTBEAT, Procs, alive, wait_for

#: a broker that lets a monitor be silent this long, so that stopping the broker
#: for a few seconds loses no monitor
STEADY = {"heartbeat": HEARTBEAT, "liveness": 25}
EPOCH = "fake-epoch"


# --- a scripted broker

Handler = Callable[["FakeBroker", bytes, Message], None]


class FakeBroker(threading.Thread):
    """A stand-in for the broker on the client port and the events port: CURVE with
    the home's keypair. It answers HELLO and PING itself, and hands every request
    but HELLO to ``handle`` (on this thread; a PING after its answer).
    ``received`` holds every request, and ``errors`` what did not decode (a
    message past the protocol's limits)."""

    def __init__(self, home: Path, port: int, handle: Handler) -> None:
        super().__init__(name="fake-broker", daemon=True)
        self.keys = keys.load_keypair(home)
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.router = self._server(zmq.ROUTER, port)
        self.events = self._server(zmq.XPUB, port + 2)
        self.handle = handle
        self.received: list[Message] = []
        self.errors: list[ProtocolError] = []
        self.subscribed = threading.Event()
        self.seq = 0
        self.running = True

    def _server(self, kind: int, port: int) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.curve_server = True
        sock.curve_publickey = self.keys.public
        sock.curve_secretkey = self.keys.secret
        sock.bind(f"tcp://127.0.0.1:{port}")
        return sock

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.events, zmq.POLLIN)
        while self.running:
            for sock, _ in poller.poll(20):
                if sock is self.events:
                    self.events.recv()
                    self.subscribed.set()
                else:
                    self._request(*self.router.recv_multipart())

    def _request(self, rid: bytes, *frames: bytes) -> None:
        try:
            msg = decode(list(frames), CLIENT_REQUESTS)
        except ProtocolError as e:
            self.errors.append(e)
            return
        self.received.append(msg)
        if msg.type is M.HELLO:
            self.reply(rid, make(M.WELCOME, req=msg.header["req"], version="fake",
                                 key=self.keys.public.decode(), epoch=EPOCH, heartbeat=HEARTBEAT,
                                 max_message_size=DEFAULT_MAX_MESSAGE_SIZE))
            return
        if msg.type is M.PING:
            self.reply(rid, make(M.PONG, seq=self.seq, epoch=EPOCH))
        self.handle(self, rid, msg)

    def reply(self, rid: bytes, msg: Message) -> None:
        self.router.send_multipart([rid, *encode(msg)])

    def ack(self, rid: bytes, msg: Message, ids: list[str] | None = None) -> None:
        """Acknowledge the jobs of a SUBMIT (or ``ids``)."""
        if ids is None:
            ids = [s["id"] for s in msg.header["jobs"]]
        self.reply(rid, make(M.ACK, req=msg.header["req"], ids=ids, errors=[]))

    def publish(self, records: list[dict[str, Any]]) -> None:
        """An event with ``records`` to the client (this home's key)."""
        self.seq += 1
        self.events.send_multipart([self.keys.public, *encode(make(
            M.EVENT, [b""] * (2 * len(records)), seq=self.seq, epoch=EPOCH, jobs=records))])

    def submitted(self) -> list[str]:
        """The ids of every job received, in order, copies included."""
        return [s["id"] for m in list(self.received) if m.type is M.SUBMIT
                for s in m.header["jobs"]]

    def stop(self) -> None:
        self.running = False
        self.join(5)
        self.ctx.destroy(linger=0)


def record(job_id: str, status: str, result_from: str = "none") -> dict[str, Any]:
    """A job record as the broker sends it (no result: encoding 'none')."""
    final = status in ("completed", "failed", "killed")
    return {"id": job_id, "name": None, "kind": "python", "status": status, "priority": 5,
            "created": 1.0, "started": 1.0, "finished": 2.0 if final else None,
            "failures": 0, "attempt": 1, "error": None, "worker": None, "encoding": "none",
            "result_from": result_from, "sealed": False, "reason": None, "by_ref": False}


@pytest.fixture
def fake(home: Path, port: int) -> Iterator[Callable[[Handler], FakeBroker]]:
    """Start a FakeBroker with a handler; it is stopped at teardown."""
    started: list[FakeBroker] = []

    def start(handle: Handler) -> FakeBroker:
        fb = FakeBroker(home, port, handle)
        fb.start()
        started.append(fb)
        return fb

    yield start
    for fb in started:
        fb.stop()


def _completes_all(jobs: list[dsage.JobWrapper], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for j in jobs:
        j.wait(max(0.1, deadline - time.monotonic()))
        assert j.status == "completed", (j.job_id, j.status, j.error)


# --- 1. nothing submitted is dropped


def _stopped(broker_pid: int, seconds: float) -> threading.Timer:
    """Stop the broker's process group (SIGSTOP) and resume it after ``seconds`` (the
    outage is the scenario: shorter than the 3 s after which ZeroMQ drops the
    connection, so nothing reconnects). Cancel and resume at once on failure."""
    os.killpg(broker_pid, signal.SIGSTOP)
    timer = threading.Timer(seconds, os.killpg, (broker_pid, signal.SIGCONT))
    timer.start()
    return timer


def _paced(D: dsage.DSage, count: int, payload: str = "") -> list[dsage.JobWrapper]:
    """Submit ``count`` jobs one at a time, as a script computing each would (so each
    leaves in a message of its own); job ``i`` returns ``i``."""
    jobs = []
    for i in range(count):
        jobs.append(D(f"{payload}{i}"))
        time.sleep(0.001)
    return jobs


@pytest.mark.timeout(180)
def test_large_submits_past_the_high_water_mark_during_a_stall_all_run(procs: Procs) -> None:
    """3,000 jobs of 100 KB while the broker stalls for 2.2 s: far more than the
    socket's high-water mark and the TCP buffers hold. The old client dropped
    what did not fit, and those jobs stayed 'new' forever."""
    broker = procs.broker(**STEADY)
    procs.worker(2, **STEADY)
    D = procs.client()
    procs.wait_workers(D, 2)
    padding = "#" + "x" * 100_000 + "\n"
    timer = _stopped(broker.pid, 2.2)
    try:
        jobs = _paced(D, 3000, padding)
    finally:
        timer.join()
    _completes_all(jobs, 150)
    assert [j.result() for j in jobs] == list(range(3000))


def test_submits_while_the_broker_is_stopped_all_run(procs: Procs) -> None:
    """1,500 jobs of 30 KB submitted while the broker's process group is stopped for
    2.2 s, as in the issue (the old client lost 499 of them)."""
    broker = procs.broker(**STEADY)
    procs.worker(2, **STEADY)
    D = procs.client()
    procs.wait_workers(D, 2)
    timer = _stopped(broker.pid, 2.2)
    try:
        jobs = _paced(D, 1500, "#" + "y" * 30_000 + "\n")
    finally:
        timer.join()
    _completes_all(jobs, 90)
    assert [j.result() for j in jobs] == list(range(1500))


def test_submits_while_the_broker_is_down_all_run_after_its_restart(procs: Procs) -> None:
    """1,500 jobs submitted one by one between a kill -9 of the broker and its
    restart on the same port and home: more messages than the socket queues for a
    peer that is not there."""
    broker = procs.broker(**STEADY)
    procs.worker(2, **STEADY)
    D = procs.client()
    procs.wait_workers(D, 2)
    procs.kill9(broker)
    jobs = _paced(D, 1500)
    procs.broker(**STEADY)
    _completes_all(jobs, 90)
    assert [j.result() for j in jobs] == list(range(1500))


def test_a_job_the_broker_dropped_is_resent_on_a_timer(
        procs: Procs, fake: Callable[[Handler], FakeBroker]) -> None:
    """The broker drops the first submit (as when its acknowledgement or the message
    is lost without a reconnection) and goes on answering pings: the client resends
    the job after a few heartbeats, and stops once it is acknowledged."""
    def handle(fb: FakeBroker, rid: bytes, msg: Message) -> None:
        if msg.type is M.SUBMIT and len(fb.submitted()) > 1:
            fb.ack(rid, msg)

    fb = fake(handle)
    D = procs.client()
    j = D("1")
    wait_for(lambda: fb.submitted().count(j.job_id) >= 2, 15, "the job sent again")
    pings = sum(m.type is M.PING for m in fb.received)
    wait_for(lambda: sum(m.type is M.PING for m in fb.received) >= pings + 10, 15,
             "ten more heartbeats")
    assert fb.submitted().count(j.job_id) == 2, "resent after it was acknowledged"


def test_submit_blocks_while_too_many_jobs_are_unacknowledged(
        procs: Procs, fake: Callable[[Handler], FakeBroker]) -> None:
    acking = threading.Event()
    held: list[tuple[bytes, Message]] = []

    def handle(fb: FakeBroker, rid: bytes, msg: Message) -> None:
        if msg.type is M.SUBMIT:
            held.append((rid, msg))
        if acking.is_set():
            for r, m in held:
                fb.ack(r, m)
            held.clear()

    fb = fake(handle)
    D = procs.client(max_unacked_jobs=5)
    submitted: list[dsage.JobWrapper] = []
    finished = threading.Event()

    def submit_eight() -> None:
        for i in range(8):
            submitted.append(D(str(i)))
        finished.set()

    t = threading.Thread(target=submit_eight, daemon=True)
    t.start()
    wait_for(lambda: len(submitted) == 5, 15, "five jobs submitted")
    assert not finished.wait(1.0), "the sixth submit did not wait for room"
    assert len(submitted) == 5
    acking.set()
    assert finished.wait(15), "submitting went on once the broker acknowledged"
    t.join(5)
    wait_for(lambda: {j.job_id for j in submitted} <= set(fb.submitted()), 15, "all sent")


# --- 2. the protocol's limits, checked in the user's call or kept by splitting


def test_submit_messages_keep_within_the_protocol_limits(
        procs: Procs, fake: Callable[[Handler], FakeBroker]) -> None:
    """2,500 tiny jobs and 100 whose names take 24 KB of JSON each: every submit
    message has at most MAX_BATCH jobs and MAX_HEADER bytes of header."""
    def handle(fb: FakeBroker, rid: bytes, msg: Message) -> None:
        if msg.type is M.SUBMIT:
            fb.ack(rid, msg)

    fb = fake(handle)
    D = procs.client()
    long_name = "\u00e9" * 4096  # 6 bytes of JSON a character
    jobs = [D("1", name=long_name) for _ in range(100)] + [D(str(i)) for i in range(2500)]
    wanted = {j.job_id for j in jobs}
    wait_for(lambda: wanted <= set(fb.submitted()) or fb.errors, 30, "every job received")
    assert fb.errors == []  # the fake decodes with the protocol's checks, MAX_HEADER included
    submits = [m for m in fb.received if m.type is M.SUBMIT]
    assert all(len(m.header["jobs"]) <= MAX_BATCH for m in submits)
    assert len(submits) >= 3 + 3  # the named ones alone need three, the rest three more


def test_a_file_many_jobs_attach_travels_once_per_connection(
        procs: Procs, fake: Callable[[Handler], FakeBroker], tmp_path: Path) -> None:
    """300 jobs attach the same 1 MB file, 300 more a small file each and that one:
    each content reaches the broker once, messages keep within the byte budget,
    and payloads never carry the content."""
    def handle(fb: FakeBroker, rid: bytes, msg: Message) -> None:
        if msg.type is M.SUBMIT:
            fb.ack(rid, msg)

    fb = fake(handle)
    D = procs.client()
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1 << 20))
    jobs = [D(f"{i}", files=[big]) for i in range(300)]
    for i in range(300):
        small = tmp_path / f"small{i}.txt"
        small.write_text(f"file {i}")
        jobs.append(D(f"{i}", files=[small, big]))
    wanted = {j.job_id for j in jobs}
    wait_for(lambda: wanted <= set(fb.submitted()) or fb.errors, 30, "every job received")
    assert fb.errors == []
    submits = [m for m in fb.received if m.type is M.SUBMIT]
    contents: list[str] = []
    for m in submits:
        n = len(m.header["jobs"])
        assert len(m.blobs) - n == len(set(m.header["shared"])) == len(m.header["shared"])
        assert sum(len(b) for b in m.blobs[:n]) < 1000 * n  # payloads: no file content
        assert sum(len(b) for b in m.blobs) <= BATCH_BYTES + (1 << 20)
        assert set(m.header["shared"]) <= {d for spec in m.header["jobs"]
                                           for d in spec["shared"]}
        contents += m.header["shared"]
    assert len(contents) == len(set(contents)) == 301  # each once: the big one, 300 small
    assert sum(len(b) for m in submits for b in m.blobs) < 2 << 20


def test_a_job_whose_file_the_broker_dropped_is_sent_again_with_it(
        procs: Procs, fake: Callable[[Handler], FakeBroker], tmp_path: Path) -> None:
    """The broker refuses a job whose shared blob it does not keep (code 'shared'):
    the client sends it again, once, with the content, and it is not failed; a job
    refused so although sent with its content fails (SubmitRejected)."""
    refused: list[str] = []
    mode = {"keep": True}

    def handle(fb: FakeBroker, rid: bytes, msg: Message) -> None:
        if msg.type is not M.SUBMIT:
            return
        here = set(msg.header["shared"]) if mode["keep"] else set()
        ok, errors = [], []
        for spec in msg.header["jobs"]:  # a broker that keeps no blob past its message
            if set(spec["shared"]) <= here:
                ok.append(spec["id"])
            else:
                refused.append(spec["id"])
                errors.append({"id": spec["id"], "code": "shared", "message": "dropped"})
        fb.reply(rid, make(M.ACK, req=msg.header["req"], ids=ok, errors=errors))

    fb = fake(handle)
    D = procs.client()
    f = tmp_path / "f.txt"
    f.write_text("content")

    def acked(j: dsage.JobWrapper) -> bool:
        return j.job_id in fb.submitted() and j.job_id not in D._io.unacked

    first = D("0", files=[f])
    wait_for(lambda: acked(first), 30, "the first job acknowledged")
    jobs = [D(f"{i}", files=[f]) for i in range(1, 20)]  # sent without the content
    for j in jobs:
        wait_for(lambda: acked(j), 30, "the job acknowledged")  # noqa: B023
    # those sent before the first refusal came back are refused once, then accepted
    assert refused and set(refused) <= {j.job_id for j in jobs}
    assert len(refused) == len(set(refused))
    assert not any(j.done() for j in [first, *jobs])
    mode["keep"] = False
    failing = D("1", files=[f])
    with pytest.raises(dsage.SubmitRejected, match="dropped"):
        failing.result(30)
    assert refused.count(failing.job_id) == 2


@pytest.mark.parametrize("options, message", [
    ({"name": "x\udcff"}, "lone surrogate"),
    ({"requires": ["gpu", "x\udcff"]}, "lone surrogate"),
    ({"memory": "10000000TB"}, "memory"),
    ({"memory": 2**63}, "memory"),
    ({"memory": "9" * 400 + "GB"}, "memory"),
    ({"memory": "0.0001"}, "memory"),
    ({"timeout": 10**400}, "timeout"),
    ({"requires": ["\U0001f600" * 4096] * 64}, "header"),
])
def test_out_of_range_options_fail_in_the_call_and_nothing_is_sent(
        procs: Procs, options: dict[str, Any], message: str) -> None:
    procs.broker()
    D = procs.client()
    with pytest.raises(ValueError, match=message):
        D("1", **options)
    with pytest.raises(ValueError, match=message):
        D.eval_function(abs, (-1,), **options)
    assert D.get_my_jobs() == []


# --- 3. jobs the broker forgot, wrappers made by the I/O thread, forks


def test_a_job_the_broker_no_longer_knows_ends_with_unknown_job(procs: Procs,
                                                                  home: Path) -> None:
    """The broker's store is replaced under a queued job: after the restart the
    client learns the job is missing, and the wrapper ends instead of hanging."""
    broker = procs.broker(**STEADY)
    D = procs.client()
    j = D("1")
    wait_for(lambda: [w.job_id for w in D.get_my_jobs()] == [j.job_id], 30, "the job stored")
    procs.kill9(broker)
    for f in (home / "db").glob("dsage.db*"):
        f.unlink()
    procs.broker(**STEADY)
    with pytest.raises(dsage.UnknownJob) as e:
        j.wait(30)
    assert e.value.job_id == j.job_id and j.job_id in str(e.value)
    assert j.done() and j.status == "failed" and "no longer knows" in (j.error or "")
    with pytest.raises(dsage.UnknownJob):
        j.result()
    assert D("2").job_id  # the client goes on


@pytest.mark.parametrize("how", ["job", "get_my_jobs"])
def test_an_event_racing_the_reply_that_made_a_wrapper_is_not_lost(
        procs: Procs, fake: Callable[[Handler], FakeBroker], how: str) -> None:
    """The job finishes just after the broker answered with its record: the event
    saying so may reach the client before the reply. The wrapper must still end."""
    job_id = "ab" * 16
    answered: list[int] = []

    def handle(fb: FakeBroker, rid: bytes, msg: Message) -> None:
        if msg.type not in (M.QUERY, M.LIST):
            return
        status = "completed" if answered else "processing"
        if not answered:
            fb.publish([record(job_id, "completed", "expression")])
        answered.append(1)
        fb.reply(rid, make(M.JOBS, [b"", b""], req=msg.header["req"], missing=[], more=False,
                           next=None, jobs=[record(job_id, status, "expression")]))

    fb = fake(handle)
    D = procs.client()
    assert fb.subscribed.wait(15)
    j = D.job(job_id) if how == "job" else D.get_my_jobs()[0]
    assert j.job_id == job_id
    wait_for(j.done, 10, "the wrapper to see the job completed")
    assert j.status == "completed" and j.result() is None


def test_wrappers_share_one_condition_and_waiters_wake_at_once(cluster: dsage.DSage,
                                                               tmp_path: Path) -> None:
    D = cluster
    gates = [tmp_path / "a", tmp_path / "b"]
    jobs = [D(f"import os, time\nwhile not os.path.exists({str(g)!r}): time.sleep(0.01)\n"
              f"{i}") for i, g in enumerate(gates)]
    for j in jobs:
        own = [k for k, v in vars(j).items() if isinstance(v, (threading.Event,
                                                               threading.Condition))]
        assert own == ["_condition"] and j._condition is D._io.changed, \
            "a wrapper has an Event or Condition of its own"
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
    assert [j.result() for j in jobs] == [0, 1]


def test_a_forked_child_gets_a_clear_error_and_leaves_the_parent_alone(
        cluster: dsage.DSage, tmp_path: Path) -> None:
    D = cluster
    running = D(f"import os, time\nwhile not os.path.exists({str(tmp_path / 'go')!r}): "
                f"time.sleep(0.01)\n'parent'")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report each call's outcome, never hang
        outcomes = []
        calls: list[Callable[[], Any]] = [lambda: D("1"), lambda: D.job(running.job_id),
                                          lambda: running.wait(3), D.workers,
                                          lambda: D.kill(running.job_id), D.close]
        for call in calls:
            try:
                call()
                outcomes.append("returned")
            except dsage.DSageError as e:
                outcomes.append("clear" if "create a new one in the child" in str(e) else str(e))
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                outcomes.append(repr(e))
        os.write(w, "\n".join(outcomes).encode())
        os._exit(0)
    os.close(w)
    try:
        assert select.select([r], [], [], 30)[0], "the child hung"
        outcomes = os.read(r, 65536).decode().split("\n")
    finally:
        os.close(r)
        wait_for(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid or not alive(pid), 30,
                 "the child to exit")
    assert outcomes == ["clear"] * 5 + ["returned"], outcomes
    (tmp_path / "go").touch()
    assert running.result(60) == "parent"
    assert D("2").result(60) == 2


def test_a_client_of_another_minor_version_is_refused_saying_why(
        procs: Procs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client whose dsage differs from the broker's in its major or minor version is
    refused at HELLO: connecting raises IncompatibleVersion naming both versions, at
    once. Before, such a client connected and then waited forever on messages it
    could not read."""
    procs.broker()
    import dsage.client

    monkeypatch.setattr(dsage.client, "__version__", "99.1.0")
    start = time.monotonic()
    with pytest.raises(dsage.IncompatibleVersion, match="99.1.0") as e:
        procs.client()
    assert dsage.__version__ in str(e.value) and "client" in str(e.value)
    assert time.monotonic() - start < 20  # said, not timed out (the wait is 30 s)
    monkeypatch.undo()
    assert procs.client().status().version == dsage.__version__  # the same one is welcome


# --- 4. errors in their own module; 5. the reason a job waits


def test_errors_have_their_own_module_and_job_does_not_import_client() -> None:
    from dsage import errors

    for name in ("DSageError", "BrokerUnreachable", "KeyRejected", "UnknownJob",
                 "SubmitRejected", "JobError", "UntrustedResultError", "IncompatibleVersion"):
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
