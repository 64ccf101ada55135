"""CPU time and memory of process trees, read from ``/proc`` (Linux only).

``/proc/PID/stat`` fields 14-17 are utime, stime, cutime and cstime in clock
ticks (``os.sysconf('SC_CLK_TCK')``); cutime/cstime hold the time of children
that exited and were waited for. A process tree's CPU time is therefore the sum
of all four over the live processes of the tree: a child that exits between two
readings moves from its own utime/stime into its parent's cutime/cstime and is
still counted once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Stat:
    pid: int
    ppid: int
    pgrp: int
    utime: int
    stime: int
    cutime: int
    cstime: int

    @property
    def own(self) -> int:
        """This process's own ticks (user + system)."""
        return self.utime + self.stime

    @property
    def children(self) -> int:
        """Ticks of its children that exited and were waited for."""
        return self.cutime + self.cstime


def read_stat(pid: int) -> Stat | None:
    """``/proc/PID/stat`` of one process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) is in parentheses and may hold spaces or ')'
    rest = text[text.rindex(")") + 2:].split()
    f = lambda n: int(rest[n - 3])  # noqa: E731 - field n (1-based) of the whole line
    return Stat(pid, f(4), f(5), f(14), f(15), f(16), f(17))


def all_stats() -> dict[int, Stat]:
    """Every process visible in ``/proc``."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            s = read_stat(int(entry))
            if s is not None:
                out[s.pid] = s
    return out


def descendants(root: int, stats: dict[int, Stat]) -> list[int]:
    """The live descendants of ``root`` (by parent links), not ``root`` itself."""
    kids: dict[int, list[int]] = {}
    for s in stats.values():
        kids.setdefault(s.ppid, []).append(s.pid)
    out, todo = [], list(kids.get(root, ()))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


#: how a role's processes are counted: ``self`` is the process alone (not even its
#: exited children), ``tree`` the process and all its descendants, ``descendants``
#: everything below the process (with its exited children) but not its own time
MODES = ("self", "tree", "descendants")


def role_ticks(spec: dict[str, Iterable[tuple[int, str]]]) -> dict[str, int]:
    """Clock ticks used so far by each role; ``spec`` maps a role to (pid, mode) pairs."""
    stats = all_stats()
    out: dict[str, int] = {}
    for role, members in spec.items():
        total = 0
        for pid, mode in members:
            root = stats.get(pid)
            if mode == "self":
                total += root.own if root else 0
                continue
            if mode == "tree" and root is not None:
                total += root.own
            if root is not None:
                total += root.children
            for d in descendants(pid, stats):
                total += stats[d].own + stats[d].children
        out[role] = total
    return out


def cpu_per_job(before: dict[str, int], after: dict[str, int], jobs: int) -> dict[str, float]:
    """Milliseconds of CPU per job, per role and in ``total``."""
    ms = {role: (after[role] - before[role]) / CLK_TCK * 1e3 / jobs for role in after}
    ms["total"] = sum(ms.values())
    return ms


def proc_status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def process_state(pid: int) -> str | None:
    """The state letter of ``/proc/PID/stat`` (``T`` when stopped), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()[0]
