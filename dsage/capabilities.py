"""What a monitor's machine can run, advertised as tags beside those of ``--tags``:
``povray`` when the ``povray`` binary is on PATH, ``sage`` when Sage jobs can run
(``python -m dsage.sage`` says so, in a child process: importing Sage takes seconds
and much memory). ``dsage-worker --no-detect`` offers only its ``--tags``."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

from .sage import SAGE_TAG

__all__ = ["detected_tags", "offered_tags"]

#: how long the check that Sage imports may take
SAGE_CHECK_TIMEOUT = 120.0


def _sage_imports() -> bool:
    try:
        if importlib.util.find_spec("sage") is None:
            return False
    except (ImportError, ValueError):
        return False
    try:
        return subprocess.run([sys.executable, "-m", "dsage.sage"], capture_output=True,
                              timeout=SAGE_CHECK_TIMEOUT).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def detected_tags() -> list[str]:
    """The tags this machine earns by what is installed."""
    tags = []
    if shutil.which("povray"):
        tags.append("povray")
    if _sage_imports():
        tags.append(SAGE_TAG)
    return tags


def offered_tags(given: list[str], detect: bool = True) -> list[str]:
    """``given`` (from ``--tags``) and, with ``detect``, the detected tags, each once."""
    return list(dict.fromkeys([*given, *(detected_tags() if detect else [])]))
