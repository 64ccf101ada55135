"""Trust (issue 4): who gets in, what anonymous workers get, private results, isolation.

Real brokers and monitors on 127.0.0.1; the only in-process sockets are raw
peers that play a stranger or a hostile anonymous worker.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

import dsage
from dsage import keys
from dsage.auth import CLIENTS, make_client, make_server
from dsage.client import BrokerUnreachable, KeyRejected, SubmitRejected, UnknownJob
from dsage.cluster import ManagedProcess

from .conftest import HEARTBEAT, LIVENESS, Procs, wait_for

# --- helpers


def other_home(tmp_path: Path, name: str) -> Path:
    """A second user's dsage home, with its own keypair (not trusted by anyone yet)."""
    root = tmp_path / name
    keys.setup(root)
    return root


def broker_key(home: Path) -> bytes:
    """The public key the test broker serves with (the first home's)."""
    return keys.load_keypair(home).public


def user_client(procs: Procs, user_home: Path, **options: object) -> dsage.DSage:
    """A client of the test broker using another home's keypair; closed at teardown."""
    options.setdefault("heartbeat", HEARTBEAT)
    options.setdefault("connect_timeout", 30)
    d = dsage.DSage("127.0.0.1", procs.port, broker_key(procs.home), home=user_home,
                    **options)  # type: ignore[arg-type]
    procs.clients.append(d)
    return d


def other_worker(procs: Procs, worker_home: Path, workers: int = 1,
                 **options: object) -> ManagedProcess:
    """A monitor started from another home (its logs go there); ended at teardown."""
    options.setdefault("heartbeat", HEARTBEAT)
    options.setdefault("liveness", LIVENESS)
    options.setdefault("priority", 0)
    p = dsage.worker("127.0.0.1", procs.port, workers, blocking=False, home=worker_home,
                     **options)
    assert p is not None
    procs.started.append(p)
    return p


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dsage.cli ARGS`` (``dsage``, or ``broker``/``worker`` launchers)."""
    return subprocess.run([sys.executable, "-m", "dsage.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def log_text(p: ManagedProcess) -> str:
    try:
        return p.log.read_text(errors="replace")
    except OSError:
        return ""


def db_rows(home: Path, sql: str) -> list[tuple[object, ...]]:
    """Read the broker's SQLite store directly (read-only; WAL allows it while it runs)."""
    con = sqlite3.connect(f"file:{home / 'db' / 'dsage.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


_HANDSHAKE = {zmq.EVENT_HANDSHAKE_SUCCEEDED: "ok", zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
              zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
              zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no-detail"}


def handshake(ctx: zmq.Context[zmq.Socket[bytes]], kind: int, endpoint: str,
              own: keys.Keypair, server: bytes, timeout: float = 10.0) -> str:
    """Connect a raw CURVE socket and report how its first handshake ended:
    'ok', 'auth' (the server's ZAP refused the key), 'protocol' or 'no-detail'."""
    sock = ctx.socket(kind)
    make_client(sock, own, server)
    mon = sock.get_monitor_socket()
    try:
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if mon.poll(100):
                ev = recv_monitor_message(mon)
                if ev["event"] in _HANDSHAKE:
                    return _HANDSHAKE[ev["event"]]
        return "timeout"
    finally:
        sock.disable_monitor()
        mon.close(linger=0)
        sock.close(linger=0)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield c
    finally:
        c.destroy(linger=0)


# --- private results


def test_database_holds_only_ciphertext_of_results_and_output(procs: Procs, home: Path) -> None:
    """Completed, timed-out and crashed jobs: the store keeps sealed blobs only."""
    procs.broker()
    procs.worker(2)
    D = procs.client()
    secret = "Sekrit-" + os.urandom(8).hex()
    rev = secret[::-1]  # the code holds the secret reversed, so payloads do not leak it
    jobs = [
        D(f"print({rev!r}[::-1])\n{rev!r}[::-1]"),
        D(f"import time\nprint({rev!r}[::-1], flush=True)\ntime.sleep(60)", timeout=1),
        D(f"import os, sys\nprint({rev!r}[::-1], flush=True)\nos._exit(3)"),
    ]
    for j in jobs:
        j.wait(60)
    assert jobs[0].result == secret and secret in jobs[0].output
    assert jobs[1].status == "failed" and "timed out" in jobs[1].error
    assert jobs[2].status == "failed" and "exited with status 3" in jobs[2].error
    for j in jobs:
        assert secret in j.output, j.status
    rows = db_rows(home, "SELECT id, sealed, result, output FROM jobs")
    assert {r[0] for r in rows} == {j.job_id for j in jobs}
    for _, sealed, result, output in rows:
        assert sealed == 1
        assert secret.encode() not in (result or b"") + (output or b"")
        assert output and output[:1] == b"\x01"  # the sealed-blob format
    raw = b"".join(p.read_bytes() for p in (home / "db").iterdir() if p.is_file())
    assert secret.encode() not in raw  # not in any page, WAL frame or journal


def test_sealed_blobs_open_only_for_their_owner() -> None:
    from dsage.seal import Opener, SealError, Sealer

    monitor, owner, other = (keys.Keypair(*zmq.curve_keypair()) for _ in range(3))
    sealer = Sealer(monitor)
    blob = sealer.seal(owner.public, b"result")
    assert b"result" not in blob
    assert Opener(owner).open(blob) == b"result"
    assert sealer.seal(owner.public, b"result") != blob  # a fresh nonce each time
    assert sealer.seal(owner.public, b"") == b""
    with pytest.raises(SealError):
        Opener(other).open(blob)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(SealError):
        Opener(owner).open(tampered)
    with pytest.raises(SealError):
        Opener(owner).open(b"\x02" + blob[1:])
