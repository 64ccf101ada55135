"""Command lines: ``dsage`` (setup, demo, keys), ``dsage-broker`` and ``dsage-worker``.

Launchers only parse, configure logging and call ``run_broker``/``run_monitor``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from . import keys as keys_mod
from .broker import BrokerOptions, PortInUse, run_broker
from .monitor import MonitorOptions, run_monitor
from .protocol import DEFAULT_MAX_MESSAGE_SIZE
from .store import StoreLocked


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65533:
        raise argparse.ArgumentTypeError(f"{text} is not a port from 1 to 65533")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", type=Path, default=None,
                   help="the dsage folder (default: $DSAGE_HOME, else ~/.sage/dsage)")
    p.add_argument("--heartbeat", type=_positive_float, default=1.0,
                   help="seconds between heartbeats (default 1)")
    p.add_argument("--liveness", type=_positive_int, default=3,
                   help="heartbeats missed before a peer counts as lost (default 3)")
    p.add_argument("--max-message-size", type=_positive_int, default=DEFAULT_MAX_MESSAGE_SIZE,
                   help="largest frame accepted, in bytes (default 256 MiB)")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    p.add_argument("--exit-with-parent", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--version", action="version", version=f"dsage {__version__}")


def broker_parser(prog: str = "dsage-broker") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Run a dsage broker: it queues jobs in an SQLite store and "
        "hands them to monitors. Uses ports PORT (clients), PORT+1 (monitors) and PORT+2 "
        "(job events), all CurveZMQ-encrypted with the dsage keypair.")
    p.add_argument("--port", type=_port, default=8081, help="first of three ports (default 8081)")
    p.add_argument("--bind", default="*", help="address to listen on (default: all)")
    p.add_argument("--allow-anonymous", action="store_true",
                   help="admit monitors with unknown keys, as anonymous workers that only "
                   "get jobs submitted with anonymous_ok=True")
    p.add_argument("--failure-limit", type=_positive_int, default=3,
                   help="a job whose worker was lost this many times fails (default 3)")
    p.add_argument("--max-queued-per-client", type=_positive_int, default=1_000_000,
                   help="most queued jobs per client key (default 1,000,000)")
    p.add_argument("--retention-days", type=_positive_float, default=7.0,
                   help="finished jobs are deleted after this many days (default 7)")
    p.add_argument("--prefetch", type=_nonneg_int, default=1,
                   help="jobs sent to a monitor beyond its free slots, so no slot waits "
                   "for a round trip (default 1)")
    p.add_argument("--store", type=Path, default=None,
                   help="the SQLite job store (default HOME/db/dsage.db); one broker per store")
    p.add_argument("--durable", action="store_true",
                   help="make every commit reach the disk (survives power loss, slower); by "
                   "default commits survive a crash of the broker but not of the machine")
    _common(p)
    return p


def worker_parser(prog: str = "dsage-worker") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Run a dsage monitor: it connects to a broker and runs jobs "
        "in worker slots, one long-lived process per slot.")
    p.add_argument("--server", default="localhost", help="the broker's host (default localhost)")
    p.add_argument("--port", type=_port, default=8081, help="the broker's port (default 8081)")
    p.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1,
                   help=f"number of slots (default: one per core, here {os.cpu_count()})")
    p.add_argument("--priority", type=int, default=10,
                   help="nice value of the slot processes (default 10)")
    p.add_argument("--server-key", default=None,
                   help="the broker's public key, z85 or a key file (default: own public key)")
    p.add_argument("--anonymous", action="store_true",
                   help="connect with a fresh key instead of the dsage keypair (the broker "
                   "must allow anonymous workers; needs --server-key)")
    p.add_argument("--max-jobs-per-slot", type=_positive_int, default=None,
                   help="restart a slot process after this many jobs")
    p.add_argument("--memory-growth", type=_positive_float, default=2.0,
                   help="restart a slot whose memory grew past this factor of its start "
                   "size (default 2)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="on SIGTERM, seconds running jobs get to finish (default 10)")
    p.add_argument("--tags", default="", help="comma-separated tags this worker offers")
    _common(p)
    return p


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def broker_main(argv: Sequence[str] | None = None, prog: str = "dsage-broker") -> int:
    a = broker_parser(prog).parse_args(argv)
    _logging(a.log_level)
    options = BrokerOptions(
        port=a.port, bind=a.bind, home=a.home, allow_anonymous=a.allow_anonymous,
        heartbeat=a.heartbeat, liveness=a.liveness, failure_limit=a.failure_limit,
        max_message_size=a.max_message_size, max_queued_per_client=a.max_queued_per_client,
        retention_days=a.retention_days, prefetch=a.prefetch, store=a.store, durable=a.durable,
        exit_with_parent=a.exit_with_parent)
    try:
        run_broker(options)
    except (keys_mod.KeyProblem, PortInUse, StoreLocked) as e:
        return _fail(prog, str(e))
    return 0


def worker_main(argv: Sequence[str] | None = None, prog: str = "dsage-worker") -> int:
    a = worker_parser(prog).parse_args(argv)
    _logging(a.log_level)
    try:
        server_key = keys_mod.parse_public_key(a.server_key) if a.server_key else None
        options = MonitorOptions(
            server=a.server, port=a.port, workers=a.workers, home=a.home, priority=a.priority,
            server_key=server_key, anonymous=a.anonymous, heartbeat=a.heartbeat,
            liveness=a.liveness, max_jobs_per_slot=a.max_jobs_per_slot,
            memory_growth=a.memory_growth, grace=a.grace,
            tags=[t for t in a.tags.split(",") if t], max_message_size=a.max_message_size,
            exit_with_parent=a.exit_with_parent)
        run_monitor(options)
    except keys_mod.KeyProblem as e:
        return _fail(prog, str(e))
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
        for name, key in keys_mod.authorized_keys(root).items():
            print(f"{name}\t{key.decode()}")
    elif a.action == "add":
        path = keys_mod.add_key(a.name, a.key, root)
        print(f"trusted {a.name}: {path} (a running broker picks it up within seconds)")
    elif a.action == "remove":
        keys_mod.remove_key(a.name, root)
        print(f"removed {a.name} (a running broker drops it within seconds)")
    return 0


def _protect_keys(args: list[str]) -> list[str]:
    """A z85 key may start with '-': after ``keys add``, end option parsing before the
    positionals so such a key is not taken for an option."""
    if "keys" in args and "add" in args[args.index("keys"):]:
        i = args.index("add", args.index("keys"))
        rest = args[i + 1:]
        if "--" not in rest and any(keys_mod.looks_like_key(r) and r.startswith("-")
                                    for r in rest):
            return [*args[:i + 1], "--", *rest]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dsage", description="Distributed computing from a script or a session: "
        "`dsage setup` makes the keypair, `dsage demo` runs the examples on a local cluster.")
    p.add_argument("--version", action="version", version=f"dsage {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("setup", help="create $DSAGE_HOME and the keypair (idempotent)")
    s.add_argument("--home", type=Path, default=None, help="the dsage folder")
    s.set_defaults(func=_setup)
    d = sub.add_parser("demo", help="start a local cluster, run the examples, shut it down")
    d.add_argument("--workers", type=_positive_int, default=2, help="slots (default 2)")
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
    kr = ks.add_parser("remove", help="stop trusting a key")
    kr.add_argument("name")
    k.set_defaults(func=_keys)
    sub.add_parser("broker", help="run a broker (as dsage-broker)", add_help=False)
    sub.add_parser("worker", help="run a monitor (as dsage-worker)", add_help=False)
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("broker", "worker"):
        run: Callable[..., int] = broker_main if args[0] == "broker" else worker_main
        return run(args[1:], prog=f"dsage {args[0]}")
    a = p.parse_args(_protect_keys(args))
    if not getattr(a, "func", None):
        p.print_help()
        return 0
    try:
        return int(a.func(a))
    except keys_mod.KeyProblem as e:
        return _fail("dsage", str(e))


if __name__ == "__main__":
    raise SystemExit(main())
