"""What a monitor's machine can run, advertised as tags beside those of ``--tags``:
``povray`` when the ``povray`` binary is on PATH, ``sage`` when Sage's namespace
and its preparser are installed (:func:`dsage.sage.missing`: found without
importing Sage, which takes a second, so that a monitor starts at once; a slot
imports Sage before its first Sage job). ``dsage-worker --no-detect`` offers
only its ``--tags``."""

from __future__ import annotations

import shutil

from .sage import SAGE_TAG, missing

__all__ = ["detected_tags", "offered_tags"]


def detected_tags() -> list[str]:
    """The tags this machine earns by what is installed."""
    tags = []
    if shutil.which("povray"):
        tags.append("povray")
    if missing() is None:
        tags.append(SAGE_TAG)
    return tags


def offered_tags(given: list[str], detect: bool = True) -> list[str]:
    """``given`` (from ``--tags``) and, with ``detect``, the detected tags, each once."""
    return list(dict.fromkeys([*given, *(detected_tags() if detect else [])]))
