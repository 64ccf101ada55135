"""Keeping every process a job starts inside its slot, so that all of them die with it.

Three layers, each enough on its own for part of the job:

- Each slot is a child subreaper (``PR_SET_CHILD_SUBREAPER``): a descendant whose
  parent exits (a daemon that forked, called ``setsid()`` and forked again) is
  re-parented to the slot, not to init, so the slot's process tree holds every
  descendant while the slot lives (:func:`tree`, :func:`kill_tree`).
- Where a cgroup v2 hierarchy is writable (root, as CI runs), each slot process
  runs in a cgroup of its own, ``dsage/m-PID-START/sN-G`` (PID and START name the
  monitor, G counts the slot's processes). ``cgroup.kill`` ends every member at
  once, whatever it did to its process tree, also after the slot itself died.
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


# --- cgroups (v2)


def _v2_mount() -> str | None:
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "cgroup2":
                    return parts[1]
    except OSError:
        pass
    return None


def _own_v2_path() -> str:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return "/"


def cgroup_base() -> str | None:
    """The folder dsage's cgroups go in (``dsage`` beside this process's own v2
    cgroup), made if needed; None where no writable cgroup v2 hierarchy exists."""
    mount = None if os.environ.get("DSAGE_CGROUPS") == "0" else _v2_mount()
    if mount is None:
        return None
    base = os.path.join(mount, _own_v2_path().lstrip("/"), "dsage")
    try:
        os.makedirs(base, exist_ok=True)
        if not os.path.exists(os.path.join(base, "cgroup.kill")):
            return None  # a kernel before 5.14: no atomic kill
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
    """SIGKILL every process in a cgroup and the cgroups below it, at once."""
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
    except OSError:
        pass


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
        if _start_time(int(parts[1])) == parts[2]:
            continue  # its monitor is alive
        remove_cgroup(os.path.join(base, name), wait=1.0)
        n += 1
    return n


# --- the watchdog


def start_watchdog(group: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start the watchdog of a monitor's cgroup ``group``; returns it and the write
    end of its pipe (close it, or die, and the watchdog kills everything in the
    group and removes it)."""
    r, w = os.pipe()
    os.set_inheritable(w, False)
    proc = subprocess.Popen(
        [sys.executable, "-S", "-c", ("import sys, types; p = types.ModuleType('dsage'); "
         "p.__path__ = [sys.argv[2]]; sys.modules['dsage'] = p; "
         "from dsage.contain import _watchdog; _watchdog(sys.argv[1])"), group,
         os.path.dirname(os.path.abspath(__file__))],
        stdin=r, stdout=subprocess.DEVNULL, start_new_session=True)
    os.close(r)
    return proc, w


def _watchdog(group: str) -> None:
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
    remove_cgroup(group, wait=5.0)


# --- memory cgroups (v1), for a per-slot memory cap the OOM killer enforces


def memory_cgroup_base() -> str | None:
    """The folder for dsage's v1 memory cgroups (``dsage`` beside this process's own),
    made if needed; None where there is no writable v1 memory hierarchy."""
    if os.environ.get("DSAGE_CGROUPS") == "0":
        return None
    mount = None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 3 and parts[2] == "cgroup" and "memory" in parts[3].split(","):
                    mount = parts[1]
        own = "/"
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    own = path
    except (OSError, ValueError):
        return None
    if mount is None:
        return None
    base = os.path.join(mount, own.lstrip("/"), "dsage")
    try:
        os.makedirs(base, exist_ok=True)
    except OSError:
        return None
    return base


def make_memory_cgroup(path: str, limit: int) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))
        return True
    except OSError:
        return False


def oom_kills(path: str) -> int:
    """How many processes the OOM killer killed in a v1 memory cgroup."""
    return _counter(os.path.join(path, "memory.oom_control"), "oom_kill")


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
