"""Result encodings.

Calls and results between the client and trusted workers are pickles: the
standard pickler's where it can, cloudpickle's by-value pickles for what only
exists in the sending process (``__main__``, a notebook or a REPL); both load
with dill. Anything from an anonymous worker is
untrusted: it travels in the data-only encoding below, which decodes to plain
values and can never run code. Unpickling is kept to :func:`load_trusted`.
"""

from __future__ import annotations

import base64
import io
import json
import math
import pickle
import re
import struct
import sys
from typing import Any

import dill

from .protocol import Encoding
from .sage import INSTALL_HINT, import_sage

MAX_DEPTH = 100


#: most characters of a Sage result's repr sent beside its pickle
MAX_SAGE_REPR = 10_000
#: a Sage module named in a pickle (not ``dsage.``, nor words such as ``message.``):
#: after a string's length byte, or the GLOBAL opcode ``c`` of protocols 0 to 3
_SAGE_MODULE = re.compile(rb"(?:(?<![\w.])|(?<=c))sage\.[a-z]")
_REPR_LENGTH = struct.Struct(">I")


class UntrustedResult(str):
    """A result from an anonymous worker that was not plain data: its repr, as text."""


class NeedsSage(str):
    """A Sage result read where Sage is not installed: the repr the worker sent, as
    text; ``pickle`` is the object itself, for a process that has Sage."""

    pickle: bytes = b""

    def __repr__(self) -> str:
        return (f"{str(self)}  # a Sage object, shown as its repr: Sage is not installed "
                f"here ({INSTALL_HINT} to load the object itself)")


def mentions_sage(blob: bytes) -> bool:
    """Whether a pickle refers to a module of Sage."""
    return b"sage." in blob and _SAGE_MODULE.search(blob) is not None  # memmem first: fast


def dump_trusted(value: Any) -> bytes:
    """Pickle a value (a call or a result) for a trusted peer, who loads it with dill.

    The standard pickler goes first: it is ~15x faster than the others and its
    output is what they would write for anything importable. cloudpickle is used
    when it fails (lambdas, closures, local classes) or refers to ``__main__``,
    whose functions and classes only exist in this process: it pickles them by
    value with just the globals they use (modules by reference, constants,
    helpers and classes beside them by value). Raises if neither can pickle the
    value. (dill is not tried: it pickles a ``__main__`` function's globals as a
    reference to the worker's own ``__main__``, where they are missing.)"""
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - cloudpickle may manage what pickle cannot
        data = b"__main__"
    if b"__main__" not in data:
        return data
    return _by_value(value)


_pickler: Any = None


def _by_value(value: Any) -> bytes:
    """cloudpickle's pickle of ``value``, keeping the file names of code it sends by
    value (cloudpickle writes ``<dynamic-code>``), so that a worker's traceback
    says where the code was written, with its lines when the file is there too."""
    global _pickler
    if _pickler is None:
        _pickler = _make_pickler()  # here: a slot that never meets such a value never imports it
    buf = io.BytesIO()
    _pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buf.getvalue()


def _make_pickler() -> Any:
    import types
    from collections import ChainMap

    import cloudpickle
    from cloudpickle import cloudpickle as impl

    reduce_code = impl._code_reduce

    def code_keeping_filename(code: types.CodeType) -> tuple[Any, tuple[Any, ...]]:
        make, args = reduce_code(code)
        return make, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)

    class Pickler(cloudpickle.Pickler):
        dispatch_table = ChainMap({types.CodeType: code_keeping_filename},
                                  cloudpickle.Pickler.dispatch_table)

    return Pickler


def load_trusted(blob: bytes) -> Any:
    """Unpickle a call or a result; only ever called for trusted peers' pickles. A
    pickle of Sage objects is loaded with Sage imported whole first, where Sage is
    installed (its modules import each other in an order unpickling does not keep)."""
    if mentions_sage(blob):
        import_sage()  # where Sage is missing, loading fails below and says so
    return dill.loads(blob)


def dump_sage(value: Any, pickled: bytes) -> bytes:
    """A Sage result for the way back: its repr (for a client without Sage) and its
    pickle, as one blob."""
    try:
        text = repr(value)
    except Exception as e:  # noqa: BLE001 - a repr must not lose the result
        text = f"<{type(value).__name__} object whose repr failed: {e}>"
    if len(text) > MAX_SAGE_REPR:
        text = text[:MAX_SAGE_REPR - 3] + "..."
    encoded = text.encode(errors="replace")
    return _REPR_LENGTH.pack(len(encoded)) + encoded + pickled


def load_sage(blob: bytes) -> Any:
    """A Sage result from :func:`dump_sage`: the object where Sage imports here, else
    its repr as :class:`NeedsSage` text. Raises ValueError for a malformed blob."""
    if len(blob) < _REPR_LENGTH.size:
        raise ValueError("malformed Sage result")
    (n,) = _REPR_LENGTH.unpack_from(blob)
    if _REPR_LENGTH.size + n > len(blob):
        raise ValueError("malformed Sage result")
    start = _REPR_LENGTH.size + n
    if import_sage():
        return dill.loads(blob[start:])
    text = NeedsSage(blob[_REPR_LENGTH.size:start].decode(errors="replace"))
    text.pickle = blob[start:]
    return text


def needs_sage(e: BaseException) -> bool:
    """Whether unpickling failed for want of Sage."""
    return isinstance(e, ImportError) and (e.name or "").split(".")[0] == "sage"


def _to_node(value: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError("too deeply nested")
    if value is None:
        return ["n"]
    if isinstance(value, bool):
        return ["T" if value else "F"]
    if type(value) is int:
        return ["i", str(value)]
    if type(value) is float:
        return ["f", repr(value)]
    if type(value) is str:
        return ["s", value]
    if type(value) is bytes:
        return ["b", base64.b64encode(value).decode()]
    if type(value) in (list, tuple):
        return ["l" if type(value) is list else "t", [_to_node(v, depth + 1) for v in value]]
    if type(value) is dict:
        return ["d", [[_to_node(k, depth + 1), _to_node(v, depth + 1)] for k, v in value.items()]]
    return ["r", repr(value)]


def dump_data(value: Any) -> bytes:
    """Data-only encoding: None, bool, int, float, str, bytes, lists, tuples and
    dicts of these; any other value becomes its repr, marked as such."""
    try:
        node = _to_node(value, 0)
    except (ValueError, RecursionError):
        node = ["r", repr(value)[:100_000]]
    return json.dumps(node, separators=(",", ":")).encode()


def _from_node(node: Any, depth: int) -> Any:
    if depth > MAX_DEPTH or not isinstance(node, list) or not node or not isinstance(node[0], str):
        raise ValueError("malformed data-encoded result")
    tag, rest = node[0], node[1:]
    if tag == "n" and not rest:
        return None
    if tag in ("T", "F") and not rest:
        return tag == "T"
    if len(rest) != 1:
        raise ValueError("malformed data-encoded result")
    arg = rest[0]
    if tag == "i" and isinstance(arg, str) and len(arg) <= 5000:
        return int(arg)
    if tag == "f" and isinstance(arg, str) and len(arg) <= 64:
        value = float(arg)
        if not (math.isfinite(value) or arg in ("inf", "-inf", "nan")):
            raise ValueError("malformed float")
        return value
    if tag == "s" and isinstance(arg, str):
        return arg
    if tag == "r" and isinstance(arg, str):
        return UntrustedResult(arg)
    if tag == "b" and isinstance(arg, str):
        return base64.b64decode(arg, validate=True)
    if tag in ("l", "t") and isinstance(arg, list):
        items = [_from_node(v, depth + 1) for v in arg]
        return items if tag == "l" else tuple(items)
    if tag == "d" and isinstance(arg, list):
        out = {}
        for pair in arg:
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError("malformed data-encoded result")
            k = _from_node(pair[0], depth + 1)
            try:
                out[k] = _from_node(pair[1], depth + 1)
            except TypeError:
                raise ValueError("unhashable key in data-encoded result") from None
        return out
    raise ValueError("malformed data-encoded result")


def load_data(blob: bytes) -> Any:
    """Decode :func:`dump_data` output; raises ValueError for anything else."""
    try:
        node = json.loads(blob)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"malformed data-encoded result: {e}") from None
    try:
        return _from_node(node, 0)
    except (TypeError, RecursionError) as e:
        raise ValueError(f"malformed data-encoded result: {e}") from None


def encode_result(value: Any, trusted: bool) -> tuple[Encoding, bytes]:
    """Encode a job's result for the way back; untrusted slots use data only. A
    pickle of Sage objects travels with the value's repr (see :func:`dump_sage`)."""
    if trusted:
        data = dump_trusted(value)
        if "sage" in sys.modules and mentions_sage(data):
            return Encoding.SAGE, dump_sage(value, data)
        return Encoding.DILL, data
    return Encoding.DATA, dump_data(value)
