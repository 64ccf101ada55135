"""``dsage stop``: stop a broker that runs for this dsage home on this machine, and
with ``--monitors`` every monitor connected to it (the broker sends them SHUTDOWN).

It signals the broker's process (found in ``$DSAGE_HOME/run/``): SIGTERM to stop
it, SIGUSR1 to stop it with its monitors. Only who may signal that process (its
user, root) can ask; nothing goes over the network.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from . import keys as keys_mod
from . import running

#: the signal that asks a broker to stop and take its monitors along
STOP_WITH_MONITORS = signal.SIGUSR1


class StopError(RuntimeError):
    """No broker to stop, or it did not stop in time."""


def choose(home: Path, port: int | None) -> running.RunningBroker:
    """The broker of ``home`` on this machine to stop: the one on ``port``, or the
    only one."""
    live = running.brokers(home)
    if port is not None:
        live = [b for b in live if b.port == port]
    if not live:
        where = f" on port {port}" if port is not None else ""
        raise StopError(f"no broker for {home} runs on this machine{where}")
    if len(live) > 1:
        ports = ", ".join(str(b.port) for b in live)
        raise StopError(f"several brokers for {home} run here (ports {ports}): say which "
                        f"with --port")
    return live[0]


def stop_broker(home: Path, port: int | None = None, monitors: bool = False,
                timeout: float = 30.0) -> running.RunningBroker:
    """Stop the broker (and with ``monitors`` its monitors); wait until it exited."""
    broker = choose(home, port)
    try:
        os.kill(broker.pid, STOP_WITH_MONITORS if monitors else signal.SIGTERM)
    except ProcessLookupError:
        return broker  # it stopped meanwhile
    except PermissionError:
        raise StopError(f"the broker on port {broker.port} (pid {broker.pid}) is another "
                        f"user's process") from None
    deadline = time.monotonic() + timeout
    while any(b.pid == broker.pid for b in running.brokers(home)):
        if time.monotonic() > deadline:
            raise StopError(f"the broker on port {broker.port} (pid {broker.pid}) did not "
                            f"stop within {timeout:g} s")
        time.sleep(0.05)
    return broker


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stop", help="stop this home's broker on this machine (with "
                       "--monitors, every monitor connected to it too)")
    p.add_argument("--port", type=int, default=None,
                   help="the broker's port (default: the only broker this home runs here)")
    p.add_argument("--monitors", action="store_true",
                   help="tell every monitor connected to it to stop too (they give their "
                   "running jobs back, which wait in the store for the next broker)")
    p.add_argument("--home", type=Path, default=None, help="the dsage folder")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for it to stop (default 30)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    try:
        broker = stop_broker(keys_mod.home(a.home), a.port, a.monitors, a.timeout)
    except StopError as e:
        print(f"dsage stop: error: {e}", file=sys.stderr)
        return 1
    print(f"stopped the broker on port {broker.port} (pid {broker.pid})"
          + (" and its monitors" if a.monitors else ""))
    return 0
