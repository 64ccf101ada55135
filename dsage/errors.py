"""The errors a user of dsage sees, in one module that imports no other part of
dsage at run time (so the client and JobWrapper both use them without importing
each other)."""

from __future__ import annotations

from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .job import JobWrapper

#: how much of a failed job's output its JobError message shows (the end)
MESSAGE_TAIL = 4000


class DSageError(Exception):
    """Base of the client's errors."""


class BrokerUnreachable(DSageError, ConnectionError):
    """No broker answered in time."""


class KeyRejected(DSageError, PermissionError):
    """The broker refused this client's key."""


class IncompatibleVersion(DSageError):
    """The broker runs a dsage of another major or minor version: their messages differ."""


class UnknownJob(DSageError, KeyError):
    """The broker knows no job with this id for this client's key: it never did,
    it pruned the job (past ``--retention-days``), or its store was replaced.

    ``job_id`` names the job when there is one (``D.job``, ``D.kill``, and a
    wrapper's ``wait()`` and ``result``)."""

    def __init__(self, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0])


class SubmitRejected(DSageError):
    """The broker (or the client, for a job larger than a message may be) refused a
    job before queueing it, for instance past the per-client queue limit."""


class JobError(Exception):
    """A job failed or was killed, or (``status`` 'completed') its result cannot be
    loaded in this process; ``output`` holds what it printed, with the traceback.
    ``error`` is why (``problem`` when given, else the job's error)."""

    def __init__(self, job: JobWrapper, problem: str | None = None) -> None:
        self.job = job
        self.status = job.status
        self.error = job.error if problem is None else problem
        self.output = job.output
        detail = f"job {job.job_id[:8]}{f' ({job.name})' if job.name else ''} {job.status}"
        tail = self.output[-MESSAGE_TAIL:]
        if len(self.output) > MESSAGE_TAIL:
            tail = "[... the start is in .output ...]\n" + tail
        super().__init__(f"{detail}: {self.error}" + (f"\n{tail}" if tail else ""))


class JobCancelled(JobError, CancelledError):
    """The job was removed from the queue before it ran (``cancel()``, or a kill while
    it was queued): a :class:`JobError`, and the ``concurrent.futures.CancelledError``
    that a cancelled Future raises."""


class UntrustedResultError(Exception):
    """A result from an anonymous worker was not in the data-only encoding."""


class RemoteTraceback(Exception):
    """The worker's traceback of an exception, set as its ``__cause__`` (as
    ``concurrent.futures.ProcessPoolExecutor`` does), so a traceback printed here
    shows where it was raised there."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


class ItemError(JobError):
    """An item of a map failed. ``index`` is its position in the map; ``exception``
    what it raised on the worker (with the worker's traceback as its ``__cause__``),
    or the :class:`JobError` of its chunk when the chunk as a whole failed (killed,
    lost too often, out of memory); ``output`` holds the worker's traceback."""

    def __init__(self, index: int, exception: BaseException, output: str,
                 job: JobWrapper | None = None) -> None:
        self.index = index
        self.exception = exception
        self.job = job  # type: ignore[assignment]  # the chunk's job, when known
        self.status = "failed" if job is None else job.status
        self.error = (exception.error if isinstance(exception, JobError)
                      else f"{type(exception).__name__}: {exception}")
        self.output = output
        if isinstance(exception, JobError):  # the chunk failed: say which job, and how
            Exception.__init__(self, f"item {index} failed: its {exception}")
            return
        tail = output[-MESSAGE_TAIL:]
        Exception.__init__(self, f"item {index} failed: {self.error}" + (f"\n{tail}" if tail else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return ItemError, (self.index, self.exception, self.output)
