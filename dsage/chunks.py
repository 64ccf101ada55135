"""The chunks of a map: what a slot runs (:func:`run_chunk`, with its cache of
functions by content address) and how large chunks are (:class:`ChunkSizer`,
pure).

A chunk is an ordinary function job whose call is ``run_chunk(digest, function,
items, star)``: ``run_chunk`` goes by reference, the map's function travels
by value only with the first chunks and is kept by the slot under the SHA-256
of its pickle, so later chunks name it by that digest. A slot that does not
have it (a new slot, a replaced one) answers :data:`NEED_FUNCTION` and the
client sends that chunk again with the function.
"""

from __future__ import annotations

import math
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import codec
from .functions import load

#: what a slot answers for a chunk naming a function it does not have
NEED_FUNCTION = "need-function"
#: functions a slot keeps (the most recently used)
CACHED_FUNCTIONS = 16
_functions: OrderedDict[str, Callable[..., Any]] = OrderedDict()

#: seconds of work a chunk is sized for, once item times are measured
TARGET_SECONDS = 0.1
#: most items in one chunk, and most bytes of a chunk's items and of its results
#: (results below the broker's by-reference size come back in one message)
MAX_ITEMS = 100_000
MAX_ITEM_BYTES = 1024 * 1024
MAX_RESULT_BYTES = 192 * 1024
#: chunks shorter than the target by this factor are not cut smaller at a map's end
BALANCE_FLOOR = 10
#: how many times larger than the largest chunk measured the next may be
GROWTH = 8
#: most chunks of one map in flight at once
MAX_IN_FLIGHT = 1000


class ItemFailure:
    """What an item raised, for the way back: the exception itself when it pickles,
    else its text; and the worker's traceback."""

    __slots__ = ("exception", "text", "traceback")

    def __init__(self, exception: BaseException | None, text: str, tb: str) -> None:
        self.exception, self.text, self.traceback = exception, text, tb

    def __reduce__(self) -> tuple[Any, ...]:
        return ItemFailure, (self.exception, self.text, self.traceback)


def run_chunk(digest: str, function: bytes | None, items: bytes, star: bool
              ) -> tuple[Any, ...]:
    """Run a map's function on a chunk of items, in a slot. Returns
    ``("ok", seconds, results, failures)``, the results pickled (so one that cannot
    be is that item's failure, not the chunk's) and ``failures`` as ``{offset:
    ItemFailure}``; or ``(NEED_FUNCTION, digest)``."""
    func = _functions.get(digest)
    if func is None:
        if function is None:
            return (NEED_FUNCTION, digest)
        func = load(function, "the function")
        _functions[digest] = func
        while len(_functions) > CACHED_FUNCTIONS:
            _functions.popitem(last=False)
    else:
        _functions.move_to_end(digest)
    args = load(items, "the items")
    results: list[Any] = []
    failures: dict[int, ItemFailure] = {}
    started = time.perf_counter()
    for i, item in enumerate(args):
        try:
            results.append(func(*item) if star else func(item))
        except Exception as e:  # noqa: BLE001 - the item's failure, reported with it
            results.append(None)
            failures[i] = _failure(e)
    seconds = time.perf_counter() - started
    try:
        blob = codec.dump_trusted(results)
    except Exception:  # noqa: BLE001 - find the results that cannot go
        blob = _dump_each(results, failures)
    return ("ok", seconds, blob, failures)


def _failure(e: BaseException) -> ItemFailure:
    tb = e.__traceback__
    if tb is not None:
        tb = tb.tb_next  # not run_chunk's own frame
    text = "".join(traceback.format_exception(type(e), e, tb))
    try:
        codec.dump_trusted(e)
        exc: BaseException | None = e
    except Exception:  # noqa: BLE001 - sent as text
        exc = None
    e.__traceback__ = None  # the frames stay here
    return ItemFailure(exc, f"{type(e).__name__}: {e}", text)


def _dump_each(results: list[Any], failures: dict[int, ItemFailure]) -> bytes:
    """The results pickled, those that cannot be replaced by None and a failure."""
    for i, value in enumerate(results):
        try:
            codec.dump_trusted(value)
        except Exception as e:  # noqa: BLE001 - the item's failure
            results[i] = None
            text = f"the result ({type(value).__name__}) cannot be pickled: {e}"
            failures[i] = ItemFailure(None, text, text + "\n")
    return codec.dump_trusted(results)


@dataclass
class ChunkSizer:
    """How many items the next chunk gets, and how many chunks may be in flight.

    With ``given`` the size is fixed. Otherwise the first chunks have one item
    each; from then on a chunk gets as many items as take ``target`` seconds by
    the item times measured so far (growing at most :data:`GROWTH` times past the
    largest chunk measured, so a few quick items do not make a huge chunk of slow
    ones, nor read far ahead in the input), bounded by :data:`MAX_ITEMS`, by the bytes
    its items and results take per item, and, when the number of items left is
    known, by a quarter of each slot's share of them, so the last chunks are
    small and every slot stays busy to the end (but not below a tenth of the
    target time, where the end is near anyway)."""

    slots: int
    given: int | None = None
    target: float = TARGET_SECONDS
    measured_items: int = 0
    measured_seconds: float = 0.0
    #: the most items a chunk measured so far had: the next may have GROWTH times more
    largest: int = 0
    result_bytes: int = 0
    sent_items: int = 0
    sent_bytes: int = 0

    def sent(self, items: int, nbytes: int) -> None:
        self.sent_items += items
        self.sent_bytes += nbytes

    def done(self, items: int, seconds: float, result_bytes: int) -> None:
        self.measured_items += items
        self.measured_seconds += seconds
        self.result_bytes += result_bytes
        self.largest = max(self.largest, items)

    def size(self, remaining: int | None) -> int:
        """Items for the next chunk, ``remaining`` items being left (None: unknown)."""
        if self.given is not None:
            return self.given
        if not self.measured_items:
            return 1
        per_item = self.measured_seconds / self.measured_items
        size = MAX_ITEMS if per_item <= 0 else int(self.target / per_item)
        if self.sent_bytes:
            size = min(size, MAX_ITEM_BYTES * self.sent_items // self.sent_bytes)
        if self.result_bytes:
            size = min(size, MAX_RESULT_BYTES * self.measured_items // self.result_bytes)
        if remaining is not None:  # small chunks at the end, unless they are short anyway
            floor = MAX_ITEMS if per_item <= 0 else int(self.target / BALANCE_FLOOR / per_item)
            size = min(size, max(math.ceil(remaining / (4 * self.slots)), floor), remaining)
        return max(1, min(size, GROWTH * self.largest, MAX_ITEMS))

    def in_flight(self, size: int) -> int:
        """How many chunks of ``size`` items to keep in flight: two per slot and one
        more; for chunks of a given size that are short, as many as hold two
        target times of work per slot, at most :data:`MAX_IN_FLIGHT`."""
        least = 2 * self.slots + 1
        if self.given is None or not self.measured_items:
            return least
        chunk_seconds = size * self.measured_seconds / self.measured_items
        wanted = (MAX_IN_FLIGHT if chunk_seconds <= 0
                  else math.ceil(2 * self.slots * self.target / chunk_seconds))
        return max(least, min(wanted, MAX_IN_FLIGHT))
