"""A network cut between hosts: the broker and a monitor in two network namespaces
joined by a veth pair; the link goes down mid-job and comes back (issue 3).

Needs root and ``ip``; skips without them (a failure under DSAGE_REQUIRE_ALL=1).
The namespaces, the link and every process in them are removed at the end. The
10.x addresses exist only inside the two namespaces.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dsage.cluster import free_port

from .conftest import skip_or_fail, wait_for

HEARTBEAT = 0.2
LIVENESS = 5
WINDOW = HEARTBEAT * LIVENESS


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Net:
    """Two namespaces, ``broker_ns`` and ``monitor_ns``, and the veth pair between them."""

    broker_ns: str
    monitor_ns: str
    broker_addr: str
    monitor_dev: str


@pytest.fixture
def net() -> Iterator[Net]:
    if os.geteuid() != 0:
        skip_or_fail("network namespaces need root")
    if shutil.which("ip") is None:
        skip_or_fail("the `ip` command (iproute2) is not installed")
    tag = uuid.uuid4().hex[:8]
    ns_b, ns_m = f"dsg-b-{tag}", f"dsg-m-{tag}"
    dev_b, dev_m = f"vb{tag}", f"vm{tag}"
    subnet = f"10.{random.randint(1, 254)}.{random.randint(0, 255)}"
    created: list[str] = []
    try:
        for ns in (ns_b, ns_m):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", dev_b, "netns", ns_b, "type", "veth", "peer", "name", dev_m,
            "netns", ns_m)
        _ip("-n", ns_b, "addr", "add", f"{subnet}.1/30", "dev", dev_b)
        _ip("-n", ns_m, "addr", "add", f"{subnet}.2/30", "dev", dev_m)
        _ip("-n", ns_b, "link", "set", dev_b, "up")
        _ip("-n", ns_m, "link", "set", dev_m, "up")
    except (subprocess.CalledProcessError, OSError) as e:
        _remove(created)
        skip_or_fail(f"cannot create network namespaces here: {e}")
    try:
        yield Net(ns_b, ns_m, f"{subnet}.1", dev_m)
    finally:
        _remove(created)


def _remove(namespaces: list[str]) -> None:
    """Kill every process left in the namespaces, then delete them (and the veth pair)."""
    for ns in namespaces:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                              timeout=30).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


class NsProcs:
    """Processes started inside namespaces; their groups are killed at teardown."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.started: list[subprocess.Popen[bytes]] = []

    def run(self, ns: str, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.home / f"{name}.log", "ab")
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "dsage.cli", *args,
             "--heartbeat", str(HEARTBEAT), "--liveness", str(LIVENESS),
             "--exit-with-parent", str(os.getpid())],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "DSAGE_HOME": str(self.home)}, start_new_session=True)
        log.close()
        self.started.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.started:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)


@pytest.fixture
def nsprocs(home: Path) -> Iterator[NsProcs]:
    p = NsProcs(home)
    try:
        yield p
    finally:
        p.stop_all()


def _job_row(home: Path) -> tuple[str, int] | None:
    """(status, failures) of the one job in the broker's store, read from outside."""
    db = sqlite3.connect(f"file:{home / 'db' / 'dsage.db'}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT status, failures FROM jobs").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        db.close()
    return None if row is None else (row[0], row[1])


CLIENT = """
import json, sys, dsage
D = dsage.DSage('127.0.0.1', int(sys.argv[1]), heartbeat=0.2, connect_timeout=60)
j = D(sys.argv[2])
j.wait(120)
print(json.dumps({"status": j.status, "failures": j.failures, "error": j.error,
                  "result": j.result() if j.status == 'completed' else None}), flush=True)
"""


def test_link_down_mid_job_requeues_and_the_monitor_comes_back(
        net: Net, nsprocs: NsProcs, home: Path, tmp_path: Path) -> None:
    port = free_port()
    nsprocs.run(net.broker_ns, "broker", "broker", "--port", str(port))
    monitor = nsprocs.run(net.monitor_ns, "monitor", "worker", "--server", net.broker_addr,
                          "--port", str(port), "--workers", "1")
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    code = (f"import os, time\nopen({str(runs)!r}, 'a').write('run\\n')\n"
            f"while not os.path.exists({str(gate)!r}): time.sleep(0.02)\n'done'")
    client = subprocess.Popen(
        ["ip", "netns", "exec", net.broker_ns, sys.executable, "-c", CLIENT, str(port), code],
        stdout=subprocess.PIPE, env={**os.environ, "DSAGE_HOME": str(home)},
        start_new_session=True)
    nsprocs.started.append(client)
    wait_for(lambda: runs.exists() and _job_row(home) == ("processing", 0), 60,
             "the job running on the monitor across the veth link")
    _ip("-n", net.monitor_ns, "link", "set", net.monitor_dev, "down")
    cut = time.monotonic()
    wait_for(lambda: _job_row(home) == ("new", 1), 30, "the job re-queued by the broker")
    requeued_after = time.monotonic() - cut
    # the broker ticks at least once per heartbeat; allow for a busy machine
    assert requeued_after < WINDOW + 5, requeued_after
    _ip("-n", net.monitor_ns, "link", "set", net.monitor_dev, "up")
    # The monitor reconnects and re-registers with the job it still runs: the broker
    # takes it back out of the queue instead of running it twice.
    wait_for(lambda: _job_row(home) == ("processing", 1), 60,
             "the monitor reconnected and its job adopted")
    gate.touch()
    assert client.stdout is not None
    out, _ = client.communicate(timeout=60)
    final = json.loads(out.decode().strip().splitlines()[-1])
    assert final == {"status": "completed", "failures": 1, "error": None, "result": "done"}
    assert runs.read_text() == "run\n"  # it ran once: never started again elsewhere
    assert _job_row(home) == ("completed", 1)
    assert monitor.poll() is None
    # registered again: over a new connection, or over the old one once packets flow
    log = (home / "broker.log").read_text()
    assert log.count(" registered from ") >= 2, log
