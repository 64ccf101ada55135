"""The version tags CPython keeps on dicts and classes, read in place.

CPython (3.11 to 3.13, 64-bit) gives every dict a version that changes whenever an
entry is added, removed or rebound to another object (``ma_version_tag``), and every
class a tag that is cleared whenever one of its attributes, or a base class's, is
set or deleted (``tp_version_tag``; it gets a new, never reused value on the next
attribute lookup). Neither is reachable from Python, so they are read at their
offsets in the C structures, many at once (:class:`Tags`). A slot reads them to
tell, in tens of microseconds, which module namespaces and classes a job may have
changed (:class:`dsage.slot.ModuleWatch`), instead of comparing every name.

:data:`WORKS` says whether the layout and the behaviour were checked here at import
(on objects made for the purpose); where not, callers compare contents instead.
"""

from __future__ import annotations

import ctypes
import operator
import struct
import sys
from collections.abc import Callable
from typing import Any

_WORD = ctypes.sizeof(ctypes.c_void_p)
#: the word offsets in ``PyTypeObject`` of tp_flags, tp_base, tp_mro and tp_version_tag
_FLAGS, _BASE, _MRO, _TYPE_TAG = 21, 32, 43, 48
#: the word offsets in ``PyDictObject`` of ma_used and ma_version_tag
_USED, _DICT_TAG = 2, 3
#: a name no class has: looking it up gives a class a tag when it has none
_PROBE = "__dsage_version_probe__"


#: this process's memory, as bytes (only the places of live objects' tags are read)
_MEMORY = memoryview((ctypes.c_char * (1 << 62)).from_address(0)).cast("B")


class Tags:
    """The version tags of many classes (or of many dicts), read all at once by one call
    in C: a struct format with a tag per object and pad bytes from one to the next, in
    the order of their addresses, so memory is read in one pass and no index is
    converted per tag (~40% faster than an itemgetter over a view of memory, cache
    misses included). :meth:`read` puts them in the order the objects were added;
    :meth:`read_placed` leaves them as read, to compare with :meth:`placed` values.
    The objects must be kept alive."""

    def __init__(self, classes: bool) -> None:
        self.code = "I" if classes else "Q"
        self.width = 4 if classes else 8
        self.offset = (_TYPE_TAG if classes else _DICT_TAG) * _WORD
        self.addresses: list[int] = []
        self._unpack: Callable[[], tuple[int, ...]] | None = None
        #: per place read, the first object added there
        self._firsts: list[int] = []
        #: the tags as read, put in the order the objects were added
        self._reorder: Callable[[tuple[int, ...]], tuple[int, ...]] | None = None

    def add(self, obj: Any) -> None:
        self.addresses.append(id(obj) + self.offset)
        self._unpack = None

    def __getitem__(self, i: int) -> int:
        """The tag of the ``i``-th object added (0 for a class that has none now)."""
        return int(struct.unpack_from("=" + self.code, _MEMORY, self.addresses[i])[0])

    def read(self) -> tuple[int, ...]:
        """Every tag, in the order the objects were added."""
        placed = self.read_placed()
        assert self._reorder is not None
        return self._reorder(placed)

    def read_placed(self) -> tuple[int, ...]:
        """Every tag, in the order of their places in memory (an object added twice
        is read once)."""
        if self._unpack is None:
            self._compile()
            assert self._unpack is not None
        return self._unpack()

    def placed(self, values: list[Any]) -> tuple[Any, ...]:
        """``values``, one per object added, in the order :meth:`read_placed` gives."""
        if self._unpack is None:
            self._compile()
        return tuple(values[i] for i in self._firsts)

    def _compile(self) -> None:
        if not self.addresses:
            self._unpack, self._firsts, self._reorder = tuple, [], lambda placed: placed
            return
        places = sorted(set(self.addresses))
        parts, at = [], places[0]
        for a in places:
            if a > at:
                parts.append(f"{a - at}x")
            parts.append(self.code)
            at = a + self.width
        unpack, start = struct.Struct("=" + "".join(parts)).unpack_from, places[0]
        self._unpack = lambda: unpack(_MEMORY, start)
        first: dict[int, int] = {}
        for i, a in enumerate(self.addresses):
            first.setdefault(a, i)
        self._firsts = [first[a] for a in places]
        if places == self.addresses:
            self._reorder = lambda placed: placed
        else:
            position = {a: i for i, a in enumerate(places)}  # (two objects at least here)
            self._reorder = operator.itemgetter(*(position[a] for a in self.addresses))


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
        classes = Tags(classes=True)
        classes.add(cls)
        classes.add(base)
        tag_class(cls)
        before = classes.read()
        setattr(base, "x", 1)  # a base class changed: the subclass's tag goes too
        cleared = classes.read()
        tag_class(cls)
        if 0 in before or cleared != (0, 0) or classes[0] in (0, before[0]):
            return False
        d: dict[str, int] = {"a": 1}
        if ctypes.c_ssize_t.from_address(id(d) + _USED * _WORD).value != 1:
            return False
        dicts = Tags(classes=False)
        dicts.add(d)
        seen = [dicts[0]]
        d["b"] = 2  # added
        seen.append(dicts[0])
        d["a"] = 3  # rebound
        seen.append(dicts[0])
        del d["b"]  # removed
        seen.append(dicts[0])
        d.clear()
        seen.append(dicts.read()[0])
        return len(set(seen)) == len(seen)
    except Exception:  # noqa: BLE001 - any surprise: compare contents instead
        return False


#: whether the tags can be used here (checked once, at import)
WORKS = _works()
