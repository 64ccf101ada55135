"""The wire format: frames, message types, schemas; pure encode and decode.

A message is a list of frames::

    [VERSION, type, header, blob, blob, ...]

``header`` is a JSON object whose keys and value types are fixed per message
type (unknown or missing keys are errors); blobs are opaque bytes (job
payloads, results, captured output) that the broker never looks into. Batched
messages carry a list of items in the header and a fixed number of blobs per
item, in order. On the events socket a topic frame (the subscriber's z85 key)
comes first.

Every problem with a received message raises :class:`ProtocolError` with a
short code; nothing here asserts on network input.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

VERSION = b"DSG1"
#: Most items (jobs, results, records, ids) in one message; senders split larger
#: batches with :func:`batches`.
MAX_BATCH = 1000
#: most bytes of a running job's output in one OUTPUT message (before sealing)
LIVE_BYTES = 64 * 1024
#: most jobs one LIST page may ask for (the reply comes in MAX_BATCH-sized messages)
MAX_LIST = 10_000
MAX_FRAMES = 3 + 2 * MAX_BATCH
DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024 * 1024
#: Most bytes of a message's JSON header (a full batch of job specs is ~200 KB).
MAX_HEADER = 1024 * 1024
#: Most blob bytes senders put in one batched message (a single larger blob
#: travels alone, up to the receiver's frame limit).
BATCH_BYTES = 8 * 1024 * 1024


def message_budget(max_message_size: int) -> int:
    """Most bytes one whole message may hold, all frames together, for a peer whose
    largest frame is ``max_message_size``: one frame that large plus a header."""
    return max_message_size + MAX_HEADER + 64 * 1024


def batch_bytes(max_message_size: int) -> int:
    """Most blob bytes a sender batches into one message for such a peer."""
    return max(1, min(BATCH_BYTES, max_message_size - 64 * 1024))
#: A final job whose result and output together exceed this travels by reference:
#: its record carries ``by_ref`` and its owner fetches the blobs in chunks.
BY_REF_BYTES = 256 * 1024
#: Most bytes of one CHUNK or PUT.
CHUNK_BYTES = 1024 * 1024
#: A result whose sealed result and output exceed this is uploaded by its monitor
#: in PUT chunks before its RESULT (``staged``), so no message holds the broker
#: for long.
UPLOAD_BYTES = 8 * 1024 * 1024
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 5
#: Longest name, tag, host or other short text; longest error or message text.
MAX_TEXT = 4096
MAX_LONG_TEXT = 64 * 1024
MAX_TAGS = 64
#: Most re-runs a job may ask for after its code raised (``retries=``).
MAX_RETRIES = 100
#: Most shared blobs (attached files) one job refers to.
MAX_SHARED = 64
#: Integers must fit SQLite's signed 64-bit INTEGER.
MAX_INT = 2**63 - 1


class Status(enum.StrEnum):
    NEW = "new"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    KILLED = "killed"


FINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.KILLED})


class Kind(enum.StrEnum):
    """What a job's payload is: code (Python or Sage) or a dill-pickled call."""

    PYTHON = "python"
    SAGE = "sage"
    FUNCTION = "function"


class Encoding(enum.StrEnum):
    """How a result blob is encoded."""

    NONE = "none"  # no result
    DILL = "dill"  # a dill pickle: only ever loaded from trusted workers
    DATA = "data"  # dsage.codec's data-only encoding, safe to decode
    #: a Sage object: its repr, for a client without Sage, then its dill pickle
    #: (dsage.codec.dump_sage); loaded only from trusted workers
    SAGE = "sage"
    #: a failed job's full error text (UTF-8); its record's ``error`` keeps only the type
    ERROR = "error"


class ResultFrom(enum.StrEnum):
    """Where a job's result came from, which decides its repr."""

    NONE = "none"
    EXPRESSION = "expression"  # the value of the code's final expression
    DSAGE_RESULT = "DSAGE_RESULT"
    RETURN = "return"  # a function job's return value


class M(enum.StrEnum):
    """Message types."""

    # client -> broker
    HELLO = "hello"
    SUBMIT = "submit"
    KILL = "kill"
    QUERY = "query"
    LIST = "list"
    WORKERS = "workers"
    PING = "ping"
    FETCH = "fetch"
    STATUS = "status"
    PURGE = "purge"
    # broker -> client
    WELCOME = "welcome"
    ACK = "ack"
    JOBS = "jobs"
    WORKER_LIST = "worker_list"
    PONG = "pong"
    CHUNK = "chunk"
    STATE = "state"
    PURGED = "purged"
    ERROR = "error"
    # monitor -> broker
    REGISTER = "register"
    HEARTBEAT = "heartbeat"
    RESULT = "result"
    STOPPING = "stopping"
    RELEASE = "release"
    PUT = "put"
    # monitor -> broker -> subscribers: what a running job printed lately
    OUTPUT = "output"
    # broker -> monitor
    REGISTERED = "registered"
    RUN = "run"
    CANCEL = "cancel"
    RESULT_ACK = "result_ack"
    PUT_ACK = "put_ack"
    # broker -> subscribers
    EVENT = "event"


class ProtocolError(Exception):
    """A received message is malformed; ``code`` is a short machine-readable word."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass
class Message:
    type: M
    header: dict[str, Any] = field(default_factory=dict)
    blobs: list[bytes] = field(default_factory=list)


# --- validators: each takes a decoded JSON value, returns it or raises ValueError

Validator = Callable[[Any], Any]
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_Z85 = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


def text_problem(v: str, limit: int) -> str | None:
    """Why ``v`` is not acceptable text (too long, or not encodable as UTF-8,
    as a lone surrogate is), or None."""
    if len(v) > limit:
        return f"longer than {limit} characters"
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return "not valid Unicode text (a lone surrogate)"
    return None


def _text(limit: int) -> Validator:
    def check(v: Any) -> str:
        if not isinstance(v, str):
            raise ValueError("not a string")
        problem = text_problem(v, limit)
        if problem:
            raise ValueError(problem)
        return v

    return check


_str = _text(MAX_LONG_TEXT)
_short_str = _text(MAX_TEXT)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("not an integer")
    if not -MAX_INT <= v <= MAX_INT:
        raise ValueError("out of the 64-bit range")
    return v


def _nonneg_int(v: Any) -> int:
    if _int(v) < 0:
        raise ValueError("negative")
    return v


def _pos_int(v: Any) -> int:
    if _int(v) <= 0:
        raise ValueError("not positive")
    return v


def _bounded_int(low: int, high: int) -> Validator:
    def check(v: Any) -> int:
        if not low <= _int(v) <= high:
            raise ValueError(f"not between {low} and {high}")
        return v

    return check


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("not a number")
    if isinstance(v, int):
        v = _int(v)
    if not math.isfinite(v):
        raise ValueError("not a finite number")
    return float(v)


def _pos_float(v: Any) -> float:
    if _float(v) <= 0:
        raise ValueError("not positive")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("not a boolean")
    return v


_HASH = re.compile(r"^[0-9a-f]{64}$")


def _hash(v: Any) -> str:
    if not isinstance(v, str) or not _HASH.match(v):
        raise ValueError("not a SHA-256 hash (64 lowercase hex digits)")
    return v


def _job_id(v: Any) -> str:
    if not isinstance(v, str) or not _JOB_ID.match(v):
        raise ValueError("not a job id (32 lowercase hex digits)")
    return v


def _key(v: Any) -> str:
    if not isinstance(v, str) or not _Z85.match(v):
        raise ValueError("not a z85 key")
    return v


def _priority(v: Any) -> int:
    if not 0 <= _int(v) <= MAX_PRIORITY:
        raise ValueError(f"priority must be 0..{MAX_PRIORITY}")
    return v


def _one_of(enum_type: type[enum.StrEnum]) -> Validator:
    values = {e.value for e in enum_type}

    def check(v: Any) -> Any:
        if not isinstance(v, str) or v not in values:  # a list or dict is not hashable
            raise ValueError(f"not one of {sorted(values)}")
        return v

    return check


def _final_status(v: Any) -> str:
    if not isinstance(v, str) or v not in {s.value for s in FINAL}:
        raise ValueError("not a final status")
    return v


def _optional(check: Validator) -> Validator:
    def opt(v: Any) -> Any:
        return None if v is None else check(v)

    return opt


def _list_of(check: Validator, limit: int = MAX_BATCH) -> Validator:
    def lst(v: Any) -> list[Any]:
        if not isinstance(v, list) or len(v) > limit:
            raise ValueError(f"not a list of at most {limit} items")
        return [check(x) for x in v]

    return lst


def _obj(fields: Mapping[str, Validator]) -> Validator:
    def check(v: Any) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise ValueError("not an object")
        missing = fields.keys() - v.keys()
        extra = v.keys() - fields.keys()
        if missing or extra:
            raise ValueError(f"missing {sorted(missing)} / unknown {sorted(extra)} keys")
        for k, f in fields.items():
            try:
                f(v[k])
            except ValueError as e:
                raise ValueError(f"{k}: {e}") from None
        return v

    return check


_tags = _list_of(_short_str, MAX_TAGS)
#: names of exception classes ('ValueError', 'mymodule.MyError')
_exception_names = _list_of(_short_str, MAX_TAGS)


def exception_name(cls: type) -> str:
    """How ``retry_on`` names an exception class: ``ValueError`` for builtins,
    ``module.QualName`` otherwise (``__main__.MyError`` for a script's own)."""
    return cls.__qualname__ if cls.__module__ == "builtins" else \
        f"{cls.__module__}.{cls.__qualname__}"


def _retries(v: Any) -> int:
    if not 0 <= _int(v) <= MAX_RETRIES:
        raise ValueError(f"retries must be 0..{MAX_RETRIES}")
    return v


def _part(v: Any) -> str:
    if v not in ("result", "output"):
        raise ValueError("not 'result' or 'output'")
    return str(v)
_ids = _list_of(_job_id)
#: the shared blobs a job uses, by content hash
_job_shared = _list_of(_hash, MAX_SHARED)

JOB_SPEC = {
    "id": _job_id,
    "name": _optional(_short_str),
    "kind": _one_of(Kind),
    "timeout": _optional(_pos_float),
    "priority": _priority,
    "memory": _optional(_pos_int),
    "anonymous_ok": _bool,
    "requires": _tags,
    #: run in a slot process no earlier job has run in
    "isolate": _bool,
    #: re-run the job up to this many times when its code raises one of ``retry_on``
    "retries": _retries,
    "retry_on": _exception_names,
    #: content hashes of the shared blobs (attached files) the job uses, each sent
    #: once per message as a trailing blob (see :class:`Schema`)
    "shared": _job_shared,
}
RUN_SPEC = {
    "id": _job_id,
    "name": _optional(_short_str),
    "kind": _one_of(Kind),
    "timeout": _optional(_pos_float),
    "memory": _optional(_pos_int),
    "owner": _key,
    "trusted": _bool,
    "isolate": _bool,
    #: which run of the job this is (1, then 2 after a retry): DSAGE_ATTEMPT
    "attempt": _pos_int,
    #: exceptions that make the slot say ``retry``; empty when no retry is left
    "retry_on": _exception_names,
    "shared": _job_shared,
}
RESULT_SPEC = {
    "id": _job_id,
    "status": _final_status,
    "error": _optional(_str),
    "encoding": _one_of(Encoding),
    "result_from": _one_of(ResultFrom),
    "sealed": _bool,
    "started": _optional(_float),
    "finished": _float,
    #: the result and output were uploaded with PUT (the blob frames are empty)
    "staged": _bool,
    #: the run this is the outcome of (a result of an earlier run is stale)
    "attempt": _pos_int,
    #: the code raised an exception named in the run's ``retry_on``
    "retry": _bool,
}
WORKER_INFO = {
    "id": _short_str,
    "host": _short_str,
    "anonymous": _bool,
    "key": _key,
}
RECORD = {
    "id": _job_id,
    "name": _optional(_short_str),
    "kind": _one_of(Kind),
    "status": _one_of(Status),
    "priority": _priority,
    "created": _float,
    "started": _optional(_float),
    "finished": _optional(_float),
    "failures": _nonneg_int,
    #: the job's run: 1, then one more after each retry
    "attempt": _pos_int,
    "error": _optional(_str),
    "worker": _optional(_obj(WORKER_INFO)),
    "encoding": _one_of(Encoding),
    "result_from": _one_of(ResultFrom),
    "sealed": _bool,
    #: why a queued job is waiting (no connected worker can run it, say), else None
    "reason": _optional(_short_str),
    #: the result and output are not in this message: their owner fetches them
    #: with FETCH, in chunks (large results do not ride the events socket)
    "by_ref": _bool,
}
MONITOR_INFO = {
    "id": _short_str,
    "host": _short_str,
    "pid": _int,
    "slots": _pos_int,
    "busy": _nonneg_int,
    "anonymous": _bool,
    "tags": _tags,
    #: None when the asking key may not see other monitors' keys (no worker role)
    "key": _optional(_key),
    #: seconds since the broker last heard from the monitor
    "quiet": _float,
}
ERROR_ITEM = {"id": _job_id, "code": _short_str, "message": _str}


@dataclass(frozen=True)
class Schema:
    """Header keys and blob layout of one message type.

    ``items`` names the list in the header whose entries each own
    ``blobs_per_item`` blobs; otherwise the message has ``blobs`` blobs.
    ``shared`` names a header list of content hashes, each owning one more blob
    after those: content that several items use, sent once.
    """

    fields: dict[str, Validator]
    items: str | None = None
    item_fields: dict[str, Validator] | None = None
    blobs_per_item: int = 0
    blobs: int = 0
    shared: str | None = None


_req = {"req": _nonneg_int}
SCHEMAS: dict[M, Schema] = {
    M.HELLO: Schema({**_req, "client": _short_str, "version": _short_str}),
    M.SUBMIT: Schema({**_req, "shared": _list_of(_hash)}, "jobs", JOB_SPEC, 1, shared="shared"),
    # ``queued_only``: cancel, not kill: only jobs still in the broker's queue end
    M.KILL: Schema({**_req, "ids": _ids, "queued_only": _bool}),
    M.QUERY: Schema({**_req, "ids": _ids}),
    # one page of a key's jobs, oldest first: ``after`` is the previous page's ``next``
    M.LIST: Schema({**_req, "status": _optional(_one_of(Status)), "name": _optional(_short_str),
                    "since": _optional(_float), "after": _nonneg_int,
                    "limit": _bounded_int(1, MAX_LIST)}),
    M.WORKERS: Schema({**_req}),
    M.PING: Schema({}),
    M.FETCH: Schema({**_req, "id": _job_id, "part": _part, "offset": _nonneg_int}),
    M.STATUS: Schema({**_req}),
    # drop this key's final jobs (that finished before ``before``, if given)
    M.PURGE: Schema({**_req, "before": _optional(_float)}),
    M.CHUNK: Schema({**_req, "id": _job_id, "part": _part, "offset": _nonneg_int,
                     "total": _nonneg_int}, blobs=1),
    M.WELCOME: Schema(
        {**_req, "version": _short_str, "key": _key, "epoch": _short_str,
         "heartbeat": _pos_float, "max_message_size": _pos_int}
    ),
    M.ACK: Schema({**_req, "ids": _ids, "errors": _list_of(_obj(ERROR_ITEM))}),
    # a long answer comes in several JOBS messages: all but the last say ``more``; the
    # last page of a LIST says where the next one starts (``next``), if there is one
    M.JOBS: Schema({**_req, "missing": _ids, "more": _bool, "next": _optional(_nonneg_int)},
                   "jobs", RECORD, 2),
    # the broker's view for STATUS: this key's jobs by state, all queued and running
    # jobs, and the monitors (as in WORKER_LIST)
    M.STATE: Schema({**_req, "version": _short_str, "uptime": _float,
                     "jobs": _obj({s.value: _nonneg_int for s in Status}),
                     "queued": _nonneg_int, "processing": _nonneg_int,
                     "workers": _list_of(_obj(MONITOR_INFO))}),
    M.PURGED: Schema({**_req, "count": _nonneg_int}),
    M.WORKER_LIST: Schema({**_req, "workers": _list_of(_obj(MONITOR_INFO))}),
    M.PONG: Schema({"seq": _nonneg_int, "epoch": _short_str}),
    M.ERROR: Schema({"req": _optional(_nonneg_int), "code": _short_str, "message": _str}),
    M.REGISTER: Schema(
        {"monitor": _short_str, "host": _short_str, "pid": _int, "slots": _pos_int,
         "tags": _tags, "running": _ids, "version": _short_str}
    ),
    M.HEARTBEAT: Schema({}),
    M.RESULT: Schema({}, "results", RESULT_SPEC, 2),
    M.STOPPING: Schema({}),
    # ``missing_blobs``: shared blobs the monitor was thought to keep and does not
    # (it dropped them): the broker sends them again with the jobs
    M.RELEASE: Schema({"ids": _ids, "reason": _short_str, "count_failure": _bool,
                       "missing_blobs": _list_of(_hash)}),
    M.REGISTERED: Schema({"heartbeat": _pos_float, "liveness": _pos_int, "cancel": _ids}),
    M.RUN: Schema({"shared": _list_of(_hash)}, "jobs", RUN_SPEC, 1, shared="shared"),
    M.CANCEL: Schema({"ids": _ids, "reason": _short_str}),
    # ``attempts``: of each acknowledged result, in the order of ``ids``
    M.RESULT_ACK: Schema({"ids": _ids, "attempts": _list_of(_pos_int)}),
    M.PUT: Schema({"id": _job_id, "part": _part, "offset": _nonneg_int, "total": _nonneg_int},
                  blobs=1),
    # ``next``: the offset to send next; ``gone``: the job is not the monitor's (any
    # more), so the rest need not be sent
    M.PUT_ACK: Schema({"id": _job_id, "part": _part, "next": _nonneg_int, "gone": _bool}),
    M.EVENT: Schema({"seq": _nonneg_int, "epoch": _short_str}, "jobs", RECORD, 2),
    # bytes ``offset``.. of a running job's output, sealed to its owner (LIVE_BYTES at most)
    M.OUTPUT: Schema({"id": _job_id, "offset": _nonneg_int}, blobs=1),
}

CLIENT_REQUESTS = frozenset({M.HELLO, M.SUBMIT, M.KILL, M.QUERY, M.LIST, M.WORKERS, M.PING,
                             M.FETCH, M.STATUS, M.PURGE})
CLIENT_REPLIES = frozenset({M.WELCOME, M.ACK, M.JOBS, M.WORKER_LIST, M.PONG, M.CHUNK,
                            M.STATE, M.PURGED, M.ERROR})
MONITOR_REQUESTS = frozenset({M.REGISTER, M.HEARTBEAT, M.RESULT, M.STOPPING, M.RELEASE,
                              M.PUT, M.OUTPUT})
#: what comes on the events socket
EVENTS = frozenset({M.EVENT, M.OUTPUT})
MONITOR_REPLIES = frozenset({M.REGISTERED, M.HEARTBEAT, M.RUN, M.CANCEL, M.RESULT_ACK,
                             M.PUT_ACK, M.ERROR})
_BY_WIRE = {m.value.encode(): m for m in M}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def encode(msg: Message) -> list[bytes]:
    """Frames for ``msg`` (no routing or topic frame)."""
    header = json.dumps(msg.header, separators=(",", ":"), allow_nan=False).encode()
    return [VERSION, msg.type.value.encode(), header, *msg.blobs]


def make(type_: M, blobs: Sequence[bytes] = (), **header: Any) -> Message:
    """A message; shorthand used by senders."""
    return Message(type_, header, list(blobs))


def decode(frames: Sequence[bytes], allowed: frozenset[M]) -> Message:
    """Validate and decode frames; raise :class:`ProtocolError` when malformed."""
    if len(frames) < 3:
        raise ProtocolError("frames", f"a message has at least 3 frames, got {len(frames)}")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError("frames", f"too many frames ({len(frames)} > {MAX_FRAMES})")
    if bytes(frames[0]) != VERSION:
        raise ProtocolError(
            "version", f"protocol version {bytes(frames[0])[:16]!r} is not {VERSION!r}"
        )
    type_ = _BY_WIRE.get(bytes(frames[1]))
    if type_ is None:
        raise ProtocolError("type", f"unknown message type {bytes(frames[1])[:32]!r}")
    if type_ not in allowed:
        raise ProtocolError("type", f"message type '{type_}' is not accepted here")
    if len(frames[2]) > MAX_HEADER:
        raise ProtocolError("size", "header too large")
    try:
        header = json.loads(bytes(frames[2]), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ProtocolError("header", f"header is not JSON: {e}") from None
    schema = SCHEMAS[type_]
    blobs = [bytes(f) for f in frames[3:]]
    try:
        _obj(_with_items(schema))(header)
        if schema.items is not None:
            assert schema.item_fields is not None
            items = _list_of(_obj(schema.item_fields))(header[schema.items])
            expected = schema.blobs_per_item * len(items)
        else:
            expected = schema.blobs
        if schema.shared is not None:
            expected += len(header[schema.shared])
    except ValueError as e:
        raise ProtocolError("header", f"bad '{type_}' header: {e}") from None
    if len(blobs) != expected:
        raise ProtocolError("frames", f"'{type_}' needs {expected} blob frames, got {len(blobs)}")
    return Message(type_, header, blobs)


def _with_items(schema: Schema) -> dict[str, Validator]:
    if schema.items is None:
        return schema.fields
    return {**schema.fields, schema.items: lambda v: v}


def error(code: str, message: str, req: int | None = None) -> Message:
    return make(M.ERROR, code=code, message=clip(message, MAX_LONG_TEXT), req=req)


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` made acceptable to the protocol: lone surrogates replaced, and cut to
    ``limit`` characters (keeping the start)."""
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    marker = " [... cut ...]"
    return text if len(text) <= limit else text[:limit - len(marker)] + marker


def shared_batches(sizes: Sequence[int], shared: Sequence[Sequence[tuple[str, int]]],
                   max_items: int = MAX_BATCH, max_bytes: int = BATCH_BYTES) -> list[range]:
    """As :func:`batches`, for items that also use shared blobs (``shared[i]``: the
    (hash, size) of each distinct blob item ``i`` uses): a blob counts once per
    batch, in its bytes and in its at most ``max_items`` shared blobs."""
    out: list[range] = []
    start, total = 0, 0
    seen: set[str] = set()
    for i, size in enumerate(sizes):
        fresh = [(h, n) for h, n in shared[i] if h not in seen]
        new = size + sum(n for _, n in fresh)
        if i > start and (i - start >= max_items or total + new > max_bytes
                          or len(seen) + len(fresh) > max_items):
            out.append(range(start, i))
            start, total, seen = i, 0, set()
            fresh = list(shared[i])
            new = size + sum(n for _, n in fresh)
        total += new
        seen.update(h for h, _ in fresh)
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


def batches(sizes: Sequence[int], max_items: int = MAX_BATCH,
            max_bytes: int = BATCH_BYTES) -> list[range]:
    """Split items into consecutive batches for separate messages: at most
    ``max_items`` each, and at most ``max_bytes`` of blobs unless one item alone
    is larger. ``sizes`` are the items' blob bytes; returns index ranges."""
    out: list[range] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_items or total + size > max_bytes):
            out.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out
