"""The version tags CPython keeps on dicts and classes, read in place.

CPython (3.11 to 3.13, 64-bit) gives every dict a version that changes whenever an
entry is added, removed or rebound to another object (``ma_version_tag``), and every
class a tag that is cleared whenever one of its attributes, or a base class's, is
set or deleted (``tp_version_tag``; it gets a new, never reused value on the next
attribute lookup). Neither is reachable from Python, so they are read through
ctypes at their offsets in the C structures. A slot compares them to tell, in a few
microseconds, which module namespaces and classes a job may have changed
(:class:`dsage.slot.ModuleWatch`), instead of comparing every name.

:data:`WORKS` says whether the layout and the behaviour were checked here at import
(on objects made for the purpose); where not, callers compare contents instead.
"""

from __future__ import annotations

import ctypes
import sys
from operator import attrgetter
from typing import Any

_WORD = ctypes.sizeof(ctypes.c_void_p)
#: the word offsets in ``PyTypeObject`` of tp_flags, tp_base, tp_mro and tp_version_tag
_FLAGS, _BASE, _MRO, _TYPE_TAG = 21, 32, 43, 48
#: the word offsets in ``PyDictObject`` of ma_used and ma_version_tag
_USED, _DICT_TAG = 2, 3
#: a name no class has: looking it up gives a class a tag when it has none
_PROBE = "__dsage_version_probe__"

#: a tag view's value, mapped over many views in C
value = attrgetter("value")


def dict_tag(d: dict[Any, Any]) -> Any:
    """A live view of ``d``'s version (``.value``); ``d`` must be kept alive."""
    return ctypes.c_uint64.from_address(id(d) + _DICT_TAG * _WORD)


def class_tag(cls: type) -> Any:
    """A live view of ``cls``'s version tag (``.value``, 0 while it has none; see
    :func:`tag_class`); ``cls`` must be kept alive."""
    return ctypes.c_uint.from_address(id(cls) + _TYPE_TAG * _WORD)


def tag_class(cls: type) -> None:
    """Have ``cls`` (and its bases) given a tag if it has none, by an attribute lookup
    that runs no code of the class or its metaclass."""
    try:
        type.__getattribute__(cls, _PROBE)
    except AttributeError:
        pass


def _works() -> bool:
    """Whether the offsets hold the fields expected, and the tags change as described,
    on a dict and on classes made here."""
    if sys.implementation.name != "cpython" or _WORD != 8 \
            or not (3, 11) <= sys.version_info[:2] <= (3, 13):
        return False
    try:
        base = type("Base", (), {})
        cls = type("Probe", (base,), {})
        word = ctypes.c_void_p.from_address
        if (ctypes.c_ulong.from_address(id(cls) + _FLAGS * _WORD).value != cls.__flags__
                or word(id(cls) + _BASE * _WORD).value != id(base)
                or word(id(cls) + _MRO * _WORD).value != id(cls.__mro__)):
            return False
        tag = class_tag(cls)
        tag_class(cls)
        before = tag.value
        base.x = 1  # a base class changed: the subclass's tag goes too
        cleared = tag.value
        tag_class(cls)
        if not before or cleared or tag.value in (0, before):
            return False
        d: dict[str, int] = {"a": 1}
        if ctypes.c_ssize_t.from_address(id(d) + _USED * _WORD).value != 1:
            return False
        version, seen = dict_tag(d), []
        for change in ("d['b'] = 2", "d['a'] = 3", "del d['b']", "d.pop('a')"):
            seen.append(version.value)
            exec(change, {"d": d})
        seen.append(version.value)
        return len(set(seen)) == len(seen)
    except Exception:  # noqa: BLE001 - any surprise: compare contents instead
        return False


#: whether the tags can be used here (checked once, at import)
WORKS = _works()
