"""The broker's job store: one SQLite file in WAL mode, the journal of the
in-memory scheduler (:mod:`dsage.scheduler`).

Every change to a job is written here; callers group them and call
:meth:`Store.commit` once per loop iteration, and the broker acknowledges a
submit or announces a final state only after that commit. At start the broker
reloads the open jobs from here. Payloads, results and output are opaque
bytes.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .protocol import BY_REF_BYTES, FINAL, Status

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    name TEXT,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    anonymous_ok INTEGER NOT NULL,
    timeout REAL,
    memory INTEGER,
    requires TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    failures INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    worker_host TEXT,
    worker_key TEXT,
    worker_anonymous INTEGER,
    error TEXT,
    encoding TEXT NOT NULL DEFAULT 'none',
    result_from TEXT NOT NULL DEFAULT 'none',
    sealed INTEGER NOT NULL DEFAULT 0,
    payload BLOB,
    result BLOB,
    output BLOB,
    staged INTEGER NOT NULL DEFAULT 0,
    isolate INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    retry_on TEXT NOT NULL DEFAULT '[]',
    attempt INTEGER NOT NULL DEFAULT 1,
    shared TEXT NOT NULL DEFAULT '[]'
);
-- shared blobs (attached files) by content hash, once per owner, kept while an
-- open job of that owner uses them (see prune)
CREATE TABLE IF NOT EXISTS shared_blobs (
    owner TEXT NOT NULL,
    hash TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (owner, hash)
);
-- large results and outputs, uploaded by a monitor in chunks; a staged job's
-- blobs are the chunks of the monitor that delivered it (its worker_id)
CREATE TABLE IF NOT EXISTS chunks (
    job_id TEXT NOT NULL,
    uploader TEXT NOT NULL,
    part TEXT NOT NULL,
    offset INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, uploader, part, offset)
);
CREATE INDEX IF NOT EXISTS by_owner ON jobs(owner, status);
-- the open jobs, loaded at start: a job leaves this index once, when it ends
CREATE INDEX IF NOT EXISTS open ON jobs(seq) WHERE status IN ('new', 'processing');
-- the final jobs, by age, for the prune
CREATE INDEX IF NOT EXISTS by_finished ON jobs(finished) WHERE finished IS NOT NULL;
-- indexes of earlier versions: the queue is the broker's, in memory, and every
-- status change paid for these
DROP INDEX IF EXISTS queue;
DROP INDEX IF EXISTS queue_anon;
DROP INDEX IF EXISTS by_status;
"""

#: columns added since the first schema, with their definitions
_ADDED_COLUMNS = (
    ("staged", "INTEGER NOT NULL DEFAULT 0"),
    ("isolate", "INTEGER NOT NULL DEFAULT 0"),
    ("retries", "INTEGER NOT NULL DEFAULT 0"),
    ("retry_on", "TEXT NOT NULL DEFAULT '[]'"),
    ("attempt", "INTEGER NOT NULL DEFAULT 1"),
    ("shared", "TEXT NOT NULL DEFAULT '[]'"),
)

_BIG = (f"(staged OR COALESCE(length(result), 0) + COALESCE(length(output), 0)"
        f" > {BY_REF_BYTES})")
#: a record's columns; large results and outputs stay in the store (``by_ref``)
_RECORD_COLUMNS = (
    "id, name, kind, status, priority, created, started, finished, failures, attempt, error, "
    "worker_id, worker_host, worker_key, worker_anonymous, encoding, result_from, sealed, "
    f"CASE WHEN {_BIG} THEN NULL ELSE result END, CASE WHEN {_BIG} THEN NULL ELSE output END, "
    f"owner, {_BIG}"
)


class StoreLocked(Exception):
    """Another broker has this store open."""


@dataclass(frozen=True)
class OpenJob:
    """A job that is not final, as the broker reloads it at start."""

    id: str
    owner: str
    name: str | None
    kind: str
    priority: int
    timeout: float | None
    memory: int | None
    anonymous_ok: bool
    requires: list[str]
    created: float
    failures: int
    seq: int
    status: Status
    worker_id: str | None
    started: float | None
    payload: bytes | None
    isolate: bool = False
    retries: int = 0
    retry_on: tuple[str, ...] = ()
    attempt: int = 1
    shared: tuple[str, ...] = ()
    #: its largest frame to a monitor, in bytes: its payload or an attached file
    frame: int = 0


@dataclass(frozen=True)
class WorkerRef:
    id: str
    host: str
    key: str
    anonymous: bool


@dataclass(frozen=True)
class Outcome:
    """A job's final state as a monitor reports it."""

    status: Status
    error: str | None
    encoding: str
    result_from: str
    sealed: bool
    started: float | None
    finished: float
    result: bytes
    output: bytes
    #: the result and output are the chunks the delivering monitor uploaded
    staged: bool = False


Record = tuple[dict[str, Any], list[bytes]]


def _record(row: sqlite3.Row | tuple[Any, ...]) -> tuple[str, Record]:
    """(owner, record) from a row of ``_RECORD_COLUMNS``."""
    (id_, name, kind, status, priority, created, started, finished, failures, attempt, error,
     worker_id, worker_host, worker_key, worker_anon, encoding, result_from, sealed,
     result, output, owner, big) = row
    worker = None
    if worker_id is not None:
        worker = WorkerRef(worker_id, worker_host, worker_key, bool(worker_anon))
    return owner, record(id_, name, kind, status, priority, created, started, finished,
                         failures, attempt, error, worker, encoding, result_from, bool(sealed),
                         result or b"", output or b"", bool(big))


def record(id_: str, name: str | None, kind: str, status: str, priority: int, created: float,
           started: float | None, finished: float | None, failures: int, attempt: int,
           error: str | None, worker: WorkerRef | None, encoding: str, result_from: str,
           sealed: bool, result: bytes, output: bytes, by_ref: bool) -> Record:
    """A job's record as clients get it (with ``by_ref``, its result and output are
    fetched apart, and the blobs given are empty)."""
    header = {
        "id": id_, "name": name, "kind": kind, "status": status, "priority": priority,
        "created": created, "started": started, "finished": finished,
        "failures": failures, "attempt": attempt, "error": error,
        "worker": None if worker is None else {
            "id": worker.id, "host": worker.host, "key": worker.key,
            "anonymous": worker.anonymous},
        "encoding": encoding, "result_from": result_from, "sealed": sealed, "reason": None,
        "by_ref": by_ref,
    }
    return header, [result, output]


def by_ref(outcome: Outcome) -> bool:
    """Whether an outcome's result and output are too large to ride on an event, or
    were uploaded in chunks (as ``_BIG`` says of a stored one)."""
    return outcome.staged or len(outcome.result) + len(outcome.output) > BY_REF_BYTES


class Store:
    """SQLite-backed job table, opened by one broker at a time.

    An exclusive ``flock`` on ``PATH.lock`` (held while the store is open, and
    released by the kernel if the broker dies) keeps a second broker off the
    same file; the lock file says who holds it. ``durable`` makes every commit
    reach the disk (``synchronous=FULL``); by default a commit survives the
    broker's crash but not the machine's (``synchronous=NORMAL`` in WAL mode).
    """

    def __init__(self, path: str | Path, durable: bool = False, holder: str = "") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = _lock(lock_path(self.path), holder)
        try:
            _private_file(self.path)  # its -wal and -shm files get the same mode
            self.db = sqlite3.connect(str(self.path), isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            # freed pages (dropped payloads, pruned jobs) are overwritten, not left behind
            self.db.execute("PRAGMA secure_delete=ON")
            self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self.db.executescript(_SCHEMA)
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
            for column, kind in _ADDED_COLUMNS:  # a store made before these existed
                if column not in columns:
                    self.db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
            self.db.execute("BEGIN")
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._committed_changes = self.db.total_changes
        self._truncated_changes = self._committed_changes

    def commit(self) -> None:
        """Make everything since the last commit durable, and start the next
        transaction (nothing to do when nothing changed)."""
        if self.db.total_changes == self._committed_changes:
            return
        self.db.execute("COMMIT")
        self.db.execute("BEGIN")
        self._committed_changes = self.db.total_changes

    def close(self) -> None:
        try:
            self.db.execute("COMMIT")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        self.db.close()
        os.close(self._lock_fd)

    def truncate_wal(self) -> None:
        """Commit, copy the WAL into the database and empty it, so that old page
        images (payloads since dropped, with secure_delete zeroing them in the
        database) do not linger in the WAL. The broker does this when it is idle."""
        self.commit()
        self.db.execute("COMMIT")
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self.db.execute("BEGIN")
        self._truncated_changes = self.db.total_changes

    def changed_since_truncate(self) -> bool:
        return self.db.total_changes != self._truncated_changes

    def rollback(self) -> None:
        """Drop every change since the last commit (after a failed write)."""
        try:
            self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        self.db.execute("BEGIN")
        self._committed_changes = self.db.total_changes

    # --- submit

    def read_part(self, job_id: str, owner: str, part: str, offset: int,
                  length: int) -> tuple[bytes, int] | None:
        """Up to ``length`` bytes of a final job's result or output from ``offset``,
        and the blob's total size; None unless the job is ``owner``'s and final.
        Reads only those bytes (incremental blob I/O, or one uploaded chunk)."""
        column = {"result": "result", "output": "output"}[part]
        row = self.db.execute(
            f"SELECT seq, length({column}), staged, worker_id FROM jobs WHERE id=? AND owner=?"
            " AND status IN ('completed', 'failed', 'killed')", (job_id, owner)).fetchone()
        if row is None:
            return None
        if row[2]:
            return self._read_chunks(job_id, row[3], part, offset, length)
        total = row[1] or 0
        if offset >= total:
            return b"", total
        with self.db.blobopen("jobs", column, row[0], readonly=True) as blob:
            blob.seek(offset)
            return blob.read(min(length, total - offset)), total

    def _read_chunks(self, job_id: str, uploader: str, part: str, offset: int,
                     length: int) -> tuple[bytes, int]:
        key = (job_id, uploader, part)
        total = self.db.execute(
            "SELECT COALESCE(SUM(length(data)), 0) FROM chunks WHERE job_id=? AND uploader=?"
            " AND part=?", key).fetchone()[0]
        row = self.db.execute(
            "SELECT offset, data FROM chunks WHERE job_id=? AND uploader=? AND part=?"
            " AND offset <= ? ORDER BY offset DESC LIMIT 1", (*key, offset)).fetchone()
        if row is None or offset >= total:
            return b"", total
        start = offset - row[0]
        return bytes(row[1][start:start + length]), total

    def owner_of(self, ids: Sequence[str]) -> dict[str, str]:
        """Owners of those ``ids`` that exist."""
        out: dict[str, str] = {}
        for chunk in _chunks(ids):
            q = f"SELECT id, owner FROM jobs WHERE id IN ({','.join('?' * len(chunk))})"
            out.update(self.db.execute(q, chunk).fetchall())
        return out

    def insert(self, owner: str, spec: dict[str, Any], payload: bytes, now: float) -> int | None:
        """Store a new job and return its row number (submission order); None (and
        no change) if its id exists already."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO jobs (id, owner, name, kind, status, priority, anonymous_ok,"
            " timeout, memory, requires, created, payload, isolate, retries, retry_on, shared)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (spec["id"], owner, spec["name"], spec["kind"], Status.NEW.value, spec["priority"],
             int(spec["anonymous_ok"]), spec["timeout"], spec["memory"],
             _json_list(spec["requires"]), now, payload, int(spec["isolate"]),
             spec["retries"], _json_list(spec["retry_on"]), _json_list(spec["shared"])),
        )
        return cur.lastrowid if cur.rowcount == 1 else None

    # --- dispatch

    def open_jobs(self, payload_budget: int) -> list[OpenJob]:
        """Every job that is not final, in submission order; payloads are loaded
        while their total stays within ``payload_budget`` bytes (the rest: None)."""
        rows = self.db.execute(
            "SELECT id, owner, name, kind, priority, timeout, memory, anonymous_ok, requires,"
            " created, failures, seq, status, worker_id, started, length(payload), isolate,"
            " retries, retry_on, attempt, shared"
            " FROM jobs WHERE status IN ('new', 'processing') ORDER BY seq").fetchall()
        out: list[OpenJob] = []
        blob_sizes: dict[tuple[str, str], int] = {}
        for r in rows:
            size = r[15] or 0
            payload = None
            if size <= payload_budget:
                payload = self.payload(r[0])
                payload_budget -= size
            shared = tuple(json.loads(r[20]))
            for d in shared:
                if (r[1], d) not in blob_sizes:  # (many jobs share a blob: asked once)
                    blob_sizes[r[1], d] = self.shared_size(r[1], d) or 0
            frame = max([size, *(blob_sizes[r[1], d] for d in shared)])
            out.append(OpenJob(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]),
                               json.loads(r[8]), r[9], r[10], r[11], Status(r[12]), r[13],
                               r[14], payload, bool(r[16]), r[17], tuple(json.loads(r[18])),
                               r[19], shared, frame))
        return out

    def put_shared(self, owner: str, digest: str, data: bytes) -> None:
        """Keep a shared blob of ``owner`` (nothing to do if it is kept already)."""
        self.db.execute("INSERT OR IGNORE INTO shared_blobs VALUES (?, ?, ?)",
                        (owner, digest, data))

    def shared_size(self, owner: str, digest: str) -> int | None:
        """The size of a kept shared blob of ``owner`` (None when it is not kept)."""
        row = self.db.execute("SELECT length(data) FROM shared_blobs WHERE owner=? AND hash=?",
                              (owner, digest)).fetchone()
        return None if row is None else int(row[0])

    def shared_blob(self, owner: str, digest: str) -> bytes | None:
        row = self.db.execute("SELECT data FROM shared_blobs WHERE owner=? AND hash=?",
                              (owner, digest)).fetchone()
        return None if row is None else bytes(row[0])

    def payload(self, job_id: str) -> bytes:
        row = self.db.execute("SELECT payload FROM jobs WHERE id=?", (job_id,)).fetchone()
        return b"" if row is None or row[0] is None else bytes(row[0])

    def start(self, started: Sequence[tuple[str, float]], worker: WorkerRef) -> None:
        """Jobs run on ``worker``, each since its time in ``started`` (job id, time)."""
        self.db.executemany(
            "UPDATE jobs SET status='processing', started=?, worker_id=?, worker_host=?,"
            " worker_key=?, worker_anonymous=? WHERE id=?",
            [(t, worker.id, worker.host, worker.key, int(worker.anonymous), i)
             for i, t in started],
        )

    # --- results and state changes

    def finish(self, job_id: str, outcome: Outcome, worker: WorkerRef | None = None) -> bool:
        """Record a final state; False (and no change) if the job is final already.

        ``worker`` is the monitor that delivered the outcome, recorded as the one
        that ran the job. (The caller makes the job's record: reading it back here
        cost as much as the update.)
        """
        w = (None, None, None, None) if worker is None else (
            worker.id, worker.host, worker.key, int(worker.anonymous))
        return self.db.execute(
            "UPDATE jobs SET status=?, error=?, encoding=?, result_from=?, sealed=?,"
            " started=COALESCE(?, started), finished=?, result=?, output=?, payload=NULL,"
            " staged=?,"
            " worker_id=COALESCE(?, worker_id), worker_host=COALESCE(?, worker_host),"
            " worker_key=COALESCE(?, worker_key),"
            " worker_anonymous=COALESCE(?, worker_anonymous)"
            " WHERE id=? AND status IN ('new', 'processing')",
            (outcome.status.value, outcome.error, outcome.encoding, outcome.result_from,
             int(outcome.sealed), outcome.started, outcome.finished, outcome.result,
             outcome.output, int(outcome.staged), *w, job_id),
        ).rowcount == 1

    def requeue(self, job_id: str, failures: int) -> None:
        """A processing job is queued again, with ``failures`` counted so far."""
        self.db.execute(
            "UPDATE jobs SET status='new', failures=?, started=NULL, worker_id=NULL,"
            " worker_host=NULL, worker_key=NULL, worker_anonymous=NULL WHERE id=?",
            (failures, job_id),
        )

    def retry(self, job_id: str, attempt: int) -> None:
        """A processing job whose code raised is queued again for run ``attempt``."""
        self.db.execute(
            "UPDATE jobs SET status='new', attempt=?, started=NULL, worker_id=NULL,"
            " worker_host=NULL, worker_key=NULL, worker_anonymous=NULL WHERE id=?",
            (attempt, job_id),
        )

    def fail(self, job_id: str, failures: int, error: str,
             now: float) -> tuple[str, Record] | None:
        """An open job fails without a result (its worker was lost too often)."""
        row = self.db.execute(
            "UPDATE jobs SET status='failed', failures=?, finished=?, error=?, payload=NULL"
            f" WHERE id=? AND status IN ('new', 'processing') RETURNING {_RECORD_COLUMNS}",
            (failures, now, error, job_id),
        ).fetchone()
        return None if row is None else _record(row)

    # --- queries

    def records(self, ids: Iterable[str], owner: str | None = None) -> dict[str, Record]:
        """Records of the given jobs (only ``owner``'s, when given)."""
        return {rec[0]["id"]: rec for _, rec in self.owned_records(ids, owner)}

    def owned_records(self, ids: Iterable[str],
                      owner: str | None = None) -> list[tuple[str, Record]]:
        """(owner, record) of the given jobs (only ``owner``'s, when given)."""
        out: list[tuple[str, Record]] = []
        for chunk in _chunks(list(ids)):
            q = f"SELECT {_RECORD_COLUMNS} FROM jobs WHERE id IN ({','.join('?' * len(chunk))})"
            args: list[Any] = list(chunk)
            if owner is not None:
                q += " AND owner=?"
                args.append(owner)
            out.extend(_record(row) for row in self.db.execute(q, args))
        return out

    def list(self, owner: str, status: Status | None, limit: int, name: str | None = None,
             since: float | None = None, after: int = 0) -> tuple[list[Record], int | None]:
        """A page of ``owner``'s jobs, oldest first, from after sequence number ``after``:
        the records, and where the next page starts (None on the last)."""
        q = f"SELECT seq, {_RECORD_COLUMNS} FROM jobs WHERE owner=? AND seq>?"
        args: list[Any] = [owner, after]
        if status is not None:
            q += " AND status=?"
            args.append(status.value)
        if name is not None:
            q += " AND name=?"
            args.append(name)
        if since is not None:
            q += " AND created>=?"
            args.append(since)
        q += " ORDER BY seq LIMIT ?"
        args.append(limit + 1)
        rows = self.db.execute(q, args).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [_record(r[1:])[1] for r in rows], rows[-1][0] if more else None

    def counts(self, owner: str) -> dict[str, int]:
        """How many of ``owner``'s jobs are in each state."""
        out = {s.value: 0 for s in Status}
        for status, n in self.db.execute(
                "SELECT status, COUNT(*) FROM jobs WHERE owner=? GROUP BY status", (owner,)):
            out[status] = n
        return out

    def purge(self, owner: str, before: float | None) -> int:
        """Delete ``owner``'s final jobs (that finished before ``before``, if given) and
        their chunks; returns how many."""
        finals = ",".join(f"'{s.value}'" for s in FINAL)
        q = f"DELETE FROM jobs WHERE owner=? AND status IN ({finals})"
        args: list[str | float] = [owner]
        if before is not None:
            q += " AND finished<?"
            args.append(before)
        n = self.db.execute(q, args).rowcount
        self.db.execute("DELETE FROM chunks WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE"
                        " jobs.id = job_id)")
        return n

    def prune(self, finished_before: float) -> int:
        """Delete final jobs that finished before the given time, chunks no job uses
        (of pruned jobs, of uploads that lost to another run, or abandoned), and
        shared blobs no open job uses."""
        finals = ",".join(f"'{s.value}'" for s in FINAL)
        cur = self.db.execute(
            f"DELETE FROM jobs WHERE status IN ({finals}) AND finished < ?", (finished_before,)
        )
        self.db.execute(
            "DELETE FROM chunks WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = job_id"
            " AND (status IN ('new', 'processing') OR (staged AND worker_id = uploader)))")
        self.db.execute(
            "DELETE FROM shared_blobs WHERE NOT EXISTS (SELECT 1 FROM jobs,"
            " json_each(jobs.shared) AS used WHERE jobs.owner = shared_blobs.owner AND used.value = shared_blobs.hash"
            " AND jobs.status IN ('new', 'processing'))")
        return cur.rowcount

    def stage(self, job_id: str, uploader: str, part: str, offset: int, data: bytes) -> int:
        """Keep one uploaded chunk; an upload from offset 0 starts over. Returns the
        offset the uploader should send next."""
        if offset == 0:
            self.db.execute("DELETE FROM chunks WHERE job_id=? AND uploader=? AND part=?",
                            (job_id, uploader, part))
        else:
            have = self.db.execute(
                "SELECT COALESCE(SUM(length(data)), 0) FROM chunks WHERE job_id=? AND"
                " uploader=? AND part=?", (job_id, uploader, part)).fetchone()[0]
            if have != offset:
                return have  # a gap (the broker restarted mid-upload): resend from there
        if data:
            self.db.execute("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?)",
                            (job_id, uploader, part, offset, data))
        return offset + len(data)


def _json_list(items: list[str]) -> str:
    """A list of strings as JSON (most jobs' are empty: no encoder call for those)."""
    return json.dumps(items) if items else "[]"


def _private_file(path: Path) -> None:
    """Create (or fix) a store file as 0600, whatever the umask; never through a symlink."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        extra = path.with_name(path.name + suffix)
        if extra.exists() and not extra.is_symlink():
            extra.chmod(0o600)


def lock_path(store: Path) -> Path:
    return store.with_name(store.name + ".lock")


def holder_of(store: Path) -> str | None:
    """Who has the store open (what its lock file says), or None if nobody does."""
    try:
        fd = os.open(lock_path(store), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another broker"
    finally:
        os.close(fd)
    return None


def _lock(path: Path, holder: str) -> int:
    """Hold an exclusive lock on ``path`` (writing ``holder`` in it) or raise StoreLocked."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        raise StoreLocked(
            f"the job store {path.with_suffix('')} is in use by another broker"
            f"{f' ({other})' if other else ''}: one broker per store. Stop that broker, "
            f"connect to it, or give this one another --home or --store") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    return fd


def _chunks(items: Sequence[str], size: int = 500) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])
