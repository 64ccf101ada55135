"""Logging for the launchers: standard ``logging`` to a file under ``$DSAGE_HOME/logs``
and to stderr, with repeated lines collapsed.

A message logged again and again (a peer that keeps failing the same way)
appears once, followed by one "(the last message repeated N times)" line when
something else is logged or a minute has passed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
#: how long identical messages are folded into one count
REPEAT_WINDOW = 60.0


class RepeatFilter(logging.Filter):
    """On one handler: drop a record identical (logger, level, text) to the previous
    one within ``window`` seconds; say how many were dropped once the run ends."""

    def __init__(self, handler: logging.Handler, window: float = REPEAT_WINDOW) -> None:
        super().__init__()
        self.handler = handler
        self.window = window
        self.last: tuple[str, int, str] | None = None
        self.first_at = 0.0
        self.repeats = 0
        self._emitting = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self._emitting:
            return True
        key = (record.name, record.levelno, record.getMessage())
        now = time.monotonic()
        if key == self.last and now - self.first_at < self.window:
            self.repeats += 1
            return False
        if self.repeats and self.last is not None:
            self._summary(record)
        self.last, self.first_at, self.repeats = key, now, 0
        return True

    def _summary(self, before: logging.LogRecord) -> None:
        assert self.last is not None
        name, level, _ = self.last
        summary = logging.LogRecord(name, level, before.pathname, before.lineno,
                                    "(the last message repeated %d more times)",
                                    (self.repeats,), None)
        self._emitting = True
        try:
            self.handler.handle(summary)
        finally:
            self._emitting = False


def default_log_file(home: Path, name: str) -> Path:
    return home / "logs" / f"{name}.log"


def setup(level: str, log_file: str | os.PathLike[str] | None, to_stderr: bool = True) -> None:
    """Log at ``level`` to ``log_file`` (made private: 0600 in a 0700 folder; ``-``
    or None for none) and to stderr, folding repeated lines."""
    root = logging.getLogger()
    root.setLevel(getattr(logging, level))
    for h in list(root.handlers):
        root.removeHandler(h)
    formatter = logging.Formatter(FORMAT)
    handlers: list[logging.Handler] = []
    if to_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    if log_file not in (None, "-"):
        path = Path(str(log_file))
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            handlers.append(logging.FileHandler(path, encoding="utf-8"))
        except OSError as e:  # logging to stderr is still worth running for
            print(f"dsage: cannot write the log file {path} ({e.strerror or e}); "
                  f"logging to stderr only", file=sys.stderr)
    for h in handlers:
        h.setFormatter(formatter)
        h.addFilter(RepeatFilter(h))
        root.addHandler(h)


def tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log file ('' if there is none)."""
    if lines <= 0:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            chunk, data = 8192, b""
            while size > 0 and data.count(b"\n") <= lines:
                step = min(chunk, size)
                size -= step
                f.seek(size)
                data = f.read(step) + data
                chunk *= 2
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])
