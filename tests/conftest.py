"""Fixtures: a fresh DSAGE_HOME per test, random ports, real broker and monitor
processes that are always ended (whole process groups), also when a test fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import dsage
from dsage import keys
from dsage.cluster import ManagedProcess, free_port

#: fast liveness for tests: a peer is lost after HEARTBEAT * LIVENESS seconds
HEARTBEAT = 0.2
LIVENESS = 5
REQUIRE_ALL = os.environ.get("DSAGE_REQUIRE_ALL") == "1"


def skip_or_fail(reason: str) -> None:
    """Skip locally; under DSAGE_REQUIRE_ALL=1 (CI) a missing part is a failure."""
    if REQUIRE_ALL:
        pytest.fail(f"required in CI (DSAGE_REQUIRE_ALL=1): {reason}")
    pytest.skip(reason)


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition",
             interval: float = 0.02) -> Any:
    """Wait until ``cond()`` is truthy (returning it), failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def done(job: dsage.JobWrapper, timeout: float | None = 60.0) -> dsage.JobWrapper:
    """``job`` once it is final (TimeoutError after ``timeout`` seconds)."""
    job.wait(timeout)
    return job


def alive(pid: int, group: bool = False) -> bool:
    """Whether a process (or, with ``group``, any process of its group) still exists."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    return True


def gone(pid: int) -> bool:
    """A process that no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def all_gone(pids: list[int], timeout: float = 15) -> None:
    """Wait until every process of ``pids`` is :func:`gone`."""
    wait_for(lambda: all(gone(p) for p in pids), timeout,
             f"processes {pids} to end (alive: {[p for p in pids if not gone(p)]})")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, set-up dsage home, also exported as DSAGE_HOME."""
    root = tmp_path / "dsage"
    monkeypatch.setenv("DSAGE_HOME", str(root))
    keys.setup(root)
    return root


@pytest.fixture
def port() -> int:
    return free_port()


class Procs:
    """Background processes of a test; all are ended at teardown."""

    def __init__(self, home: Path, port: int) -> None:
        self.home, self.port = home, port
        self.started: list[ManagedProcess] = []

    def broker(self, **options: Any) -> ManagedProcess:
        """Start a broker and wait until it serves. The random ports were free when
        picked, but another process may take one before the broker binds it: then
        the test moves to new ports (before anything else of it has used them)."""
        options.setdefault("heartbeat", HEARTBEAT)
        options.setdefault("liveness", LIVENESS)
        for _ in range(5):
            p = dsage.server(self.port, blocking=False, home=self.home, **options)
            assert p is not None
            self.started.append(p)
            wait_for(lambda: not p.alive() or "dsage-broker serving" in p.log_tail(400),
                     30, "the broker to serve or exit")
            if p.alive() or "is in use" not in p.log_tail(400) or self.clients \
                    or len(self.started) > 1:
                return p
            self.started.remove(p)
            self.port = free_port()
        return p

    def worker(self, workers: int = 2, **options: Any) -> ManagedProcess:
        options.setdefault("heartbeat", HEARTBEAT)
        options.setdefault("liveness", LIVENESS)
        options.setdefault("priority", 0)
        p = dsage.worker("127.0.0.1", self.port, workers, blocking=False, home=self.home,
                         **options)
        assert p is not None
        self.started.append(p)
        return p

    def client(self, **options: Any) -> dsage.DSage:
        options.setdefault("heartbeat", HEARTBEAT)
        options.setdefault("connect_timeout", 30)
        d = dsage.DSage("127.0.0.1", self.port, home=self.home, **options)
        self.clients.append(d)
        return d

    clients: list[dsage.DSage]

    def up(self, slots: int = 2) -> dsage.DSage:
        """A broker, a monitor with ``slots`` slots, and a client that sees them."""
        self.broker()
        self.worker(slots)
        d = self.client()
        self.wait_workers(d, slots)
        return d

    def wait_workers(self, d: dsage.DSage, slots: int, timeout: float = 30.0) -> None:
        wait_for(lambda: sum(w.slots for w in d.workers()) >= slots, timeout,
                 f"{slots} worker slots")

    def kill9(self, p: ManagedProcess) -> None:
        """SIGKILL the process's whole group, as a crash would."""
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.proc.wait(10)

    def stop_all(self) -> None:
        for d in self.clients:
            d.close()
        for p in reversed(self.started):
            p.stop(timeout=5)


@pytest.fixture
def procs(home: Path, port: int) -> Iterator[Procs]:
    p = Procs(home, port)
    p.clients = []
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture
def cluster(procs: Procs) -> Iterator[dsage.DSage]:
    """A broker, a monitor with 2 slots and a connected client."""
    d = procs.up()
    yield d


def raw_dealer(ctx: zmq.Context[zmq.Socket[bytes]], home: Path, port: int,
               kp: keys.Keypair | None = None) -> zmq.Socket[bytes]:
    """A CURVE DEALER speaking the protocol by hand (the home's keypair unless
    ``kp``), connected to ``port`` of the test broker."""
    from dsage.auth import make_client

    own = keys.load_keypair(home)
    sock = ctx.socket(zmq.DEALER)
    make_client(sock, kp or own, own.public)
    sock.rcvtimeo = 10_000
    sock.sndtimeo = 10_000
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def run_python(code: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run Python code in a separate process (a second client, say)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
