"""``D.executor()``: dsage behind the standard library's ``concurrent.futures.Executor``.

``submit`` is ``D.eval_function`` and returns the job's JobWrapper; ``map`` is
``D.imap`` in order, raising at the first failing item what the item raised
(with the worker's traceback as its cause, as ``ProcessPoolExecutor`` does);
``shutdown`` stops new work and waits for (or kills) what was submitted.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from .errors import DSageError
from .job import JobWrapper
from .mapping import MapRun
from .protocol import Status

if TYPE_CHECKING:
    from .client import DSage

__all__ = ["DSageExecutor"]


class DSageExecutor(Executor):
    """Runs calls on a DSage client's workers, each job with the ``job_options``
    given to ``D.executor(...)`` (``priority``, ``requires``, ``memory``...).

    As in the standard library, work submitted before :meth:`shutdown` runs to its
    end unless ``cancel_futures`` kills what has not started, and a ``map``
    iterator made before shutdown can still be read to its end. Unlike
    ``ProcessPoolExecutor.map``, ``chunksize=None`` (the default) sizes chunks from
    measured item times, and a map reads its items as its chunks are sent."""

    def __init__(self, client: DSage, **job_options: Any) -> None:
        self._client = client
        self._options = job_options
        self._lock = threading.Lock()
        self._shutdown = False
        #: jobs from submit() not seen final yet, by id (pruned as the table grows)
        self._pending: dict[str, JobWrapper] = {}
        self._prune_at = 1024
        self._maps: weakref.WeakSet[MapRun] = weakref.WeakSet()

    def submit(self, fn: Callable[..., Any], /, *args: Any,
               **kwargs: Any) -> JobWrapper:  # (until JobWrapper is a Future)
        """Run ``fn(*args, **kwargs)`` on a worker; its JobWrapper is the future."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            job = self._client.eval_function(fn, args, kwargs, **self._options)
            self._pending[job.job_id] = job
            if len(self._pending) >= self._prune_at:
                self._pending = {k: j for k, j in self._pending.items() if not j.done()}
                self._prune_at = max(1024, 2 * len(self._pending))
            return job

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int | None = None) -> Iterator[Any]:
        """``fn`` over the zipped iterables, results in order; reading the iterator
        raises the first failing item's exception, or TimeoutError once ``timeout``
        seconds have passed since this call."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            run = MapRun(self._client, fn, iterables, chunksize=chunksize, ordered=True,
                         timeout=timeout, return_exceptions=False,
                         job_options=dict(self._options), raise_original=True)
            self._maps.add(run)
        return run.results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new work after this; with ``cancel_futures`` the queued jobs (and map
        chunks) are killed; with ``wait`` it returns once every job is final."""
        with self._lock:
            self._shutdown = True
            jobs = [j for j in self._pending.values() if not j.done()]
            jobs += [c.job for run in list(self._maps) for c in run.in_flight
                     if c.job is not None]
        if cancel_futures:
            queued = [j.job_id for j in jobs if j.status == Status.NEW and not j.done()]
            self._client._kill_quietly(queued)
        if wait:
            for job in jobs:
                try:
                    job.wait()
                except DSageError:
                    return  # the client was closed: nothing more will finish
        with self._lock:
            self._pending = {k: j for k, j in self._pending.items() if not j.done()}
