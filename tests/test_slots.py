"""Slots contain their jobs: every descendant dies with the job, a monitor whose slots
cannot start steps back, and what a job changes does not reach the next job."""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dsage
from dsage import JobWrapper, ManagedProcess, contain, versions
from dsage.protocol import new_job_id
from dsage.slot import JobFolders, ModuleWatch, recv_frame, send_frame, spare_folder

from .conftest import Procs, all_gone, done, skip_or_fail, wait_for

#: a job that starts a daemon (fork, setsid, fork, sleep: no exec) and a plain child
#: process, writes their pids to PIDS, then runs TAIL
DAEMONS = """
import os, subprocess, time
path = {path!r}
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        with open(path, 'a') as f:
            f.write(f'{{os.getpid()}}\\n')
        time.sleep(300)
    os._exit(0)
os.waitpid(pid, 0)
p = subprocess.Popen(['sleep', '43'])
with open(path, 'a') as f:
    f.write(f'{{p.pid}}\\n')
deadline = time.monotonic() + 20
while len(open(path).read().split()) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)  # the daemon has written its pid
{tail}
"""


def started_pids(path: Path, n: int = 2) -> list[int]:
    def read() -> list[int] | None:
        try:
            pids = [int(x) for x in path.read_text().split()]
        except FileNotFoundError:
            return None
        return pids if len(pids) >= n else None
    return wait_for(read, 30, f"{n} pids in {path}")


def daemon_job(tmp_path: Path, tail: str) -> tuple[str, Path]:
    path = tmp_path / "pids"
    return DAEMONS.format(path=str(path), tail=tail), path


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def kill_all(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def use_backend(kind: str, monkeypatch: pytest.MonkeyPatch) -> contain.Backend:
    """Have the monitors this test starts contain their slots the way ``kind`` says
    ('v2', 'v1' or 'none'); skip (fail in CI) where this machine does not allow it."""
    backend = contain.choose(kind)
    if backend is None:
        skip_or_fail(f"no writable cgroup {kind} hierarchy (needs root and cgroup {kind})")
    assert backend is not None
    monkeypatch.setenv("DSAGE_CGROUP", kind)
    return backend


@pytest.fixture(params=["v2", "v1", "none"])
def contained(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every way of finding a job's descendants: its slot's cgroup v2, its slot's v1
    freezer, pids and memory groups, and (as on a machine without cgroups) its slot's
    process tree."""
    use_backend(request.param, monkeypatch)
    return str(request.param)


@pytest.fixture(params=["v2", "v1"])
def cgroups(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
            ) -> contain.Backend:
    """Each cgroup backend in turn (what needs a cgroup: the slot outlived by its
    descendants, a monitor killed -9)."""
    return use_backend(request.param, monkeypatch)


@pytest.fixture
def one_slot(procs: Procs) -> dsage.DSage:
    procs.broker()
    procs.worker(1, grace=0.5)
    d = procs.client()
    procs.wait_workers(d, 1)
    return d


@pytest.fixture(params=["reused", "isolated"])
def any_slot(request: pytest.FixtureRequest, procs: Procs) -> dsage.DSage:
    """A one-slot monitor whose slot runs every job (started by the monitor), or
    a fresh slot per job (``--isolate``: forked off the monitor's template)."""
    procs.broker()
    procs.worker(1, grace=0.5, isolate=request.param == "isolated")
    d = procs.client()
    procs.wait_workers(d, 1)
    return d


# --- 1. every descendant of a job dies with it


def test_descendants_die_when_the_job_returns(contained: str, any_slot: dsage.DSage,
                                              tmp_path: Path) -> None:
    code, path = daemon_job(tmp_path, "'done'")
    j = done(any_slot(code), 60)
    pids = started_pids(path)
    try:
        assert j.status == "completed", (j.status, j.error)
        all_gone(pids, 5)
        assert any_slot("2+2").result(30) == 4
    finally:
        kill_all(pids)


def test_descendants_die_on_timeout_and_the_slot_is_free(contained: str, any_slot: dsage.DSage,
                                                         tmp_path: Path) -> None:
    code, path = daemon_job(tmp_path, "time.sleep(300)")
    t0 = time.monotonic()
    j = any_slot(code, timeout=2)
    pids = started_pids(path)
    try:
        j.wait(30)
        assert j.status == "failed" and "timed out" in (j.error or ""), (j.status, j.error)
        assert time.monotonic() - t0 < 20
        all_gone(pids)
        assert any_slot("2+2").result(30) == 4
    finally:
        kill_all(pids)


def test_descendants_die_on_kill_and_the_slot_is_free(contained: str, any_slot: dsage.DSage,
                                                      tmp_path: Path) -> None:
    code, path = daemon_job(tmp_path, "time.sleep(300)")
    j = any_slot(code, timeout=None)
    pids = started_pids(path)
    try:
        j.kill()
        wait_for(lambda: j.status == "killed", 20, "the kill")
        all_gone(pids)
        assert any_slot("2+2").result(30) == 4
    finally:
        kill_all(pids)


def test_descendants_die_when_an_isolated_slot_crashes(contained: str, procs: Procs,
                                                     tmp_path: Path) -> None:
    """A slot that dies first leaves its job's descendants to the monitor (the
    subreaper of the slots it forks), which kills them, with or without cgroups."""
    procs.broker()
    worker = procs.worker(1, isolate=True)
    d = procs.client()
    procs.wait_workers(d, 1)
    code, path = daemon_job(tmp_path, "os._exit(3)")
    j = done(d(code), 60)
    pids = started_pids(path)
    try:
        assert j.status == "failed" and "status 3" in (j.error or ""), (j.status, j.error)
        all_gone(pids)
        assert d("2+2").result(30) == 4
        wait_for(lambda: not [p for p in contain.children(worker.pid) if p in pids], 10,
                 "the monitor to reap what it adopted")
    finally:
        kill_all(pids)


@pytest.mark.parametrize("isolate", [False, True])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_descendants_die_with_their_monitor(cgroups: contain.Backend, procs: Procs,
                                            tmp_path: Path, sig: signal.Signals,
                                            isolate: bool) -> None:
    procs.broker()
    worker = procs.worker(1, grace=0.5, isolate=isolate)
    d = procs.client()
    procs.wait_workers(d, 1)
    code, path = daemon_job(tmp_path, "time.sleep(300)")
    d(code, timeout=None)
    pids = started_pids(path)
    try:
        if sig == signal.SIGKILL:
            procs.kill9(worker)
        else:
            os.kill(worker.pid, sig)
            worker.proc.wait(20)
        all_gone(pids)
    finally:
        kill_all(pids)


def test_a_monitor_kills_what_is_left_in_the_cgroups_of_a_dead_one(
        cgroups: contain.Backend) -> None:
    # a "monitor" that is gone: a pid that does not exist, with a process in its
    # groups, and a process that forks all the time (each child forks again) in the
    # group that is killed first
    groups = cgroups.groups("m-999999999-1/s0-1")
    procs = [subprocess.Popen(["sleep", "41"]),
             subprocess.Popen(["sh", "-c", "while :; do sh -c 'sleep 0.01' & wait; done"])]
    try:
        for group in groups:
            os.makedirs(group)
            with open(os.path.join(group, "cgroup.procs"), "w") as f:
                f.write(str(procs[0].pid))
        with open(os.path.join(groups[0], "cgroup.procs"), "w") as f:
            f.write(str(procs[1].pid))
        assert sum(contain.sweep_stale(base) for base in cgroups.bases) >= len(groups)
        for p in procs:
            assert p.wait(10) == -signal.SIGKILL
        for group in groups:
            assert not os.path.exists(os.path.dirname(group))
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for group in groups:
            contain.remove_cgroup(os.path.dirname(group), wait=2)


def test_a_forked_child_does_not_hold_the_slot_pipe(one_slot: dsage.DSage) -> None:
    """A child that forks (no exec) gets /dev/null where the slot's pipe was."""
    code = """
import os, sys
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    fd = int(sys.argv[1])
    os.write(w, os.readlink(f'/proc/self/fd/{fd}').encode())
    os._exit(0)
os.waitpid(pid, 0)
os.read(r, 1000).decode()
"""
    assert one_slot(code).result(30) == "/dev/null"


def test_has_children_sees_running_and_exited_children_and_reaps_none() -> None:
    """The slot's one-call check for children before it walks /proc (in a process of
    its own: the test's may have children of other tests)."""
    code = """
import os, sys, time
from dsage.contain import has_children
seen = [has_children()]
pid = os.fork()
if pid == 0:
    time.sleep(0.5)
    os._exit(0)
seen.append(has_children())
while not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] != "Z":
    time.sleep(0.01)
seen.append(has_children())  # exited, not waited for: still there to reap
seen.append(os.waitpid(pid, 0)[0] == pid)
seen.append(has_children())
print(seen)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[False, True, True, True, False]", (r.stdout, r.stderr)


# --- 2. a monitor that cannot start slots says so and steps back


def test_a_job_that_removes_the_worker_temp_folder_breaks_nothing(one_slot: dsage.DSage) -> None:
    code = "import os, shutil; shutil.rmtree(os.path.dirname(os.getcwd())); 'gone'"
    j = done(one_slot(code), 30)
    assert j.status == "completed" and j.result() == "gone", (j.status, j.error)
    for _ in range(3):
        assert one_slot("import os; os.getcwd() and 2+2").result(30) == 4


def test_a_monitor_whose_slots_cannot_start_steps_back_and_recovers(
        procs: Procs, home: Path) -> None:
    procs.broker()
    worker = procs.worker(1)
    d = procs.client()
    procs.wait_workers(d, 1)
    tmp = home / "tmp_worker_files"
    # the job replaces the worker's temp folder with a file: no slot can start there
    j = d(f"import shutil; shutil.rmtree({str(tmp)!r}); open({str(tmp)!r}, 'w').close()")
    j.wait(30)
    wait_for(lambda: "fail to start" in worker.log.read_text(), 20, "the monitor to say so")
    later = d("2+2")
    time.sleep(0)  # (no wait: the job must stay queued while the monitor steps back)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert later.status in ("new", "processing"), later.status
        time.sleep(0.1)
    log = worker.log.read_text()
    assert log.count("Traceback") == 0, log[-3000:]
    assert log.count("fail to start") == 1, log[-3000:]
    tmp.unlink()
    assert later.result(60) == 4
    assert "start again" in worker.log.read_text()


# --- 3. what a job changes does not reach the next job

LEAKS = {
    "builtins": ("import builtins; builtins.sum = lambda *a: 42", "sum([1, 2])", 3),
    # builtins the slot's own code calls after the job: its answer comes all the same
    "builtins_the_slot_uses": (
        "import builtins; builtins.len = builtins.type = builtins.isinstance = None\n"
        "builtins.max = lambda *a: 1 / 0", "len('ab')", 2),
    # names of modules the slot's own code calls after the job (a mocked clock, a fake
    # file system, a patched socket): its answer comes all the same
    "modules_the_slot_uses": (
        "import os, resource, socket, sys, time\n"
        "time.time = lambda: 0.0; os.fstat = os.chdir = None; del os.pread\n"
        "sys.getrecursionlimit = resource.setrlimit = None\n"
        "socket.socket.sendmsg = None; socket.socket.recv_into = None",
        "import os, time; (time.time() > 1e9, os.fstat(0) is not None, 'pread' in dir(os))",
        (True, True, True)),
    "module": ("import math; math.pi = 3", "import math; math.pi", 3.141592653589793),
    # modules the slot had not loaded: the job imports one, then changes it
    "new_module": ("import colorsys; colorsys.rgb_to_hsv = lambda *a: 'x'",
                   "import colorsys; colorsys.rgb_to_hsv(1, 0, 0)", (0.0, 1.0, 1.0)),
    "new_module_class": ("import fractions; fractions.Fraction.__add__ = lambda a, b: 42",
                         "from fractions import Fraction as F; str(F(1, 2) + F(1, 2))", "1"),
    "class": ("import json; json.JSONEncoder.encode = lambda self, o: 'x'",
              "import json; json.dumps([1])", "[1]"),
    "environ": ("import os; os.environ['DSAGE_LEAK'] = '1'; os.environ.pop('PATH', None)",
                "import os; ('DSAGE_LEAK' in os.environ, 'PATH' in os.environ)",
                (False, True)),
    "thread": (("import threading, time\n"
               "def spam():\n"
               "    while True:\n"
               "        print('LEAK', flush=True)\n"
               "        time.sleep(0.01)\n"
               "threading.Thread(target=spam, daemon=True).start()\ntime.sleep(0.05)"),
               "import time; print('clean'); time.sleep(0.3); 1", 1),
    "alarm": ("import signal; signal.alarm(2)", "import time; time.sleep(3); 'survived'",
              "survived"),
    "handler": ("import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)",
                "import signal; signal.getsignal(signal.SIGTERM) is signal.SIG_DFL", True),
    "itimer": ("import signal; signal.setitimer(signal.ITIMER_REAL, 1.5)",
               "import time; time.sleep(2.5); 'survived'", "survived"),
    "dup2": ("import os; os.dup2(os.open(os.devnull, os.O_WRONLY), 1)",
             "print('visible'); 1", 1),
    "close": ("import os; os.close(1)", "print('visible'); 1", 1),
    "recursion": ("import sys; sys.setrecursionlimit(60)",
                  "def f(n): return 0 if n == 0 else 1 + f(n - 1)\nf(500)", 500),
    "streams": (("import io, sys; sys.stdout = io.StringIO(); sys.argv = ['x']; "
                "sys.path.insert(0, '/nonexistent')"),
                "import sys; print('visible'); ('/nonexistent' in sys.path, sys.argv != ['x'])",
                (False, True)),
    "umask": ("import os; os.umask(0o777)", "import os; m = os.umask(0o22); os.umask(m); m",
              None),
    "open_file": ("import os; os.open('/etc/hostname', os.O_RDONLY)",
                  "import os; len(os.listdir('/proc/self/fd'))", None),
    # settings held by the interpreter or the C library, not by a name
    "gc": ("import gc; gc.disable(); gc.set_threshold(1)",
           "import gc; (gc.isenabled(), gc.get_threshold())", None),
    "trace": ("import sys\ndef quiet(*args): return None\n"
              "sys.settrace(quiet); sys.setprofile(quiet)",
              "import sys; (sys.gettrace(), sys.getprofile())", (None, None)),
    "switch_interval": ("import sys; sys.setswitchinterval(1.0)",
                        "import sys; sys.getswitchinterval()", None),
    "int_digits": ("import sys; sys.set_int_max_str_digits(640)",
                   "import sys; sys.get_int_max_str_digits()", None),
    "socket_timeout": ("import socket; socket.setdefaulttimeout(0.001)",
                       "import socket; socket.getdefaulttimeout()", None),
    "faulthandler": ("import faulthandler; faulthandler.enable()",
                     "import faulthandler; faulthandler.is_enabled()", None),
    "locale": ("import locale; locale.setlocale(locale.LC_ALL, 'C.UTF-8')",
               "import locale; locale.setlocale(locale.LC_ALL)", None),
    "time_zone": ("import os, time; os.environ['TZ'] = 'Asia/Tokyo'; time.tzset()",
                  "import time; time.tzname", None),
    "decimal": ("import decimal; decimal.getcontext().prec = 3",
                "import decimal; str(decimal.Decimal(1) / 3)", None),
    "warnings": ("import warnings; warnings.simplefilter('error')",
                 "import warnings\ntry:\n    warnings.warn('x')\n    r = 'warned'\n"
                 "except Warning:\n    r = 'raised'\nr", "warned"),
    "logging": ("import logging; logging.basicConfig(level=logging.DEBUG); logging.disable(50)",
                "import logging; r = logging.root\n(r.level, r.handlers, r.manager.disable)",
                None),
    # a module removed from sys.modules, imported again and changed: the new copy
    "imported_anew": ("import sys, json\ndel sys.modules['json']\nimport json\n"
                      "json.dumps = lambda *a, **k: 'changed'",
                      "import json; json.dumps([1])", "[1]"),
    "sys_modules": ("import sys; sys.modules.clear()",
                    "import sys, json; sys.modules['json'] is json and len(sys.modules) > 50",
                    True),
}


def test_a_job_that_breaks_builtins_and_raises_fails_with_its_own_error(
        one_slot: dsage.DSage) -> None:
    """The slot reports a job's exception with type() and isinstance(): a job that had
    replaced them made its slot crash (the job "exited with status 0"). Builtins are
    put back as soon as the job's code ends, before the slot's own code runs."""
    j = done(one_slot("import builtins\nbuiltins.type = builtins.isinstance = None\n"
                      "builtins.str = builtins.len = None\nraise KeyError('its own')"), 30)
    assert j.status == "failed" and "KeyError: 'its own'" in (j.error or ""), j.error
    assert one_slot("str(len('abc'))").result(30) == "3"


@pytest.mark.parametrize("name", list(LEAKS))
def test_a_job_does_not_change_the_next_one(one_slot: dsage.DSage, name: str) -> None:
    leak, check, expected = LEAKS[name]
    if expected is None:  # whatever a fresh slot says
        expected = one_slot(check).result(30)
    first = done(one_slot(leak), 30)
    assert first.status == "completed", (first.status, first.error)
    j = done(one_slot(check), 30)
    assert j.status == "completed", (name, j.status, j.error, j.output)
    assert j.result() == expected, (name, j.result())
    if name in ("thread", "dup2", "close", "streams"):
        out = j.output or ""
        assert "LEAK" not in out, out
        if name != "thread":
            assert "visible" in out, out


def test_a_slot_answers_before_it_puts_itself_back_and_then_asks_to_be_replaced(
        tmp_path: Path) -> None:
    """The result leaves before the slot restores itself; a slot that cannot then says
    so in a frame of its own and starts nothing more, not even a job already sent."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsage.slot", str(theirs.fileno()), str(tmp_path / "cap"),
         str(tmp_path / "work"), "0"], pass_fds=[theirs.fileno()], process_group=0)
    theirs.close()
    try:
        ours.settimeout(60)
        assert recv_frame(ours)[0]["ready"]
        first, second = new_job_id(), new_job_id()
        for jid, code in ((first, "import math; math.pi = 3; 1"), (second, "2")):
            send_frame(ours, {"id": jid, "kind": "python", "attempt": 1}, code.encode())
        reply = recv_frame(ours)[0]
        assert (reply["id"], reply["status"], "replace" in reply) == (first, "completed", False)
        assert recv_frame(ours)[0] == {"replace": "it changed math", "id": first}
        ours.shutdown(socket.SHUT_WR)
        assert proc.wait(60) == 0
        assert recv_frame_or_end(ours) is None  # the second job never ran
        assert not (tmp_path / "work" / second).exists()
    finally:
        ours.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def recv_frame_or_end(sock: socket.socket) -> dict[str, Any] | None:
    try:
        return recv_frame(sock)[0]
    except EOFError:
        return None


def dirty_then_clean(procs: Procs, objects: int
                     ) -> tuple[ManagedProcess, dsage.DSage, JobWrapper, JobWrapper]:
    """A monitor of one slot, and two jobs on it: one that changes its slot and leaves it
    a long reset (a garbage collection over ``objects`` lists, as it left a file open),
    and one queued behind it. Both give their slot's pid; the second also math.pi."""
    procs.broker()
    worker = procs.worker(1, grace=0.5, memory_growth=100.0)  # (the job grows its slot)
    d = procs.client()
    procs.wait_workers(d, 1)
    dirty = d(f"import math, os; math.pi = 3; math.keep = [[] for _ in range({objects})]; "
              "math.f = open(os.devnull); os.getpid()")
    clean = d("import math, os; (math.pi, os.getpid())")
    assert done(dirty, 60).status == "completed", (dirty.status, dirty.error)
    return worker, d, dirty, clean


def test_a_job_sent_to_a_slot_that_asks_to_be_replaced_runs_in_a_fresh_one(
        procs: Procs) -> None:
    """The job queued behind one that changes its slot is handed to that slot while it
    puts itself back (which here takes long); it is never started there, but given to
    the fresh slot that replaces it, with no failure counted."""
    worker, _, dirty, clean = dirty_then_clean(procs, 10**6)
    assert done(clean, 60).status == "completed", (clean.status, clean.error)
    pi, pid = clean.result()
    assert pi == math.pi and pid != dirty.result()
    assert clean.failures == 0 and clean.attempt == 1
    assert f"job {clean.job_id}, sent to slot 0 since, goes to the fresh one" \
        in worker.log.read_text()


def test_a_job_sent_to_a_replaced_slot_of_a_stopping_monitor_goes_back(procs: Procs) -> None:
    """As above, with the monitor told to stop while the slot puts itself back: the job
    handed to it goes back to the broker (its other jobs went already), counting no
    failure, and runs on the next monitor."""
    first, _, _, clean = dirty_then_clean(procs, 2 * 10**6)
    os.kill(first.pid, signal.SIGTERM)  # the slot is still collecting the garbage
    first.proc.wait(60)
    assert f"job {clean.job_id}, sent to slot 0 since, goes back to the broker" \
        in first.log.read_text()
    procs.worker(1)
    assert clean.result(60)[0] == math.pi and clean.failures == 0


def test_output_is_kept_when_a_job_closes_its_own_fds(one_slot: dsage.DSage) -> None:
    j = done(one_slot("import os, sys; print('before', flush=True); os.close(1); os.close(2); "
                 "sys.stdout = None; 7"), 30)
    assert j.status == "completed" and j.result() == 7, (j.status, j.error)
    assert "before" in (j.output or "")


def test_innocent_jobs_keep_their_slot(one_slot: dsage.DSage) -> None:
    """Ordinary jobs (code, functions, imports, printing, failures) change nothing
    that makes their slot be replaced: one process runs them all."""
    jobs = [one_slot("import os; os.getpid()"),
            one_slot.eval_function(os.getpid),
            one_slot("import json, collections, decimal; print('x'); open('f', 'w').write('x')"),
            one_slot.eval_function(sorted, [[3, 1, 2]]),
            one_slot("raise ValueError('no')"),
            one_slot("import subprocess; subprocess.run(['true']).returncode"),
            # modules that set their own names on first use
            one_slot("import tempfile, platform; tempfile.gettempdir(); platform.system()"),
            one_slot("import os; os.getpid()")]
    for j in jobs:
        j.wait(30)
    assert jobs[0].result() == jobs[1].result() == jobs[-1].result(), [j.result() for j in jobs]


#: what a job may do to its own folder before it returns
FOLDER_LEFT = ["", "open('f', 'w').write('x')", "os.mkdir('sub')", "os.chmod('.', 0o755)",
               "os.rmdir(os.getcwd())", "d = os.getcwd(); os.rmdir(d); open(d, 'w').write('x')",
               "d = os.getcwd(); os.rmdir(d); os.symlink('/', d)", ""]


def test_each_job_gets_an_empty_folder_of_its_own(one_slot: dsage.DSage) -> None:
    """Jobs on one slot each run in an empty folder of mode 0700 named by their id,
    whatever the job before did to its own (left it empty or not, changed its mode,
    removed it, put a file or a link in its place); no job's folder outlives it."""
    seen = []
    for leave in FOLDER_LEFT:
        code = ("import os, stat\nhere = (os.getpid(), os.getcwd(), os.listdir('.'), "
                f"stat.S_IMODE(os.stat('.').st_mode))\n{leave}\nhere")
        j = done(one_slot(code), 30)
        assert j.status == "completed", (leave, j.status, j.error)
        pid, cwd, entries, mode = j.result()
        assert (Path(cwd).name, entries, mode) == (j.job_id, [], 0o700), (leave, j.result())
        wait_for(lambda: not os.path.lexists(cwd), 10, f"the folder of a job that ran {leave!r}")
        seen.append(pid)
    assert len(set(seen)) == 1, seen  # one slot ran them all


def test_a_jobs_folder_is_handed_on_only_as_it_was_made(tmp_path: Path) -> None:
    """What the slot does with each job's folder (its spare one, renamed), with every
    unchanged modification time trusted from the first job on: a folder a job left
    files in, or changed, is never handed on; one it added to and emptied again is."""
    folders = JobFolders(str(tmp_path), str(tmp_path / spare_folder(".slot-0.out")))
    folders.SETTLED_NS = 0
    here = os.getcwd()
    kept = []
    try:
        for i, leave in enumerate(["", "", "open('f', 'w').close()", "", "",
                                   "os.mkdir('d'); os.rmdir('d')", "", "os.chmod('.', 0o750)",
                                   "open('g', 'w').close()", "os.rmdir(os.getcwd())", ""]):
            job_dir = folders.enter(f"job{i}")
            assert os.getcwd() == job_dir and os.listdir(job_dir) == [], (i, leave)
            assert stat.S_IMODE(os.stat(job_dir).st_mode) == 0o700, (i, leave)
            exec(leave)
            os.chdir(tmp_path)
            folders.leave(job_dir)
            assert not os.path.lexists(job_dir), (i, leave)
            kept.append(os.listdir(tmp_path) == [os.path.basename(folders.spare)])
    finally:
        os.chdir(here)
    assert kept == [True, True, False, True, True, True, True, False, False, False, True]


def test_a_slot_leaves_no_folder_behind(procs: Procs, home: Path) -> None:
    """The spare folder a slot keeps for its next job goes with the slot: when it is
    recycled, and when its monitor stops."""
    procs.broker()
    worker = procs.worker(1, max_jobs_per_slot=2)
    d = procs.client()
    procs.wait_workers(d, 1)
    pids = {d("import os; os.getpid()").result(30) for _ in range(5)}
    assert len(pids) == 3, pids  # two slots recycled, the third one has run one job
    folders = home / "tmp_worker_files"
    wait_for(lambda: [p.name for p in folders.iterdir() if p.is_dir()]
             == [spare_folder(p.name) for p in folders.glob("*.out")], 10,
             "only the live slot's spare folder left")
    worker.stop()
    assert [p.name for p in folders.iterdir()] == []


@pytest.fixture
def watched() -> Iterator[types.ModuleType]:
    """A module of the test's own in ``sys.modules``: a name, a class and its subclass."""
    m = types.ModuleType("dsage_watched")
    exec("class Base:\n    def f(self): return 1\nclass Sub(Base): pass\nvalue = 1\nlate = None\n",
         m.__dict__)
    sys.modules[m.__name__] = m
    try:
        yield m
    finally:
        del sys.modules[m.__name__]


@pytest.mark.parametrize("tags", [True, False], ids=["version-tags", "contents"])
def test_the_module_watch_reports_rebound_names_and_nothing_else(watched: types.ModuleType,
                                                                 tags: bool) -> None:
    """Told by CPython's version tags or by the namespaces' contents alike: a rebound
    module name or class attribute is reported; a private name, a name that was None,
    a name bound again to the same object, or a subclass whose base changed is not
    (and the next check starts from there)."""
    if tags and not versions.WORKS:
        skip_or_fail(f"no version tags to read on {sys.implementation.name} {sys.version}")
    watch = ModuleWatch(tags=tags)
    assert watch.tags is tags and watch.changed() == []
    watched._cache, watched.late, watched.Base._seen = {}, "set on first use", 1
    watched.value = 1  # the same object
    assert watch.changed() == []
    watched.value = 2
    assert watch.changed() == ["dsage_watched"]
    watched.value = 1
    assert watch.changed() == []
    watched.Base.f = lambda self: 2
    assert watch.changed() == ["dsage_watched.Base"]
    del watched.Base.f
    assert watch.changed() == ["dsage_watched.Base"]
    watched.Base.f = watch.class_copies[watch.classes.index(watched.Base)]["f"]
    assert watch.changed() == []
    # looked up since the change (through a subclass too): a new tag, not none
    original, watched.Base.f = watched.Base.f, lambda self: 3
    assert watched.Sub().f() == watched.Base().f() == 3
    assert watch.changed() == ["dsage_watched.Base"]
    watched.Base.f = original
    assert watched.Sub().f() == 1
    assert watch.changed() == []
    del watched.value
    assert watch.changed() == ["dsage_watched"]
    watched.value = 1
    assert watch.changed() == []


def test_version_tags_are_read_on_the_pythons_that_keep_them() -> None:
    """The slot's cheap check is not lost to a layout check gone wrong (see versions.py)."""
    if sys.implementation.name != "cpython" or sys.version_info[:2] > (3, 13):
        skip_or_fail(f"version tags are read on CPython 3.11 to 3.13, not {sys.version}")
    assert versions.WORKS


def test_isolate_runs_each_job_in_a_process_no_earlier_job_ran_in(procs: Procs) -> None:
    procs.broker()
    procs.worker(1, isolate=True)
    d = procs.client()
    procs.wait_workers(d, 1)
    code = ("import os, sys; m = sys.modules.setdefault('dsage_mark', type(sys)('m')); "
            "seen = getattr(m, 'seen', False); m.seen = True; (os.getpid(), seen)")
    results = [d(code).result(30) for _ in range(3)]
    assert len({pid for pid, _ in results}) == 3, results
    assert not any(seen for _, seen in results), results


def test_isolated_slots_are_forked_off_a_template_that_runs_no_job(contained: str,
                                                                   procs: Procs) -> None:
    """Each isolated job's slot is a fork (no exec) of the monitor's template, adopted
    by the monitor, in cgroups of its own; the template itself runs no job."""
    procs.broker()
    worker = procs.worker(1, isolate=True)
    d = procs.client()
    procs.wait_workers(d, 1)
    code = ("import os; (os.getpid(), os.getppid(), open('/proc/self/cmdline').read(), "
            "open('/proc/self/cgroup').read())")
    results: list[tuple[int, int, str, str]] = []
    forked: list[set[int]] = []
    for _ in range(3):
        results.append(d(code).result(30))
        forked.append({p for p in contain.children(worker.pid) if "--template" in cmdline(p)})
    templates = list(set.intersection(*forked))  # slots come and go; the template stays
    assert len(templates) == 1, forked
    template_cgroup = Path(f"/proc/{templates[0]}/cgroup").read_text()
    assert len({pid for pid, _, _, _ in results}) == 3, results
    for pid, parent, command, cgroup in results:
        assert pid != templates[0] and parent == worker.pid
        assert "--template" in command  # forked, not started afresh
        if contained != "none":
            assert "/s0-" in cgroup and cgroup != template_cgroup, (cgroup, template_cgroup)


def test_isolated_jobs_go_on_when_the_template_dies(procs: Procs) -> None:
    """A template that is gone costs the slots it would have forked a start afresh,
    and the monitor makes a new one: no job waits or fails for it."""
    procs.broker()
    worker = procs.worker(1, isolate=True)
    d = procs.client()
    procs.wait_workers(d, 1)
    assert d("1").result(30) == 1
    found = re.findall(r"template process \(pid (\d+)\)", worker.log.read_text())
    assert len(found) == 1, worker.log.read_text()[-2000:]
    os.kill(int(found[0]), signal.SIGKILL)
    for i in range(3):
        j = done(d(f"{i} + 1"), 30)
        assert j.status == "completed" and j.result() == i + 1, (j.status, j.error)
    log = worker.log.read_text()
    assert "could not fork a slot" in log, log[-2000:]
    assert len(re.findall(r"template process \(pid (\d+)\)", log)) == 2, log[-2000:]
    assert log.count("Traceback") == 0, log[-3000:]


def test_isolate_on_one_job_gives_it_a_process_no_earlier_job_ran_in(procs: Procs) -> None:
    d = procs.up(1)
    pid = "import os; os.getpid()"
    first, second = d(pid).result(30), d(pid).result(30)
    assert first == second  # ordinary jobs share their slot
    isolated = d(pid, isolate=True).result(30)
    assert isolated != first
    func = done(d.eval_function(os.getpid, isolate=True), 30)
    assert func.result() not in (first, isolated)


# --- 4. slots are light


def test_a_slot_does_not_load_zeromq_or_the_client(one_slot: dsage.DSage) -> None:
    j = done(one_slot("import sys; sorted(m for m in sys.modules if m.split('.')[0] in "
                 "('zmq', 'nacl') or m in ('dsage.client', 'dsage.monitor'))"), 30)
    assert j.status == "completed" and j.result() == [], (j.status, j.error, j.result())


def test_a_job_may_import_the_dsage_package(one_slot: dsage.DSage) -> None:
    j = done(one_slot("import dsage; callable(dsage.DSage)"), 30)
    assert j.result() is True, (j.status, j.error)


# --- 5. failures say what happened


def test_memory_error_names_the_cap(one_slot: dsage.DSage) -> None:
    j = done(one_slot("b = bytearray(600 * 2**20)", memory="300MB"), 30)
    assert j.status == "failed" and "MemoryError" in (j.error or ""), (j.status, j.error)
    assert "memory cap" in (j.error or "") and "300000000" in (j.error or ""), j.error
    assert one_slot("2+2").result(30) == 4


def test_a_job_that_lowers_its_limits_says_so(one_slot: dsage.DSage) -> None:
    j = done(one_slot("import resource; resource.setrlimit(resource.RLIMIT_CPU, (1, 1))\n"
                 "while True: pass"), 60)
    assert j.status == "failed", (j.status, j.error)
    assert "lowered its own limits" in (j.error or "") and "cpu time" in (j.error or ""), \
        j.error
    # a lowered soft limit is put back for the next job
    one_slot("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (20, "
             "resource.getrlimit(resource.RLIMIT_NOFILE)[1]))").wait(30)
    j = done(one_slot("import resource; resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 20"), 30)
    assert j.result() is True, (j.status, j.error)


def test_a_job_killed_by_its_slot_memory_cgroup_says_so(cgroups: contain.Backend,
                                                      procs: Procs) -> None:
    if cgroups.memory is None:
        skip_or_fail("no writable cgroup v1 memory hierarchy (needs root)")
    procs.broker()
    procs.worker(1, slot_memory=100 * 2**20)
    d = procs.client()
    procs.wait_workers(d, 1)
    j = done(d("b = bytearray(400 * 2**20); len(b)"), 60)
    assert j.status == "failed", (j.status, j.error)
    assert "memory cap of 100 MiB" in (j.error or "") and "out-of-memory killer" in j.error, \
        j.error
    assert d("2+2").result(30) == 4


def test_a_job_killed_by_an_oom_killer_not_its_caps_says_so(contained: str, procs: Procs
                                                         ) -> None:
    """The monitor runs in a memory cgroup of the test's, capped at 200 MiB: a job that
    goes past it is killed by that cgroup's OOM killer, not by a cap of dsage's, and
    says so (the slot's own memory group counts the kill; without one, the kernel)."""
    memory = next((b.memory for b in map(contain.choose, ("v1", "v2")) if b and b.memory),
                  None)
    if memory is None:
        skip_or_fail("no writable cgroup v1 memory hierarchy (needs root)")
        return
    own, outer = os.path.dirname(memory), f"{memory}-oom-test-{os.getpid()}"
    assert contain.make_cgroup(outer, 200 * 2**20)
    try:
        assert contain.join_cgroup(outer)  # the monitor starts in it, then the test leaves
        try:
            worker = procs.worker(1)
        finally:
            assert contain.join_cgroup(own)
        procs.broker()
        d = procs.client()
        procs.wait_workers(d, 1)
        j = done(d("b = bytearray(400 * 2**20); len(b)"), 60)
        assert j.status == "failed", (j.status, j.error)
        assert "killed by the OOM killer" in (j.error or ""), j.error
        assert "memory cap" not in (j.error or ""), j.error
        assert d("2+2").result(30) == 4
    finally:
        if "worker" in locals():
            worker.stop(timeout=5)
        contain.remove_cgroup(outer, wait=5)


def test_a_signal_is_named(one_slot: dsage.DSage) -> None:
    j = done(one_slot("import os, signal; os.kill(os.getpid(), signal.SIGTERM)"), 30)
    assert j.status == "failed" and "SIGTERM" in (j.error or ""), (j.status, j.error)


def test_a_full_disk_is_named_in_the_failure(one_slot: dsage.DSage, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0:
        skip_or_fail("a full-disk test mounts a small tmpfs: needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        j = done(one_slot(f"open({str(small / 'big')!r}, 'wb').write(b'x' * 4_000_000)"), 60)
        assert j.status == "failed"
        assert "No space left" in (j.error or "") and "disk is full" in (j.error or ""), j.error
        assert one_slot("'next'").result(60) == "next"  # the slot goes on
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
