"""The client's side of ``D.map`` and ``D.imap``: items cut into chunks (sized by
:class:`dsage.chunks.ChunkSizer`), chunks submitted as function jobs a window at a
time, in as few messages as the batch limits allow, and results handed out in
order or as chunks complete.

Only the user's thread runs this; it waits on the client's condition (notified
by the I/O thread when jobs become final) and refills the window whenever
chunks complete, also while it waits for an earlier one.
"""

from __future__ import annotations

import itertools
import pickle
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import codec
from .chunks import NEED_FUNCTION, ChunkSizer, ItemFailure, run_chunk
from .errors import DSageError, ItemError, JobError, RemoteTraceback
from .functions import dump_function, dump_items
from .job import JobWrapper, check_wait
from .progress import JobProgress
from .protocol import MAX_TEXT, Kind, Status, new_job_id

if TYPE_CHECKING:
    from .client import DSage

#: times a chunk is sent again because its slot lacked the function, before the map fails
MAX_RESENDS = 5


class _Chunk:
    """Items ``start`` to ``start + count`` of a map, and their job."""

    __slots__ = ("start", "count", "items", "job", "resends", "results", "failures", "error")

    def __init__(self, start: int, count: int, items: bytes) -> None:
        self.start, self.count, self.items = start, count, items
        self.job: JobWrapper | None = None
        self.resends = 0
        #: once done: the results (a deque, consumed as yielded) and failures by offset
        self.results: deque[Any] | None = None
        self.failures: dict[int, ItemFailure] = {}
        #: once done, if the chunk as a whole failed: its JobError
        self.error: JobError | None = None


class MapRun:
    """One map: call :meth:`results` once for its iterator. The first chunks are
    submitted by the constructor, so a map starts (and its timeout counts) from
    the call, as ``Executor.map``'s does."""

    def __init__(self, client: DSage, func: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
                 *, chunksize: int | None, ordered: bool, timeout: float | None,
                 return_exceptions: bool, job_options: dict[str, Any],
                 raise_original: bool = False) -> None:
        if not callable(func):
            raise TypeError(f"{func!r} is not callable")
        if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int)
                                      or chunksize < 1):
            raise ValueError(f"chunksize={chunksize!r}: give an int of at least 1, or None "
                             f"to size chunks by measured item times")
        timeout = check_wait(timeout)
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.client = client
        self.ordered, self.return_exceptions = ordered, return_exceptions
        self.raise_original = raise_original
        self.digest, self.function = dump_function(func)
        self.fname = getattr(func, "__name__", None) or type(func).__name__
        options = dict(job_options)
        self.template = client._spec(
            Kind.FUNCTION.value, options.pop("job_timeout", None),
            options.pop("priority", 5), (options.pop("name", None) or self.fname)[:MAX_TEXT - 50],
            options.pop("memory", None), options.pop("anonymous_ok", False),
            options.pop("requires", ()), options.pop("isolate", False), **options)
        self.star = len(iterables) != 1
        self.items: Iterator[Any] = iter(iterables[0]) if not self.star else zip(*iterables)
        self.total = _length(iterables)
        self.taken = 0
        self.exhausted = False
        try:
            slots = client._slots(bool(self.template["anonymous_ok"]), timeout=5.0)
        except DSageError:
            slots = 1  # the broker is not answering yet: jobs wait for it anyway
        self.sizer = ChunkSizer(slots, chunksize)
        #: chunks of the function's first wave (as many as are in flight before any
        #: result) carry it; later ones name it by digest (every chunk carries it when
        #: each runs in a fresh process, with ``isolate``)
        self.with_function = (1 << 62 if self.template["isolate"] else
                              0 if self.digest in client._functions_sent
                              else self.sizer.in_flight(1))
        #: chunks submitted and not yet handed out, in submission order
        self.chunks: deque[_Chunk] = deque()
        #: chunks whose jobs are not final yet
        self.in_flight: list[_Chunk] = []
        #: chunks done (unordered mode: waiting to be handed out)
        self.ready: deque[_Chunk] = deque()
        self.on_done: Callable[[int], None] | None = None
        #: the live view of the map's items (progress=True), fed as chunks go out
        self.progress: JobProgress | None = None
        self._fill()

    # --- sending

    def _fill(self) -> None:
        """Submit chunks until the window is full or the items run out: all in one
        command, so they leave in as few messages as the batch limits allow."""
        new: list[_Chunk] = []
        while not self.exhausted:
            remaining = None if self.total is None else self.total - self.taken
            size = self.sizer.size(remaining)
            if len(self.in_flight) + len(new) >= self.sizer.in_flight(size):
                break
            items = list(itertools.islice(self.items, size))
            if len(items) < size:
                self.exhausted = True
            if not items:
                break
            blob = dump_items(items, self.taken)
            self.sizer.sent(len(items), len(blob))
            new.append(_Chunk(self.taken, len(items), blob))
            self.taken += len(items)
        self._submit(new)
        self.chunks.extend(new)

    def _submit(self, chunks: list[_Chunk]) -> None:
        if not chunks:
            return
        jobs = []
        for c in chunks:
            function = None
            if self.with_function > 0 or c.resends:
                function = self.function
                self.with_function -= 1
            payload = pickle.dumps((run_chunk, (self.digest, function, c.items, self.star), {}),
                                   protocol=pickle.HIGHEST_PROTOCOL)
            spec = dict(self.template, id=new_job_id(),
                        name=f"{self.template['name']} [{c.start}:{c.start + c.count}]")
            if c.resends:  # ahead of the map's later chunks, whose turn it had come before
                spec["priority"] = max(0, spec["priority"] - 1)
            jobs.append((spec, payload))
        for c, job in zip(chunks, self.client._submit_specs(jobs)):
            c.job = job
            self.in_flight.append(c)
        if self.progress is not None:
            self.progress.add([c.job for c in chunks if c.job is not None],
                              [c.count for c in chunks])
        self.client._functions_sent.add(self.digest)

    # --- receiving

    def _wait(self) -> None:
        """Wait until some chunk in flight is final (TimeoutError past the deadline),
        then take in every final one and refill the window."""
        changed = self.client._host.changed

        def some_done() -> bool:
            return any(c.job.done() for c in self.in_flight)  # type: ignore[union-attr]

        while not some_done():
            self.client._check_usable()  # a client closed meanwhile ends the wait
            left = 1.0 if self.deadline is None else min(1.0, self.deadline - time.monotonic())
            if left <= 0:
                raise TimeoutError(f"the map was not done within its timeout "
                                   f"({len(self.in_flight)} chunks still running)")
            with changed:
                changed.wait_for(some_done, left)
        done: list[_Chunk] = []
        running: list[_Chunk] = []
        for c in self.in_flight:  # one look at each: a job may become final meanwhile
            (done if c.job.done() else running).append(c)  # type: ignore[union-attr]
        self.in_flight = running
        resend = [c for c in done if not self._take(c)]
        self._submit(resend)
        self._fill()

    def _take(self, c: _Chunk) -> bool:
        """Take in a final chunk; False if it must go again with the function."""
        job, c.job = c.job, None
        assert job is not None
        if job.status != Status.COMPLETED:
            c.error = JobError(job)
        elif not job.trusted:
            c.error = _chunk_error(job, "the chunk ran on an anonymous worker, whose results "
                                        "are data only: a map's results are not loaded from it")
        else:
            try:
                value = job.result()
            except Exception as e:  # noqa: BLE001 - a result this client cannot load
                c.error = _chunk_error(job, f"its result cannot be loaded here: "
                                            f"{type(e).__name__}: {e}")
                value = None
            if value is not None and value[0] == NEED_FUNCTION:
                # new slots: the next chunks carry the function too, not only this one
                self.with_function = max(self.with_function, self.sizer.slots)
                c.resends += 1
                if c.resends <= MAX_RESENDS:
                    if self.progress is not None:
                        self.progress.forget([job])  # counted again as the job it becomes
                    return False
                c.error = _chunk_error(job, "the function was sent with it, yet the worker "
                                            "said it did not have it")
            elif value is not None:
                _, seconds, blob, c.failures = value
                c.results = deque(codec.load_trusted(blob))
                self.sizer.done(c.count, seconds, len(blob))
        c.items = b""
        if self.on_done is not None:
            self.on_done(c.count)
        if not self.ordered:
            self.ready.append(c)
        return True

    # --- handing out

    def results(self, progress: bool = False) -> Iterator[Any]:
        """The map's results (see ``D.imap``)."""
        if not progress:
            return self._iterate()
        view = self.progress = JobProgress(title=f"map {self.fname}", total=self.total,
                                           unit="items")
        view.add([c.job for c in self.in_flight if c.job is not None],
                 [c.count for c in self.in_flight if c.job is not None])
        return _with_progress(view, self._iterate())

    def _iterate(self) -> Iterator[Any]:
        try:
            while self.chunks:
                if self.ordered:
                    head = self.chunks[0]
                    while head.job is not None:
                        self._wait()
                    self.chunks.popleft()
                    c = head
                else:
                    while not self.ready:
                        self._wait()
                    c = self.ready.popleft()
                    self.chunks.remove(c)
                yield from self._hand_out(c)
        finally:
            self.client._kill_quietly([c.job.job_id for c in self.in_flight
                                       if c.job is not None and not c.job.done()])
            self.in_flight.clear()

    def _hand_out(self, c: _Chunk) -> Iterator[Any]:
        for offset in range(c.count):
            if c.error is None and offset not in c.failures:
                yield c.results.popleft()  # type: ignore[union-attr]
                continue
            if c.results:
                c.results.popleft()
            exc = self._item_error(c, offset)
            if self.return_exceptions:
                yield exc
            elif self.raise_original and not isinstance(exc, ItemError):
                raise exc
            elif isinstance(exc, ItemError):
                raise exc
            else:
                raise ItemError(c.start + offset, exc, c.failures[offset].traceback) from exc

    def _item_error(self, c: _Chunk, offset: int) -> BaseException:
        """The exception of a failed item: what it raised (with the worker's traceback
        as its cause), or an :class:`ItemError` when its chunk failed as a whole."""
        if c.error is not None:
            return ItemError(c.start + offset, c.error, c.error.output, c.error.job)
        f = c.failures[offset]
        exc = f.exception if f.exception is not None else _Unpicklable(f.text)
        exc.__cause__ = RemoteTraceback(f.traceback)
        return exc


class _Unpicklable(Exception):
    """An item's exception that could not be pickled on the worker: its text."""


def _chunk_error(job: JobWrapper, why: str) -> JobError:
    err = JobError(job)
    err.error = why
    err.args = (f"job {job.job_id[:8]} ({job.name}): {why}",)
    return err


def _length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    """How many items zipping the iterables gives, when they all have a length."""
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None if iterables else 0


def _with_progress(view: JobProgress, results: Iterator[Any]) -> Iterator[Any]:
    """``results``, ending the live view of the map's items when they end."""
    try:
        yield from results
    finally:
        view.close()
