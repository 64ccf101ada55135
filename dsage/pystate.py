"""Interpreter-wide settings a job can change with one call, put back after each job.

A slot runs many jobs in one process. Besides what :class:`dsage.slot.Baseline`
undoes (the environment, signals, limits, streams, rebound names), a job can
change settings held by the interpreter or the C library rather than by a name:
the garbage collector, a trace or profile function, the thread switch interval,
the longest int ``str()`` takes, the sockets' default timeout, ``faulthandler``,
the C locale, the decimal context, the warnings filters and the root logger. Left
as they are, the next job would run with them (its warnings raised as errors, its
``logging.basicConfig`` ignored, its Decimals rounded to 3 digits).
:class:`Settings` notes them once and puts back what moved, in about a
microsecond when nothing did.
"""

from __future__ import annotations

import _locale
import faulthandler
import gc
import socket
import sys
import threading
import warnings
from typing import Any

#: the root logger's level before logging is configured
_ROOT_LEVEL = 30


class Settings:
    """The settings as they are now, to :meth:`put_back` after each job."""

    def __init__(self) -> None:
        self.gc = gc.isenabled(), gc.get_threshold()
        self.switch = sys.getswitchinterval()
        self.int_digits = sys.get_int_max_str_digits()
        self.timeout = socket.getdefaulttimeout()
        self.faults = faulthandler.is_enabled()
        self.locale = _locale.setlocale(_locale.LC_ALL)
        self.filters = list(warnings.filters)
        logging = sys.modules.get("logging")
        self.root: tuple[int, list[Any], int] = (
            (logging.root.level, list(logging.root.handlers), logging.root.manager.disable)
            if logging is not None else (_ROOT_LEVEL, [], 0))

    def put_back(self) -> list[str]:
        """Put back every setting a job moved; which ones."""
        moved = []
        if (gc.isenabled(), gc.get_threshold()) != self.gc:
            (gc.enable if self.gc[0] else gc.disable)()
            gc.set_threshold(*self.gc[1])
            moved.append("gc")
        if sys.gettrace() is not None or sys.getprofile() is not None \
                or threading.gettrace() is not None or threading.getprofile() is not None:
            sys.settrace(None)
            sys.setprofile(None)
            threading.settrace(None)  # (None clears it)
            threading.setprofile(None)
            moved.append("trace")
        if sys.getswitchinterval() != self.switch:
            sys.setswitchinterval(self.switch)
            moved.append("switch interval")
        if sys.get_int_max_str_digits() != self.int_digits:
            sys.set_int_max_str_digits(self.int_digits)
            moved.append("int digits")
        if socket.getdefaulttimeout() != self.timeout:
            socket.setdefaulttimeout(self.timeout)
            moved.append("socket timeout")
        if faulthandler.is_enabled() != self.faults:
            (faulthandler.enable if self.faults else faulthandler.disable)()
            moved.append("faulthandler")
        if _locale.setlocale(_locale.LC_ALL) != self.locale:
            _locale.setlocale(_locale.LC_ALL, self.locale)
            moved.append("locale")
        decimal = sys.modules.get("decimal")
        if decimal is not None:
            decimal.setcontext(decimal.Context())  # (cheaper than comparing it)
        if warnings.filters != self.filters:
            filters: list[Any] = warnings.filters  # type: ignore[assignment]  # (a list)
            filters[:] = self.filters
            warnings._filters_mutated()  # type: ignore[attr-defined]  # (as filterwarnings does)
            moved.append("warnings")
        logging = sys.modules.get("logging")
        if logging is not None:
            root = logging.root
            if (root.level, root.handlers, root.manager.disable) != self.root:
                root.setLevel(self.root[0])
                root.handlers[:] = self.root[1]
                logging.disable(self.root[2])
                moved.append("logging")
        return moved
