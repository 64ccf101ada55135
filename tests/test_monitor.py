"""The monitor and its slots, over real processes, sockets and signals (and a
broker played by the test where a test must see, or order, exactly what the
monitor sends)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import zmq

import dsage
from dsage import keys
from dsage.auth import MONITORS, KeyRing, ZapPolicy, make_server, start_authenticator
from dsage.cluster import ManagedProcess
from dsage.protocol import (
    BATCH_BYTES, DEFAULT_MAX_MESSAGE_SIZE, MONITOR_REQUESTS, M, Message, decode, encode, make,
)
from dsage.seal import Opener, binding
from dsage.slot import FrameError, recv_frame, send_frame

from .conftest import Procs, done, wait_for


# --- the slot pipe


def test_frames_carry_a_header_and_two_raw_blobs() -> None:
    a, b = socket.socketpair()
    with a, b:
        big = os.urandom(1 << 22)  # larger than the socket buffer: sent while received
        sender = threading.Thread(target=send_frame, args=(a, {"id": "x", "n": 1}, big, b"out"))
        sender.start()
        assert recv_frame(b) == ({"id": "x", "n": 1}, big, b"out")
        sender.join()
        send_frame(a, {"ready": True})
        assert recv_frame(b) == ({"ready": True}, b"", b"")


@pytest.mark.parametrize("header", [
    {"error": "KeyError: '\udcff'"},  # a lone surrogate, from a job's exception
    {"started": 1.5e9, "rss": 1 << 70, "name": "é ✓", "list": [None, True, -0.0, {}]},
])
def test_frame_headers_keep_whatever_json_can_say(header: dict[str, object]) -> None:
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, header, b"r")
        assert recv_frame(b) == (header, b"r", b"")


def test_a_pipe_that_ends_between_frames_or_inside_one() -> None:
    a, b = socket.socketpair()
    with b:
        a.close()
        with pytest.raises(EOFError) as e:
            recv_frame(b)
        assert not isinstance(e.value, FrameError)  # no frame was cut: the other side left
    for cut in (3, 25, 40):  # inside the prefix, the header, the first blob
        a, b = socket.socketpair()
        with b:
            with a:
                send_frame(a, {"id": "x"}, b"r" * 100)
            whole = b.recv(1000)
        a, b = socket.socketpair()
        with b:
            with a:
                a.sendall(whole[:cut])
            with pytest.raises(FrameError):
                recv_frame(b)


@pytest.mark.parametrize("code, says", [
    # closes its pipe and goes on: killed, not waited for
    ("import os, sys, time\nos.close(int(sys.argv[1]))\ntime.sleep(300)",
     "broke its process's pipe"),
    # closes its pipe and returns: the slot cannot answer, and says so by its exit
    ("import os, sys\nos.close(int(sys.argv[1]))\n7", "broke its process's pipe"),
    # puts another socket in its pipe's place and returns: the answer is not sent there
    ("import builtins, os, socket, sys\nbuiltins.keep = socket.socketpair()\n"
     "os.dup2(builtins.keep[0].fileno(), int(sys.argv[1]))\n7", "broke its process's pipe"),
    # writes a bogus frame start into it and goes on
    ("import os, sys, time\nos.write(int(sys.argv[1]), b'\\xff' * 20)\ntime.sleep(300)",
     "broke its process's pipe"),
    # writes part of a frame and exits: a truncated frame from a dead slot
    ("import os, sys\nos.write(int(sys.argv[1]), b'\\x05\\x00')\nos._exit(7)",
     "exited with status 7"),
], ids=["closed", "closed-returns", "replaced", "garbage", "truncated"])
def test_a_job_that_breaks_its_slot_pipe_fails_and_the_monitor_goes_on(
        cluster: dsage.DSage, code: str, says: str) -> None:
    """The job fails saying what it did, with what it printed and no traceback of the
    slot's own; the monitor replaces the slot and runs the next jobs."""
    t0 = time.monotonic()
    j = done(cluster("print('printed', flush=True)\n" + code), 30)
    assert j.status == "failed", (j.status, j.error)
    assert says in (j.error or "")
    assert "printed" in j.output and "Traceback" not in j.output, j.output
    assert time.monotonic() - t0 < 20
    assert [cluster(f"{i} + 1").result(60) for i in range(4)] == [1, 2, 3, 4]


# --- helpers: jobs that record their runs, stalls, a broker played by the test


def _recorded(runs: Path, name: str, gate: Path | None = None, value: str = "None") -> str:
    """Job code that appends ``name`` to the file ``runs`` each time it runs (after
    waiting for the file ``gate``, if given), then evaluates ``value``."""
    wait = (f"while not os.path.exists({str(gate)!r}): time.sleep(0.02)\n"
            if gate is not None else "")
    return (f"import os, time\n{wait}"
            f"with open({str(runs)!r}, 'a') as f: f.write({name!r} + '\\n')\n{value}")


def _runs(runs: Path) -> Counter[str]:
    """How many times each recorded job ran."""
    return Counter(runs.read_text().split()) if runs.exists() else Counter()


def _stall(p: ManagedProcess) -> None:
    os.killpg(p.pid, signal.SIGSTOP)


def _resume(p: ManagedProcess) -> None:
    os.killpg(p.pid, signal.SIGCONT)


class FakeBroker:
    """A broker's monitor port played by the test: a CURVE ROUTER with the home's keys.
    A real monitor connects to it; every message it sends is decoded with the
    protocol's checks (so one over the limits fails the test) and kept."""

    def __init__(self, home: Path, port: int) -> None:
        self.keys = keys.load_keypair(home)
        self.owner = self.keys.public.decode()
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.auth = start_authenticator(
            self.ctx, ZapPolicy(KeyRing(home, self.keys.public), False))
        self.sock = self.ctx.socket(zmq.ROUTER)
        make_server(self.sock, self.keys, MONITORS, DEFAULT_MAX_MESSAGE_SIZE)
        self.sock.bind(f"tcp://127.0.0.1:{port + 1}")
        self.rid = b""
        self.received: list[Message] = []

    def recv(self, timeout: float = 30.0) -> Message:
        """The monitor's next message other than a heartbeat (each heartbeat is answered)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                raise AssertionError(f"nothing from the monitor for {timeout} s")
            self.rid, *frames = self.sock.recv_multipart()
            msg = decode(frames, MONITOR_REQUESTS)
            if msg.type is M.HEARTBEAT:
                self.send(make(M.HEARTBEAT))
                continue
            self.received.append(msg)
            return msg

    def expect(self, type_: M, timeout: float = 30.0) -> Message:
        """The next message of ``type_`` (others are kept in ``received`` only)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if msg.type is type_:
                return msg

    def send(self, msg: Message) -> None:
        self.sock.send_multipart([self.rid, *encode(msg)])

    def register(self, cancel: Sequence[str] = (), prefetch: int | None = 16) -> Message:
        """Wait for REGISTER and answer it as a broker whose prefetch lets the monitor
        keep queued what it is sent (``prefetch`` jobs; None: a broker that does not
        say); returns the REGISTER."""
        reg = self.expect(M.REGISTER)
        told = {} if prefetch is None else {"prefetch": prefetch}
        self.send(make(M.REGISTERED, heartbeat=0.2, liveness=50, cancel=list(cancel), **told))
        return reg

    def run(self, codes: list[str], ids: list[str] | None = None, attempt: int = 1,
            retry_on: Sequence[str] = ()) -> list[str]:
        """Send python jobs in one RUN (new ones unless ``ids`` are given); returns their ids."""
        ids = ids or [uuid.uuid4().hex for _ in codes]
        specs = [{"id": jid, "name": None, "kind": "python", "timeout": None, "memory": None,
                  "owner": self.owner, "trusted": True, "isolate": False, "attempt": attempt,
                  "retry_on": list(retry_on), "shared": []} for jid in ids]
        self.send(make(M.RUN, [c.encode() for c in codes], jobs=specs, shared=[], acked=[],
                       attempts=[]))
        return ids

    def results(self, ids: list[str], ack: bool = False) -> dict[str, dict[str, object]]:
        """Receive RESULTs until every id in ``ids`` came; each checked against the
        byte limit; returns the items by id."""
        got: dict[str, dict[str, object]] = {}
        while not set(ids) <= set(got):
            msg = self.expect(M.RESULT)
            blob_bytes = sum(len(b) for b in msg.blobs)
            assert blob_bytes <= BATCH_BYTES or len(msg.header["results"]) == 1, \
                f"a RESULT of {len(msg.header['results'])} items and {blob_bytes} bytes"
            got.update((r["id"], r) for r in msg.header["results"])
            if ack:
                self.send(make(M.RESULT_ACK, ids=[r["id"] for r in msg.header["results"]],
                               attempts=[r["attempt"] for r in msg.header["results"]]))
        return got

    def close(self) -> None:
        self.sock.close(linger=0)
        self.auth.stop()
        self.ctx.term()


#: a monitor that stays with a quiet fake broker
PATIENT = {"heartbeat": 0.2, "liveness": 50}


@pytest.fixture
def fake(home: Path, port: int) -> Iterator[FakeBroker]:
    f = FakeBroker(home, port)
    try:
        yield f
    finally:
        f.close()


# --- registering again after a broker stall


def test_results_finished_during_a_broker_stall_are_not_run_again(
        procs: Procs, home: Path, tmp_path: Path) -> None:
    """The broker stalls longer than the monitor's liveness window; meanwhile the
    running jobs finish, so their results wait on the monitor, unacknowledged, when
    it registers again from a new connection. Nothing runs twice."""
    broker = procs.broker()
    monitor = procs.worker(2)
    D = procs.client()
    procs.wait_workers(D, 2)
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    gated = [D(_recorded(runs, f"g{i}", gate, repr(f"g{i}"))) for i in range(2)]
    short = [D(_recorded(runs, f"s{i}", value=str(i))) for i in range(20)]
    wait_for(lambda: all(j.status == "processing" for j in gated)
             and len(D.get_my_jobs()) == 22, 30, "two jobs running, twenty queued")
    _stall(broker)
    try:
        wait_for(lambda: "no word from the broker" in monitor.log.read_text(), 30,
                 "the monitor giving up on the stalled broker's connection")
        gate.touch()
        job_dirs = [home / "tmp_worker_files" / j.job_id for j in gated]
        # (a job the broker prefetched to the monitor may run meanwhile as well)
        wait_for(lambda: _runs(runs)["g0"] == _runs(runs)["g1"] == 1
                 and not any(d.exists() for d in job_dirs), 30,
                 "both running jobs finished while the broker is stalled")
    finally:
        _resume(broker)
    assert [j.result(60) for j in gated] == ["g0", "g1"]
    assert [j.result(60) for j in short] == list(range(20))
    assert all(j.failures == 0 for j in gated + short)
    counts = _runs(runs)
    assert counts == Counter({f"g{i}": 1 for i in range(2)} | {f"s{i}": 1 for i in range(20)}), \
        {k: n for k, n in counts.items() if n != 1}


# --- what the monitor holds (the broker may send more jobs than free slots)


def test_a_monitor_refused_for_its_version_says_so_and_exits(
        procs: Procs, fake: FakeBroker) -> None:
    """A broker of another dsage version refuses the monitor at REGISTER: the monitor
    logs the broker's reason and exits with status 2, rather than registering again
    every second."""
    worker = procs.worker(1, **PATIENT)
    fake.expect(M.REGISTER)
    fake.send(make(M.ERROR, code="version", req=None,
                   message="this broker runs dsage 9.9.0 and the worker dsage 0.1.0"))
    assert worker.proc.wait(30) == 2
    assert "this broker runs dsage 9.9.0" in worker.log.read_text()


def test_the_monitor_keeps_and_lists_every_job_it_holds(
        procs: Procs, fake: FakeBroker, tmp_path: Path) -> None:
    """A one-slot monitor is sent four jobs at once. When it registers again, it
    lists the one finished (result not acknowledged), the one running and the two
    queued. A job the broker cancels keeps its result if it has one; a job sent
    again is answered with its result, or not queued twice; nothing runs twice."""
    procs.worker(1, **PATIENT)
    fake.register()
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    b_started = tmp_path / "b-started"
    a, b, c, d = fake.run([_recorded(runs, "a", value="'a'"),
                           f"open({str(b_started)!r}, 'w').close()\n" + _recorded(runs, "b", gate),
                           _recorded(runs, "c"), _recorded(runs, "d")])
    fake.results([a])
    wait_for(b_started.exists, 30, "b running")
    fake.send(make(M.ERROR, code="unregistered", message="register again", req=None))
    reg = fake.register(cancel=[a, d])
    assert sorted(reg.header["running"]) == sorted([a, b, c, d])
    resent = fake.results([a, d])
    assert resent[a]["status"] == "completed"  # its one outcome, not a second one
    assert resent[d]["status"] == "killed"
    fake.run([_recorded(runs, "a"), _recorded(runs, "c")], ids=[a, c])  # sent again
    assert fake.results([a], ack=True)[a]["status"] == "completed"
    fake.send(make(M.RESULT_ACK, ids=[d], attempts=[1]))
    gate.touch()
    done = fake.results([b, c], ack=True)
    assert done[b]["status"] == done[c]["status"] == "completed"
    assert _runs(runs) == Counter("abc")


def test_jobs_queued_beyond_the_prefetch_go_back_once_they_have_waited(
        procs: Procs, fake: FakeBroker, tmp_path: Path) -> None:
    """A one-slot monitor of a broker with a prefetch of one (told at REGISTERED; one
    that does not say means one) is sent four jobs while its slot is busy. It keeps
    one queued and gives the other two back, counting no failure, once they have
    waited GIVE_BACK_AFTER; the one kept runs after the first."""
    procs.worker(1, **PATIENT)
    reg = fake.register(prefetch=None)
    assert reg.header["slots"] == 1
    gate, runs = tmp_path / "gate", tmp_path / "runs"
    a, b, c, d = fake.run([_recorded(runs, "a", gate), _recorded(runs, "b"),
                           _recorded(runs, "c"), _recorded(runs, "d")])
    released = fake.expect(M.RELEASE)
    assert released.header["ids"] == [c, d] and not released.header["count_failure"]
    gate.touch()
    assert set(fake.results([a, b], ack=True)) == {a, b}
    assert _runs(runs) == Counter("ab")


# --- jobs that cross the monitor's STOPPING


#: a longer liveness window where a spurious "lost" on a busy machine would change
#: the failure count a test asserts
STEADY = {"heartbeat": 0.2, "liveness": 15}


def test_jobs_sent_as_the_monitor_stops_go_back_without_a_failure(
        procs: Procs, tmp_path: Path) -> None:
    """A burst of jobs is dispatched to a monitor that is stopped (SIGSTOP), so it
    reads them only after it has begun stopping (SIGTERM, then SIGCONT). They are
    given back at once, count no failure, and complete on the next monitor."""
    procs.broker(**STEADY)
    first = procs.worker(4, grace=5, **STEADY)
    D = procs.client()
    procs.wait_workers(D, 4)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        jobs = [D(f"{i} * 3") for i in range(4)]
        wait_for(lambda: all(j.status == "processing" for j in jobs), 30,
                 "the jobs dispatched to the stopped monitor")
        os.kill(first.pid, signal.SIGTERM)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.proc.wait(20) == 0
    wait_for(lambda: all(j.status == "new" for j in jobs), 10, "the jobs back in the queue")
    procs.worker(1, **STEADY)
    assert [j.result(60) for j in jobs] == [0, 3, 6, 9]
    assert [j.failures for j in jobs] == [0] * 4


def test_an_idle_stopping_monitor_gives_back_jobs_already_on_their_way(
        procs: Procs, fake: FakeBroker) -> None:
    """The broker dispatched jobs before it read the monitor's STOPPING. The
    monitor, idle as it is, does not exit before they arrive: it waits for the
    broker's answer to a message sent after STOPPING, and gives them back."""
    monitor = procs.worker(2, **PATIENT)
    fake.register()
    os.kill(monitor.pid, signal.SIGTERM)
    fake.expect(M.STOPPING)
    ids = fake.run(["1", "2"])  # sent as the broker would before reading STOPPING
    while (msg := fake.recv()).type is not M.RELEASE:
        if msg.type is M.RESULT and not msg.header["results"]:
            fake.send(make(M.RESULT_ACK, ids=[], attempts=[]))  # the broker's answer, after the RUN
    assert msg.header["ids"] == ids and msg.header["count_failure"] is False
    assert monitor.proc.wait(20) == 0


# --- what the monitor sends: within the protocol's limits, text made acceptable


def test_a_lone_surrogate_in_a_jobs_error_fails_it_cleanly(cluster: dsage.DSage) -> None:
    """The text is made valid for the protocol; the results sent with it are not lost."""
    bad = cluster("raise ValueError('\\udcff')")
    good = [cluster(f"{i}") for i in range(5)]
    assert done(bad, 30).status == "failed", bad.status
    assert "ValueError" in (bad.error or "") and "ValueError" in bad.output
    assert [j.result(30) for j in good] == list(range(5))


def test_results_sent_again_are_split_within_the_byte_limit(
        procs: Procs, fake: FakeBroker) -> None:
    procs.worker(2, **PATIENT)
    fake.register()
    ids = fake.run(["import sys\nsys.stdout.write('x' * 3_000_000)"] * 6)
    fake.results(ids)  # not acknowledged: they stay with the monitor
    fake.send(make(M.ERROR, code="unregistered", message="register again", req=None))
    reg = fake.register()
    again = fake.results(ids, ack=True)
    assert all(again[jid]["status"] == "completed" for jid in ids)
    last = [m for m in fake.received if m.type is M.RESULT][-1]
    item = last.header["results"][0]  # blobs[1] is the first item's output
    bind = binding(item["id"], fake.owner, "completed", item["encoding"], item["result_from"],
                   "output")
    assert Opener(fake.keys).open(last.blobs[1], bind) == b"x" * 3_000_000
    assert set(ids) <= set(reg.header["running"])  # held, so listed


def test_releases_are_split_within_the_id_limit(procs: Procs, fake: FakeBroker,
                                                tmp_path: Path) -> None:
    """A stopping monitor gives back more queued jobs than one message may name."""
    monitor = procs.worker(1, grace=0.5, **PATIENT)
    fake.register()
    started = tmp_path / "started"
    first = fake.run([f"open({str(started)!r}, 'w').close()\nimport time\ntime.sleep(300)"]
                     + ["1"] * 999)
    rest = fake.run(["2"] * 300)
    wait_for(started.exists, 30, "the first job running")
    os.kill(monitor.pid, signal.SIGTERM)
    released: list[str] = []
    while len(released) < 1300:
        msg = fake.recv()  # a RELEASE of more than 1000 ids fails to decode here
        if msg.type is M.RELEASE:
            assert msg.header["count_failure"] is False
            released += msg.header["ids"]
        elif msg.type is M.RESULT and not msg.header["results"]:
            fake.send(make(M.RESULT_ACK, ids=[], attempts=[]))
    assert sorted(released) == sorted(first + rest)
    assert monitor.proc.wait(20) == 0


def test_a_large_result_is_uploaded_in_chunks_before_its_result(
        procs: Procs, fake: FakeBroker) -> None:
    """No message holds the broker for long: a 20 MB result goes up as 1 MiB PUT
    chunks, one in flight, then a RESULT marked staged with empty blobs; a chunk the
    broker could not keep is sent again, and an upload of a job that is gone stops."""
    procs.worker(1, **PATIENT)
    fake.register()
    [jid] = fake.run(["DSAGE_RESULT = b'r' * 20_000_000\nprint('out')"])
    got = bytearray()
    refused_once = False
    while True:
        msg = fake.recv()
        if msg.type is M.RESULT:
            break
        assert msg.type is M.PUT and len(msg.blobs[0]) <= 1024 * 1024
        h = msg.header
        if h["part"] == "result":
            assert h["offset"] == len(got)
            if h["offset"] > 0 and not refused_once:  # "could not keep it": no progress
                refused_once = True
                fake.send(make(M.PUT_ACK, id=jid, part="result", next=h["offset"], gone=False))
                continue
            got += msg.blobs[0]
        fake.send(make(M.PUT_ACK, id=jid, part=h["part"], next=h["offset"] + len(msg.blobs[0]),
                       gone=False))
    [item] = msg.header["results"]
    assert item["staged"] and msg.blobs == [b"", b""] and item["status"] == "completed"
    assert refused_once and len(got) > 20_000_000  # the sealed result, all of it
    fake.send(make(M.RESULT_ACK, ids=[jid], attempts=[1]))
    # a job that is not the monitor's any more: one PUT, then straight to the RESULT
    [other] = fake.run(["DSAGE_RESULT = b'x' * 20_000_000"])
    put = fake.expect(M.PUT)
    fake.send(make(M.PUT_ACK, id=other, part="result", next=put.header["total"], gone=True))
    assert fake.expect(M.RESULT).header["results"][0]["staged"]


# --- retries: a job's next attempt on the monitor that still holds its last result


def test_a_retry_reaching_the_monitor_before_the_last_results_ack_runs_and_keeps_its_result(
        procs: Procs, fake: FakeBroker, tmp_path: Path) -> None:
    """The broker sends a retried job's RUN before the RESULT_ACK of its failed
    attempt (RUNs go out before the commit). The monitor runs the new attempt
    instead of sending the old result again, and the late acknowledgement of the
    old attempt does not drop the new attempt's result."""
    procs.worker(1, **PATIENT)
    fake.register()
    runs = tmp_path / "runs"
    code = ("import os\n" + _recorded(runs, "x") + "\nn = int(os.environ['DSAGE_ATTEMPT'])\n"
            "if n == 1: raise KeyError('first')\nn")
    [jid] = fake.run([code], retry_on=["LookupError"])  # a base class of KeyError
    first = fake.results([jid])[jid]
    assert first["status"] == "failed" and first["retry"] and first["attempt"] == 1
    fake.run([code], ids=[jid], attempt=2)  # the retry, before the acknowledgement
    second = fake.results([jid])[jid]
    assert second["status"] == "completed" and second["attempt"] == 2 and not second["retry"]
    fake.send(make(M.RESULT_ACK, ids=[jid], attempts=[1]))  # late, for attempt 1
    fake.run([code], ids=[jid], attempt=2)  # sent again: answered with the held result
    assert fake.results([jid], ack=True)[jid]["attempt"] == 2
    assert _runs(runs) == Counter({"x": 2})
    [other] = fake.run(["raise ValueError('not retried')"], retry_on=["KeyError"])
    assert fake.results([other], ack=True)[other]["retry"] is False


def test_attached_files_come_once_and_one_the_monitor_lacks_sends_the_job_back(
        procs: Procs, fake: FakeBroker, tmp_path: Path) -> None:
    """Three jobs of one RUN use one copy of a file; a later RUN leaves it out (the
    monitor keeps it); a job whose file the monitor does not have goes back to
    the broker, naming the file, instead of failing."""
    from dsage import attach

    procs.worker(1, **PATIENT)
    fake.register()
    (tmp_path / "a.txt").write_text("shared content")
    payload, shared = attach.wrap(b"open('a.txt').read()", attach.collect([tmp_path / "a.txt"]))
    [digest] = shared
    ids = [uuid.uuid4().hex for _ in range(3)]
    specs = [{"id": jid, "name": None, "kind": "python", "timeout": None, "memory": None,
              "owner": fake.owner, "trusted": True, "isolate": False, "attempt": 1,
              "retry_on": [], "shared": [digest]} for jid in ids]
    fake.send(make(M.RUN, [payload] * 3 + [shared[digest]], jobs=specs, shared=[digest],
                   acked=[], attempts=[]))
    got = fake.results(ids, ack=True)
    assert all(got[i]["status"] == "completed" for i in ids)  # three jobs, one copy
    later = uuid.uuid4().hex
    fake.send(make(M.RUN, [payload], jobs=[{**specs[0], "id": later}], shared=[], acked=[],
                   attempts=[]))
    assert fake.results([later], ack=True)[later]["status"] == "completed"
    (tmp_path / "b.txt").write_text("never sent")
    other, other_shared = attach.wrap(b"1", attach.collect([tmp_path / "b.txt"]))
    lacking = uuid.uuid4().hex
    fake.send(make(M.RUN, [other], jobs=[{**specs[0], "id": lacking,
                                          "shared": list(other_shared)}], shared=[],
                   acked=[], attempts=[]))
    release = fake.expect(M.RELEASE)
    assert release.header["ids"] == [lacking] and not release.header["count_failure"]
    assert release.header["missing_blobs"] == list(other_shared)
