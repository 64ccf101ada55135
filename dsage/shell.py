"""The shell's view of a cluster: ``dsage status``, ``top``, ``jobs``, ``kill``, ``purge``.

Each command connects as a client with the home's keypair, asks the broker,
and prints rich tables (or ``--json``). Without ``--port`` it talks to the
broker this home runs on this machine (see :mod:`dsage.running`), else 8081.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from . import keys as keys_mod
from . import running
from .client import DSage
from .errors import DSageError, UnknownJob
from .job import JobWrapper, strip_control
from .protocol import Status
from .words import plural

DEFAULT_PORT = 8081
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float | None = None) -> float:
    """A point in time from ``10m``/``2h``/``3d`` ago (units s, m, h, d, w) or an ISO
    date (``2026-11-25`` or ``2026-11-25T14:00``), as a ``time.time()`` value."""
    m = _DURATION.match(text)
    if m:
        return (time.time() if now is None else now) - float(m[1]) * _SECONDS[m[2]]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (10m, 2h, 3d) nor a date (2026-11-25T14:00)"
        ) from None


def add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="localhost", help="the broker's host (default localhost)")
    p.add_argument("--port", type=int, default=None,
                   help="the broker's client port (default: the broker this home runs on "
                        "this machine, else 8081)")
    p.add_argument("--home", type=Path, default=None, help="the dsage folder")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the broker (default 10)")


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def resolve_port(a: argparse.Namespace) -> int:
    if a.port is not None:
        return int(a.port)
    if a.server in ("localhost", "127.0.0.1", "::1"):
        live = running.brokers(keys_mod.home(a.home))
        if live:
            return live[-1].port  # the newest
    return DEFAULT_PORT


@contextmanager
def connect(a: argparse.Namespace) -> Iterator[DSage]:
    d = DSage(a.server, resolve_port(a), home=a.home, connect_timeout=a.timeout)
    try:
        yield d
    finally:
        d.close()


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _when(t: float | None) -> str:
    return "" if t is None else datetime.fromtimestamp(t).strftime("%m-%d %H:%M:%S")


def job_dict(j: JobWrapper) -> dict[str, Any]:
    """A job as ``--json`` prints it."""
    return {"id": j.job_id, "name": j.name, "kind": j.kind, "status": j.status,
            "priority": j.priority, "created": j.created, "started": j.started,
            "finished": j.finished, "failures": j.failures, "error": j.error, "reason": j.reason,
            "worker": None if j.worker is None else {
                "id": j.worker.id, "host": j.worker.host, "anonymous": j.worker.anonymous}}


def status_dict(d: DSage) -> dict[str, Any]:
    s = d.status()
    return {"server": s.server, "port": s.port, "version": s.version, "uptime": s.uptime,
            "jobs": s.jobs, "queued": s.queued, "processing": s.processing,
            "slots": s.slots, "busy": s.busy,
            "workers": [{"id": w.id, "host": w.host, "pid": w.pid, "slots": w.slots,
                         "busy": w.busy, "anonymous": w.anonymous, "tags": w.tags,
                         "quiet": w.quiet} for w in s.workers]}


def status_view(st: dict[str, Any]) -> Group:
    jobs = st["jobs"]
    head = Table.grid(padding=(0, 2))
    head.add_row("broker", f"{st['server']}:{st['port']} (dsage {st['version']}), "
                           f"up {_ago(st['uptime'])}")
    head.add_row("your jobs", ", ".join(f"{jobs[s.value]} {s.value}" for s in Status))
    head.add_row("all jobs", f"{st['queued']} queued, {st['processing']} processing")
    head.add_row("slots", f"{st['busy']} busy of {st['slots']} "
                          f"on {plural(len(st['workers']), 'monitor')}")
    mon = Table(title="monitors", title_justify="left")
    mon.add_column("id", no_wrap=True, min_width=32)
    mon.add_column("host", max_width=24, overflow="ellipsis")
    for col in ("pid", "slots", "busy", "free"):
        mon.add_column(col, justify="right")
    mon.add_column("tags", overflow="fold")
    mon.add_column("anonymous")
    mon.add_column("last heard", justify="right", no_wrap=True)
    for w in st["workers"]:
        mon.add_row(w["id"], w["host"], str(w["pid"] or ""), str(w["slots"]), str(w["busy"]),
                    str(max(0, w["slots"] - w["busy"])), ",".join(w["tags"]),
                    "yes" if w["anonymous"] else "", f"{_ago(w['quiet'])} ago")
    return Group(head, mon)


def jobs_table(jobs: list[JobWrapper], title: str | None = None,
               now: float | None = None) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("id", no_wrap=True, min_width=32)  # whole: ids are copied into commands
    t.add_column("name", max_width=20, overflow="ellipsis")
    t.add_column("status", no_wrap=True)
    t.add_column("prio", justify="right")
    t.add_column("created", no_wrap=True)
    t.add_column("elapsed", justify="right", no_wrap=True)
    t.add_column("worker", max_width=16, overflow="ellipsis")
    t.add_column("error / reason", overflow="fold")
    wall = time.time() if now is None else now
    for j in jobs:
        if j.started is not None:
            elapsed = _ago((j.finished or wall) - j.started)
        else:
            elapsed = ""
        note = strip_control((j.error or j.reason or "").splitlines()[0] if (j.error or j.reason)
                             else "")
        t.add_row(j.job_id, j.name or "", j.status, str(j.priority), _when(j.created), elapsed,
                  j.worker.host if j.worker else "", note[:80])
    return t


def _console() -> Console:
    """Rich output: the terminal's width, or wide lines when piped (so ids stay whole)."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def cmd_status(a: argparse.Namespace) -> int:
    with connect(a) as d:
        st = status_dict(d)
    if a.json:
        _print_json(st)
    else:
        _console().print(status_view(st))
    return 0


def cmd_top(a: argparse.Namespace) -> int:
    """The status and this key's running jobs, refreshed every ``--interval`` s."""
    console = _console()
    with connect(a) as d:
        def view() -> Group:
            running_jobs = d.get_my_jobs(Status.PROCESSING.value, limit=a.limit)
            return Group(status_view(status_dict(d)),
                         jobs_table(running_jobs, title="your running jobs"))

        shown = 0
        try:
            with Live(view(), console=console, auto_refresh=False,
                      transient=False) as live:
                shown = 1
                while a.count is None or shown < a.count:
                    time.sleep(a.interval)
                    live.update(view(), refresh=True)
                    shown += 1
        except KeyboardInterrupt:
            pass
    return 0


def cmd_jobs(a: argparse.Namespace) -> int:
    with connect(a) as d:
        if a.action == "show":
            try:
                j = d.job(a.id)
            except (UnknownJob, ValueError) as e:
                print(f"dsage jobs show: {e}", file=sys.stderr)
                return 1
            info = job_dict(j)
            info["output"] = j.output if j.done() else None
            if a.json:
                _print_json(info)
            else:
                console = _console()
                console.print(jobs_table([j]))
                if j.error:
                    console.print(f"[bold]error:[/] {strip_control(j.error)}", markup=True,
                                  highlight=False)
                if j.done() and j.output:
                    console.print("[bold]output:[/]")
                    console.print(j.output, markup=False, highlight=False)
            return 0
        jobs = d.get_my_jobs(a.status, name=a.name, since=a.since, limit=a.limit)
    if a.json:
        _print_json([job_dict(j) for j in jobs])
    else:
        _console().print(jobs_table(jobs, title=plural(len(jobs), "job")))
    return 0


def cmd_kill(a: argparse.Namespace) -> int:
    if a.all == bool(a.ids):
        print("dsage kill: give job ids, or --all", file=sys.stderr)
        return 2
    if a.status and not a.all:
        print("dsage kill: --status goes with --all", file=sys.stderr)
        return 2
    with connect(a) as d:
        if a.all:
            n = d.kill_all(a.status)
            print(f"killed {plural(n, 'job')}")
            return 0
        failed = 0
        for jid in a.ids:
            try:
                d.kill(jid)
                print(f"killed {jid}")
            except (UnknownJob, ValueError) as e:
                print(f"dsage kill: {e}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


def cmd_purge(a: argparse.Namespace) -> int:
    with connect(a) as d:
        n = d.purge(before=a.older_than)
    print(f"dropped {plural(n, 'finished job')}")
    return 0


def add_commands(sub: Any) -> None:
    """The shell commands, as subcommands of ``dsage``."""
    s = sub.add_parser("status", help="the broker, your jobs by state, and the monitors")
    add_connection(s)
    add_json(s)
    s.set_defaults(func=cmd_status)
    t = sub.add_parser("top", help="status and your running jobs, live (Ctrl-C ends)")
    add_connection(t)
    t.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    t.add_argument("--count", type=int, default=None, help="stop after COUNT refreshes")
    t.add_argument("--limit", type=int, default=50, help="running jobs shown (default 50)")
    t.set_defaults(func=cmd_top)
    j = sub.add_parser("jobs", help="list your jobs (oldest first), or `jobs show ID`")
    add_connection(j)
    add_json(j)
    j.add_argument("action", nargs="?", choices=["show"], help="show one job with its output")
    j.add_argument("id", nargs="?", help="the job id (with show)")
    j.add_argument("--status", choices=[s.value for s in Status], help="only jobs in this state")
    j.add_argument("--name", help="only jobs with this name")
    j.add_argument("--since", type=parse_when, metavar="WHEN",
                   help="only jobs created since WHEN: 10m, 2h, 3d ago, or a date")
    j.add_argument("--limit", type=int, default=100, help="most jobs listed (default 100)")
    j.set_defaults(func=cmd_jobs)
    k = sub.add_parser("kill", help="kill jobs by id, or all your unfinished ones (--all)")
    add_connection(k)
    k.add_argument("ids", nargs="*", metavar="ID", help="job ids")
    k.add_argument("--all", action="store_true", help="every unfinished job of yours")
    k.add_argument("--status", choices=["new", "processing"],
                   help="with --all: only the queued (new) or only the running ones")
    k.set_defaults(func=cmd_kill)
    p = sub.add_parser("purge", help="drop your finished jobs from the broker's store")
    add_connection(p)
    p.add_argument("--older-than", type=parse_when, metavar="WHEN", dest="older_than",
                   help="only jobs that finished before WHEN: 10m, 2h, 3d ago, or a date")
    p.set_defaults(func=cmd_purge)


def run(a: argparse.Namespace) -> int:
    """Run a shell command, turning connection problems into one clear line."""
    if getattr(a, "action", None) == "show" and not a.id:
        print("dsage jobs show: which job? give its id", file=sys.stderr)
        return 2
    try:
        return int(a.func(a))
    except DSageError as e:
        print(f"dsage {a.command}: {e}", file=sys.stderr)
        return 1
