"""Command lines: ``dsage`` (setup, demo, keys), ``dsage-broker`` and ``dsage-worker``.

Launchers only parse, configure logging and call ``run_broker``/``run_monitor``.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from . import keys as keys_mod
from . import logs
from . import shell
from . import slurm
from . import stop
from .broker import BrokerFailed, PortInUse, run_broker
from .errors import DSageError
from .monitor import run_monitor
from .options import BrokerOptions, MonitorOptions, add_arguments, from_args, positive_int
from .runas import RunAsError
from .store import StoreLocked


SHELL_COMMANDS = ("status", "top", "jobs", "kill", "purge")


def _common(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    p.add_argument("--log-file", default=None, metavar="PATH",
                   help=f"also log to PATH (default $DSAGE_HOME/logs/{name}.log; - for none)")
    p.add_argument("--version", action="version", version=f"dsage {__version__}")


def broker_parser(prog: str = "dsage-broker") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Run a dsage broker: it queues jobs in an SQLite store and "
        "hands them to monitors. Uses ports PORT (clients), PORT+1 (monitors) and PORT+2 "
        "(job events), all CurveZMQ-encrypted with the dsage keypair.")
    add_arguments(p, BrokerOptions)
    _common(p, "broker")
    return p


def worker_parser(prog: str = "dsage-worker") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Run a dsage monitor: it connects to a broker and runs jobs "
        "in worker slots, one long-lived process per slot.")
    add_arguments(p, MonitorOptions)
    r = p.add_argument_group("monitors on other machines, through ssh (this process "
                             "stays to stop them: Ctrl-C or SIGTERM)")
    r.add_argument("--ssh", type=lambda t: [h for h in t.split(",") if h], default=None,
                   metavar="HOST[,HOST]", help="start the monitor on each of these hosts "
                   "([user@]host[:port]) instead of here; --workers defaults to their cores")
    r.add_argument("--python", default="python3", metavar="COMMAND",
                   help="how Python runs there (default python3)")
    r.add_argument("--copy-key", default=None, metavar="NAME",
                   help="install the worker key `dsage keys issue-worker NAME` made there "
                   "('self': the own keypair; default: the host's own)")
    r.add_argument("--ssh-options", default="", metavar="'OPTIONS'",
                   help="more ssh options, one string ('-i KEY -o ...')")
    r.add_argument("--remote-home", default=None, metavar="DIR",
                   help="the dsage folder there (default: its $DSAGE_HOME or ~/.sage/dsage)")
    _common(p, "worker")
    return p


def _logging(a: argparse.Namespace, name: str) -> None:
    log_file = a.log_file
    home = keys_mod.home(a.home)
    try:
        has_home = home.is_dir()
    except OSError:
        has_home = False  # not ours to read: the launcher says what is wrong
    if log_file is None and has_home:  # (without a home, the launcher says to set up)
        log_file = logs.default_log_file(home, name)
    logs.setup(a.log_level, log_file)


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def broker_main(argv: Sequence[str] | None = None, prog: str = "dsage-broker") -> int:
    a = broker_parser(prog).parse_args(argv)
    _logging(a, "broker")
    try:
        run_broker(from_args(BrokerOptions, a))
    except (keys_mod.KeyProblem, PortInUse, StoreLocked, BrokerFailed) as e:
        return _fail(prog, str(e))
    return 0


def worker_main(argv: Sequence[str] | None = None, prog: str = "dsage-worker") -> int:
    parser = worker_parser(prog)
    a = parser.parse_args(argv)
    if a.ssh is not None:
        return _ssh_workers(parser, a, prog)
    _logging(a, "worker")
    try:
        server_key = keys_mod.parse_public_key(a.server_key) if a.server_key else None
        return run_monitor(from_args(MonitorOptions, a, server_key=server_key))
    except (keys_mod.KeyProblem, RunAsError) as e:
        return _fail(prog, str(e))


def _ssh_workers(parser: argparse.ArgumentParser, a: argparse.Namespace, prog: str) -> int:
    """``dsage-worker --ssh``: start the monitors there, stay until told to stop."""
    from .cluster import MONITOR_FIELDS, RemoteProcess, StartError, start_workers

    logs.setup(a.log_level, None)
    given = {k: v for k, v in vars(a).items()
             if k in MONITOR_FIELDS and v != parser.get_default(k)}
    workers = a.workers if a.workers != parser.get_default("workers") else None
    copy_key: bool | str = True if a.copy_key == "self" else (a.copy_key or False)
    try:
        cluster = start_workers(
            a.ssh, workers, a.python, None if a.server == "localhost" else a.server, a.port,
            copy_key, shlex.split(a.ssh_options), home=a.home, remote_home=a.remote_home,
            **given)
    except (StartError, keys_mod.KeyProblem, DSageError) as e:
        return _fail(prog, str(e))
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    hosts = [m.host for m in cluster.monitors if isinstance(m, RemoteProcess)]
    print(f"{prog}: monitors on {', '.join(hosts)} (logs in "
          f"{keys_mod.home(a.home) / 'logs'}); Ctrl-C stops them", file=sys.stderr)
    while not stop.wait(0.5) and any(m.alive() for m in cluster.monitors):
        pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cluster.stop()
    except KeyboardInterrupt:  # a second Ctrl-C: at once
        cluster.stop(hurry=True)
    if not stop.is_set():
        print(f"{prog}: every remote monitor ended; see the logs", file=sys.stderr)
        return 1
    return 0


def _setup(a: argparse.Namespace) -> int:
    root = keys_mod.home(a.home)
    created = keys_mod.setup(root)
    keys = keys_mod.load_keypair(root)
    print(f"{'created' if created else 'already set up:'} {root}")
    print(f"public key: {keys.public.decode()}")
    return 0


def _demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(workers=a.workers, home=a.home)


def _keys(a: argparse.Namespace) -> int:
    root = keys_mod.home(a.home)
    if a.action in (None, "show"):
        print(keys_mod.load_keypair(root).public.decode())
    elif a.action == "list":
        for name, (key, role) in keys_mod.authorized_roles(root).items():
            print(f"{name}\t{key.decode()}\t{role}")
    elif a.action == "add":
        path = keys_mod.add_key(a.name, a.key, root, role=a.role)
        print(f"trusted {a.name} as {'client and worker' if a.role == 'both' else a.role}: "
              f"{path} (a running broker picks it up within seconds)")
    elif a.action == "issue-worker":
        folder = keys_mod.issue_worker_key(a.name, root)
        own = keys_mod.load_keypair(root).public.decode()
        print(f"made a worker key for {a.name} in {folder}, trusted with the worker role "
              f"(its monitor runs jobs but cannot submit any). To install it on the node, "
              f"copy both files into its dsage home, the secret key readable by its owner "
              f"only:\n"
              f"  ssh NODE 'mkdir -p -m 700 ~/.sage/dsage'\n"
              f"  scp -p {shlex.quote(str(folder / keys_mod.SECRET_NAME))} "
              f"{shlex.quote(str(folder / keys_mod.PUBLIC_NAME))} "
              f"NODE:.sage/dsage/\n"
              f"then start the monitor there with the broker's key:\n"
              f"  dsage-worker --server BROKER_HOST --port PORT --server-key={shlex.quote(own)}\n"
              f"(or from Python: dsage.start_workers(['NODE'], client=D, "
              f"copy_key={a.name!r}) does all of it)")
    elif a.action == "remove":
        keys_mod.remove_key(a.name, root)
        print(f"removed {a.name} (a running broker drops it within seconds)")
    return 0


def _protect_keys(args: list[str]) -> list[str]:
    """A z85 key may start with '-': after ``keys add``, end option parsing before the
    positionals so such a key is not taken for an option (options go before that)."""
    if "keys" in args and "add" in args[args.index("keys"):]:
        i = args.index("add", args.index("keys"))
        rest = args[i + 1:]
        if "--" not in rest and any(keys_mod.looks_like_key(r) and r.startswith("-")
                                    for r in rest):
            options: list[str] = []
            positionals: list[str] = []
            j = 0
            while j < len(rest):
                if rest[j] == "--role" and j + 1 < len(rest):
                    options += rest[j:j + 2]
                    j += 2
                    continue
                (options if rest[j].startswith("--role=") else positionals).append(rest[j])
                j += 1
            return [*args[:i + 1], *options, "--", *positionals]
    return args


def parser() -> argparse.ArgumentParser:
    """The ``dsage`` command line (also what the docs' CLI reference is made from)."""
    p = argparse.ArgumentParser(
        prog="dsage", description="Distributed computing from a script or a session: "
        "`dsage setup` makes the keypair, `dsage demo` runs the examples on a local cluster, "
        "`dsage status`, `top`, `jobs`, `kill` and `purge` watch and steer a running one.")
    p.add_argument("--version", action="version", version=f"dsage {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("setup", help="create $DSAGE_HOME and the keypair (idempotent)")
    s.add_argument("--home", type=Path, default=None, help="the dsage folder")
    s.set_defaults(func=_setup)
    d = sub.add_parser("demo", help="start a local cluster, run the examples, shut it down")
    d.add_argument("--workers", type=positive_int, default=2, help="slots (default 2)")
    d.add_argument("--home", type=Path, default=None, help="the dsage folder")
    d.set_defaults(func=_demo)
    k = sub.add_parser("keys", help="show the own public key, or manage authorized keys")
    k.add_argument("--home", type=Path, default=None, help="the dsage folder")
    ks = k.add_subparsers(dest="action", metavar="ACTION")
    ks.add_parser("show", help="print the own public key (the default)")
    ks.add_parser("list", help="list the authorized keys")
    ka = ks.add_parser("add", help="trust a public key")
    ka.add_argument("name", help="a name for the key (file authorized_keys/NAME.pub)")
    ka.add_argument("key", help="the key: 40 z85 characters, or a key file")
    ka.add_argument("--role", choices=keys_mod.ROLES, default="client",
                    help="client: submits jobs (default, for another user); worker: runs "
                    "jobs (a machine's monitor key); both")
    ki = ks.add_parser("issue-worker", help="make a keypair for one machine's monitor, "
                       "trusted as a worker only, and say how to install it there")
    ki.add_argument("name", help="a name for the machine (file authorized_keys/NAME.pub)")
    kr = ks.add_parser("remove", help="stop trusting a key")
    kr.add_argument("name")
    k.set_defaults(func=_keys)
    shell.add_commands(sub)
    slurm.add_commands(sub)
    stop.add_command(sub)
    sub.add_parser("broker", help="run a broker (as dsage-broker)", add_help=False)
    sub.add_parser("worker", help="run a monitor (as dsage-worker)", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("broker", "worker"):
        run: Callable[..., int] = broker_main if args[0] == "broker" else worker_main
        return run(args[1:], prog=f"dsage {args[0]}")
    a = p.parse_args(_protect_keys(args))
    if not getattr(a, "func", None):
        p.print_help()
        return 0
    try:
        if a.command in SHELL_COMMANDS:
            return shell.run(a)
        return int(a.func(a))
    except keys_mod.KeyProblem as e:
        return _fail("dsage", str(e))


if __name__ == "__main__":
    raise SystemExit(main())
