"""A job alone at the Python prompt shows as the seed showed it: what it printed,
or its result (``str(j)``); in a list it shows as ``<job ID 'name' status>``.

Python's prompt shows a value through ``sys.displayhook``, which calls
``repr``; :func:`install` wraps the hook so that a JobWrapper shows as
``str``. Only the plain interactive prompt is changed (IPython and Jupyter use
``JobWrapper._repr_pretty_``), and only once; other values go to the hook that
was there.
"""

from __future__ import annotations

import builtins
import sys
from collections.abc import Callable
from typing import Any

_installed = False


def install() -> None:
    """Wrap ``sys.displayhook`` at an interactive prompt (a no-op elsewhere, or twice)."""
    global _installed
    if _installed or not hasattr(sys, "ps1") or sys.displayhook is not sys.__displayhook__:
        return
    _installed = True
    previous: Callable[[object], Any] = sys.displayhook

    def hook(value: object) -> None:
        from .job import JobWrapper

        if isinstance(value, JobWrapper):
            builtins._ = value  # type: ignore[attr-defined]
            sys.stdout.write(f"{value}\n")
        else:
            previous(value)

    sys.displayhook = hook
