"""A job's attachments: files copied into its working folder (``files=``), names
bound before its code runs (``user_vars=``) and files run before it
(``load_files=``).

Files travel as *shared blobs*, by content (SHA-256): a message carries each
content once however many of its jobs use it, and the broker keeps it once
per owner (see ``shared`` in :mod:`dsage.protocol`). The rest travels inside
the job's payload, which the broker never opens, in an envelope:
:data:`MAGIC`, the length of the pickled attachments (8 bytes), that pickle
(the files' names and hashes, user_vars, load_files), then the job's own
payload (code, or a pickled call). No Python source and no pickle starts with
a NUL byte, so a payload without attachments is never taken for one. The
client refuses, in the call, a missing file, two different files of one
name, what is not a regular file (a FIFO or a device would block the call,
or never end), and attachments larger than a message may be.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import codec

MAGIC = b"\0dsage-attachments\0"
_LENGTH = struct.Struct("<Q")


@dataclass
class Attachments:
    #: base name -> content, written into the job's folder before it runs
    files: dict[str, bytes] = field(default_factory=dict)
    #: names bound in the job's namespace before its code (and load_files) run
    user_vars: dict[str, Any] = field(default_factory=dict)
    #: (file name, source) run in the job's namespace, in order, before its code
    load_files: list[tuple[str, str]] = field(default_factory=list)
    #: base name -> SHA-256 of the file's content
    digests: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.files or self.user_vars or self.load_files)

    def size(self) -> int:
        return sum(map(len, self.files.values())) + sum(len(s) for _, s in self.load_files)


def _paths(paths: Iterable[str | os.PathLike[str]], option: str) -> list[Path]:
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(f"{option}={paths!r}: give a list of paths, such as ['data.csv']")
    return [Path(p) for p in paths]


class _FileCache:
    """Files read lately, by (device, inode, size, modification time): many jobs that
    attach one file share one bytes object and one hash, and the file is read once."""

    LIMIT = 256 * 1024 * 1024

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: OrderedDict[tuple[int, int, int, int], tuple[bytes, str]] = OrderedDict()
        self.size = 0

    def read(self, path: Path, option: str, limit: int | None) -> tuple[bytes, str]:
        """A file's content and hash (from the cache when unchanged), or a clear error."""
        with _opened(path, option, limit) as (fd, st):
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            with self.lock:
                if key in self.files:
                    self.files.move_to_end(key)
                    return self.files[key]
            data = _read_all(fd)
        entry = (data, content_hash(data))
        if len(data) != st.st_size:
            return entry  # it changed while being read: not kept
        with self.lock:
            if key not in self.files:
                self.files[key] = entry
                self.size += len(data)
            while self.size > self.LIMIT and self.files:
                _, (old, _) = self.files.popitem(last=False)
                self.size -= len(old)
        return entry


_cache = _FileCache()


def read_file(path: str | os.PathLike[str], option: str, limit: int | None = None) -> bytes:
    """A regular file's content, or an error naming ``option`` and the problem: none
    there, a folder, not a regular file, or more than ``limit`` bytes."""
    with _opened(Path(path), option, limit) as (fd, _):
        return _read_all(fd)


@contextmanager
def _opened(path: Path, option: str, limit: int | None) -> Iterator[tuple[int, os.stat_result]]:
    """``path`` open to read, with its status, once it is known to be a regular file
    of at most ``limit`` bytes (opened without blocking: a FIFO with no writer would
    block the call)."""
    with _reading(path, option):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{option}: {path} is not a regular file (a FIFO, a device "
                                 f"or a socket); attach files")
            if limit is not None and st.st_size > limit:
                raise ValueError(f"{option}: {path} is {st.st_size} bytes, more than the "
                                 f"largest message allowed ({limit} bytes, "
                                 f"--max-message-size): put large files where the "
                                 f"workers can read them")
            os.set_blocking(fd, True)
            yield fd, st
        finally:
            os.close(fd)


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb", closefd=False) as f:
        return f.read()


@contextmanager
def _reading(path: Path, option: str) -> Iterator[None]:
    """Turn an error reading ``path`` (given as ``option``) into one that says so."""
    try:
        yield
    except IsADirectoryError:
        raise IsADirectoryError(f"{option}: {path} is a folder; attach files") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{option}: no file {path}") from None
    except OSError as e:
        raise OSError(f"{option}: cannot read {path}: {e.strerror}") from None


def collect(files: Iterable[str | os.PathLike[str]] = (),
            user_vars: Mapping[str, Any] | None = None,
            load_files: Iterable[str | os.PathLike[str]] = (),
            limit: int | None = None) -> Attachments:
    """Read and check what a job call attaches (ValueError, TypeError or OSError
    naming the problem); a file over ``limit`` bytes is refused before it is read."""
    att = Attachments()
    origin: dict[str, Path] = {}
    for path in _paths(files, "files"):
        data, digest = _cache.read(path, "files", limit)
        name = path.name
        if name in att.files and att.digests[name] != digest:
            raise ValueError(f"files: {origin[name]} and {path} are both named {name!r} in "
                             f"the job's folder; rename one")
        att.files[name], att.digests[name], origin[name] = data, digest, path
    for path in _paths(load_files, "load_files"):
        data = read_file(path, "load_files", limit)
        try:
            att.load_files.append((str(path), data.decode()))
        except UnicodeDecodeError:
            raise ValueError(f"load_files: {path} is not UTF-8 text (code to run)") from None
    if user_vars is not None:
        if not isinstance(user_vars, Mapping):
            raise TypeError(f"user_vars must be a dict of names to values, not "
                            f"{type(user_vars).__name__}")
        for k in user_vars:
            if not isinstance(k, str) or not k.isidentifier():
                raise ValueError(f"user_vars: {k!r} is not a Python name")
        att.user_vars = dict(user_vars)
    return att


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wrap(payload: bytes, att: Attachments) -> tuple[bytes, dict[str, bytes]]:
    """The job's payload with its attachments (the payload itself if there are none),
    and the shared blobs it uses: its files' contents, by hash."""
    if not att:
        return payload, {}
    shared = {att.digests[name]: data for name, data in att.files.items()}
    refs = dict(att.digests)
    try:
        packed = codec.dump_trusted((refs, att.user_vars, att.load_files))
    except Exception as e:  # noqa: BLE001 - name the value that cannot travel
        for k, v in att.user_vars.items():
            try:
                codec.dump_trusted(v)
            except Exception as inner:  # noqa: BLE001
                raise TypeError(f"user_vars: cannot send {k!r} ({type(v).__name__}): "
                                f"{inner}") from None
        raise TypeError(f"cannot pickle the attachments: {e}") from None
    return b"".join((MAGIC, _LENGTH.pack(len(packed)), packed, payload)), shared


def unwrap(payload: bytes, shared: Mapping[str, bytes]
           ) -> tuple[bytes, Attachments | None]:
    """The job's own payload and its attachments (None if it has none), its files
    taken from the ``shared`` blobs that came with it; ValueError if the envelope is
    malformed or a file's content did not come. Only ever called in a slot, which
    runs the job anyway."""
    if not payload.startswith(MAGIC):
        return payload, None
    start = len(MAGIC) + _LENGTH.size
    if len(payload) < start:
        raise ValueError("a job's attachments are cut short")
    (n,) = _LENGTH.unpack_from(payload, len(MAGIC))
    if start + n > len(payload):
        raise ValueError("a job's attachments are cut short")
    refs, user_vars, load_files = codec.load_trusted(payload[start:start + n])
    files = {}
    for name, digest in refs.items():
        if digest not in shared:
            raise ValueError(f"the content of the attached file {name!r} did not arrive")
        files[name] = shared[digest]
    return payload[start + n:], Attachments(files, user_vars, load_files)


def place(att: Attachments, folder: str) -> None:
    """Write the attached files into the job's folder."""
    for name, data in att.files.items():
        if name in ("", ".", "..") or os.sep in name:
            raise ValueError(f"an attached file is named {name!r}: not a file name")
        fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                     | os.O_NOFOLLOW, 0o600)
        with open(fd, "wb") as f:
            f.write(data)
