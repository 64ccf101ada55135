"""Sage jobs, through the passagemath packages (the optional ``sage`` extra)."""

from __future__ import annotations

from typing import Any


class SageMissing(ImportError):
    """Sage is not installed on this worker."""


def _require() -> None:
    try:
        import sage.all  # noqa: F401
    except ImportError as e:
        raise SageMissing(
            "this worker cannot run Sage jobs: install the Sage extra "
            "(pip install 'dsage[sage]') on the worker's machine") from e


def preparse(code: str) -> str:
    """Sage's preparser: ``2^3`` is a power, ``1/2`` a rational, and so on."""
    _require()
    from sage.repl.preparse import preparse_file

    return preparse_file(code)


def sage_namespace() -> dict[str, Any]:
    """A fresh namespace with everything from ``sage.all``."""
    _require()
    import sage.all

    ns: dict[str, Any] = {"__name__": "__main__"}
    ns.update({k: v for k, v in vars(sage.all).items() if not k.startswith("_")})
    return ns
