"""JobWrapper: the user's handle on one job, kept up to date by the client's I/O thread.

A wrapper is a :class:`concurrent.futures.Future`, so ``concurrent.futures.wait``
and ``as_completed``, ``asyncio.wrap_future`` and ``await`` accept it. It knows
its client only through :class:`JobHost`, the few things it asks of it.

All wrappers of a client share one condition variable (their Future
``_condition``), which the I/O thread notifies once per batch of jobs that
reached a final state. Future's own ``__init__`` would give each wrapper a
Condition of its own: measured on 10,000 wrappers, that is 13.6 MB more (1.4 KB
each, about three times a wrapper's own size), twice the time to make them
(20 ms instead of 10), and 10,000 locks (4.6 ms) for the I/O thread to announce
a batch of 10,000 results instead of one (4 us). ``concurrent.futures.wait``
acquires every future's condition, which for one shared RLock is re-entrant.
"""

from __future__ import annotations

import logging
import numbers
import re
import sys
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, FINISHED, PENDING
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from . import codec
from .errors import (
    DSageError, JobCancelled, JobError, SubmitRejected, UnknownJob, UntrustedResultError,
)
from .protocol import FINAL, Encoding, ResultFrom, Status

__all__ = ["JobCancelled", "JobError", "JobHost", "JobWrapper", "UntrustedResultError",
           "WorkerInfo"]

log = logging.getLogger("dsage.client")

_UNSET: Any = object()

_CONTROL = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])"
                      r"|[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")


def strip_control(text: str) -> str:
    """``text`` without terminal escape sequences and control characters (newlines
    and tabs stay)."""
    return _CONTROL.sub("", text)

#: how much of a running job's output a wrapper keeps (its end)
LIVE_KEEP = 1 << 20

#: the condition of wrappers without a client (made by hand, as tests do)
_HOSTLESS = threading.Condition()


def check_wait(timeout: Any) -> float | None:
    """A wait's ``timeout``, checked in the call: None (no limit) or a number of
    seconds >= 0 (TypeError or ValueError naming it otherwise)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout={timeout!r}: give None or a number of seconds >= 0")
    seconds = float(timeout)
    if not seconds >= 0:  # (also NaN)
        raise ValueError(f"timeout={timeout!r}: give None or a number of seconds >= 0")
    return seconds


class JobHost(Protocol):
    """What a JobWrapper needs from its client."""

    @property
    def changed(self) -> threading.Condition:
        """Notified (by the I/O thread) whenever jobs of this client reach a final state."""

    def check_usable(self) -> None:
        """Raise ``DSageError`` if the client cannot be used here (closed, or this is a
        forked child of the process that made it)."""

    def kill(self, job_id: str) -> None:
        """Kill the job (raises ``UnknownJob`` if the broker does not know it)."""

    def cancel(self, job_id: str) -> None:
        """Remove the job if it is still queued on the broker (raises ``UnknownJob``
        if the broker does not know it); the wrapper is updated before this returns."""

    def query(self, job_id: str) -> None:
        """Ask the broker for the job's state, in the background."""

    def watch(self, watcher: Callable[[list[JobWrapper]], None]) -> None:
        """Call ``watcher`` (on the I/O thread; it must be quick) with the wrappers that
        changed, after each batch of updates."""

    def unwatch(self, watcher: Callable[[list[JobWrapper]], None]) -> None:
        """Stop calling ``watcher``."""

    def open_sealed(self, rec: dict[str, Any], result: bytes,
                    output: bytes) -> tuple[bytes, bytes]:
        """Open a result and output sealed to this client's key, checking that they are
        bound to the job and outcome of ``rec`` and come from the worker it names
        (ValueError if anything fails)."""


@dataclass(frozen=True)
class WorkerInfo:
    """The monitor that ran (or runs) a job."""

    id: str
    host: str
    anonymous: bool
    key: str


class JobWrapper(Future[Any]):
    """A submitted job. ``status``, ``output`` and ``result`` follow the job live.

    Only the client's I/O thread changes a wrapper (and the client makes every
    wrapper it hands out there, so no update is missed between a reply and the
    wrapper's registration). It is a :class:`concurrent.futures.Future` whose
    state that thread drives: ``done()`` once the job is final, ``cancelled()``
    once it was removed from the queue before it ran, ``running()`` while a
    worker has it."""

    def __init__(self, host: JobHost | None, job_id: str, name: str | None, kind: str,
                 priority: int = 5) -> None:
        # Future's state, without Future.__init__'s Condition of its own (see the
        # module's docstring); changed only under the shared condition, by _settle
        self._condition = _HOSTLESS if host is None else host.changed
        self._state = PENDING
        self._result = None
        self._exception = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[Future[Any]], object]] = []
        self._host = host
        self.job_id = job_id
        self.name = name
        self.kind = kind
        self.priority = priority
        self.status = Status.NEW.value
        self.created: float | None = None
        self.started: float | None = None
        self.finished: float | None = None
        self.failures = 0
        #: which run of the job this is, or was last: 1, then 2 after a retry (``retries=``)
        self.attempt = 1
        self.error: str | None = None
        #: why a queued job is waiting (no connected worker offers its tags, say), else None
        self.reason: str | None = None
        self.worker: WorkerInfo | None = None
        self._encoding = Encoding.NONE.value
        self._result_from = ResultFrom.NONE.value
        self._result_blob = b""
        self._output_blob = b""
        #: what the job printed while running (its last LIVE_KEEP bytes), from offset
        #: ``_live_base`` of its output
        self._live = bytearray()
        self._live_base = 0
        #: the decoded result, or the error result() raises, once known
        self._value: Any = _UNSET
        self._failure: BaseException | None = None
        #: final: set once by the I/O thread, before it notifies ``host.changed``
        self._final = False
        #: why the job was refused before it was queued ('quota', 'size', ...), else None
        self.refused: str | None = None
        #: set when the broker no longer knows the job: wait() and result raise UnknownJob
        self._unknown: str | None = None
        #: set when the client closed before the job ended: wait() and result raise it
        self._closed: str | None = None

    # --- updates from the I/O thread (which notifies ``host.changed`` after a batch)

    def _update(self, rec: dict[str, Any], blobs: list[bytes]) -> bool:
        """Apply a record from the broker; True if the job just reached a final state."""
        if self._final:
            return False  # a final state never changes
        self.status = rec["status"]
        self.name = rec["name"]
        self.priority = rec["priority"]
        self.created, self.started, self.finished = rec["created"], rec["started"], rec["finished"]
        self.failures = rec["failures"]
        self.attempt = rec.get("attempt", 1)  # records of older brokers have none
        self.error = rec["error"]
        w = rec["worker"]
        if self.error and w is not None and w["anonymous"]:
            self.error = strip_control(self.error)
        self.reason = rec.get("reason")  # records of older brokers have none
        w = rec["worker"]
        self.worker = None if w is None else WorkerInfo(w["id"], w["host"], w["anonymous"], w["key"])
        if rec["status"] not in FINAL:
            return False
        self._encoding, self._result_from = rec["encoding"], rec["result_from"]
        self._result_blob, self._output_blob = blobs
        if self._host is not None and (rec["sealed"] or any(blobs)):
            try:
                if not rec["sealed"]:  # only the broker's own final states carry nothing
                    raise ValueError("the result is not sealed: refused")
                self._result_blob, self._output_blob = self._host.open_sealed(
                    rec, self._result_blob, self._output_blob)
            except ValueError as e:  # seal.SealError: never let it stop the I/O thread
                self.status, self.error = Status.FAILED.value, f"unreadable result: {e}"
                self._encoding = Encoding.NONE.value
                self._result_blob = self._output_blob = b""
        if self._encoding == Encoding.ERROR:  # the full error text, sealed
            text = self._result_blob.decode("utf-8", errors="replace")
            self.error = text if self.trusted else strip_control(text)
            self._encoding, self._result_blob = Encoding.NONE.value, b""
        self._final = True
        self._settle_hostless()
        return True

    def _end(self, error: str, refused: str | None = None, unknown: bool = False) -> bool:
        """End a job the broker never accepted (``refused`` says why) or no longer knows
        (``unknown``): it is 'failed' with ``error``. True if it was not final before."""
        if self._final:
            return False
        self.status, self.error, self.reason = Status.FAILED.value, error, None
        self.refused = refused
        self._unknown = error if unknown else None
        self._final = True
        self._settle_hostless()
        return True

    def _add_live(self, offset: int, data: bytes) -> bool:
        """More of the running job's output (from the I/O thread); whether it added any."""
        end = self._live_base + len(self._live)
        if self._final or offset > end or offset + len(data) <= end:
            return False  # final, a gap (a chunk was lost: the result has it all), or seen
        self._live += data[end - offset:]
        if len(self._live) > LIVE_KEEP:
            cut = len(self._live) - LIVE_KEEP
            del self._live[:cut]
            self._live_base += cut
        return True

    def _abandon(self, why: str) -> None:
        """The client closed before the job ended: its state stays as last known, and
        ``wait()``/``result()`` raise DSageError(``why``). The caller notifies waiters."""
        if not self._final:
            self._closed = why
            self._final = True

    # --- the Future's state, driven by the I/O thread

    def _settle(self) -> bool:
        """Under the shared condition (the I/O thread, once the job is final): move the
        Future to its final state and tell ``concurrent.futures`` waiters. True if
        there are done callbacks to call (outside the lock: :meth:`_run_callbacks`)."""
        if not self._final or self._state in (CANCELLED_AND_NOTIFIED, FINISHED):
            return False
        if self._removed_unrun():
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
        else:
            self._state = FINISHED
            ok = self.status == Status.COMPLETED
            for waiter in self._waiters:
                (waiter.add_result if ok else waiter.add_exception)(self)
        return bool(self._done_callbacks)

    def _run_callbacks(self) -> None:
        for fn in self._done_callbacks:
            self._call(fn)

    def _call(self, fn: Callable[[Future[Any]], object]) -> None:
        """Call a done callback; what it raises is logged (it must not stop the I/O thread)."""
        try:
            fn(self)
        except BaseException:  # noqa: BLE001 - even SystemExit: the caller is the I/O thread
            log.exception("a done callback of job %s raised", self.job_id)

    # --- the user's view

    def _removed_unrun(self) -> bool:
        return self._final and self.status == Status.KILLED and self.started is None

    def _settle_hostless(self) -> None:
        """A wrapper without a client (made by hand) has no I/O thread to settle it."""
        if self._host is None:
            with self._condition:
                self._settle()
                self._condition.notify_all()
            self._run_callbacks()

    def done(self) -> bool:
        """Whether the job reached a final state (completed, failed or killed)."""
        return self._state in (CANCELLED_AND_NOTIFIED, FINISHED)

    def cancelled(self) -> bool:
        """Whether the job was removed from the queue before it ran (by :meth:`cancel`,
        or killed while still queued)."""
        return self._state == CANCELLED_AND_NOTIFIED

    def running(self) -> bool:
        """Whether a worker has the job now."""
        return not self._final and self.status == Status.PROCESSING

    def cancel(self) -> bool:
        """Remove the job if the broker still has it queued, as ``Future.cancel``
        does: True if it is cancelled (now or before), False if a worker has it or
        it is finished. A job that runs goes on; :meth:`kill` stops it."""
        if self.done():
            return self.cancelled()
        if self._host is None:
            return False
        self._host.cancel(self.job_id)
        return self.cancelled()

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        """Call ``fn(job)`` when the job is final: from the client's I/O thread, or at
        once if it is final already. What ``fn`` raises is logged and dropped."""
        with self._condition:
            if self._state not in (CANCELLED_AND_NOTIFIED, FINISHED):
                self._done_callbacks.append(fn)
                return
        self._call(fn)

    def set_result(self, result: Any) -> None:
        raise RuntimeError("a JobWrapper's result comes from its job")

    def set_exception(self, exception: BaseException | None) -> None:
        raise RuntimeError("a JobWrapper's outcome comes from its job")

    def set_running_or_notify_cancel(self) -> bool:
        raise RuntimeError("a JobWrapper's state comes from its job")

    def __await__(self) -> Generator[Any, None, Any]:
        """``await job`` in asyncio: the result, without blocking the event loop."""
        import asyncio

        return asyncio.wrap_future(self).__await__()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the job is final, at most ``timeout`` seconds (TimeoutError after).
        Returns nothing (so that ``j.wait()`` at the prompt shows nothing: ``j`` then
        shows the job).

        Raises :class:`UnknownJob` if the broker no longer knows the job, and
        ``DSageError`` for a job that is not final if its client was closed or this
        is a forked child of the process that made the client."""
        timeout = check_wait(timeout)
        if not self.done():
            self._wait(timeout)
        if self._unknown is not None:
            raise UnknownJob(f"job {self.job_id}: {self._unknown}", self.job_id)
        if self._closed is not None:
            raise DSageError(f"job {self.job_id}: {self._closed}")

    def _wait(self, timeout: float | None) -> None:
        host = self._host
        if host is not None:
            host.check_usable()
        changed = _HOSTLESS if host is None else host.changed
        with changed:
            finished = changed.wait_for(self.done, timeout)
        if not finished:
            if host is not None:
                host.query(self.job_id)  # the truth, should an event be lost
            raise TimeoutError(f"job {self.job_id} is still {self.status} after {timeout} s")

    @property
    def output(self) -> str:
        """What the job printed (stdout and stderr), with the traceback if it raised;
        while it runs, what it printed so far (its last MiB, updated about twice a
        second). From an anonymous worker, terminal control sequences are removed (it
        could otherwise rewrite what your terminal shows)."""
        blob = self._output_blob if self._final else bytes(self._live)
        text = blob.decode("utf-8", errors="replace")
        return text if self.trusted else strip_control(text)

    def tail(self, file: TextIO | None = None, callback: Callable[[str], None] | None = None,
             timeout: float | None = None) -> None:
        """Follow the job's output until it ends: each new piece goes to ``callback``,
        or is written to ``file`` (stdout by default) as it arrives. Returns when the
        job is final (TimeoutError after ``timeout`` seconds)."""
        out = sys.stdout if file is None else file
        emit = callback or (lambda text: (out.write(text), out.flush()))
        deadline = None if timeout is None else time.monotonic() + timeout
        shown = self._live_base  # what came before is not kept: start where it is
        host = self._host
        changed = _HOSTLESS if host is None else host.changed
        while True:
            with changed:
                final = self._final
                blob = self._output_blob if final else bytes(self._live)
                base = 0 if final else self._live_base
            if shown < base:
                shown = base
            if base + len(blob) > shown:
                piece = blob[shown - base:].decode("utf-8", errors="replace")
                emit(piece if self.trusted else strip_control(piece))
                shown = base + len(blob)
            if final:
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"job {self.job_id} is still {self.status} after {timeout} s")
            if host is not None:
                host.check_usable()
            with changed:
                changed.wait(0.5 if left is None else min(0.5, left))

    @property
    def trusted(self) -> bool:
        """False when an anonymous worker ran the job: its result is plain data only."""
        return self.worker is None or not self.worker.anonymous

    def result(self, timeout: float | None = None) -> Any:
        """The job's result, waiting for it (at most ``timeout`` seconds, then
        TimeoutError) if needed; raises :class:`JobError` if the job failed or was
        killed, :class:`SubmitRejected` if it was never accepted and
        :class:`UnknownJob` if the broker no longer knows it."""
        self.wait(timeout)
        if self._value is _UNSET and self._failure is None:
            self._outcome()
        if self._failure is not None:
            raise self._failure
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error :meth:`result` raises, or None if it returns a value (waiting as
        it does); raises :class:`JobCancelled` for a cancelled job, as
        ``Future.exception`` does."""
        timeout = check_wait(timeout)
        if not self.done():
            self._wait(timeout)
        if self._value is _UNSET and self._failure is None:
            self._outcome()
        if isinstance(self._failure, JobCancelled):
            raise self._failure
        return self._failure

    def _outcome(self) -> None:
        """Decide, once, what :meth:`result` gives: a value, or an error."""
        try:
            if self._unknown is not None:
                raise UnknownJob(f"job {self.job_id}: {self._unknown}", self.job_id)
            if self._closed is not None:
                raise DSageError(f"job {self.job_id}: {self._closed}")
            if self.refused is not None:
                raise SubmitRejected(f"job {self.job_id}: {self.error}")
            if self._removed_unrun():
                raise JobCancelled(self)
            if self.status != Status.COMPLETED:
                raise JobError(self)
            self._value = self._decode()
        except (DSageError, JobError, UntrustedResultError) as e:
            self._failure = e

    def _decode(self) -> Any:
        if self._encoding == Encoding.NONE:
            return None
        if self._encoding == Encoding.DATA:
            return codec.load_data(self._result_blob)
        if not self.trusted:
            raise UntrustedResultError(
                f"job {self.job_id} ran on an anonymous worker, which sent a pickle: "
                f"it is not loaded, as it could run code")
        try:
            if self._encoding == Encoding.SAGE:  # Sage's object, or its repr without Sage
                return codec.load_sage(self._result_blob)
            return codec.load_trusted(self._result_blob)
        except Exception as e:  # noqa: BLE001 - anything unpickling runs may raise
            if codec.needs_sage(e):
                raise JobError(self, f"its result is a Sage object, and Sage is not "
                               f"installed here ({type(e).__name__}: {e}): install it with "
                               f"pip install 'dsage[sage]' to load it") from e
            raise JobError(self, f"its result cannot be loaded here: {type(e).__name__}: "
                           f"{e} (a module or class the worker had is missing, or "
                           f"differs, in this process)") from e

    def kill(self) -> JobWrapper:
        """Kill the job: a queued one is removed, a running one's process is killed."""
        if self._host is None:
            raise RuntimeError("this job has no client")
        self._host.kill(self.job_id)
        return self

    def __repr__(self) -> str:
        """``<job ID 'name' status>``: how a job shows in a list. A job alone at the
        prompt shows as :meth:`__str__` (see :func:`dsage.display.install`)."""
        name = "" if self.name is None else f" {self.name!r}"
        return f"<job {self.job_id}{name} {self.status}>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        """IPython and Jupyter: the seed's display alone, the short form in a list."""
        p.text(str(self) if len(getattr(p, "stack", ())) <= 1 else repr(self))

    def __str__(self) -> str:
        """What the job printed; else ``No output.`` when its result came from
        ``DSAGE_RESULT`` (or it has none), or the repr of its final expression's
        value; ``No output yet.`` while it runs (the seed's ``repr(j)``)."""
        if not self.done():
            return "No output yet."
        out = self.output
        if out:
            return out.rstrip("\n")
        if self.status != Status.COMPLETED:
            return f"Job {self.status}: {self.error}"
        if self._result_from in (ResultFrom.NONE, ResultFrom.DSAGE_RESULT):
            return "No output."
        try:
            return repr(self.result())
        except Exception as e:  # noqa: BLE001 - a repr must not raise
            return f"<result that cannot be shown: {e}>"
