"""Which brokers run on this machine for a dsage home: ``$DSAGE_HOME/run/PORT.json``.

A broker writes its file once it serves and removes it when it stops; a file
whose process is gone (a broker killed -9) is ignored and cleaned up. The
shell commands (``dsage status``, ``jobs``, ...) use it to find the broker of
a ``start_all()`` session, which picks a free port, without being told.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .keys import private_dir


@dataclass(frozen=True)
class RunningBroker:
    port: int
    pid: int
    host: str
    started: float


def _dir(home: Path) -> Path:
    return home / "run"


def record(home: Path, port: int) -> Path:
    """Say that this process serves ``port`` for ``home``."""
    folder = _dir(home)
    private_dir(folder)
    path = folder / f"{port}.json"
    tmp = folder / f".{port}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"port": port, "pid": os.getpid(), "host": socket.gethostname(),
                   "started": time.time()}, f)
    os.replace(tmp, path)
    return path


def forget(home: Path, port: int) -> None:
    """Remove this process's record for ``port`` (not another process's)."""
    path = _dir(home) / f"{port}.json"
    found = _read(path)
    if found is not None and found.pid == os.getpid():
        path.unlink(missing_ok=True)


def _read(path: Path) -> RunningBroker | None:
    try:
        data = json.loads(path.read_text())
        return RunningBroker(int(data["port"]), int(data["pid"]), str(data["host"]),
                             float(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def brokers(home: Path) -> list[RunningBroker]:
    """The brokers serving ``home`` on this machine, oldest first (stale records of
    processes that are gone are removed)."""
    out: list[RunningBroker] = []
    try:
        paths = sorted(_dir(home).glob("*.json"))
    except OSError:
        return out
    for path in paths:
        found = _read(path)
        if found is None or found.host != socket.gethostname():
            continue
        if _alive(found.pid):
            out.append(found)
        else:
            path.unlink(missing_ok=True)
    return sorted(out, key=lambda b: b.started)
