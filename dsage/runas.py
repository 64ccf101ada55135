"""Running jobs as another, unprivileged user (``dsage-worker --run-as USER``).

A monitor that runs as root starts each slot as root, so that it can place the
slot in its cgroups; the slot then drops to the run-as user (supplementary
groups, group, user, in that order) before it reads a job, so no job ever runs
with the monitor's rights and cannot read its secret key or the dsage home.

Python itself may live where that user cannot look (pyenv under ``/root``, which
is 0700). The slot opens the folders it imports from while it is still root, and
after the drop reaches those the user could not reach through its own open
folders (``/proc/self/fd/N``): the user reads what the slot was given to import
and nothing around it (a folder closed to it stays closed below that point too).

The monitor's side (:func:`resolve`, :func:`working_folder`) and the slot's
(:func:`drop`) are here; only the standard library's core is imported: slots
import this module.
"""

from __future__ import annotations

import os
import pwd
import sys
from dataclasses import dataclass

from .contain import monitor_alive, monitor_group_name

#: the user jobs of an anonymous-facing monitor run as when the monitor is root
DEFAULT_ANONYMOUS_USER = "nobody"


class RunAsError(Exception):
    """``--run-as`` cannot be honoured; the message says why and what to do."""


@dataclass(frozen=True)
class RunAs:
    """The user jobs run as."""

    name: str
    uid: int
    gid: int


def lookup(name: str) -> RunAs:
    """The user called ``name`` (or with that numeric id)."""
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, OverflowError):
        raise RunAsError(f"--run-as {name}: there is no such user on this machine") from None
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def resolve(run_as: str | None, anonymous: bool) -> RunAs | None:
    """Whom the slots of a monitor run as (None: the monitor's own user).

    ``run_as`` given: that user, which needs the monitor to be root. Not given: an
    anonymous monitor (one that serves strangers' jobs) run by root uses
    ``nobody``; any other monitor runs jobs as its own user. Naming root itself
    (``--run-as root``) keeps jobs as root, on purpose."""
    root = os.geteuid() == 0
    if run_as is None:
        if not (anonymous and root):
            return None
        run_as = DEFAULT_ANONYMOUS_USER
    user = lookup(run_as)
    if not root and user.uid != os.geteuid():
        raise RunAsError(f"--run-as {run_as}: only a monitor that runs as root can run jobs "
                         f"as another user (this one runs as uid {os.geteuid()}); start it "
                         f"as root, or start it as {run_as} without --run-as")
    return None if user.uid == os.geteuid() else user


def working_folder(base: str, user: RunAs) -> str:
    """A folder for the slots' files that ``user`` owns (mode 0700), inside a folder
    of root's (0711) that it cannot rename or replace, made under ``base`` and named
    after this monitor. The dsage home stays closed to the user. Those that monitors
    killed before they could remove theirs left are removed first: what jobs left in
    them is no later job's to read."""
    import tempfile

    sweep_stale(base)
    outer = tempfile.mkdtemp(prefix=f"dsage-{user.name}-{monitor_group_name()}-", dir=base)
    os.chmod(outer, 0o711)
    inner = os.path.join(outer, "work")
    os.mkdir(inner, 0o700)
    os.chown(inner, user.uid, user.gid)
    return inner


def sweep_stale(base: str) -> int:
    """Remove the working folders (``dsage-USER-m-PID-START-XXXX``, root's) of
    monitors that are gone; returns how many."""
    import shutil
    import stat

    n = 0
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    for name in names:
        head, sep, tail = name.partition("-m-")
        parts = tail.split("-")
        if not (head.startswith("dsage-") and sep and len(parts) == 3 and parts[0].isdigit()):
            continue
        if monitor_alive(int(parts[0]), parts[1]):
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == 0:  # made by a monitor, as root
            shutil.rmtree(path, ignore_errors=True)
            n += 1
    return n


def drop(name: str, home: str) -> None:
    """Become the user ``name`` for good (this process and all it starts), keeping
    what is already imported and the folders on the import path importable; ``home``
    (its working folder) becomes ``$HOME``. Raises :class:`RunAsError` when the
    change does not hold."""
    user = lookup(name)
    held = _hold_import_folders()
    os.initgroups(user.name, user.gid)
    os.setgid(user.gid)
    os.setuid(user.uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise RunAsError(f"could not give up root for {user.name}")
    if os.getuid() != user.uid or os.geteuid() != user.uid or os.getegid() != user.gid:
        raise RunAsError(f"could not become {user.name}")
    _reroute_imports(held)
    os.environ.update(USER=user.name, LOGNAME=user.name, HOME=home)


def _hold_import_folders() -> dict[str, int]:
    """Open every folder Python imports from (``sys.path`` and the packages already
    loaded), while this process may still open them."""
    folders = [p for p in sys.path if p] + [
        p for m in list(sys.modules.values()) for p in (getattr(m, "__path__", None) or [])
        if isinstance(p, str)]
    held: dict[str, int] = {}
    for path in dict.fromkeys(os.path.abspath(p) for p in folders):
        try:
            held[path] = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            pass
    return held


def _reroute_imports(held: dict[str, int]) -> None:
    """After the drop: a held folder the user can reach keeps its path (its fd is
    closed); one it cannot is reached through the fd (``/proc/self/fd/N``)."""
    moved: dict[str, str] = {}
    for path, fd in held.items():
        if os.access(path, os.R_OK | os.X_OK):
            os.close(fd)
        else:
            moved[path] = f"/proc/self/fd/{fd}"
    if not moved:
        return

    def via(path: str) -> str:
        return moved.get(os.path.abspath(path), path) if path else path

    sys.path[:] = [via(p) for p in sys.path]
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if isinstance(paths, list) and paths and all(isinstance(p, str) for p in paths):
            paths[:] = [via(p) for p in paths]
    sys.path_importer_cache.clear()
