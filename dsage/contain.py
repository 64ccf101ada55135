"""Keeping every process a job starts inside its slot, so that all of them die with it.

Three layers, each enough on its own for part of the job:

- Each slot is a child subreaper (``PR_SET_CHILD_SUBREAPER``): a descendant whose
  parent exits (a daemon that forked, called ``setsid()`` and forked again) is
  re-parented to the slot, not to init, so the slot's process tree holds every
  descendant while the slot lives (:func:`tree`, :func:`kill_tree`).
- Where the monitor may make cgroups (root, as CI runs), each slot process runs
  in cgroups of its own, ``dsage/m-PID-START/sN-G`` (PID and START name the
  monitor, G counts the slot's processes), chosen by :func:`choose`: cgroup v2,
  where ``cgroup.kill`` ends every member at once; else the v1 ``freezer``,
  ``pids`` and ``memory`` hierarchies (freeze, kill, thaw); else none. Either
  way the group is killed whatever its members did to their process tree, also
  after the slot itself died. A v1 memory group per slot holds its cap and
  tells an OOM kill (and whether the slot's own cap caused it).
- A watchdog process per monitor, in a session of its own, waits for its monitor's
  end (the pipe it reads from closes, also on ``kill -9``) and kills everything
  left in the monitor's cgroups; a monitor that starts kills what is left in the
  cgroups of monitors that are gone (:func:`sweep_stale`).

Nothing here imports more than the standard library's core: slots import it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

_PR_SET_CHILD_SUBREAPER = 36


def set_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux >= 3.4)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1) == 0
    except (OSError, AttributeError):
        return False


def children(pid: int) -> list[int]:
    """The direct children of a process (every thread's), from /proc."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return out


def tree(pid: int) -> list[int]:
    """Every descendant of a process, parents before children (not ``pid`` itself)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def kill_tree(pid: int, include_self: bool = True) -> int:
    """SIGKILL a process and all its descendants: each is stopped first (so none
    forks between the walk and the kill), then killed; walked again until no
    descendant is left. Returns how many were signalled."""
    killed = 0
    for _ in range(50):
        found = tree(pid)
        if not found:
            break
        for p in found:
            _signal(p, signal.SIGSTOP)
        for p in found:
            killed += _signal(p, signal.SIGKILL)
    if include_self:
        killed += _signal(pid, signal.SIGKILL)
    return killed


def _signal(pid: int, sig: int) -> int:
    try:
        os.kill(pid, sig)
        return 1
    except (ProcessLookupError, PermissionError):
        return 0


def has_children() -> bool:
    """Whether this process has a child (running, stopped or exited and not yet
    waited for; any thread's), asked in one system call that reaps none."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WSTOPPED | os.WCONTINUED | os.WNOHANG
                  | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def reap_children() -> int:
    """Collect every exited child (a subreaper inherits the zombies of orphans)."""
    n = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return n
        if pid == 0:
            return n
        n += 1


class Adopted:
    """A child this process adopted as a subreaper (a slot forked off the template):
    the part of ``subprocess.Popen`` the monitor uses of its slots."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -signal.SIGKILL  # reaped elsewhere: its status is lost
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            time.sleep(0.001)
        assert self.returncode is not None
        return self.returncode


def reap_strays(known: set[int]) -> int:
    """Kill and reap this process's children that are not ``known`` (the orphans a
    subreaper adopts: what a job left behind a slot that died). Returns how many."""
    n = 0
    for pid in children(os.getpid()):
        if pid in known:
            continue
        kill_tree(pid)
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                n += 1
        except ChildProcessError:
            pass
    return n


# --- cgroups: one interface, three backends

#: the ways of containing slots, best first: ``DSAGE_CGROUP`` picks one (default: the
#: first this machine allows)
BACKENDS = ("v2", "v1", "none")
#: the v1 hierarchies a slot joins: freezer (an atomic kill: freeze, kill, thaw), pids
#: (membership where there is no freezer) and memory (the cap, and OOM kill counts)
V1_CONTROLLERS = ("freezer", "pids", "memory")


@dataclass(frozen=True)
class Backend:
    """Where a monitor puts its cgroups. ``kind`` is 'v2', 'v1' or 'none' (a subreaper
    and the slot's process tree only); ``bases`` are the ``dsage`` folders, one per
    hierarchy, the one whose groups are killed first; ``memory`` is the v1 memory
    hierarchy's among them (per-slot caps and OOM counts), or None."""

    kind: str
    bases: tuple[str, ...] = ()
    memory: str | None = None

    def groups(self, parent: str) -> list[str]:
        """The folders named ``parent`` (a monitor's, 'm-PID-START', or a slot's below
        it, 'm-PID-START/sN-G') in every hierarchy of this backend, killer first."""
        return [os.path.join(base, parent) for base in self.bases]


def choose(wanted: str | None = None) -> Backend | None:
    """The containment backend ``wanted`` ('v2', 'v1', 'none'; default ``DSAGE_CGROUP``,
    else the best one here), or None when this machine does not allow it."""
    wanted = wanted or os.environ.get("DSAGE_CGROUP", "auto")
    if wanted == "auto":
        return next(filter(None, (choose(kind) for kind in BACKENDS)))
    if wanted == "none":
        return Backend("none")
    memory = _writable_base(*_v1_place("memory"))
    if wanted == "v2":
        base = _writable_base(*_v2_place())
        if base is None or not os.path.exists(os.path.join(base, "cgroup.kill")):
            return None  # none, or a kernel before 5.14: no atomic kill
        return Backend("v2", (base,) + ((memory,) if memory else ()), memory)
    if wanted == "v1":
        bases = tuple(b for b in (_writable_base(*_v1_place(c)) for c in V1_CONTROLLERS) if b)
        if not bases or bases == (memory,):
            return None  # memory alone cannot kill a group at once, nor list it cheaply
        return Backend("v1", bases, memory)
    raise ValueError(f"DSAGE_CGROUP={wanted!r}: use one of auto, {', '.join(BACKENDS)}")


def _mounts() -> list[list[str]]:
    try:
        with open("/proc/self/mounts") as f:
            return [line.split() for line in f]
    except OSError:
        return []


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup in each hierarchy: '' for v2, else each v1 controller."""
    out: dict[str, str] = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(",") if controllers else [""]:
                    out[c] = path
    except (OSError, ValueError):
        pass
    return out


def _v2_place() -> tuple[str | None, str]:
    mount = next((m[1] for m in _mounts() if len(m) > 2 and m[2] == "cgroup2"), None)
    return mount, _own_cgroups().get("", "/")


def _v1_place(controller: str) -> tuple[str | None, str]:
    mount = next((m[1] for m in _mounts() if len(m) > 3 and m[2] == "cgroup"
                  and controller in m[3].split(",")), None)
    return mount, _own_cgroups().get(controller, "/")


def _writable_base(mount: str | None, own: str) -> str | None:
    """The folder ``dsage`` beside this process's own cgroup of a hierarchy, made if
    needed; None where it cannot be made, or groups cannot be made in it."""
    if mount is None:
        return None
    base = os.path.join(mount, own.lstrip("/"), "dsage")
    try:
        os.makedirs(base, exist_ok=True)
        probe = os.path.join(base, f"probe-{os.getpid()}")
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError:
        return None
    return base


def _start_time(pid: int) -> str | None:
    """A process's start time in clock ticks (tells a pid from its reuse)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def monitor_group_name(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"m-{pid}-{_start_time(pid)}"


def monitor_alive(pid: int, start: str) -> bool:
    """Whether the monitor named ``m-PID-START`` (see :func:`monitor_group_name`) still
    runs: its pid exists and was not reused since."""
    return _start_time(pid) == start


def cgroup_procs(path: str, recursive: bool = True) -> list[int]:
    """The processes in a cgroup (and, with ``recursive``, in those below it)."""
    pids: list[int] = []
    for root, _dirs, _files in os.walk(path) if recursive else [(path, [], [])]:
        try:
            with open(os.path.join(root, "cgroup.procs")) as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return pids


def kill_cgroup(path: str) -> None:
    """SIGKILL every process in a cgroup and the cgroups below it: at once through
    ``cgroup.kill`` (v2); in a v1 freezer group, frozen first (so none forks between
    the listing and the kill), killed, thawed (so they exit); elsewhere (v1 pids,
    memory) killed by listing until none is left."""
    if _write(os.path.join(path, "cgroup.kill"), "1"):
        return
    state = os.path.join(path, "freezer.state")
    frozen = _write(state, "FROZEN")
    try:
        for _ in range(20):
            if frozen:
                _wait_frozen(state)
            pids = cgroup_procs(path)
            if not pids:
                return
            for pid in pids:
                _signal(pid, signal.SIGKILL)
            if frozen:  # frozen processes exit only once thawed
                _write(state, "THAWED")
            _wait_empty(path)
            if frozen:
                _write(state, "FROZEN")
    finally:
        if frozen:
            _write(state, "THAWED")


def _wait_empty(path: str, wait: float = 0.2) -> None:
    """Wait (up to ``wait`` s) until no process is left in a cgroup tree."""
    deadline = time.monotonic() + wait
    while cgroup_procs(path) and time.monotonic() < deadline:
        time.sleep(0.001)


def _write(path: str, text: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(text)
        return True
    except OSError:
        return False


def _wait_frozen(state: str, wait: float = 0.2) -> None:
    """Wait (up to ``wait`` s) until a v1 freezer group's state reads FROZEN."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            with open(state) as f:
                if f.read().strip() == "FROZEN":
                    return
        except OSError:
            return
        time.sleep(0.0005)


def remove_cgroup(path: str, wait: float = 0.0) -> bool:
    """Kill what is in a cgroup tree and remove its folders (deepest first); within
    ``wait`` seconds, retried while killed members are still exiting."""
    deadline = time.monotonic() + wait
    while True:
        kill_cgroup(path)
        left = False
        for root, _dirs, _files in sorted(os.walk(path), key=lambda w: -len(w[0])):
            try:
                os.rmdir(root)
            except FileNotFoundError:
                pass
            except OSError:
                left = True
        if not left or time.monotonic() > deadline:
            return not left
        time.sleep(0.01)


def make_cgroup(path: str, memory_limit: int | None = None) -> bool:
    """Make the cgroup ``path``; in a v1 memory hierarchy, capped at ``memory_limit``."""
    try:
        os.makedirs(path, exist_ok=True)
        if memory_limit and os.path.exists(os.path.join(path, "memory.limit_in_bytes")):
            with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
                f.write(str(memory_limit))
        return True
    except OSError:
        return False


def join_cgroup(path: str) -> bool:
    """Move this process into the cgroup ``path``, made if needed."""
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write("0")
        return True
    except OSError:
        return False


def sweep_stale(base: str) -> int:
    """Kill and remove the cgroups of monitors that are gone (a pid that no longer
    exists, or now names another process). Returns how many were removed."""
    n = 0
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    for name in names:
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != "m" or not parts[1].isdigit():
            continue
        if monitor_alive(int(parts[1]), parts[2]):
            continue
        remove_cgroup(os.path.join(base, name), wait=1.0)
        n += 1
    return n


# --- the watchdog


def start_watchdog(groups: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    """Start the watchdog of a monitor's cgroups ``groups`` (one per hierarchy, the
    killer first); returns it and the write end of its pipe (close it, or die, and the
    watchdog kills everything in the groups and removes them)."""
    r, w = os.pipe()
    os.set_inheritable(w, False)
    proc = subprocess.Popen(
        [sys.executable, "-S", "-c", ("import sys, types; p = types.ModuleType('dsage'); "
         "p.__path__ = [sys.argv[1]]; sys.modules['dsage'] = p; "
         "from dsage.contain import _watchdog; _watchdog(sys.argv[2:])"),
         os.path.dirname(os.path.abspath(__file__)), *groups],
        stdin=r, stdout=subprocess.DEVNULL, start_new_session=True)
    os.close(r)
    return proc, w


def _watchdog(groups: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        try:
            if not os.read(0, 4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    for group in groups:
        remove_cgroup(group, wait=5.0)


# --- memory (v1): what ended a slot


def oom_kills(path: str) -> int:
    """How many processes in a v1 memory cgroup (or below) any OOM killer killed: its
    own cap's, a parent group's or the kernel's."""
    return _counter(os.path.join(path, "memory.oom_control"), "oom_kill")


def cap_reached(path: str) -> bool:
    """Whether a v1 memory cgroup's own limit was ever reached (``memory.failcnt``)."""
    try:
        with open(os.path.join(path, "memory.failcnt")) as f:
            return int(f.read()) > 0
    except (OSError, ValueError):
        return False


def kernel_oom_kills() -> int:
    """The kernel's count of OOM kills (all of this machine)."""
    return _counter("/proc/vmstat", "oom_kill")


def _counter(path: str, name: str) -> int:
    """The value of a ``name value`` line in a kernel statistics file (0 if none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name + " "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _limits(pid: int | str) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f.readlines()[1:]:
                name, soft = line[:26].strip(), line[26:47].strip()
                out[name] = soft
    except OSError:
        pass
    return out


def lowered_limits(pid: int, ignore: tuple[str, ...] = ()) -> list[str]:
    """The resource limits a process (a slot, dead or alive) has lower than this
    process's own, as ``'Max cpu time 1 seconds'``."""
    mine, theirs = _limits("self"), _limits(pid)
    out = []
    for name, soft in theirs.items():
        own = mine.get(name)
        if name in ignore or own is None or own == soft or soft == "unlimited":
            continue
        if own == "unlimited" or (soft.isdigit() and own.isdigit() and int(soft) < int(own)):
            out.append(f"{name} {soft}")
    return out
