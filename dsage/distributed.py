"""DistributedFunction: a computation that runs as jobs and decides, from each
result, what to submit next and when it is done.

A subclass fills ``self.outstanding_jobs`` (code strings or :class:`Job`\\ s),
overrides :meth:`DistributedFunction.process_result`, and sets ``self.result``
and ``self.done`` there. ``start()`` submits the outstanding jobs; one thread
(the run's own) calls ``process_result`` for each job as it ends, in the order
they end, and submits whatever it added to ``outstanding_jobs``. Once
``done``, the jobs still queued or running are killed.

A run's jobs live on the broker under the run's name, with a small
"manifest" job whose result is how to make the run again (its class and
arguments). :func:`restore` finds both after a client restarts: it makes the
run again and replays the results the broker holds, in the order the jobs
ended, through ``process_result``; a job the replay submits is matched to the
broker's job of the same rank instead of being submitted again, so nothing
that already ran runs twice, and what was still queued or running is
followed live. A ``process_result`` that decides only from the results it
sees, in that order (and from its constructor's arguments), resumes exactly
where it stopped.
"""

from __future__ import annotations

import base64
import heapq
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self

from . import codec
from .client import DSage, _check_priority, _check_tags, _check_timeout, parse_memory
from .errors import DSageError, UnknownJob
from .functions import dump_call
from .job import JobWrapper
from .progress import JobProgress
from .protocol import Kind, Status

__all__ = ["DistributedFunction", "Job", "restore"]

log = logging.getLogger("dsage.distributed")

#: what a run's manifest job is named: the run's name and this
MANIFEST_SUFFIX = " (manifest)"
#: the job options a :class:`Job` takes, with DSage.eval's defaults
_OPTIONS = {"timeout": 600, "priority": 5, "memory": None, "anonymous_ok": False,
            "requires": (), "isolate": False}


class Job:
    """One job of a DistributedFunction: ``code`` (Python, or Sage with
    ``kind='sage'``; by default the client's kind) or a call ``func(*args, **kwargs)``; ``files`` (name to
    bytes or text) are written into the job's folder before it runs; ``options``
    are DSage.eval's (``timeout``, ``priority``, ``memory``, ``requires``,
    ``anonymous_ok``, ``isolate``). ``tag`` is any value of yours, kept beside
    the job on this side (``run.job_of(wrapper).tag``), never sent."""

    def __init__(self, code: str | None = None, *, func: Callable[..., Any] | None = None,
                 args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
                 files: Mapping[str, bytes | str] | None = None, kind: str | None = None,
                 tag: Any = None, **options: Any) -> None:
        if (code is None) == (func is None):
            raise TypeError("a Job is code or a function call: give code or func=, not both")
        if code is not None and not isinstance(code, str):
            raise TypeError(f"code must be a string, not {type(code).__name__}")
        if func is not None and not callable(func):
            raise TypeError(f"func={func!r} is not callable")
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise TypeError(f"unknown job option(s): {', '.join(sorted(unknown))} "
                            f"(choose from {', '.join(_OPTIONS)})")
        if kind is not None and func is not None:
            raise TypeError("kind= is for code jobs; a function call is its own kind")
        self.code, self.func = code, func
        self.args, self.kwargs = tuple(args), dict(kwargs or {})
        self.files = {str(k): v.encode() if isinstance(v, str) else bytes(v)
                      for k, v in (files or {}).items()}
        for name in self.files:
            if os.path.isabs(name) or ".." in name.split("/") or not name:
                raise ValueError(f"files: {name!r} must be a relative path inside the job's "
                                 f"folder")
        if kind is not None and kind not in (Kind.PYTHON, Kind.SAGE):
            raise ValueError(f"kind={kind!r}: choose 'python' or 'sage'")
        #: None for code of the client's kind (``DSage.kind``)
        self.kind = kind or (Kind.FUNCTION.value if func is not None else None)
        self.tag = tag
        self.options = {**_OPTIONS, **options}
        # checked now, where the mistake is, not when the run submits the job
        _check_timeout(self.options["timeout"])
        _check_priority(self.options["priority"])
        parse_memory(self.options["memory"])
        self.options["requires"] = _check_tags(self.options["requires"])

    def payload(self) -> bytes:
        """What the worker gets: the code (after lines that write the files), or the
        pickled call (wrapped to write the files first)."""
        if self.func is not None:
            if self.files:
                return dump_call(call_with_files, (self.files, self.func, self.args,
                                                   self.kwargs), {})
            return dump_call(self.func, self.args, self.kwargs)
        assert self.code is not None
        if not self.files:
            return self.code.encode()
        blobs = {k: base64.b64encode(v).decode() for k, v in self.files.items()}
        prelude = ("import base64 as _b64, os as _os\n"
                   f"for _n, _d in {blobs!r}.items():\n"
                   "    _os.makedirs(_os.path.dirname(_n) or '.', exist_ok=True)\n"
                   "    open(_n, 'wb').write(_b64.b64decode(_d))\n"
                   "del _b64, _os, _n, _d\n")
        return (prelude + self.code).encode()

    def __repr__(self) -> str:
        what = self.code if self.code is not None else getattr(self.func, "__name__", "call")
        return f"Job({what!r}{f', tag={self.tag!r}' if self.tag is not None else ''})"


def write_files(files: Mapping[str, bytes]) -> None:
    """Write ``files`` (relative name to bytes) into the current folder (the job's)."""
    for name, data in files.items():
        folder = os.path.dirname(name)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(name, "wb") as f:
            f.write(data)


def call_with_files(files: Mapping[str, bytes], func: Callable[..., Any],
                    args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """On the worker: write ``files`` into the job's folder, then call ``func``."""
    write_files(files)
    return func(*args, **kwargs)


def manifest(spec: bytes) -> bytes:
    """A run's manifest job: its result is what it was given, how to make the run
    (pickled by the client: the worker never loads the run's class)."""
    return spec


class DistributedFunction:
    """A computation made of jobs (see the module's docs). Subclasses call
    ``super().__init__(dsage, ...)`` first, then fill ``self.outstanding_jobs``."""

    #: how to make this run again: its constructor's arguments but the client
    _init_args: tuple[tuple[Any, ...], dict[str, Any]]

    def __new__(cls, *args: Any, **kwargs: Any) -> DistributedFunction:
        self = super().__new__(cls)
        # how to make this run again, without the client (the first argument): the
        # manifest's content
        if args and isinstance(args[0], DSage):
            args = args[1:]
        self._init_args = (args, {k: v for k, v in kwargs.items() if not isinstance(v, DSage)})
        return self

    def __init__(self, dsage: DSage, name: str | None = None, progress: bool = False) -> None:
        self.dsage = dsage
        #: the run's name: every job of the run carries it (``restore`` finds them by it)
        self.name = name or f"{type(self).__name__}-{os.urandom(4).hex()}"
        #: jobs to submit: code strings or :class:`Job`\ s (process_result may add more)
        self.outstanding_jobs: list[Job | str] = []
        #: set by process_result when the computation is over
        self.done = False
        #: set by process_result: the computation's value
        self.result: Any = None
        #: the exception that ended the run (process_result raised, the client closed)
        self.error: BaseException | None = None
        self.progress = progress
        self.started: float | None = None
        self.finished: float | None = None
        #: every job submitted, by id, with the Job it came from
        self.jobs: dict[str, tuple[JobWrapper, Job]] = {}
        self._lock = threading.Lock()
        self._live: dict[str, JobWrapper] = {}  # submitted and not processed
        self._queued: set[str] = set()
        self._results: queue.SimpleQueue[JobWrapper | None] = queue.SimpleQueue()
        #: jobs of an earlier run of this name that a replay adopts, in submission order
        self._replay: deque[JobWrapper] = deque()
        self._replay_final: list[tuple[float, int, JobWrapper]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._ended = threading.Event()
        self._stopping = False
        self._view: JobProgress | None = None

    # --- for subclasses

    def process_result(self, job: JobWrapper) -> None:
        """Called for each job of the run once it is final (completed, failed, or
        killed by someone else), one at a time, in the order they ended. Read
        ``job.result()`` or ``job.status``; append to ``self.outstanding_jobs`` for
        more work; set ``self.result`` and ``self.done`` when finished."""
        raise NotImplementedError(f"{type(self).__name__} must define process_result(self, job)")

    def job_of(self, wrapper: JobWrapper) -> Job:
        """The :class:`Job` a wrapper of this run was made from."""
        return self.jobs[wrapper.job_id][1]

    # --- the user's handle

    def start(self) -> Self:
        """Submit the outstanding jobs and process results in the background."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} was already started")
        self.started = time.monotonic()
        if self.progress:
            self._view = JobProgress(title=self.name, until_closed=True)
        self.dsage._host.watch(self._changed)
        self._thread = threading.Thread(target=self._run, name=f"dsage-{self.name}", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the run ends (TimeoutError after ``timeout`` seconds); its
        result. Raises what ended it if process_result raised or the client closed."""
        if self._thread is None:
            raise RuntimeError(f"{self.name} was not started: call start() first")
        if not self._ended.wait(timeout):
            raise TimeoutError(f"{self.name} is not done after {timeout} s "
                               f"({len(self._live)} jobs open)")
        if self.error is not None:
            raise DSageError(f"{self.name} failed: {type(self.error).__name__}: "
                             f"{self.error}") from self.error
        return self.result

    @property
    def elapsed(self) -> float:
        """Seconds since start, up to the end once the run ended."""
        if self.started is None:
            return 0.0
        return (self.finished or time.monotonic()) - self.started

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._ended.is_set()

    def open_jobs(self) -> list[JobWrapper]:
        """The jobs submitted and not yet processed."""
        with self._lock:
            return list(self._live.values())

    def stop(self, kill: bool = False) -> None:
        """Stop processing results. The run's jobs stay on the broker (they go on
        running), so :func:`restore` can resume it later; with ``kill`` they are
        killed instead."""
        self._stopping = True
        self._results.put(None)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(30)
        if kill:
            self._kill_open()
        self._finish()

    def __enter__(self) -> Self:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Leaving the block ends the run: what is still open is killed."""
        if not self._ended.is_set():
            self.stop(kill=True)

    def __repr__(self) -> str:
        state = ("done" if self.done else "failed" if self.error else "stopped"
                 if self._ended.is_set() else "running" if self._thread else "not started")
        return f"<{type(self).__name__} {self.name!r} {state}, {len(self.jobs)} jobs>"

    # --- restoring

    @classmethod
    def restore(cls, dsage: DSage, name: str, progress: bool = False,
                timeout: float = 60.0) -> Self:
        """The run ``name`` made again from its manifest and resumed (see the module's
        docs), started."""
        run = restore(dsage, name, progress=progress, timeout=timeout)
        if not isinstance(run, cls):
            raise TypeError(f"{name!r} is a run of {type(run).__name__}, not {cls.__name__}")
        return run

    # --- the run's thread

    def _run(self) -> None:
        try:
            if not self._replay and not self.done:
                self._submit_manifest()
            self._submit_outstanding()
            while not self.done and not self._stopping:
                if self._replay_final:
                    w: JobWrapper | None = heapq.heappop(self._replay_final)[2]
                elif not self._live:
                    break  # nothing left to wait for: the computation is over
                else:
                    w = self._results.get()
                if w is None:
                    break
                with self._lock:
                    self._live.pop(w.job_id, None)
                try:
                    w.wait(0)
                except UnknownJob:
                    pass  # purged: final, and process_result sees it failed
                except DSageError as e:  # the client closed
                    self.error = e
                    break
                self.process_result(w)
                if not self.done and not self._stopping:  # stop() may come from process_result
                    self._submit_outstanding()
            if not self._stopping:
                if not self.done and self.error is None:
                    self.done = True  # ran out of jobs: over
                self._kill_open()
                for w in self._replay:  # an earlier run's jobs the replay never reached
                    if not w.done():
                        self._kill(w)
        except BaseException as e:  # noqa: BLE001 - said by wait()
            self.error = e
            self._kill_open()
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._ended.is_set():
            return
        self.finished = time.monotonic()
        try:
            self.dsage._host.unwatch(self._changed)
        except Exception:  # noqa: BLE001 - a closed client
            pass
        if self._view is not None:
            self._view.close()
        self._ended.set()

    def _submit_manifest(self) -> None:
        spec = (type(self), *self._init_args)
        try:
            payload = dump_call(manifest, (codec.dump_trusted(spec),), {})
        except Exception as e:  # noqa: BLE001 - any pickling failure: said, and no restore
            log.warning("%s cannot be restored later: %s", self.name, e)
            return
        self.dsage._submit_specs([(self.dsage._spec(
            Kind.FUNCTION.value, 60, 0, self.name + MANIFEST_SUFFIX, None, False, ()), payload)])

    def _submit_outstanding(self) -> None:
        pending, self.outstanding_jobs = self.outstanding_jobs, []
        jobs = [j if isinstance(j, Job) else Job(j) for j in pending]
        fresh: list[tuple[dict[str, Any], bytes]] = []
        fresh_jobs: list[Job] = []
        adopted: list[tuple[JobWrapper, Job]] = []
        for job in jobs:
            if self._replay:
                adopted.append((self._replay.popleft(), job))
                continue
            o = job.options
            spec = self.dsage._spec(job.kind or self.dsage.kind, o["timeout"], o["priority"], self.name,
                                    o["memory"], o["anonymous_ok"], o["requires"], o["isolate"])
            fresh.append((spec, job.payload()))
            fresh_jobs.append(job)
        wrappers = self.dsage._submit_specs(fresh) if fresh else []
        for w, job in adopted:
            self.jobs[w.job_id] = (w, job)
            if w.done():
                heapq.heappush(self._replay_final, (w.finished or 0.0, next(self._seq), w))
            else:
                self._follow(w)
        for w, job in zip(wrappers, fresh_jobs):
            self.jobs[w.job_id] = (w, job)
            self._follow(w)
        if self._view is not None:
            self._view.add([w for w, _ in adopted] + wrappers)

    def _follow(self, w: JobWrapper) -> None:
        with self._lock:
            self._live[w.job_id] = w
            if w.done() and w.job_id not in self._queued:
                self._queued.add(w.job_id)
                self._results.put(w)

    def _changed(self, wrappers: list[JobWrapper]) -> None:
        """From the client's I/O thread: queue the run's jobs that became final."""
        with self._lock:
            for w in wrappers:
                if w.done() and w.job_id in self._live and w.job_id not in self._queued:
                    self._queued.add(w.job_id)
                    self._results.put(w)

    def _kill_open(self) -> None:
        with self._lock:
            open_jobs = [w for w in self._live.values() if not w.done()]
            self._live.clear()
        for w in open_jobs:
            self._kill(w)

    @staticmethod
    def _kill(w: JobWrapper) -> None:
        try:
            w.kill()
        except DSageError:
            pass  # ended meanwhile, or the client closed


def restore(dsage: DSage, name: str, progress: bool = False,
            timeout: float = 60.0) -> DistributedFunction:
    """Resume the run ``name`` (a DistributedFunction's ``name``) whose jobs are on the
    broker, from a new client: made again from its manifest, the results the
    broker holds replayed, the rest followed live. Started; ``wait()`` for it."""
    found = dsage.get_my_jobs(name=name + MANIFEST_SUFFIX, limit=1, timeout=timeout)
    if not found:
        raise DSageError(f"no run named {name!r} on {dsage.server}:{dsage.port} (no job is "
                         f"named {name + MANIFEST_SUFFIX!r})")
    man = found[0]
    if man.status == Status.KILLED:
        raise DSageError(f"the manifest of run {name!r} was killed: it cannot be restored")
    cls, args, kwargs = codec.load_trusted(man.result(timeout))
    run: DistributedFunction = cls(dsage, *args, **kwargs)
    run.name = name
    if progress:
        run.progress = True
    run._replay = deque(dsage.get_my_jobs(name=name, limit=None, timeout=timeout))
    return run.start()
