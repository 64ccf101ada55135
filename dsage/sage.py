"""Sage jobs, through the passagemath packages (the optional ``sage`` extra).

The extra installs the smallest part of Sage that runs the preparser and the
usual arithmetic (integers, rationals, factoring, matrices): passagemath's
``repl``, ``pari`` and ``modules`` distributions. Those have no ``sage.all``;
each has a top-level namespace module ``sage.all__sagemath_NAME`` instead. A
job's globals are ``sage.all`` where the whole of Sage is installed, else the
union of those modules. :func:`missing` says, without importing Sage, whether
it is installed (a monitor offers the ``sage`` tag when it is); :func:`check`
imports it, and says what fails if it does not.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from typing import Any

#: the top-level namespace modules of passagemath's modular distributions
DISTRIBUTION_PREFIX = "all__sagemath_"
#: the tag of monitors that can run Sage jobs, which every Sage job requires
SAGE_TAG = "sage"
#: how to get Sage, for messages
INSTALL_HINT = "pip install 'dsage[sage]'"

_namespace: dict[str, Any] | None = None


class SageMissing(ImportError):
    """Sage is not installed here (or only a part of it too small for Sage jobs)."""


def _entry_points() -> list[str]:
    """``['sage.all']`` where the whole of Sage is installed, else the namespace
    modules of the passagemath distributions installed."""
    try:
        if importlib.util.find_spec("sage") is None:
            return []
        if importlib.util.find_spec("sage.all") is not None:
            return ["sage.all"]
        import sage
    except (ImportError, ValueError):
        return []
    return sorted(f"sage.{m.name}" for m in pkgutil.iter_modules(sage.__path__)
                  if m.name.startswith(DISTRIBUTION_PREFIX))


def missing() -> str | None:
    """What Sage jobs lack here, found without importing Sage (in a millisecond):
    None when Sage's namespace modules and its preparser are installed."""
    if not _entry_points():
        return f"Sage is not installed here: {INSTALL_HINT}"
    try:
        found = importlib.util.find_spec("sage.repl.preparse") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return f"Sage's preparser (passagemath-repl) is not installed here: {INSTALL_HINT}"
    return None


def _load_namespace() -> dict[str, Any]:
    """Sage's global names, imported once per process. A distribution that does not
    import (one whose own dependencies are missing) is left out; of two that both
    define a name, the larger wins (it imports the smaller one and refines it)."""
    global _namespace
    if _namespace is not None:
        return _namespace
    modules, failures = [], []
    for name in _entry_points():
        try:
            modules.append(importlib.import_module(name))
        except ImportError as e:
            failures.append(f"{name}: {e}")
    if not modules:
        why = f" ({'; '.join(failures)})" if failures else ""
        raise SageMissing(f"Sage is not installed here{why}: {INSTALL_HINT}")
    spaces = [{k: v for k, v in vars(m).items() if not k.startswith("_")} for m in modules]
    namespace: dict[str, Any] = {}
    for space in sorted(spaces, key=len):
        namespace.update(space)
    if "ZZ" not in namespace:
        raise SageMissing(f"this Sage lacks its integers (ZZ): {INSTALL_HINT}")
    _namespace = namespace
    return namespace


def import_sage() -> bool:
    """Import Sage's namespace here if it is installed; whether it is. Unpickling a
    Sage object needs it imported whole first (its modules import each other in an
    order unpickling does not keep)."""
    try:
        _load_namespace()
    except ImportError:
        return False
    return True


def check() -> None:
    """Raise :class:`SageMissing`, saying what is missing, unless this Python can run
    Sage jobs: Sage's namespace and its preparser import."""
    _load_namespace()
    try:
        importlib.import_module("sage.repl.preparse")
    except ImportError as e:
        raise SageMissing(f"Sage's preparser is not installed here ({e}): {INSTALL_HINT}"
                          ) from e


def _require() -> None:
    try:
        check()
    except SageMissing as e:
        raise SageMissing(f"this worker cannot run Sage jobs: {e} on the worker's machine"
                          ) from e


def preparse(code: str) -> str:
    """Sage's preparser: ``2^3`` is a power, ``1/2`` a rational, and so on."""
    _require()
    from sage.repl.preparse import preparse_file

    return preparse_file(code)  # type: ignore[no-any-return,unused-ignore]


def sage_namespace() -> dict[str, Any]:
    """A fresh namespace with Sage's global names (see :func:`_load_namespace`)."""
    _require()
    return {**_load_namespace(), "__name__": "__main__"}


def main() -> int:
    """0 when Sage jobs can run here (Sage imports); else 1, saying why on stderr."""
    try:
        check()
    except ImportError as e:
        print(e, file=sys.stderr)
        return 1
    return 0
