"""Starting brokers and monitors from Python: ``server()``, ``worker()``, ``start_all()``,
and ``start_workers()`` for monitors on other machines (through ssh, see ``remote``).

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
import threading
import time
import weakref
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from . import keys as keys_mod
from . import remote
from .broker import run_broker
from .client import DSage
from .monitor import run_monitor
from .options import BrokerOptions, MonitorOptions, check_values, names
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

    def request_stop(self, hurry: bool = False) -> None:
        """Ask it to stop (SIGTERM; with ``hurry`` also SIGINT, which ends a monitor's
        grace period: a second signal, so it is not merged with the first)."""
        _signal_group(self.pid, signal.SIGTERM)
        if hurry:
            _signal_group(self.pid, signal.SIGINT)

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


class RemoteProcess(ManagedProcess):
    """A monitor on another machine: the local ``ssh`` running it. A ``stop`` line
    on the session's standard input stops the remote monitor gracefully, closing
    it stops the monitor at once (it gives its jobs back and exits, then ``ssh``
    exits; a dead ``ssh`` closes it too); its log lines are copied to ``log``."""

    def __init__(self, host: str, proc: subprocess.Popen[bytes], log: Path,
                 pump: threading.Thread) -> None:
        super().__init__(f"ssh {host}", proc, log)
        self.host, self.pump = host, pump
        self.asked = False

    def request_stop(self, hurry: bool = False) -> None:
        """Ask once for a graceful stop; with ``hurry``, close the session's input."""
        stdin = self.proc.stdin
        if stdin is None or stdin.closed or (self.asked and not hurry):
            return
        try:
            if hurry:
                stdin.close()
            else:
                self.asked = True
                stdin.write(b"stop\n")
                stdin.flush()
        except OSError:  # the session is gone already
            pass

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the remote monitor, waiting up to ``timeout`` for it to end its jobs
        and exit, then end the session (at once), then ``ssh``."""
        for hurry, wait in ((False, timeout), (True, 5.0)):
            self.request_stop(hurry)
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                pass
        super().stop(timeout=3.0)
        self.pump.join(5.0)


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
            # -P: a dsage.py in the working folder (the seed's example file) is not dsage
            [sys.executable, "-P", "-m", "dsage.cli", *args,
             "--exit-with-parent", str(os.getpid()),
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
    flags = _as_args(options, BROKER_FIELDS, "broker")  # (checks the names)
    check_values(BrokerOptions, {"port": port, **options})  # and the values, in the call
    if blocking:
        run_broker(BrokerOptions(port=port, home=root, **options))
        return None
    args = ["broker", "--port", str(port), *flags]
    return _spawn(f"broker-{port}", args, root)


def worker(server: str = "localhost", port: int = 8081, workers: int | None = None,
           blocking: bool = True, home: str | os.PathLike[str] | None = None,
           **options: Any) -> ManagedProcess | None:
    """Run a monitor with ``workers`` slots (default: one per core) for the broker at
    ``server:port``; ``anonymous=True`` with ``server_key=`` connects without a trusted key."""
    root = keys_mod.home(home)
    n = workers or os.cpu_count() or 1
    flags = _as_args(options, MONITOR_FIELDS, "worker")  # (checks the names)
    check_values(MonitorOptions, {"port": port, "workers": n, **options})
    if blocking:
        if options.get("server_key") is not None:
            options["server_key"] = keys_mod.parse_public_key(options["server_key"])
        run_monitor(MonitorOptions(server=server, port=port, workers=n, home=root, **options))
        return None
    args = ["worker", "--server", server, "--port", str(port), "--workers", str(n), *flags]
    return _spawn(f"worker-{port}-{time.monotonic_ns()}", args, root)


class Cluster:
    """The broker and monitors that :func:`start_all` started."""

    def __init__(self) -> None:
        self.broker: ManagedProcess | None = None
        self.monitors: list[ManagedProcess] = []
        #: hosts where :func:`start_workers` could not start a monitor, and why
        self.failed: dict[str, str] = {}

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
            m.request_stop(hurry)
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
              kind: str = "python", **options: Any) -> DSage:
    """Start a local broker and a monitor with ``workers`` slots; return a connected DSage.
    ``kind='sage'`` makes it run code jobs as Sage by default (``D('2^10')`` is 1024).

    Runs ``dsage setup`` first when there is no keypair yet. The broker uses three
    free ports (``dsage status`` and the other shell commands find it), or ``port``
    and the two after it when given. Jobs an earlier session on this home left
    unfinished are in the store and run first: it says how many, and how to drop
    them. When another broker (another script's ``start_all``) has the home's job
    store open, this cluster keeps its jobs in a store of its
    own, and says so. ``D.close()`` (or leaving a ``with`` block, or the interpreter
    exiting) stops everything started here, and the broker then tells every other
    monitor connected to it (started with ``start_workers``, by hand, on another
    machine) to stop too: ``shutdown_monitors=False`` leaves those running, to
    reconnect to the next broker. Other options go to the broker and the
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
    broker_opts.setdefault("shutdown_monitors", True)  # the cluster ends together
    monitor_opts = {k: v for k, v in options.items() if k in MONITOR_FIELDS}
    unknown = set(options) - BROKER_FIELDS - MONITOR_FIELDS
    if unknown:
        raise TypeError(f"unknown start_all option(s): {', '.join(sorted(unknown))}")
    # checked before anything starts, as the launchers would check them
    check_values(BrokerOptions, {"port": port, **broker_opts})
    check_values(MonitorOptions, {"port": port, "workers": workers, **monitor_opts})
    cluster = Cluster()
    d: DSage | None = None
    try:
        cluster.broker = server(port, blocking=False, home=root, **broker_opts)
        monitor = worker("127.0.0.1", port, workers, blocking=False, home=root, **monitor_opts)
        assert monitor is not None
        cluster.monitors.append(monitor)
        d = DSage("127.0.0.1", port, home=root, connect_timeout=0,
                  heartbeat=shared.get("heartbeat", 1.0), kind=kind)
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


def start_workers(hosts: Sequence[str] | str, workers: int | None = None,
                  python: str = "python3", server: str | None = None, port: int | None = None,
                  copy_key: bool | str = False, ssh_options: Sequence[str] = (), *,
                  client: DSage | None = None, home: str | os.PathLike[str] | None = None,
                  remote_home: str | None = None, timeout: float = 60.0,
                  **options: Any) -> Cluster:
    """Start a monitor with ``workers`` slots (default: one per core there) on each of
    ``hosts`` (``'alice@node1'``, ``'node2:2222'``, or a comma-separated string) through
    the system's ``ssh``, for the broker of ``client`` (a DSage, say from
    :func:`start_all`: the monitors then stop when it closes) or at ``server:port``.

    ``server`` is the broker's address as the hosts reach it (default: this machine's
    name). ``python`` is the command that runs Python there (``'python3'``, or
    ``'~/venv/bin/python'``); it must import a compatible dsage, else the host is
    reported with how to install it. ``copy_key=True`` installs this home's keypair
    there; ``copy_key='NAME'`` the worker key ``dsage keys issue-worker NAME`` made
    (recommended: it can run jobs but not submit them); by default the host's own
    keypair is used. ``ssh_options`` are passed to ``ssh`` (``['-i', 'key']``);
    ``remote_home`` is the dsage folder there; other options go to the monitors
    (``heartbeat=0.5``, ``tags=[...]``).

    A host that is down, refuses, lacks dsage or does not register within
    ``timeout`` is reported (on stderr, and in the returned cluster's ``failed``) and
    the others go on; StartError when no host started. Each monitor's log lines
    are copied to ``$DSAGE_HOME/logs/ssh-HOST.log``.
    """
    names = [h for h in (hosts.split(",") if isinstance(hosts, str) else hosts) if h]
    if not names:
        raise ValueError("start_workers needs at least one host")
    if len(set(names)) < len(names):
        raise ValueError("a host is listed twice; one monitor per host runs all its "
                         "slots (workers=)")
    root = keys_mod.home(home if client is None else client.home)
    unknown = set(options) - MONITOR_FIELDS
    if unknown:
        raise TypeError(f"unknown worker option(s): {', '.join(sorted(unknown))}")
    check_values(MonitorOptions, {"port": port, "workers": workers, **options})
    if client is None and port is None:
        raise TypeError("start_workers needs the broker: client=D, or port= (and server=)")
    port = port if port is not None else client.port  # type: ignore[union-attr]
    server = server or socket.getfqdn()
    given_key = options.pop("server_key", None)
    server_key = (keys_mod.parse_public_key(given_key) if given_key is not None
                  else client.server_key if client is not None
                  else keys_mod.load_keypair(root).public)
    copy_from: Path | None = None
    if copy_key is True:
        copy_from = root
    elif isinstance(copy_key, str) and copy_key:
        copy_from = keys_mod.worker_key_dir(copy_key, root)
        if not (copy_from / keys_mod.SECRET_NAME).exists():
            raise keys_mod.NoKeypair(f"no worker key named {copy_key!r} in {root}: make it "
                                     f"with `dsage keys issue-worker {copy_key}`")
    parsed = [remote.Host.parse(h) for h in names]
    cluster = Cluster()
    for host, error in remote.prepare_all(parsed, python, ssh_options, copy_from,
                                          remote_home).items():
        if error is not None:
            cluster.failed[host.text] = str(error)
    started: dict[str, RemoteProcess] = {}
    for host in parsed:
        if host.text in cluster.failed:
            continue
        extra = _as_args({**options, "server_key": server_key,
                          "tags": [*options.get("tags", []), f"ssh:{host.text}"]},
                         MONITOR_FIELDS, "worker")
        command = remote.worker_command(python, server, port, workers, remote_home, extra)
        log = root / "logs" / f"{host.log_name}.log"
        proc, pump = remote.start_session(host, ssh_options, command, log)
        started[host.text] = RemoteProcess(host.text, proc, log, pump)
    waiter: DSage | None = client
    try:
        if waiter is None and started:
            waiter = DSage(server, port, server_key, home=root, connect_timeout=timeout)
        _wait_registered(waiter, started, cluster, timeout)
    except BaseException:  # (the broker is unreachable from here, Ctrl-C): end them all
        for p in started.values():
            p.request_stop(hurry=True)
        for p in started.values():
            p.stop(timeout=3.0)
        raise
    finally:
        if waiter is not None and waiter is not client:
            waiter.close()
    for text, message in cluster.failed.items():
        print(f"dsage: no monitor on {message}" if message.startswith(text)
              else f"dsage: no monitor on {text}: {message}", file=sys.stderr)
    if not cluster.monitors:
        raise StartError("no monitor started:\n" + "\n".join(cluster.failed.values()))
    if client is not None:
        if client._cluster is None:
            client._cluster = Cluster()
        client._cluster.monitors.extend(cluster.monitors)
    return cluster


def _wait_registered(d: DSage | None, started: dict[str, RemoteProcess], cluster: Cluster,
                     timeout: float) -> None:
    """Wait until each started monitor registered (its ``ssh:HOST`` tag shows); one
    whose session ended, or that is not there by ``timeout``, goes to ``failed``."""
    deadline = time.monotonic() + timeout
    waiting = dict(started)
    while waiting and d is not None:
        tags = {t for w in d.workers() for t in w.tags}
        for text, p in list(waiting.items()):
            if f"ssh:{text}" in tags:
                cluster.monitors.append(waiting.pop(text))
            elif not p.alive() or time.monotonic() > deadline:
                why = (f"the session ended (status {p.proc.returncode})" if not p.alive()
                       else f"the monitor did not register within {timeout:g} s")
                p.stop(timeout=3.0)
                cluster.failed[text] = f"{text}: {why}; its log {p.log} ends with:\n" \
                                       f"{p.log_tail()}"
                del waiting[text]
        if waiting:
            time.sleep(0.1)
