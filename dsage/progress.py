"""A live view of many jobs: done/total, failed, running, queued, rate, elapsed, ETA.

``dsage.progress(jobs)`` shows it in the background until every job is done
(``with dsage.progress(jobs) as p:`` also ends it with the block; ``p.wait()``
blocks until the jobs are done). It is driven by the client's job events: the
I/O thread hands over the wrappers that changed, so nothing polls the broker
or walks all the jobs. On a terminal it is a rich progress bar; in Jupyter an
output that is updated in place (an HTML ``<progress>`` bar and the line, through
IPython's display ids: no ipywidgets needed); otherwise a plain line every
``interval`` seconds and one at the end.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .job import JobHost, JobWrapper
from .protocol import Status

__all__ = ["JobProgress", "Counts", "progress"]


@dataclass
class Counts:
    """How many of the watched jobs are in each state."""

    total: int = 0
    completed: int = 0
    failed: int = 0  # failed, or abandoned by a closed client
    running: int = 0
    queued: int = 0
    #: killed or cancelled (as a DistributedFunction does with the jobs it no longer
    #: needs): over, but not a failure
    killed: int = 0

    @property
    def done(self) -> int:
        return self.completed + self.failed + self.killed


def _state(w: JobWrapper) -> str:
    if w.done():
        if w.status == Status.COMPLETED:
            return "completed"
        return "killed" if w.status == Status.KILLED else "failed"
    return "running" if w.status == Status.PROCESSING else "queued"


#: seconds between updates of the Jupyter view (each is one message to the notebook)
JUPYTER_REFRESH = 0.5


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class JobProgress:
    """The live view of a set of jobs (see the module's docs)."""

    def __init__(self, jobs: Iterable[JobWrapper] = (), title: str = "dsage",
                 console: Console | None = None, enabled: bool = True,
                 interval: float = 10.0, total: int | None = None,
                 unit: str = "jobs", until_closed: bool = False) -> None:
        self.title = title
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.interval = interval
        self.started = time.monotonic()
        self.counts = Counts()
        self._lock = threading.Lock()
        self._all_done = threading.Event()
        self._state: dict[str, str] = {}
        #: what each job counts for (a map's chunk: its items), 1 unless said
        self._weight: dict[str, int] = {}
        #: the total expected, before all its jobs were added (a map's items)
        self._expected = total or 0
        self.counts.total = self._expected
        self.unit = unit
        #: the view ends when close() is called, not when the jobs so far are done
        #: (a computation that submits as it goes)
        self._until_closed = until_closed
        self._hosts: list[JobHost] = []
        self._closed = False
        self._closing = False
        self._live: Live | None = None
        #: the Jupyter output updated in place (an IPython DisplayHandle)
        self._jupyter: Any = None
        self._in_jupyter = False
        self._ticker: threading.Thread | None = None
        self._wake = threading.Event()
        self.add(jobs)
        if enabled:
            self._start_display()
        self._check_done()

    # --- jobs and their changes

    def add(self, jobs: Iterable[JobWrapper], weights: Iterable[int] | None = None) -> None:
        """Watch more jobs (a computation that submits as it goes); ``weights`` says
        what each counts for (a map's chunk: its items), 1 by default."""
        jobs = list(jobs)
        for w, weight in zip(jobs, weights if weights is not None else [1] * len(jobs)):
            host = w._host
            if host is not None and not any(h is host for h in self._hosts):
                host.watch(self._changed)
                self._hosts.append(host)
            with self._lock:
                if w.job_id in self._state:
                    continue
                state = _state(w)
                self._state[w.job_id] = state
                self._weight[w.job_id] = weight
                self._count(state, weight)
                self._all_done.clear()
        self._check_done()

    def forget(self, jobs: Iterable[JobWrapper]) -> None:
        """Stop counting jobs (a map's chunk sent again as another job)."""
        with self._lock:
            for w in jobs:
                state = self._state.pop(w.job_id, None)
                if state is not None:
                    self._count(state, -self._weight.pop(w.job_id))
        self._check_done()

    def _count(self, state: str, delta: int) -> None:
        setattr(self.counts, state, getattr(self.counts, state) + delta)
        c = self.counts
        c.total = max(self._expected, c.done + c.running + c.queued)

    def _changed(self, wrappers: list[JobWrapper]) -> None:
        """From a client's I/O thread: these wrappers changed."""
        with self._lock:
            for w in wrappers:
                old = self._state.get(w.job_id)
                if old is None:
                    continue
                new = _state(w)
                if new != old:
                    self._state[w.job_id] = new
                    weight = self._weight[w.job_id]
                    self._count(old, -weight)
                    self._count(new, weight)
        self._check_done()

    def _check_done(self) -> None:
        if self.counts.done >= self.counts.total:
            self._all_done.set()
            self._wake.set()

    def snapshot(self) -> Counts:
        with self._lock:
            c = self.counts
            return Counts(c.total, c.completed, c.failed, c.running, c.queued, c.killed)

    # --- showing it

    def line(self, counts: Counts | None = None) -> str:
        """The state (now, or ``counts``) in one line of text."""
        c = counts or self.snapshot()
        elapsed = time.monotonic() - self.started
        rate = c.done / elapsed if elapsed > 0 else 0.0
        left = c.total - c.done
        eta = _clock(left / rate) if rate > 0 and left else ("0:00" if not left else "?")
        killed = f"{c.killed} killed, " if c.killed else ""
        return (f"{c.done}/{c.total} done, {c.failed} failed, {killed}{c.running} running, "
                f"{c.queued} queued, {rate:.1f} {self.unit}/s, {_clock(elapsed)} elapsed, ETA {eta}")

    def __rich__(self) -> RenderableType:
        c = self.snapshot()
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True)
        grid.add_column(overflow="fold")
        text = Text(self.line(c))
        if c.failed:
            start = len(f"{c.done}/{c.total} done, ")
            text.stylize("bold red", start, start + len(f"{c.failed} failed"))
        grid.add_row(Text(self.title, style="bold"),
                     ProgressBar(total=max(c.total, 1), completed=c.done, width=30), text)
        return grid

    def _mimebundle(self) -> dict[str, str]:
        """The state for Jupyter: the line as text, and as HTML a ``<progress>`` bar and
        the line with the failures in red."""
        c = self.snapshot()
        line = self.line(c)
        done = f"{c.done}/{c.total} done, "  # the line starts so (as in __rich__)
        failed = (f'<span class="dsage-failed" style="color:#c62828;font-weight:bold">'
                  f'{c.failed} failed</span>' if c.failed else f"{c.failed} failed")
        rest = line[len(done) + len(f"{c.failed} failed"):]
        html_line = html.escape(done) + failed + html.escape(rest)
        return {"text/plain": f"{self.title}: {line}",
                "text/html": (f'<div class="dsage-progress"><b>{html.escape(self.title)}</b> '
                              f'<progress value="{c.done}" max="{max(c.total, 1)}" '
                              f'style="width:16em;vertical-align:middle"></progress> '
                              f'<span style="font-family:monospace">{html_line}</span></div>')}

    def __repr__(self) -> str:
        return f"<JobProgress {self.title}: {self.line()}>"

    def _ipython_display_(self) -> None:
        """At an IPython or Jupyter prompt: the live view is already an output of the
        cell that started it, so a cell ending in ``dsage.progress(jobs)`` shows it
        once; otherwise (``enabled=False``, not in Jupyter) the state now."""
        if self._in_jupyter:
            return
        from IPython.display import display

        display(self._mimebundle(), raw=True)

    def _start_display(self) -> None:
        if self.console.is_jupyter:
            # rich's Live needs ipywidgets in Jupyter; an output updated by its display
            # id needs nothing but IPython
            from IPython.display import display

            self._jupyter = display(self._mimebundle(), raw=True, display_id=True)
            self._in_jupyter = True
        elif self.console.is_terminal:
            self._live = Live(self, console=self.console, refresh_per_second=4, transient=False)
            self._live.start()
        self._ticker = threading.Thread(target=self._tick, name="dsage-progress", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        """Stop the display once all jobs are done; update the Jupyter view every
        ``JUPYTER_REFRESH`` seconds; without either, print a line every ``interval``
        seconds."""
        wait = (None if self._live is not None else
                JUPYTER_REFRESH if self._jupyter is not None else self.interval)
        printed = time.monotonic()
        while not self._closed:
            self._wake.wait(wait)
            self._wake.clear()
            if self._closed:
                return
            if (self._all_done.is_set() and not self._until_closed) or self._closing:
                self._stop_display()
                return
            jupyter = self._jupyter
            if jupyter is not None:
                jupyter.update(self._mimebundle(), raw=True)
            elif self._live is None and self.counts.total \
                    and time.monotonic() - printed >= 0.9 * self.interval:
                # a line every interval (not at each wake-up: the jobs so far being
                # done wakes it too), once there are jobs to speak of
                printed = time.monotonic()
                self.console.print(f"{self.title}: {self.line()}", markup=False,
                                   highlight=False, soft_wrap=True)

    def _stop_display(self) -> None:
        with self._lock:
            live, self._live = self._live, None
            jupyter, self._jupyter = self._jupyter, None
            printed_final = self._closed
            self._closed = True
        if live is not None:
            live.update(self, refresh=True)
            live.stop()
        elif jupyter is not None:
            jupyter.update(self._mimebundle(), raw=True)  # the final state stays shown
        elif self.enabled and not printed_final:
            self.console.print(f"{self.title}: {self.line()}", markup=False, highlight=False,
                               soft_wrap=True)
        for host in self._hosts:
            host.unwatch(self._changed)

    # --- the user's handle

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every watched job is done (at most ``timeout`` s); whether they are."""
        return self._all_done.wait(timeout)

    def close(self) -> None:
        """End the view now (a last line shows where the jobs stand)."""
        self._closing = True
        self._wake.set()
        ticker = self._ticker
        if ticker is not None and ticker is not threading.current_thread():
            ticker.join(10)  # it draws the last state and stops
        if not self._closed:
            self._stop_display()

    def __enter__(self) -> JobProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def progress(jobs: Iterable[JobWrapper] = (), title: str = "dsage", **options: Any) -> JobProgress:
    """Show the live view of ``jobs`` in the background until they are all done; use it
    as a context (``with dsage.progress(jobs):``) to end it with the block, and
    ``.wait()`` to block until the jobs are done. Options: ``console`` (a rich
    Console; stderr by default), ``enabled=False`` (show nothing), ``interval``
    (seconds between lines when not on a terminal)."""
    return JobProgress(jobs, title, **options)
