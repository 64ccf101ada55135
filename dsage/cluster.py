"""Starting brokers and monitors from Python: ``server()``, ``worker()``, ``start_all()``.

Background processes run ``python -m dsage.cli``, each in its own process
group, logging to ``$DSAGE_HOME/logs``. They exit by themselves when the
process that started them dies, and :meth:`Cluster.stop` (called by
``DSage.close()`` and at interpreter exit) ends them, whole groups at once.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from . import keys as keys_mod
from .broker import run_broker
from .client import DSage
from .monitor import run_monitor
from .options import BrokerOptions, MonitorOptions, names
from .protocol import Status
from .store import holder_of

BROKER_FIELDS = names(BrokerOptions) - {"home", "port"}
MONITOR_FIELDS = names(MonitorOptions) - {
    "home", "port", "server", "workers"}


class StartError(RuntimeError):
    """A background broker or monitor did not come up."""


class ManagedProcess:
    """A broker or monitor running in the background, in its own process group."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``timeout``."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def __repr__(self) -> str:
        return f"<{self.name} pid {self.pid} {'running' if self.alive() else 'stopped'}>"


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _as_args(options: dict[str, Any], allowed: set[str], what: str) -> list[str]:
    """Launcher arguments for keyword options (``max_jobs_per_slot=5`` -> ``--max-jobs-per-slot 5``)."""
    args: list[str] = []
    for key, value in options.items():
        if key not in allowed:
            raise TypeError(f"unknown {what} option {key!r}; known: {', '.join(sorted(allowed))}")
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args.append(f"{flag}={','.join(map(str, value))}")
        elif isinstance(value, bytes):  # a z85 key may start with '-': keep it glued
            args.append(f"{flag}={value.decode()}")
        else:
            args.append(f"{flag}={value}")
    return args


def _spawn(name: str, args: list[str], home: Path) -> ManagedProcess:
    log_path = home / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DSAGE_HOME": str(home)}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsage.cli", *args, "--exit-with-parent", str(os.getpid()),
             "--log-file", "-"],  # its stderr is the log file (crashes included)
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
    return ManagedProcess(name, proc, log_path)


def server(port: int = 8081, blocking: bool = True, home: str | os.PathLike[str] | None = None,
           **options: Any) -> ManagedProcess | None:
    """Run a broker on ``port`` (and the two after it). Blocking, or in the background
    with ``blocking=False``, which returns its :class:`ManagedProcess`. Options are
    those of ``dsage-broker`` (``allow_anonymous=True``, ``failure_limit=5``, ...)."""
    root = keys_mod.home(home)
    if blocking:
        _as_args(options, BROKER_FIELDS, "broker")  # validates the names
        run_broker(BrokerOptions(port=port, home=root, **options))
        return None
    args = ["broker", "--port", str(port), *_as_args(options, BROKER_FIELDS, "broker")]
    return _spawn(f"broker-{port}", args, root)


def worker(server: str = "localhost", port: int = 8081, workers: int | None = None,
           blocking: bool = True, home: str | os.PathLike[str] | None = None,
           **options: Any) -> ManagedProcess | None:
    """Run a monitor with ``workers`` slots (default: one per core) for the broker at
    ``server:port``; ``anonymous=True`` with ``server_key=`` connects without a trusted key."""
    root = keys_mod.home(home)
    n = workers or os.cpu_count() or 1
    if blocking:
        _as_args(options, MONITOR_FIELDS, "worker")
        if options.get("server_key") is not None:
            options["server_key"] = keys_mod.parse_public_key(options["server_key"])
        run_monitor(MonitorOptions(server=server, port=port, workers=n, home=root, **options))
        return None
    args = ["worker", "--server", server, "--port", str(port), "--workers", str(n),
            *_as_args(options, MONITOR_FIELDS, "worker")]
    return _spawn(f"worker-{port}-{time.monotonic_ns()}", args, root)


class Cluster:
    """The broker and monitors that :func:`start_all` started."""

    def __init__(self) -> None:
        self.broker: ManagedProcess | None = None
        self.monitors: list[ManagedProcess] = []

    def processes(self) -> list[ManagedProcess]:
        return [*self.monitors, *([self.broker] if self.broker else [])]

    def check(self) -> None:
        for p in self.processes():
            if not p.alive():
                raise StartError(f"the {p.name} process exited (status {p.proc.returncode}); "
                                 f"its log {p.log} ends with:\n{p.log_tail()}")

    def stop(self, hurry: bool = False) -> None:
        """Stop the monitors (they give running jobs back to the broker: at once with
        ``hurry``, else after their grace period), then the broker."""
        for m in self.monitors:
            _signal_group(m.pid, signal.SIGTERM)
            if hurry:  # a second stop request (another signal, so it is not merged
                _signal_group(m.pid, signal.SIGINT)  # with the first): no grace period
        for m in self.monitors:
            m.stop(timeout=3.0 if hurry else 15.0)
        if self.broker is not None:
            self.broker.stop(timeout=3.0 if hurry else 15.0)

    def kill(self) -> None:
        """End every process at once (SIGKILL to whole groups); nothing is lost, as the
        broker's store keeps every job, but running jobs start over next time."""
        for p in self.processes():
            _signal_group(p.pid, signal.SIGKILL)
        for p in self.processes():
            p.proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """A port p such that p, p+1 and p+2 are free now (the broker needs three)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base > 65530:
            continue
        try:
            held = []
            for p in (base + 1, base + 2):
                t = socket.socket()
                held.append(t)
                t.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for t in held:
                t.close()
    raise StartError("could not find three free consecutive ports")


_LIVE: weakref.WeakSet[DSage] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """At interpreter exit, close every client ``start_all`` made (stopping its
    cluster). A Ctrl-C during that ends the clusters at once, quietly."""
    try:
        for d in list(_LIVE):
            d.close()
    except KeyboardInterrupt:
        for d in list(_LIVE):
            if d._cluster is not None:
                d._cluster.kill()


def start_all(workers: int = 2, port: int | None = None,
              home: str | os.PathLike[str] | None = None, timeout: float = 60.0,
              **options: Any) -> DSage:
    """Start a local broker and a monitor with ``workers`` slots; return a connected DSage.

    Runs ``dsage setup`` first when there is no keypair yet. The broker uses three
    free ports (``dsage status`` and the other shell commands find it), or ``port``
    and the two after it when given. Jobs an earlier session on this home left
    unfinished are in the store and run first: it says how many, and how to drop
    them. When another broker (another script's ``start_all``) has the home's job
    store open, this cluster keeps its jobs in a store of its
    own, and says so. ``D.close()`` (or leaving a ``with`` block, or the interpreter
    exiting) stops everything started here. Other options go to the broker and the
    monitor by name (``heartbeat=0.5``, ``max_jobs_per_slot=100``).
    """
    root = keys_mod.home(home)
    if not keys_mod.has_keypair(root):
        keys_mod.setup(root)
        print(f"dsage: no keypair yet, so ran `dsage setup`: created {root}", file=sys.stderr)
    keys_mod.load_keypair(root)  # a too-open secret key is refused before anything starts
    port = port or free_port()
    if "store" not in options:
        default = root / "db" / "dsage.db"
        holder = holder_of(default)
        if holder is not None:
            options["store"] = root / "db" / f"dsage-{port}.db"
            print(f"dsage: the job store {default} is in use by another broker ({holder}); "
                  f"this cluster keeps its jobs in its own job store, {options['store']}",
                  file=sys.stderr)
    shared = {k: options[k] for k in ("heartbeat", "liveness") if k in options}
    broker_opts = {k: v for k, v in options.items() if k in BROKER_FIELDS}
    monitor_opts = {k: v for k, v in options.items() if k in MONITOR_FIELDS}
    unknown = set(options) - BROKER_FIELDS - MONITOR_FIELDS
    if unknown:
        raise TypeError(f"unknown start_all option(s): {', '.join(sorted(unknown))}")
    cluster = Cluster()
    d: DSage | None = None
    try:
        cluster.broker = server(port, blocking=False, home=root, **broker_opts)
        monitor = worker("127.0.0.1", port, workers, blocking=False, home=root, **monitor_opts)
        assert monitor is not None
        cluster.monitors.append(monitor)
        d = DSage("127.0.0.1", port, home=root, connect_timeout=0,
                  heartbeat=shared.get("heartbeat", 1.0))
        d._cluster = cluster
        deadline = time.monotonic() + timeout
        while not d._io.conn.welcomed.wait(0.05):
            cluster.check()
            if time.monotonic() > deadline:
                raise StartError(f"the broker did not answer within {timeout:g} s; "
                                 f"see the logs in {root / 'logs'}")
        while sum(w.slots for w in d.workers()) < workers:
            cluster.check()
            if time.monotonic() > deadline:
                raise StartError(f"the monitor did not register within {timeout:g} s; "
                                 f"see {monitor.log}")
            time.sleep(0.05)
    except BaseException:
        if d is not None:
            d.close()  # stops the cluster too
        else:
            cluster.stop()
        raise
    _LIVE.add(d)
    left = d.status().jobs
    earlier = left[Status.NEW.value] + left[Status.PROCESSING.value]
    if earlier:
        print(f"dsage: {earlier} unfinished job{'s' if earlier != 1 else ''} from an earlier "
              f"session on {root} {'are' if earlier != 1 else 'is'} queued and run first; "
              f"D.kill_all() (or `dsage kill --all` in a shell) drops them", file=sys.stderr)
    return d
