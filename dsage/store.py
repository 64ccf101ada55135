"""The broker's job store: one SQLite file in WAL mode.

The store is the single owner of job state. Callers group changes and call
:meth:`Store.commit` once per loop iteration; the broker acknowledges a submit
only after that commit. Payloads, results and output are opaque bytes here.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .protocol import FINAL, Status

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
    output BLOB
);
CREATE INDEX IF NOT EXISTS queue ON jobs(priority, seq) WHERE status = 'new';
CREATE INDEX IF NOT EXISTS queue_anon ON jobs(priority, seq)
    WHERE status = 'new' AND anonymous_ok = 1;
CREATE INDEX IF NOT EXISTS by_owner ON jobs(owner, status);
CREATE INDEX IF NOT EXISTS by_status ON jobs(status);
"""

_RECORD_COLUMNS = (
    "id, name, kind, status, priority, created, started, finished, failures, error, "
    "worker_id, worker_host, worker_key, worker_anonymous, encoding, result_from, sealed, "
    "result, output, owner"
)


@dataclass(frozen=True)
class RunnableJob:
    """A queued job as a monitor needs it."""

    id: str
    owner: str
    name: str | None
    kind: str
    timeout: float | None
    memory: int | None
    anonymous_ok: bool
    payload: bytes
    priority: int
    created: float
    failures: int


@dataclass(frozen=True)
class JobState:
    """A job's status, the monitor running it (if any), its owner and security setting."""

    status: Status
    worker_id: str | None
    owner: str
    anonymous_ok: bool


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


Record = tuple[dict[str, Any], list[bytes]]


def _record(row: sqlite3.Row | tuple[Any, ...]) -> tuple[str, Record]:
    """(owner, record) from a row of ``_RECORD_COLUMNS``."""
    (id_, name, kind, status, priority, created, started, finished, failures, error,
     worker_id, worker_host, worker_key, worker_anon, encoding, result_from, sealed,
     result, output, owner) = row
    worker = None
    if worker_id is not None:
        worker = {"id": worker_id, "host": worker_host, "key": worker_key,
                  "anonymous": bool(worker_anon)}
    header = {
        "id": id_, "name": name, "kind": kind, "status": status, "priority": priority,
        "created": created, "started": started, "finished": finished,
        "failures": failures, "error": error, "worker": worker, "encoding": encoding,
        "result_from": result_from, "sealed": bool(sealed), "reason": None,
    }
    return owner, (header, [result or b"", output or b""])


class Store:
    """SQLite-backed job table."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self.db.execute("BEGIN")
        self._committed_changes = self.db.total_changes

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
        except sqlite3.OperationalError:
            pass
        self.db.close()

    # --- submit

    def owner_of(self, ids: Sequence[str]) -> dict[str, str]:
        """Owners of those ``ids`` that exist."""
        out: dict[str, str] = {}
        for chunk in _chunks(ids):
            q = f"SELECT id, owner FROM jobs WHERE id IN ({','.join('?' * len(chunk))})"
            out.update(self.db.execute(q, chunk).fetchall())
        return out

    def insert(self, owner: str, spec: dict[str, Any], payload: bytes, now: float) -> bool:
        """Store a new job; False (and no change) if its id exists already."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO jobs (id, owner, name, kind, status, priority, anonymous_ok,"
            " timeout, memory, requires, created, payload) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (spec["id"], owner, spec["name"], spec["kind"], Status.NEW.value, spec["priority"],
             int(spec["anonymous_ok"]), spec["timeout"], spec["memory"],
             json.dumps(spec["requires"]), now, payload),
        )
        return cur.rowcount == 1

    # --- dispatch

    def next_queued(self, limit: int, anonymous_only: bool) -> list[RunnableJob]:
        """Up to ``limit`` queued jobs, most urgent first (priority, then submission order)."""
        index = "queue_anon" if anonymous_only else "queue"
        extra = " AND anonymous_ok = 1" if anonymous_only else ""
        rows = self.db.execute(
            f"SELECT id, owner, name, kind, timeout, memory, anonymous_ok, payload, priority,"
            f" created, failures FROM jobs INDEXED BY {index} WHERE status = 'new'{extra}"
            f" ORDER BY priority, seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [RunnableJob(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), *r[7:]) for r in rows]

    def start(self, ids: Sequence[str], worker: WorkerRef, now: float) -> None:
        self.db.executemany(
            "UPDATE jobs SET status='processing', started=?, worker_id=?, worker_host=?,"
            " worker_key=?, worker_anonymous=? WHERE id=?",
            [(now, worker.id, worker.host, worker.key, int(worker.anonymous), i) for i in ids],
        )

    # --- results and state changes

    def finish(self, job_id: str, outcome: Outcome,
               worker: WorkerRef | None = None) -> tuple[str, Record] | None:
        """Record a final state; return (owner, record), or None (and no change) if
        the job is already final.

        ``worker`` is the monitor that delivered the outcome, recorded as the one
        that ran the job.
        """
        w = (None, None, None, None) if worker is None else (
            worker.id, worker.host, worker.key, int(worker.anonymous))
        row = self.db.execute(
            "UPDATE jobs SET status=?, error=?, encoding=?, result_from=?, sealed=?,"
            " started=COALESCE(?, started), finished=?, result=?, output=?, payload=NULL,"
            " worker_id=COALESCE(?, worker_id), worker_host=COALESCE(?, worker_host),"
            " worker_key=COALESCE(?, worker_key),"
            " worker_anonymous=COALESCE(?, worker_anonymous)"
            f" WHERE id=? AND status IN ('new', 'processing') RETURNING {_RECORD_COLUMNS}",
            (outcome.status.value, outcome.error, outcome.encoding, outcome.result_from,
             int(outcome.sealed), outcome.started, outcome.finished, outcome.result,
             outcome.output, *w, job_id),
        ).fetchone()
        return None if row is None else _record(row)

    def requeue(self, job_id: str, count_failure: bool, failure_limit: int,
                reason: str, now: float) -> Status | None:
        """Put a processing job back in the queue, or fail it past the failure limit.

        Returns the new status, or None when the job was not processing.
        """
        row = self.db.execute(
            "SELECT failures FROM jobs WHERE id=? AND status='processing'", (job_id,)
        ).fetchone()
        if row is None:
            return None
        failures = row[0] + (1 if count_failure else 0)
        if failures >= failure_limit:
            self.db.execute(
                "UPDATE jobs SET status='failed', failures=?, finished=?, error=?, payload=NULL"
                " WHERE id=?",
                (failures, now, f"{reason}: lost its worker {failures} times "
                                f"(failure limit {failure_limit})", job_id),
            )
            return Status.FAILED
        self.db.execute(
            "UPDATE jobs SET status='new', failures=?, started=NULL, worker_id=NULL,"
            " worker_host=NULL, worker_key=NULL, worker_anonymous=NULL WHERE id=?",
            (failures, job_id),
        )
        return Status.NEW

    def state(self, job_id: str) -> JobState | None:
        """What the broker's rules need to know of one job."""
        row = self.db.execute(
            "SELECT status, worker_id, owner, anonymous_ok FROM jobs WHERE id=?", (job_id,)
        ).fetchone()
        return None if row is None else JobState(Status(row[0]), row[1], row[2], bool(row[3]))

    def processing(self) -> list[tuple[str, str | None]]:
        """(job id, monitor id) of every job marked processing."""
        return self.db.execute(
            "SELECT id, worker_id FROM jobs WHERE status='processing'"
        ).fetchall()

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

    def list(self, owner: str, status: Status | None, limit: int) -> list[Record]:
        q = f"SELECT {_RECORD_COLUMNS} FROM jobs WHERE owner=?"
        args: list[Any] = [owner]
        if status is not None:
            q += " AND status=?"
            args.append(status.value)
        q += " ORDER BY seq LIMIT ?"
        args.append(limit)
        return [_record(r)[1] for r in self.db.execute(q, args)]

    def queued_counts(self) -> tuple[int, int, dict[str, int]]:
        """Queued jobs: total, how many may run anonymously, and per owner."""
        per_owner = dict(self.db.execute(
            "SELECT owner, COUNT(*) FROM jobs WHERE status='new' GROUP BY owner"
        ).fetchall())
        anon = self.db.execute(
            "SELECT COUNT(*) FROM jobs WHERE status='new' AND anonymous_ok=1"
        ).fetchone()[0]
        return sum(per_owner.values()), anon, per_owner

    def prune(self, finished_before: float) -> int:
        """Delete final jobs that finished before the given time."""
        finals = ",".join(f"'{s.value}'" for s in FINAL)
        cur = self.db.execute(
            f"DELETE FROM jobs WHERE status IN ({finals}) AND finished < ?", (finished_before,)
        )
        return cur.rowcount


def _chunks(items: Sequence[str], size: int = 500) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])
