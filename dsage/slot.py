"""The child side of a worker slot: a long-lived process that runs one job at a time.

The monitor runs :func:`main` with the arguments ``FD CAPTURE TMPDIR NICE GROUPS``
(as ``python -m dsage.slot`` would), with one end of a socket pair as FD and the
slot's cgroups, comma-separated, as GROUPS. The slot's stdout and stderr (file
descriptors 1 and 2, so child processes are captured too) go to the CAPTURE file,
which is emptied before each job; the monitor can read it even after killing the
slot. Each job runs in its own folder ``TMPDIR/<job id>``: the slot's spare empty
folder (:func:`spare_folder`) renamed, made anew when there is none. After the
reply the slot renames it back to the spare one if the job left it empty, else
removes it (:class:`JobFolders`); the monitor removes it if the slot dies during
the job, and the spare one once the slot is gone. With ``--template`` as CAPTURE
the process is instead the template that slots are forked from (:func:`template`).

Messages on the pair are frames of our own (:func:`send_frame`,
:func:`recv_frame`): a JSON header and two raw blobs. In: the run spec, with
the payload as the first blob. Out: ``{"ready": true, "rss": N}`` once, then
per job its outcome fields, with the encoded result and the captured output
as the blobs. The blobs are never pickled or copied on the way. The slot puts
itself back as it was (:class:`Baseline`) after the reply, so that the result
does not wait for it; when it cannot, it then sends ``{"replace": why, "id":
job id}`` and runs nothing more (a job sent meanwhile was never started).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # getsignal without enum conversion
import ast
import builtins
import ctypes
import errno
import importlib.machinery
import json
import operator
import os
import resource
import shutil
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback
from typing import Any

import msgspec

from . import chunks, contain, pystate, runas, versions
from .attach import Attachments, place, unwrap
from .codec import encode_result, mentions_sage
from .functions import LoadError, preload
from .protocol import MAX_HEADER, Encoding, Kind, ResultFrom, Status, exception_name

#: the most captured output returned per job (the end is kept)
MAX_OUTPUT = 64 * 1024 * 1024
_PR_SET_PDEATHSIG = 1

#: a frame's fixed-size start: the lengths of its JSON header and of its two blobs
_PREFIX = struct.Struct("<IQQ")
#: the largest blob a frame may announce (a corrupt length is refused, not allocated)
MAX_FRAME_BLOB = 1 << 36
#: a frame whose blobs are at most this size is read in one piece and sliced
_SMALL = 64 * 1024
_to_json = json.JSONEncoder(separators=(",", ":")).encode
_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode


def _header(header: dict[str, Any]) -> bytes:
    """A frame's header as compact JSON: msgspec's, ~10x faster than the standard
    encoder, which writes what msgspec cannot (a lone surrogate, as an escape). (A
    float that is not finite would be written as null: no header holds one, as the
    protocol refuses them.)"""
    try:
        return _encode_json(header)
    except (TypeError, ValueError, OverflowError):
        return _to_json(header).encode()


class FrameError(EOFError):
    """The slot pipe ended inside a frame, or carried one that is malformed."""


def send_frame(sock: socket.socket, header: dict[str, Any], first: bytes = b"",
               second: bytes = b"") -> None:
    """Send one frame: the prefix, ``header`` as JSON, then both blobs as they are,
    in one ``sendmsg`` (more only when a signal cuts it short)."""
    head = _header(header)
    parts = [_PREFIX.pack(len(head), len(first), len(second)), head, first, second]
    sent = sock.sendmsg(parts)
    if sent < _PREFIX.size + len(head) + len(first) + len(second):
        _send_rest(sock, [memoryview(b) for b in parts if b], sent)


def _send_rest(sock: socket.socket, parts: list[memoryview], sent: int) -> None:
    """Send what a signal left unsent of ``parts``, ``sent`` bytes in."""
    while parts:
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts.pop(0)
        if parts:
            parts[0] = parts[0][sent:]
            sent = sock.sendmsg(parts)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes, bytes]:
    """Receive one frame: its header and both blobs. Raises :class:`FrameError` if
    the pipe ends inside the frame or the frame is malformed, ``EOFError`` if it ends
    before one (the other side is gone), ``OSError`` if it breaks.

    A small frame takes two reads (its prefix, then the rest, sliced); larger blobs
    are each read whole into their own bytes object, never copied."""
    prefix = sock.recv(_PREFIX.size, socket.MSG_WAITALL)
    if not prefix:
        raise EOFError("the slot pipe was closed")
    if len(prefix) < _PREFIX.size:
        prefix += _recv_exactly(sock, _PREFIX.size - len(prefix))
    head_len, first_len, second_len = _PREFIX.unpack(prefix)
    if head_len > MAX_HEADER or max(first_len, second_len) > MAX_FRAME_BLOB:
        raise FrameError(f"a frame announces {head_len}, {first_len} and {second_len} bytes")
    if first_len + second_len <= _SMALL:
        body = _recv_exactly(sock, head_len + first_len + second_len)
        head, rest = body[:head_len], body[head_len:]
        first, second = rest[:first_len], rest[first_len:]
    else:
        head, first, second = (_recv_exactly(sock, n) for n in (head_len, first_len, second_len))
    try:
        header = _decode_json(head)
    except msgspec.DecodeError:  # what only the standard decoder reads (NaN, escaped surrogates)
        try:
            header = json.loads(head)
        except ValueError as e:
            raise FrameError(f"a frame's header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise FrameError("a frame's header is not a JSON object")
    return header, first, second


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from the pipe, as one bytes object received in place (no copy
    unless a signal interrupts the read)."""
    if n == 0:
        return b""
    try:
        data = sock.recv(n, socket.MSG_WAITALL)
    except MemoryError:
        raise FrameError(f"no memory for a {n}-byte blob") from None
    if len(data) == n:
        return data
    parts, got = [data], len(data)
    while got < n:
        more = sock.recv(n - got, socket.MSG_WAITALL)
        if not more:
            raise FrameError(f"the slot pipe ended inside a frame ({got} of {n} bytes)")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _die_with_parent() -> None:
    """Have the kernel kill this slot when its monitor dies (Linux)."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def run_code(code: str, filename: str, kind: str, att: Attachments | None = None
             ) -> tuple[Any, ResultFrom]:
    """Run code like a session cell: the result is ``DSAGE_RESULT`` if the code
    sets it, else the value of a final expression. ``att``'s user_vars are bound
    first, then its load_files run, in the same namespace."""
    if kind == Kind.SAGE:
        from .sage import preparse, sage_namespace

        code = preparse(code)
        namespace = sage_namespace()
    else:
        namespace = {"__name__": "__main__", "__builtins__": builtins}
    if att is not None:
        namespace.update(att.user_vars)
        for name, text in att.load_files:
            if kind == Kind.SAGE and name.endswith(".sage"):
                text = preparse(text)
            exec(compile(text, name, "exec"), namespace)
    tree = ast.parse(code, filename)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body[-1].value)
        tree.body.pop()
    exec(compile(tree, filename, "exec"), namespace)
    value = eval(compile(last, filename, "eval"), namespace) if last is not None else None
    if "DSAGE_RESULT" in namespace:
        return namespace["DSAGE_RESULT"], ResultFrom.DSAGE_RESULT
    return value, (ResultFrom.EXPRESSION if last is not None else ResultFrom.NONE)


preload(chunks)  # a map's chunks call chunks.run_chunk


def run_function(payload: bytes) -> Any:
    """Run a pickled call; a pickle that cannot be loaded here raises
    :class:`dsage.functions.LoadError` naming what is missing."""
    from .functions import load

    func, args, kwargs = load(payload, "the call")
    return func(*args, **kwargs)


def _user_traceback(exc: BaseException) -> str:
    """The traceback from the job's own code on: without this module's frames, or
    ``ast``'s that parsing the job's code adds to a SyntaxError."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, ast.__file__):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


_PAGE = resource.getpagesize()
#: the builtins namespace, reached without a builtin name (see Baseline.put_back)
_BUILTINS: dict[str, Any] = builtins.__dict__
#: modules and a class whose names the slot's own code calls between a job's end and
#: its answer (``os.fstat``, ``time.time``, ``socket.socket.sendmsg``...): put back
#: at once when a job rebinds one, as builtins are (see Baseline.put_back)
_OWN_MODULES = (os, sys, time, resource, socket, struct, stat, errno, signal, _signal,
                threading, operator)
_OWN_CLASSES = (socket.socket,)
_MISSING = object()


def _rss() -> int:
    """This process's resident memory, in bytes."""
    fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return int(os.read(fd, 256).split()[1]) * _PAGE
    finally:
        os.close(fd)


class Capture:
    """Files 1 and 2 redirected to one file, emptied per job."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        self.ident = _ident(self.fd)
        sys.stdout.flush()
        sys.stderr.flush()
        self.attach()
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    def attach(self) -> None:
        """Point files 1 and 2 at the capture file again (a job may have moved or
        closed them, or closed the capture file's own descriptor)."""
        if _ident(self.fd) != self.ident:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            if fd != self.fd:
                os.dup2(fd, self.fd, inheritable=False)
                os.close(fd)
            self.ident = _ident(self.fd)
        for target in (1, 2):
            if _ident(target) != self.ident:
                os.dup2(self.fd, target)

    def reset(self) -> None:
        """Empty the file (unless it is empty: that costs no write to the disk's journal)."""
        if os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, 0)

    def read(self) -> bytes:
        _flush()
        try:
            st = os.fstat(self.fd)
        except OSError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != self.ident:
            self.attach()
            st = os.fstat(self.fd)
        return read_tail(self.fd, size=st.st_size)


def _flush() -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError, AttributeError):
            pass


def _ident(fd: int) -> tuple[int, int] | None:
    """Which file an open descriptor is (None when it is closed)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def read_tail(fd: int, limit: int = MAX_OUTPUT, size: int | None = None) -> bytes:
    """Up to the last ``limit`` bytes of an open file (of ``size`` bytes, if known)."""
    if size is None:
        size = os.fstat(fd).st_size
    if not size:
        return b""
    start = max(0, size - limit)
    data = os.pread(fd, size - start, start)
    return (b"[... output cut ...]\n" + data) if start else data


def _enter(folder: str) -> None:
    """Change into ``folder``, making it again if a job removed it."""
    try:
        os.chdir(folder)
    except FileNotFoundError:
        os.makedirs(folder, 0o700, exist_ok=True)
        os.chdir(folder)


def _explain(e: BaseException, spec: dict[str, Any]) -> str:
    """What an exception means for a job, where it is about the job's limits."""
    if isinstance(e, MemoryError) and spec.get("memory"):
        return (f" (the job reached its memory cap: memory={spec['memory']} bytes of "
                f"address space)")
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return " (the disk is full, or the quota is used up)"
    return ""


def spare_folder(capture_path: str) -> str:
    """Where a slot keeps the empty folder that its next job's folder will be (named
    after its capture file: the monitor removes both when the slot is gone)."""
    return capture_path + ".dir"


class JobFolders:
    """The folder each job runs in, ``TMPDIR/<job id>``: the slot's spare empty folder
    renamed when there is one (no block to allocate, nor to free and discard after),
    else made anew; after the job, renamed back to the spare one if the job left it as
    it was made (empty, a folder of this user's with mode 0700), as most jobs do, else
    removed."""

    #: how long before a job started the spare folder must have last changed for an
    #: unchanged modification time to say the job left it empty (a file system's clock
    #: may lag by a tick); it is listed otherwise
    SETTLED_NS = 50_000_000

    def __init__(self, tmpdir: str, spare: str) -> None:
        self.tmpdir, self.spare = tmpdir, spare
        self.uid = os.geteuid()
        #: the spare folder's inode and modification time, while it is known to be empty
        self.seen: tuple[int, int] | None = None
        self.entered = 0

    def enter(self, job_id: str) -> str:
        """Make the folder of the job ``job_id`` and change into it; its path."""
        job_dir = os.path.join(self.tmpdir, job_id)
        self.entered = time.time_ns()
        try:
            os.rename(self.spare, job_dir)
        except OSError:
            self.seen = None  # none (a first job, or the last one left files)
        else:
            try:
                os.chdir(job_dir)
                return job_dir
            except OSError:  # not a folder any more
                self.seen = None
                remove_folder(job_dir)
        try:
            os.mkdir(job_dir, 0o700)
        except FileExistsError:
            pass
        except FileNotFoundError:  # an earlier job removed the temp folder
            os.makedirs(job_dir, 0o700, exist_ok=True)
        os.chdir(job_dir)
        return job_dir

    def leave(self, job_dir: str) -> None:
        """Keep a finished job's folder as the spare one, or remove it."""
        try:
            st = os.lstat(job_dir)
            if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 \
                    and st.st_uid == self.uid:
                seen = (st.st_ino, st.st_mtime_ns)
                if seen == self.seen and st.st_mtime_ns < self.entered - self.SETTLED_NS:
                    empty = True  # nothing was added to it or removed from it
                else:
                    with os.scandir(job_dir) as entries:
                        empty = next(entries, None) is None
                if empty:
                    os.rename(job_dir, self.spare)
                    self.seen = seen
                    return
        except OSError:
            pass
        self.seen = None
        remove_folder(job_dir)


def run_job(spec: dict[str, Any], payload: bytes, capture: Capture, folders: JobFolders,
            blobs: bytes = b"", baseline: Baseline | None = None,
            ) -> tuple[dict[str, Any], bytes, bytes]:
    """Run one job in its own folder (see :class:`JobFolders`); return its outcome
    fields for the monitor, the encoded result and the captured output. ``blobs``
    holds the shared blobs the job uses, one after another, as its ``blobs`` field
    lists them. What the job rebound of the ``baseline``'s builtins, and of the modules
    the slot itself uses, is put back as soon as the job's code ends, before any code
    of the slot's own runs."""
    job_dir = folders.enter(spec["id"])
    capture.reset()
    recursion = sys.getrecursionlimit()
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    if spec.get("memory"):
        resource.setrlimit(resource.RLIMIT_AS, (min(spec["memory"], old_limit[1])
                                                if old_limit[1] > 0 else spec["memory"],
                                                old_limit[1]))
    attempt = str(spec.get("attempt", 1))
    if os.environ.get("DSAGE_ATTEMPT") != attempt:
        os.environ["DSAGE_ATTEMPT"] = attempt
    started = time.time()
    status, error, report = Status.COMPLETED, None, ""
    retry = False
    value: Any = None
    result_from = ResultFrom.NONE
    try:
        try:
            payload, att = unwrap(payload, _split(blobs, spec.get("blobs") or ()))
            if att is not None:
                place(att, job_dir)
            if spec["kind"] == Kind.FUNCTION:
                value, result_from = run_function(payload), ResultFrom.RETURN
            else:
                value, result_from = run_code(payload.decode(),
                                              spec.get("name") or "<dsage job>",
                                              spec["kind"], att)
        finally:
            if baseline is not None:
                baseline.put_back()
    except SystemExit as e:
        status, error = Status.FAILED, f"the job exited: sys.exit({e.code!r})"
        retry = raised_one_of(e, spec.get("retry_on") or ())
    except LoadError as e:  # one line says it all: no traceback through the unpickler
        status, error = Status.FAILED, str(e)[:2000]
    except BaseException as e:  # noqa: BLE001 - the job's own failure, reported in full
        status = Status.FAILED
        error = f"{type(e).__name__}: {e}"[:2000] + _explain(e, spec)
        report = _user_traceback(e)
        retry = raised_one_of(e, spec.get("retry_on") or ())
    finally:
        try:
            resource.setrlimit(resource.RLIMIT_AS, old_limit)
        except (OSError, ValueError):
            pass  # the job lowered the hard limit: the slot is replaced (see restore)
        sys.setrecursionlimit(max(recursion, sys.getrecursionlimit()))
        _enter(folders.tmpdir)
        capture.attach()
    if report:
        _flush()
        os.write(capture.fd, report.encode(errors="replace"))
    encoding, blob = Encoding.NONE, b""
    if status is Status.COMPLETED and result_from is not ResultFrom.NONE:
        try:
            encoding, blob = encode_result(value, spec.get("trusted", True))
        except Exception as e:  # noqa: BLE001 - unpicklable results are the job's failure
            status = Status.FAILED
            error = f"the result ({type(value).__name__}) cannot be serialised: {e}"[:2000]
            os.write(capture.fd, (error + "\n").encode(errors="replace"))
    return ({"id": spec["id"], "status": status.value, "error": error,
             "encoding": encoding.value, "result_from": result_from.value, "started": started,
             "finished": time.time(), "rss": _rss(), "retry": retry}, blob, capture.read())


def _split(blobs: bytes, sizes: Any) -> dict[str, bytes]:
    """The shared blobs by hash, from their concatenation."""
    out, at = {}, 0
    for digest, size in sizes:
        out[digest] = blobs[at:at + size]
        at += size
    return out


def raised_one_of(exc: BaseException, names: Any) -> bool:
    """Whether ``exc`` is an instance of a class named in ``names`` (its own class or
    a base class, named as :func:`~dsage.protocol.exception_name` does)."""
    return bool(names) and any(exception_name(c) in names for c in type(exc).__mro__)


#: signals whose handlers the slot restores after each job
_SIGNALS = [int(s) for s in signal.valid_signals()
            if s not in (signal.SIGKILL, signal.SIGSTOP)]
_ITIMERS = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)
#: limits the slot puts back after each job (RLIMIT_AS is the job's memory cap: run_job)
_RLIMITS = [getattr(resource, n) for n in (
    "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE", "RLIMIT_RSS",
    "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE",
    "RLIMIT_RTPRIO", "RLIMIT_SIGPENDING") if hasattr(resource, n)]


def _fd_count() -> int:
    """How many files this process has open, as Linux 6.2 and later count them (0 where
    the kernel does not)."""
    try:
        return os.stat("/proc/self/fd").st_size
    except OSError:
        return 0


def _threads() -> int:
    """How many threads this process has: ``/proc/self/task`` links one per thread
    beside ``.`` and ``..`` (listed where that count is missing)."""
    try:
        links = os.stat("/proc/self/task").st_nlink
        return links - 2 if links > 2 else len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _open_fds() -> set[int]:
    try:
        return {int(n) for n in os.listdir("/proc/self/fd")}
    except OSError:
        return set()


#: a class whose attributes a job can rebind: made at run time (not static, as ``int``),
#: and not marked immutable (as most types of C extensions)
_HEAPTYPE, _IMMUTABLE = 1 << 9, 1 << 8
_MISSING = object()


def _classes(d: dict[str, Any]) -> list[type]:
    """The classes a module binds that a job could change (``Fraction.__add__ = f``)."""
    return [v for v in list(d.values()) if issubclass(type(v), type)
            and v.__flags__ & (_HEAPTYPE | _IMMUTABLE) == _HEAPTYPE]


def _rebound(now: Any, then: dict[str, Any]) -> list[str]:
    """The names a namespace rebound (or added, or removed) since it was ``then``,
    leaving out what changes as a matter of course: private names (``_cache``) and a
    name bound to None before (a value set on first use, as ``tempfile.tempdir``)."""
    return [k for k in set(now.keys()) | then.keys()
            if now.get(k, _MISSING) is not then.get(k, _MISSING)
            and not (k[:1] == "_" and k[:2] != "__") and then.get(k) is not None]


class ModuleWatch:
    """What every loaded module's names, and its classes' attributes, are bound to, to
    tell when a job rebound one (``math.pi = 3``, ``Fraction.__add__ = f``). Each
    namespace has a stamp that moves whenever it may have changed: CPython's version
    tag of the dict or class where :mod:`dsage.versions` can read it, else its contents
    (its values, compared identity first in loops that run in C: ~0.2 ms). The tags are
    read and compared whole, in C (~40 us per job for the slot's own 200 modules and
    820 classes, mostly reading them from memory); only when they differ are they
    compared one by one, and a namespace whose stamp moved compared name by name with
    its copy. A module is noted as soon as its import completes (:meth:`install`), so
    that one a job imports and then changes is caught too; modules that appear some
    other way are noted after the job."""

    #: modules whose names change as a matter of course
    SKIP = frozenset({"sys", "__main__", "__mp_main__", "builtins", "sage"})
    #: Sage's modules rebind their own names as a matter of course (lazy imports and
    #: lazy class attributes resolve on first use): a job's changes there go unseen
    SKIP_PREFIX = "sage."

    def __init__(self, tags: bool = versions.WORKS) -> None:
        self.tags = tags
        #: per module noted: its name, namespace, a copy of it and its stamp then
        self.names: list[str] = []
        self.dicts: list[dict[str, Any]] = []
        self.copies: list[dict[str, Any]] = []
        self.module_then: list[Any] = []
        #: per class noted: the class, its attributes (a live view), a copy of them and
        #: its stamp then
        self.classes: list[type] = []
        self.attrs: list[Any] = []
        self.class_copies: list[dict[str, Any]] = []
        self.class_then: list[Any] = []
        if tags:
            self.module_tags, self.class_tags = versions.Tags(False), versions.Tags(True)
        #: with tags: the stamps noted, in the order the tags are read (compared whole,
        #: in C), remade when one is noted anew
        self.module_seen: tuple[Any, ...] | None = None
        self.class_seen: tuple[Any, ...] | None = None
        self.known: set[str] = set()
        #: per module name noted, the namespace noted (a module imported anew under the
        #: same name, after a job removed it from sys.modules, has another)
        self.namespace: dict[str, dict[str, Any]] = {}
        #: names imported anew since the last :meth:`changed`
        self.imported_anew: set[str] = set()
        self.known_classes: set[int] = set()
        self.count = 0
        self.add_new()

    def note(self, name: str) -> None:
        """Remember what the module ``name`` (and each class it binds) is bound to now."""
        d = getattr(sys.modules.get(name), "__dict__", None)
        if name in self.known:
            if isinstance(d, dict) and d is not self.namespace[name]:
                self.imported_anew.add(name)  # its copy's changes would go unseen
            return
        if name in self.SKIP or not isinstance(d, dict) or name.startswith(self.SKIP_PREFIX):
            return
        self.known.add(name)
        self.namespace[name] = d
        self.names.append(name)
        self.dicts.append(d)
        self.copies.append({})
        self.module_then.append(None)
        if self.tags:
            self.module_tags.add(d)
        self._note_module(len(self.dicts) - 1)
        for cls in _classes(d):
            if id(cls) not in self.known_classes:  # classes noted are kept: ids stay theirs
                self.known_classes.add(id(cls))
                self.classes.append(cls)
                self.attrs.append(cls.__dict__)
                self.class_copies.append({})
                self.class_then.append(None)
                if self.tags:
                    self.class_tags.add(cls)
                self._note_class(len(self.classes) - 1)

    def _note_module(self, i: int) -> None:
        """Take module ``i``'s stamp and copy as they are now."""
        d = self.dicts[i]
        self.module_then[i] = self.module_tags[i] if self.tags else list(d.values())
        self.module_seen = None
        self.copies[i] = dict(d)

    def _note_class(self, i: int) -> None:
        """Take class ``i``'s stamp and copy as they are now (with tags: -1 for a class
        that cannot get one, so that it is compared every time)."""
        cls = self.classes[i]
        if self.tags:
            versions.tag_class(cls)
            self.class_then[i] = self.class_tags[i] or -1
            self.class_seen = None
            self.class_copies[i] = dict(cls.__dict__)
        else:
            self.class_then[i] = self.class_copies[i] = dict(cls.__dict__)

    def add_new(self) -> None:
        if len(sys.modules) == self.count:
            return
        for name in list(sys.modules):
            self.note(name)
        self.count = len(sys.modules)

    def install(self) -> None:
        """Note each module the moment its import completes: a finder first on
        ``sys.meta_path`` lets the others find the module and marks the spec found, which
        the import machinery tells when the module is loaded."""
        sys.meta_path.insert(0, _ImportWatch(self))

    def changed(self) -> list[str]:
        """Modules and classes with names rebound since they were noted; then notes new
        modules. A namespace that changed only in what :func:`_rebound` leaves out is
        noted again as it is now."""
        out: list[str] = []
        now: Any
        classes: Any
        if self.tags:
            if self.module_seen is None:
                self.module_seen = self.module_tags.placed(self.module_then)
            if self.class_seen is None:
                self.class_seen = self.class_tags.placed(self.class_then)
            if self.module_tags.read_placed() == self.module_seen \
                    and self.class_tags.read_placed() == self.class_seen:
                self.add_new()  # (no tag moved)
                return self._anew()
            now, classes = self.module_tags.read(), self.class_tags.read()
        else:
            now, classes = map(list, map(dict.values, self.dicts)), self.attrs
        for i in _moved(now, self.module_then):
            if _rebound(self.dicts[i], self.copies[i]):
                out.append(self.names[i])
            else:
                self._note_module(i)
        for i in _moved(classes, self.class_then):
            cls = self.classes[i]
            if _rebound(self.attrs[i], self.class_copies[i]):
                out.append(f"{cls.__module__}.{cls.__qualname__}")
            else:
                self._note_class(i)
        self.add_new()
        return out + self._anew()

    def _anew(self) -> list[str]:
        """The modules imported anew since this was last asked (a job removed them from
        sys.modules and imported them again: what it changed in the new copy, noted
        under the same name, is not watched)."""
        out = [f"{name} (imported anew)" for name in sorted(self.imported_anew)]
        self.imported_anew.clear()
        return out

    def accept(self) -> None:
        """Take every module and class as it is now: what the slot itself loaded (Sage)
        is not a job's change."""
        self.add_new()
        self.imported_anew.clear()
        for i in range(len(self.dicts)):
            self._note_module(i)
        for i in range(len(self.classes)):
            self._note_class(i)


def _moved(now: Any, then: list[Any]) -> list[int]:
    """The places where the stamps ``now`` differ from ``then``."""
    now = list(now)
    if not _differs(now, then):
        return []
    return [i for i, (a, b) in enumerate(zip(now, then)) if _differs(a, b)]


def _differs(now: Any, then: Any) -> bool:
    try:
        return bool(now != then)
    except Exception:  # noqa: BLE001 - a value whose == fails was put there
        return True


class _NotedSpec(importlib.machinery.ModuleSpec):
    """A module's spec that has :class:`ModuleWatch` note the module once it is loaded
    (the import machinery clears ``_initializing`` then, whether or not it worked)."""

    watch: ModuleWatch

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "_initializing" and value is False:
            self.watch.note(self.name)


class _ImportWatch:
    """A finder that finds nothing itself: it asks the finders after it, and marks the
    spec one finds (see :class:`_NotedSpec`)."""

    def __init__(self, watch: ModuleWatch) -> None:
        self.watch = watch

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                if type(spec) is importlib.machinery.ModuleSpec:
                    spec.__class__ = _NotedSpec
                    setattr(spec, "watch", self.watch)  # (now a _NotedSpec)
                return spec
        return None


class Baseline:
    """What a job must leave as it found it: what can be put back cheaply is put back
    after each job (:meth:`restore`); what cannot makes the slot ask to be replaced."""

    def __init__(self, capture: Capture, tmpdir: str) -> None:
        self.capture, self.tmpdir = capture, tmpdir
        self.environ = dict(os.environ)
        self.environ_data = dict(getattr(os.environ, "_data", {}))
        self.umask = os.umask(0o077)
        os.umask(self.umask)
        self.handlers = {}
        for sig in _SIGNALS:
            handler = _signal.getsignal(sig)
            if handler is not None:
                self.handlers[sig] = handler
        self.streams = (sys.stdin, sys.stdout, sys.stderr)
        self.hooks = (sys.displayhook, sys.excepthook)
        self.argv, self.path = list(sys.argv), list(sys.path)
        self.recursion = sys.getrecursionlimit()
        self.stdin = os.dup(0)  # what file 0 was, to put back
        os.set_inheritable(self.stdin, False)
        self.fds = {fd for fd in _open_fds() if _ident(fd) is not None}  # not the listing's
        #: what :meth:`put_back` put back since the last :meth:`restore`
        self.put_back_names: list[str] = []
        self._note_own()
        self.handler_values = list(self.handlers.values())
        self.modules = ModuleWatch()
        self.modules.install()
        self.settings = pystate.Settings()
        self.rlimits = {r: resource.getrlimit(r) for r in _RLIMITS}
        self.rlimit_values = list(self.rlimits.values())
        self.fd_count = _fd_count()
        self.threads = self.tasks = 1

    def _note_own(self) -> None:
        """Copy builtins and the namespaces of _OWN_MODULES and _OWN_CLASSES, and read
        their version tags (where they can be read), for :meth:`put_back`."""
        self.builtins = dict(_BUILTINS)
        self.own = [(m.__dict__, m.__name__, dict(m.__dict__)) for m in _OWN_MODULES]
        self.own_classes = [(cls, dict(cls.__dict__)) for cls in _OWN_CLASSES]
        self.own_tags: tuple[versions.Tags, versions.Tags] | None = None
        if versions.WORKS:
            dicts, classes = versions.Tags(classes=False), versions.Tags(classes=True)
            dicts.add(_BUILTINS)
            for d, _, _ in self.own:
                dicts.add(d)
            for cls, _ in self.own_classes:
                versions.tag_class(cls)
                classes.add(cls)
            self.own_tags = dicts, classes
            self.own_then = dicts.read_placed(), classes.read_placed()

    def put_back(self) -> None:
        """Right after the job's code, before the slot's own code runs again: put back
        builtins whole, and the names the job rebound or removed in _OWN_MODULES and
        _OWN_CLASSES. What was put back is remembered (the slot is then replaced), but
        for ``sys``, whose streams and hooks :meth:`restore` puts back anyway. Uses no
        name the job may have rebound until builtins are back; one read of version
        tags when the job rebound nothing."""
        tags = self.own_tags
        if tags is not None and tags[0].read_placed() == self.own_then[0] \
                and tags[1].read_placed() == self.own_then[1]:
            return
        now = _BUILTINS
        same = now.keys() == self.builtins.keys()
        if same:
            for name, value in self.builtins.items():
                if now[name] is not value:
                    same = False
                    break
        if not same:
            now.clear()
            now.update(self.builtins)
            self.put_back_names.append("builtins")
        for d, module, copy in self.own:
            rebound = [name for name, value in copy.items()
                       if d.get(name, _MISSING) is not value]
            if rebound:
                d.update((name, copy[name]) for name in rebound)
                if module != "sys":  # (as restore() puts back sys.stdout and the like)
                    self.put_back_names.append(module)
        for cls, attrs in self.own_classes:
            rebound = [name for name, value in attrs.items()
                       if cls.__dict__.get(name, _MISSING) is not value]
            added = [name for name in cls.__dict__ if name not in attrs]
            if rebound or added:
                for name in added:
                    delattr(cls, name)
                for name in rebound:
                    setattr(cls, name, attrs[name])
                versions.tag_class(cls)
                self.put_back_names.append(f"{cls.__module__}.{cls.__qualname__}")
        if tags is not None:
            self.own_then = tags[0].read_placed(), tags[1].read_placed()

    def accept(self) -> None:
        """Take the slot's modules and threads as they are now (once it loaded Sage)."""
        self.modules.accept()
        self._note_own()
        self.settings = pystate.Settings()
        self.threads = threading.active_count()
        self.tasks = _threads()

    def _extra_fds(self) -> set[int]:
        """Files open now that were not before the first job (the listing's own is not).
        None when as many are open as then, where the kernel counts them (it could only
        be others if the job closed one of the slot's own and kept a file open instead)."""
        if self.fd_count and _fd_count() == self.fd_count:
            return set()
        return {fd for fd in _open_fds() - self.fds - {self.capture.fd}
                if _ident(fd) is not None}

    def restore(self) -> str | None:
        """Undo what the job changed cheaply; return why the slot must be replaced
        (None when it is as good as new)."""
        for timer in _ITIMERS:  # (ITIMER_REAL is alarm()'s timer too)
            signal.setitimer(timer, 0)
        why = []
        if contain.has_children():  # (most jobs start none: one system call says so)
            left = contain.tree(os.getpid())
            if left:
                contain.kill_tree(os.getpid(), include_self=False)
                why.append(f"it left {len(left)} processes running (killed)")
            contain.reap_children()
        if threading.active_count() > self.threads or _threads() > self.tasks:
            why.append("it left threads running")
        try:
            moved = any(map(operator.is_not, map(_signal.getsignal, self.handlers),
                            self.handler_values))
        except (OSError, ValueError):
            moved = True
        if moved:
            for sig, handler in self.handlers.items():
                try:
                    if _signal.getsignal(sig) is not handler:
                        _signal.signal(sig, handler)
                except (OSError, ValueError):
                    pass
        _signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if getattr(os.environ, "_data", None) != self.environ_data:
            os.environ.clear()
            os.environ.update(self.environ)
        os.umask(self.umask)
        if list(map(resource.getrlimit, self.rlimits)) != self.rlimit_values:
            for r, limits in self.rlimits.items():
                if resource.getrlimit(r) != limits:
                    try:
                        resource.setrlimit(r, limits)
                    except (OSError, ValueError):
                        why.append("it lowered its own hard limits")
        _enter(self.tmpdir)
        sys.stdin, sys.stdout, sys.stderr = self.streams
        sys.displayhook, sys.excepthook = self.hooks
        sys.argv[:], sys.path[:] = self.argv, self.path
        sys.setrecursionlimit(self.recursion)
        if any(getattr(f, "closed", True) for f in self.streams):
            why.append("it closed sys.stdin, sys.stdout or sys.stderr")
        os.dup2(self.stdin, 0)
        self.capture.attach()
        extra = self._extra_fds()
        if extra:
            import gc

            gc.collect()  # files the job dropped without closing
            if self._extra_fds():
                why.append(f"it left {len(extra)} files open")
        self.settings.put_back()
        if len(sys.modules) < self.modules.count:
            why.append("it removed modules from sys.modules")
        self.put_back()  # (a thread the job left may have rebound names since)
        changed = list(dict.fromkeys(self.put_back_names + self.modules.changed()))
        self.put_back_names = []
        if changed:
            why.append(f"it changed {', '.join(sorted(changed)[:5])}")
        return "; ".join(why) or None


def _detach_pipe(fd: int) -> None:
    """In a process the job forked: let go of the slot's pipe (file ``fd`` becomes
    /dev/null), so only the slot itself holds it."""
    try:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, fd, inheritable=False)
        os.close(null)
    except OSError:
        pass


#: the capture argument that makes a slot process a template (see :func:`template`)
TEMPLATE = "--template"
#: how long a forked slot waits to be adopted by its monitor
ADOPT_WAIT = 5.0
#: the exit status of a slot whose job closed its pipe to the monitor, or put another
#: file in its place: the one thing the slot can still tell the monitor
PIPE_LOST = 117


def main(argv: list[str]) -> int:
    fd, capture_path, tmpdir, nice = int(argv[0]), argv[1], argv[2], int(argv[3])
    groups = [p for p in (argv[4] if len(argv) > 4 else "").split(",") if p]
    run_as = argv[5] if len(argv) > 6 else ""  # the last one is the package's folder
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the monitor decides when slots stop
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    if capture_path == TEMPLATE:
        for path in groups:
            contain.join_cgroup(path)
        return template(fd, tmpdir, run_as)
    return serve(fd, capture_path, tmpdir, groups, run_as)


def serve(fd: int, capture_path: str, tmpdir: str, groups: list[str], run_as: str = "") -> int:
    """Be a slot: run the jobs that come on the pipe ``fd``, one at a time (as user
    ``run_as``, if given, once placed in its cgroups as root)."""
    contain.set_subreaper()  # orphaned descendants of a job become this slot's children
    for path in groups:
        contain.join_cgroup(path)
    if run_as:  # placed in its cgroups as root: now give root up, before any job
        try:
            runas.drop(run_as, tmpdir)
        except (OSError, runas.RunAsError) as e:
            send_frame(socket.socket(fileno=fd), {"failed": f"--run-as {run_as}: {e}"[:1000]})
            return 3
        _die_with_parent()  # a change of user clears it
    os.set_inheritable(fd, False)  # the job's own child processes do not get the pipe
    os.register_at_fork(after_in_child=lambda: _detach_pipe(fd))  # nor its forks
    sock = socket.socket(fileno=fd)
    pipe = _ident(fd)
    os.environ["DSAGE_ATTEMPT"] = "1"  # in the baseline: a first attempt changes nothing
    try:
        os.makedirs(tmpdir, exist_ok=True)  # again, if a job removed it
        capture = Capture(capture_path)
        os.chdir(tmpdir)
        baseline = Baseline(capture, tmpdir)
    except Exception as e:  # noqa: BLE001 - told to the monitor in one line
        send_frame(sock, {"failed": f"{type(e).__name__}: {e}"[:1000]})
        return 3
    send_frame(sock, {"ready": True, "rss": _rss()})
    folders = JobFolders(tmpdir, spare_folder(capture_path))
    remove_folder(folders.spare)  # what an earlier slot of the same capture file left
    sage_loaded = False
    while True:
        try:
            spec, payload, blobs = recv_frame(sock)
        except (EOFError, OSError):
            return 0
        base_rss = 0  # the slot's size anew, when it grew by loading Sage
        if not sage_loaded and (spec["kind"] == Kind.SAGE or (
                spec["kind"] == Kind.FUNCTION and mentions_sage(payload))):
            sage_loaded = load_sage(baseline)
            base_rss = _rss() if sage_loaded else 0
        reply, result, output = run_job(spec, payload, capture, folders, blobs, baseline)
        reply["base_rss"] = base_rss
        if _ident(fd) != pipe:
            # The job closed the pipe or put another file in its place: end, before the
            # capture file is emptied (the monitor reads the job's output from it).
            os._exit(PIPE_LOST)
        capture.reset()  # before the reply: what the monitor reads next is the next job's
        try:
            send_frame(sock, reply, result, output)
        except OSError:
            os._exit(PIPE_LOST)
        # After the reply, off the job's path: the monitor may send the next job
        # meanwhile, and it waits in the pipe until the slot is as good as new.
        why = baseline.restore()
        folders.leave(os.path.join(tmpdir, spec["id"]))
        if why is not None:
            send_frame(sock, {"replace": why, "id": spec["id"]})
            return _await_end(sock)


def _await_end(sock: socket.socket) -> int:
    """After asking to be replaced: run nothing more (a job the monitor sent before it
    read the request stays queued there) until the monitor closes the pipe."""
    while True:
        try:
            recv_frame(sock)
        except (EOFError, OSError):
            return 0


def load_sage(baseline: Baseline) -> bool:
    """Import Sage into the slot before its first Sage job (or call that pickles
    Sage objects), as a part of the slot rather than of the job (its import rebinds
    names in modules it loads, and numpy's BLAS would start a thread per core: one
    is enough in a slot), so that it is loaded once, not again in a new slot after
    each Sage job. False when Sage cannot run here (the job fails, saying so)."""
    from .sage import check

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the job's environment is put back
    try:
        check()
    except ImportError:
        return False
    baseline.accept()
    return True


def template(fd: int, tmpdir: str, run_as: str = "") -> int:
    """Be the template isolated slots are forked from: warm (its imports are done) and
    never used (it runs no job, opens no capture, takes no snapshot). Each request on
    the pipe ``fd`` (a SOCK_SEQPACKET pair) is a JSON header ``{"capture", "groups"}``
    with the new slot's end of its pipe attached; the template forks, the child forks
    the slot and exits, so that the slot is adopted by the monitor (a subreaper) as a
    child of its own; the answer is ``{"pid": N}`` (0 when the fork failed)."""
    monitor = os.getppid()
    sock = socket.socket(fileno=fd)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, MAX_HEADER, 1)
        except OSError:
            return 0
        if not msg:
            return 0  # the monitor is gone
        pid = 0
        try:
            request = json.loads(msg)
            if fds:
                pid = _fork_slot(sock, fds[0], request["capture"], tmpdir,
                                 [p for p in request["groups"].split(",") if p], monitor, run_as)
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            pass
        for f in fds:
            os.close(f)
        try:
            sock.send(_to_json({"pid": pid}).encode())
        except OSError:
            return 0


def _fork_slot(sock: socket.socket, fd: int, capture: str, tmpdir: str, groups: list[str],
               monitor: int, run_as: str) -> int:
    """Fork a slot off this template (see :func:`template`); its pid."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        code = 70
        try:
            os.close(r)
            slot = os.fork()
            if slot:
                os.write(w, str(slot).encode())
                code = 0
            else:
                os.close(w)
                sock.close()
                code = _adopted_slot(fd, capture, tmpdir, groups, monitor, run_as)
        finally:
            os._exit(code)
    os.close(w)
    os.waitpid(middle, 0)  # once it is reaped, the slot is the monitor's child
    with os.fdopen(r, "rb") as f:
        return int(f.read() or 0)


def _adopted_slot(fd: int, capture: str, tmpdir: str, groups: list[str], monitor: int,
                  run_as: str) -> int:
    """In a slot forked off the template: wait to be the monitor's child, then serve."""
    os.setpgid(0, 0)  # a process group of its own, as a slot the monitor starts has
    deadline = time.monotonic() + ADOPT_WAIT
    while os.getppid() != monitor and time.monotonic() < deadline:
        time.sleep(0.0002)
    _die_with_parent()
    if os.getppid() != monitor:
        return 1  # the monitor is gone (or did not adopt this slot)
    return serve(fd, capture, tmpdir, groups, run_as)


def remove_folder(path: str) -> None:
    """Remove a job's folder: one rmdir when the job left it empty; what a job put in
    its place (a file, a link) goes too."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except NotADirectoryError:
        try:
            os.unlink(path)
        except OSError:
            pass
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
