"""Every option of the broker and the monitor, declared once.

Each option is a dataclass field whose metadata holds its help text (and, where
needed, how a command line spells or checks it). The launchers' argparse
parsers are built from these fields (:func:`add_arguments`, :func:`from_args`),
and ``dsage.server()``, ``dsage.worker()`` and ``dsage.start_all()`` take the
same names as keyword arguments, so a new option is written in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .protocol import DEFAULT_MAX_MESSAGE_SIZE, MIN_MESSAGE_SIZE


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def nonneg_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def message_size(text: str) -> int:
    value = int(text)
    if value < MIN_MESSAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"{text} is less than {MIN_MESSAGE_SIZE} bytes (1 MiB): dsage's own messages "
            f"need that much")
    return value


def port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65533:
        raise argparse.ArgumentTypeError(f"{text} is not a port from 1 to 65533")
    return value


def tag_list(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def opt(default: Any = dataclasses.MISSING, help: str = "", *,
        parse: Callable[[str], Any] | None = None, metavar: str | None = None,
        default_factory: Callable[[], Any] | None = None, hidden: bool = False) -> Any:
    """A field that is also a command-line option ``--name-with-dashes``.

    ``parse`` turns the command line's text into the value (by default the
    field's type); ``hidden`` options are for dsage's own use."""
    meta = {"help": argparse.SUPPRESS if hidden else help, "parse": parse, "metavar": metavar}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


_HOME_HELP = "the dsage folder (default: $DSAGE_HOME, else ~/.sage/dsage)"


@dataclass
class BrokerOptions:
    """Everything ``dsage-broker`` can be told; ``port`` is the first of three."""

    port: int = opt(8081, "first of three ports: clients, monitors, job events (default 8081)",
                    parse=port)
    bind: str = opt("*", "address to listen on (default: all)")
    home: Path | None = opt(None, _HOME_HELP)
    allow_anonymous: bool = opt(False, "admit monitors with unknown keys, as anonymous workers "
                                "that only get jobs submitted with anonymous_ok=True")
    heartbeat: float = opt(1.0, "seconds between heartbeats (default 1)", parse=positive_float)
    liveness: int = opt(3, "heartbeats missed before a monitor counts as lost (default 3)",
                        parse=positive_int)
    failure_limit: int = opt(3, "a job whose worker was lost this many times fails (default 3)",
                             parse=positive_int)
    max_message_size: int = opt(DEFAULT_MAX_MESSAGE_SIZE,
                                "largest frame accepted, in bytes (default 256 MiB, at "
                                "least 1 MiB)", parse=message_size)
    max_queued_per_client: int = opt(1_000_000, "most queued jobs per client key "
                                     "(default 1,000,000)", parse=positive_int)
    retention_days: float = opt(7.0, "finished jobs are deleted after this many days "
                                "(default 7)", parse=positive_float)
    prefetch: int = opt(1, "jobs sent to a monitor beyond its free slots, so no slot waits "
                        "for a round trip, at least (default 1; a monitor whose jobs are "
                        "short is sent enough for a few ms of work)", parse=nonneg_int)
    max_anonymous: int = opt(64, "most anonymous monitors registered at once (default 64)",
                             parse=nonneg_int)
    max_anonymous_connections: int = opt(
        128, "most live connections from unknown keys on the monitor port; more "
        "handshakes are refused until some close (default 128)", parse=nonneg_int)
    anonymous_rate: float = opt(200.0, "messages a second an anonymous monitor may send on "
                                "average; more are dropped (default 200)",
                                parse=positive_float)
    store: Path | None = opt(None, "the SQLite job store (default HOME/db/dsage.db); one broker "
                             "per store")
    durable: bool = opt(False, "make every commit reach the disk (survives power loss, "
                        "slower); by default commits survive a crash of the broker but not "
                        "of the machine")
    shutdown_monitors: bool = opt(False, "when this broker stops, tell every connected "
                                  "monitor to stop too (their running jobs go back to the "
                                  "queue, in the store, for the next broker); start_all's "
                                  "broker does this, so its cluster ends together")
    exit_with_parent: int | None = opt(None, hidden=True)


@dataclass
class MonitorOptions:
    """Everything ``dsage-worker`` can be told."""

    server: str = opt("localhost", "the broker's host (default localhost)")
    port: int = opt(8081, "the broker's port (default 8081)", parse=port)
    workers: int = opt(help=f"number of slots (default: one per core, here {os.cpu_count()})",
                       parse=positive_int, default_factory=lambda: os.cpu_count() or 1)
    home: Path | None = opt(None, _HOME_HELP)
    priority: int = opt(10, "nice value of the slot processes (default 10)", parse=int)
    server_key: bytes | None = opt(None, "the broker's public key, z85 or a key file "
                                   "(default: own public key)", parse=str)
    anonymous: bool = opt(False, "connect with a fresh key instead of the dsage keypair (the "
                          "broker must allow anonymous workers; needs --server-key)")
    heartbeat: float = opt(1.0, "seconds between heartbeats (default 1)", parse=positive_float)
    liveness: int = opt(3, "heartbeats missed before the broker counts as lost (default 3)",
                        parse=positive_int)
    max_jobs_per_slot: int | None = opt(None, "restart a slot process after this many jobs",
                                        parse=positive_int)
    memory_growth: float = opt(2.0, "restart a slot whose memory grew past this factor of its "
                               "start size (default 2)", parse=positive_float)
    grace: float = opt(10.0, "on SIGTERM, seconds running jobs get to finish before they are "
                       "given back to the broker (default 10; a second SIGTERM or Ctrl-C "
                       "gives them back at once)",
                       parse=nonneg_float)
    tags: list[str] = opt(help="comma-separated tags this worker offers, for jobs sent with "
                          "requires=[...] ('povray' and 'sage' are added when POV-Ray is on "
                          "PATH and Sage imports)", parse=tag_list, metavar="TAG,TAG",
                          default_factory=list)
    no_detect: bool = opt(False, "offer only the --tags given, not 'povray' and 'sage' for "
                          "what is installed (this machine then runs no Sage jobs)")
    max_message_size: int = opt(DEFAULT_MAX_MESSAGE_SIZE,
                                "largest frame accepted, in bytes (default 256 MiB, at "
                                "least 1 MiB)", parse=message_size)
    slot_memory: int | None = opt(None, "memory cap of each slot in bytes, its processes "
                                  "together, kept by the OOM killer of a cgroup per slot "
                                  "(needs a writable cgroup v1 memory hierarchy)",
                                  parse=positive_int)
    isolate: bool = opt(False, "run every job in a slot process no earlier job ran in (a "
                        "fresh slot, forked off a warm template, after each job)")
    run_as: str | None = opt(None, "run jobs as this unprivileged user, so that they cannot "
                             "read the monitor's secret key or the dsage home (the monitor "
                             "must run as root; default: nobody for an --anonymous monitor "
                             "run as root, else the monitor's own user)", metavar="USER")
    idle_exit: float | None = opt(None, "exit when the broker has been silent for this many "
                                  "seconds (for monitors on other machines, so none outlives "
                                  "its cluster; default: keep trying)", parse=positive_float,
                                  metavar="SECONDS")
    exit_with_parent: int | None = opt(None, hidden=True)
    #: stop when standard input says ``stop`` (gracefully) or closes (at once): for a
    #: monitor started over ssh, the session's end
    exit_on_stdin_eof: bool = opt(False, hidden=True)


def _parser_type(f: dataclasses.Field[Any], hint: Any) -> Callable[[str], Any]:
    if f.metadata.get("parse"):
        return f.metadata["parse"]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if isinstance(hint, types.UnionType) and args else hint
    return base if base in (int, float, str, Path) else str


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """One ``--option`` per field of the options dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if hints[f.name] is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
            else f.default
        parser.add_argument(flag, type=_parser_type(f, hints[f.name]), default=default,
                            metavar=f.metadata.get("metavar"), help=help_text)


def from_args(cls: type[Any], namespace: argparse.Namespace, **override: Any) -> Any:
    """An options dataclass from parsed arguments (``override`` wins)."""
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)}
    return cls(**{**values, **override})


def check_values(cls: type[Any], values: dict[str, Any]) -> None:
    """Check keyword options as the command line checks them (by each field's ``parse``,
    on the text the launcher would be given); a bad one raises ValueError naming it."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        parse = fields[name].metadata.get("parse") if name in fields else None
        if parse is None or value is None or isinstance(value, bool):
            continue
        if isinstance(value, (list, tuple)):
            text = ",".join(map(str, value))
        else:
            text = value.decode() if isinstance(value, bytes) else str(value)
        try:
            parse(text)
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise ValueError(f"{name}={value!r}: {e}") from None


def names(cls: type[Any]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}
