"""JobWrapper: the user's handle on one job, kept up to date by the client's I/O thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import codec
from .protocol import FINAL, Encoding, ResultFrom, Status

if TYPE_CHECKING:
    from .client import DSage

_UNSET: Any = object()


#: how much of a failed job's output its JobError message shows (the end)
MESSAGE_TAIL = 4000


class JobError(Exception):
    """A job failed or was killed; ``output`` holds what it printed, with the traceback."""

    def __init__(self, job: JobWrapper) -> None:
        self.job = job
        self.status = job.status
        self.error = job.error
        self.output = job.output
        detail = f"job {job.job_id[:8]}{f' ({job.name})' if job.name else ''} {job.status}"
        tail = self.output[-MESSAGE_TAIL:]
        if len(self.output) > MESSAGE_TAIL:
            tail = "[... the start is in .output ...]\n" + tail
        super().__init__(f"{detail}: {job.error}" + (f"\n{tail}" if tail else ""))


class UntrustedResultError(Exception):
    """A result from an anonymous worker was not in the data-only encoding."""


@dataclass(frozen=True)
class WorkerInfo:
    """The monitor that ran (or runs) a job."""

    id: str
    host: str
    anonymous: bool
    key: str


class JobWrapper:
    """A submitted job. ``status``, ``output`` and ``result`` follow the job live."""

    def __init__(self, client: DSage | None, job_id: str, name: str | None, kind: str,
                 priority: int = 5) -> None:
        self._client = client
        self.job_id = job_id
        self.name = name
        self.kind = kind
        self.priority = priority
        self.status = Status.NEW.value
        self.created: float | None = None
        self.started: float | None = None
        self.finished: float | None = None
        self.failures = 0
        self.error: str | None = None
        self.worker: WorkerInfo | None = None
        self._encoding = Encoding.NONE.value
        self._result_from = ResultFrom.NONE.value
        self._result_blob = b""
        self._output_blob = b""
        self._result: Any = _UNSET
        self._done = threading.Event()
        #: why the job was refused before it was queued ('quota', 'size', ...), else None
        self.refused: str | None = None

    # --- updates from the I/O thread

    def _update(self, rec: dict[str, Any], blobs: list[bytes]) -> bool:
        """Apply a record from the broker; True if the job just reached a final state."""
        if self._done.is_set():
            return False  # a final state never changes
        self.status = rec["status"]
        self.name = rec["name"]
        self.priority = rec["priority"]
        self.created, self.started, self.finished = rec["created"], rec["started"], rec["finished"]
        self.failures = rec["failures"]
        self.error = rec["error"]
        w = rec["worker"]
        self.worker = None if w is None else WorkerInfo(w["id"], w["host"], w["anonymous"], w["key"])
        if rec["status"] in FINAL:
            self._encoding, self._result_from = rec["encoding"], rec["result_from"]
            self._result_blob, self._output_blob = blobs
            if rec["sealed"] and self._client is not None:
                try:
                    self._result_blob, self._output_blob = self._client._unseal(
                        self._result_blob, self._output_blob, self.worker)
                except ValueError as e:  # seal.SealError: never let it stop the I/O thread
                    self.status, self.error = Status.FAILED.value, f"unreadable result: {e}"
                    self._encoding = Encoding.NONE.value
                    self._result_blob = self._output_blob = b""
            self._done.set()
            return True
        return False

    # --- the user's view

    def done(self) -> bool:
        """Whether the job reached a final state (completed, failed or killed)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> JobWrapper:
        """Block until the job is final, at most ``timeout`` seconds (TimeoutError after)."""
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be None or a number of seconds >= 0")
        if not self._done.wait(timeout):
            if self._client is not None:
                self._client._query(self.job_id)  # the truth, should an event be lost
            raise TimeoutError(f"job {self.job_id} is still {self.status} after {timeout} s")
        return self

    @property
    def output(self) -> str:
        """What the job printed (stdout and stderr), with the traceback if it raised."""
        return self._output_blob.decode("utf-8", errors="replace")

    @property
    def trusted(self) -> bool:
        """False when an anonymous worker ran the job: its result is plain data only."""
        return self.worker is None or not self.worker.anonymous

    @property
    def result(self) -> Any:
        """The job's result, waiting for it if needed; raises :class:`JobError` if the
        job failed or was killed, and ``SubmitRejected`` if it was never accepted."""
        self.wait()
        if self.refused is not None:
            from .client import SubmitRejected

            raise SubmitRejected(f"job {self.job_id}: {self.error}")
        if self.status != Status.COMPLETED:
            raise JobError(self)
        if self._result is _UNSET:
            self._result = self._decode()
        return self._result

    def _decode(self) -> Any:
        if self._encoding == Encoding.NONE:
            return None
        if self._encoding == Encoding.DATA:
            return codec.load_data(self._result_blob)
        if not self.trusted:
            raise UntrustedResultError(
                f"job {self.job_id} ran on an anonymous worker, which sent a pickle: "
                f"it is not loaded, as it could run code")
        return codec.load_trusted(self._result_blob)

    def kill(self) -> JobWrapper:
        """Kill the job: a queued one is removed, a running one's process is killed."""
        if self._client is None:
            raise RuntimeError("this job has no client")
        self._client.kill(self.job_id)
        return self

    def __repr__(self) -> str:
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
            return repr(self.result)
        except Exception as e:  # noqa: BLE001 - a repr must not raise
            return f"<result that cannot be shown: {e}>"
