"""Sending functions as scripts write them, and saying what failed when one cannot go.

A call is pickled with :func:`dsage.codec.dump_trusted`: functions of installed
modules by reference, those of ``__main__`` (a script, a notebook cell, a REPL)
by value together with what they use. When that fails, :func:`culprit` walks
the call (arguments, a function's globals, closure cells and defaults, an
object's attributes) to name the part that cannot be pickled. On the worker,
:func:`load` turns a failure to unpickle into one line naming what was missing.
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import dill

from . import codec

__all__ = ["LoadError", "culprit", "dump_call", "dump_function", "load"]

#: how deep :func:`culprit` looks into nested functions and containers
_DEPTH = 6


class LoadError(Exception):
    """A pickle from the client could not be loaded on the worker (a module or a
    name it refers to is missing there, say)."""


def dump_call(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a call for a trusted worker; TypeError naming the part that cannot go."""
    try:
        return codec.dump_trusted((func, args, kwargs))
    except Exception as e:  # noqa: BLE001 - find the culprit for a clear message
        parts: list[tuple[str, Any]] = [(f"the function {_name(func)}", func)]
        parts += [(f"argument {i}", a) for i, a in enumerate(args)]
        parts += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
        raise _unpicklable(parts, e) from None


def dump_function(func: Callable[..., Any]) -> tuple[str, bytes]:
    """A function's pickle and its content address (the pickle's SHA-256, hex)."""
    try:
        blob = codec.dump_trusted(func)
    except Exception as e:  # noqa: BLE001 - find the culprit for a clear message
        raise _unpicklable([(f"the function {_name(func)}", func)], e) from None
    return hashlib.sha256(blob).hexdigest(), blob


def dump_items(items: list[Any], first_index: int) -> bytes:
    """Pickle a chunk's items; TypeError naming the first item that cannot go."""
    try:
        return codec.dump_trusted(items)
    except Exception as e:  # noqa: BLE001 - find the culprit for a clear message
        raise _unpicklable([(f"item {first_index + i}", item) for i, item in enumerate(items)],
                           e) from None


def _unpicklable(parts: list[tuple[str, Any]], error: Exception) -> TypeError:
    for label, part in parts:
        where = culprit(part)
        if where is not None:
            path, inner = where
            what = " -> ".join(path) if path else f"it ({type(part).__name__})"
            return TypeError(f"cannot send {label}: {what} cannot be pickled ({inner})")
    return TypeError(f"cannot pickle the call: {type(error).__name__}: {error}")


def culprit(obj: Any, depth: int = _DEPTH) -> tuple[list[str], str] | None:
    """None if ``obj`` pickles; else where inside it the failure is (a path such as
    ``["its global 'helper' (function)", "its global 'LOCK' (lock)"]``, empty for
    ``obj`` itself) and the pickler's message."""
    try:
        codec.dump_trusted(obj)
        return None
    except Exception as e:  # noqa: BLE001 - that is what we look for
        error = f"{type(e).__name__}: {e}"
    if depth > 0:
        for label, part in _parts(obj):
            inner = culprit(part, depth - 1)
            if inner is not None:
                return [f"{label} ({type(part).__name__})"] + inner[0], inner[1]
    return [], error


def _parts(obj: Any) -> Iterator[tuple[str, Any]]:
    """The named parts of an object that a pickle of it would hold."""
    if isinstance(obj, types.MethodType):
        yield "its instance", obj.__self__
        obj = obj.__func__
    if isinstance(obj, types.FunctionType):
        g = obj.__globals__
        for name in sorted(_global_names(obj.__code__)):
            if name in g:
                yield f"its global {name!r}", g[name]
        cells = obj.__closure__ or ()
        for name, cell in zip(obj.__code__.co_freevars, cells):
            try:
                yield f"its closure variable {name!r}", cell.cell_contents
            except ValueError:
                pass  # an empty cell
        for i, d in enumerate(obj.__defaults__ or ()):
            yield f"its default {i}", d
        for k, d in (obj.__kwdefaults__ or {}).items():
            yield f"its default {k!r}", d
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            yield f"item {i}", v
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield f"the value of {k!r}", v
    elif not isinstance(obj, type) and isinstance(getattr(obj, "__dict__", None), dict):
        for k, v in vars(obj).items():
            yield f"its attribute {k!r}", v


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or type(func).__name__


class _NamingUnpickler(dill.Unpickler):
    """dill's unpickler, remembering the last global it looked up, to name it."""

    looking_up: str | None = None

    def find_class(self, module: str, name: str) -> Any:
        self.looking_up = f"{module}.{name}"
        if module in _PRELOADED:  # loaded by the slot: not the whole package again
            return getattr(_PRELOADED[module], name)
        return super().find_class(module, name)


#: modules of dsage a slot loaded at its start, which a chunk's call names: a slot
#: drops its stand-in ``dsage`` package once started, so the standard lookup would
#: import the whole package (the client, ZeroMQ: ~130 ms) at a slot's first chunk
_PRELOADED: dict[str, types.ModuleType] = {}


def preload(module: types.ModuleType) -> None:
    """Let calls name ``module`` without importing its package (see :data:`_PRELOADED`)."""
    _PRELOADED[module.__name__] = module


def load(blob: bytes, what: str) -> Any:
    """Unpickle ``what`` (``"the function"``, ``"the items"``) from the client;
    :class:`LoadError` in one line naming what could not be found."""
    import io

    unpickler = _NamingUnpickler(io.BytesIO(blob))
    try:
        return unpickler.load()
    except (ImportError, AttributeError) as e:
        missing = unpickler.looking_up
        hint = (f" ({missing} is not importable here: install its module on the worker, "
                f"or define it in the script)" if missing else "")
        raise LoadError(f"cannot load {what} on this worker: {type(e).__name__}: {e}{hint}"
                        ) from None
    except Exception as e:  # noqa: BLE001 - any other failure, said in one line
        at = f" (while loading {unpickler.looking_up})" if unpickler.looking_up else ""
        raise LoadError(f"cannot load {what} on this worker: {type(e).__name__}: {e}{at}"
                        ) from None
