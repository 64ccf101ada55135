"""A cluster that ends together: a broker told to (``--shutdown-monitors``, as
``start_all``'s is) sends SHUTDOWN to its monitors when it stops; they give their
jobs back, which wait in the store for the next broker, and exit. SHUTDOWN comes
only from the broker whose key a monitor checked: nothing else can send it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import zmq
import zmq.utils.monitor

import dsage
from dsage.cli import main as cli_main
from dsage.protocol import MONITOR_REPLIES, M, decode, encode, make

from .conftest import HEARTBEAT, LIVENESS, Procs, raw_dealer, wait_for

SLEEPER = "import time\ntime.sleep(600)"


def _status(store: Path, job_id: str) -> tuple[str, int]:
    with sqlite3.connect(store) as db:
        row = db.execute("SELECT status, failures FROM jobs WHERE id=?", (job_id,)).fetchone()
    return row[0], row[1]


def test_a_monitor_started_elsewhere_ends_with_the_cluster_that_owns_the_broker(
        procs: Procs, home: Path) -> None:
    d = dsage.start_all(1, port=procs.port, home=home, heartbeat=HEARTBEAT, liveness=LIVENESS)
    try:
        outside = procs.worker(1, tags=["outside"])  # not the cluster's: as if remote
        wait_for(lambda: sum(w.slots for w in d.workers()) >= 2, 30, "the outside monitor")
        j = d(SLEEPER, requires=["outside"])
        wait_for(lambda: j.status == "processing", 30, "the job to run outside")
    finally:
        d.close()
    wait_for(lambda: not outside.alive(), 30, "the outside monitor to exit")
    assert outside.proc.returncode == 0
    assert "the broker says stop (its broker stopped)" in outside.log.read_text()
    # its job was given back, not lost and not failed: queued for the next broker
    assert _status(home / "db" / "dsage.db", j.job_id) == ("new", 0)


def test_a_broker_started_by_hand_leaves_its_monitors_to_reconnect(
        procs: Procs, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = procs.broker()
    m = procs.worker(1)
    d = procs.client()
    procs.wait_workers(d, 1)
    assert cli_main(["stop", "--home", str(home)]) == 0  # the only broker of this home
    assert f"stopped the broker on port {procs.port} (pid {b.pid})" in capsys.readouterr().out
    assert b.proc.wait(10) == 0
    wait_for(lambda: "reconnecting" in m.log_tail(50), 30, "the monitor to miss its broker")
    procs.broker()
    assert m.alive()
    procs.wait_workers(d, 1)  # the same monitor registered with the new broker
    assert "the broker says stop" not in m.log.read_text()


def test_nothing_but_the_checked_broker_can_send_shutdown(procs: Procs, home: Path) -> None:
    # An impostor on the monitor port, with a key other than the broker's the
    # monitor expects: no handshake completes, so it never has a peer to tell.
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    impostor = ctx.socket(zmq.ROUTER)
    impostor.curve_server = True  # and no ZAP handler: it would admit any client key
    impostor.curve_publickey, impostor.curve_secretkey = zmq.curve_keypair()
    events = impostor.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                         | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                         | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                         | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        impostor.bind(f"tcp://127.0.0.1:{procs.port + 1}")
        m = procs.worker(1)
        events.rcvtimeo = 30_000
        ev = zmq.utils.monitor.recv_monitor_message(events)
        assert ev["event"] != zmq.EVENT_HANDSHAKE_SUCCEEDED, ev
        assert impostor.poll(0) == 0  # nothing came through that it could answer
    finally:
        events.close(linger=0)
        impostor.close(linger=0)
        ctx.term()
    # The real broker, taking its monitors along; a peer cannot relay SHUTDOWN
    # through it: the broker refuses it on the monitor port.
    b = procs.broker(shutdown_monitors=True)
    d = procs.client()
    procs.wait_workers(d, 1)
    assert m.alive()
    peer_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    peer = raw_dealer(peer_ctx, home, procs.port + 1)
    try:
        peer.send_multipart(encode(make(M.SHUTDOWN, reason="a peer says so")))
        reply = decode(peer.recv_multipart(), MONITOR_REPLIES)
        assert reply.type is M.ERROR and reply.header["code"] == "type"
    finally:
        peer.close(linger=0)
        peer_ctx.term()
    assert m.alive() and sum(w.slots for w in d.workers()) == 1
    b.stop()  # now the broker itself says stop
    wait_for(lambda: not m.alive(), 30, "the monitor to exit with its broker")
    assert m.proc.returncode == 0
    assert "the broker says stop" in m.log.read_text()


def test_dsage_stop_with_monitors_takes_them_along(
        procs: Procs, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["stop", "--home", str(home)]) == 1  # nothing runs yet: said so
    assert f"no broker for {home} runs on this machine" in capsys.readouterr().err
    b = procs.broker()
    m = procs.worker(1)
    d = procs.client()
    procs.wait_workers(d, 1)
    j = d(SLEEPER)
    wait_for(lambda: j.status == "processing", 30, "the job to run")
    assert cli_main(["stop", "--home", str(home), "--port", str(procs.port),
                     "--monitors"]) == 0
    assert "and its monitors" in capsys.readouterr().out
    assert b.proc.wait(10) == 0
    wait_for(lambda: not m.alive(), 30, "the monitor to exit with its broker")
    assert "the broker says stop" in m.log.read_text()
    assert _status(home / "db" / "dsage.db", j.job_id) == ("new", 0)
