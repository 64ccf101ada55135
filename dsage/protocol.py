"""The wire format: frames, message types, schemas; pure encode and decode.

A message is a list of frames::

    [VERSION, type, header, blob, blob, ...]

``header`` is a JSON object of a type fixed per message type: a ``TypedDict``
below, whose annotations carry every bound (lengths, ranges, patterns, item
counts), checked by msgspec while it parses. A missing key or a value out of
its type is an error; a key the type does not name is dropped, so a newer peer
may add optional keys. Blobs are opaque bytes (job
payloads, results, captured output) that the broker never looks into. Batched
messages carry a list of items in the header and a fixed number of blobs per
item, in order. On the events socket a topic frame (the subscriber's z85 key)
comes first.

Every problem with a received message raises :class:`ProtocolError` with a
short code; nothing here asserts on network input.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING, Annotated, Any, Literal, NotRequired, TypeAlias, TypedDict, TypeGuard,
    get_args, get_type_hints,
)

import msgspec
from msgspec import Meta

from .entropy import RandomPool

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
#: The smallest frame limit (``--max-message-size``) a peer may set: every frame that
#: dsage makes of its own (a header, a chunk of a large result, a small result on an
#: event) fits in it; only a job's payload or attached file may be larger.
MIN_MESSAGE_SIZE = 1024 * 1024
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
    #: the broker is stopping and takes its monitors with it: stop, give jobs back
    SHUTDOWN = "shutdown"
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


# --- the typed headers: one TypedDict per message type, its bounds in its types.
# msgspec validates a header against its type while it parses the JSON (in C):
# types, ranges, lengths, patterns and item counts, with no surrogates, NaN or
# infinity; keys a type does not name are dropped, so a newer peer may add
# optional keys.

_JOB_ID_PATTERN = "^[0-9a-f]{32}$"
_Z85_PATTERN = r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$"
_HASH_PATTERN = "^[0-9a-f]{64}$"
_JOB_ID = re.compile(_JOB_ID_PATTERN)


def is_job_id(value: Any) -> TypeGuard[str]:
    """Whether ``value`` is a job id: 32 lowercase hex digits."""
    return isinstance(value, str) and len(value) == 32 and _JOB_ID.match(value) is not None


def version_problem(theirs: str, who: str, ours: str) -> str | None:
    """Why a peer (``who``: "client" or "worker") of dsage ``theirs`` cannot work with
    a broker of ``ours``, or None: their major and minor versions must be the same, as
    the messages and their fields may change between minor versions until 1.0; a
    different patch version is fine."""
    if theirs.split(".")[:2] == ours.split(".")[:2]:
        return None
    return (f"this broker runs dsage {ours} and the {who} dsage {theirs}: their messages "
            f"differ; install dsage {'.'.join(ours.split('.')[:2])}.x on the {who} "
            f"(or the {who}'s version on the broker)")


#: the randomness job ids are made of (beside the time)
_ids = RandomPool(10)


def new_job_id() -> str:
    """A new job id, made by the client, so a submit never waits for the broker to name
    its job: the time in milliseconds (48 bits) and 80 random bits, as 32 hex digits.
    The time first keeps new ids together in the store's index of them, so that a
    commit writes a few pages of it rather than one per job (about 5 us per job).
    (Ids need not be secret: the broker answers another key's job id as unknown.)"""
    return f"{int(time.time() * 1000) & 0xFFFF_FFFF_FFFF:012x}{_ids.take().hex()}"


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


Int = Annotated[int, Meta(ge=-MAX_INT, le=MAX_INT)]
NonNeg = Annotated[int, Meta(ge=0, le=MAX_INT)]
Pos = Annotated[int, Meta(ge=1, le=MAX_INT)]
PosFloat = Annotated[float, Meta(gt=0)]
#: a name, tag, host or other short text
Text = Annotated[str, Meta(max_length=MAX_TEXT)]
#: an error or message text
LongText = Annotated[str, Meta(max_length=MAX_LONG_TEXT)]
JobId = Annotated[str, Meta(min_length=32, max_length=32, pattern=_JOB_ID_PATTERN)]
#: a public key, z85-encoded
Key = Annotated[str, Meta(min_length=40, max_length=40, pattern=_Z85_PATTERN)]
#: a SHA-256 content hash (64 lowercase hex digits)
Hash = Annotated[str, Meta(min_length=64, max_length=64, pattern=_HASH_PATTERN)]
Priority = Annotated[int, Meta(ge=0, le=MAX_PRIORITY)]
Tags = Annotated[list[Text], Meta(max_length=MAX_TAGS)]
#: names of exception classes ('ValueError', 'mymodule.MyError')
ExceptionNames = Annotated[list[Text], Meta(max_length=MAX_TAGS)]
Ids = Annotated[list[JobId], Meta(max_length=MAX_BATCH)]
Hashes = Annotated[list[Hash], Meta(max_length=MAX_BATCH)]
#: the shared blobs (attached files) one job uses, by content hash
JobShared = Annotated[list[Hash], Meta(max_length=MAX_SHARED)]


def _values(members: Iterable[enum.StrEnum]) -> Any:
    """The header type of a field that holds one of ``members``, by value (a plain
    ``str`` once decoded, as SQLite stores it)."""
    return Literal[tuple(m.value for m in members)]


if TYPE_CHECKING:  # the values are strings
    KindName: TypeAlias = str
    StatusName: TypeAlias = str
    FinalStatusName: TypeAlias = str
    EncodingName: TypeAlias = str
    ResultFromName: TypeAlias = str
else:
    KindName = _values(Kind)
    StatusName = _values(Status)
    FinalStatusName = _values(s for s in Status if s in FINAL)
    EncodingName = _values(Encoding)
    ResultFromName = _values(ResultFrom)
Part = Literal["result", "output"]


def exception_name(cls: type) -> str:
    """How ``retry_on`` names an exception class: ``ValueError`` for builtins,
    ``module.QualName`` otherwise (``__main__.MyError`` for a script's own)."""
    return cls.__qualname__ if cls.__module__ == "builtins" else \
        f"{cls.__module__}.{cls.__qualname__}"


class JobSpec(TypedDict):
    """A job as a client submits it."""

    id: JobId
    name: Text | None
    kind: KindName
    timeout: PosFloat | None
    priority: Priority
    memory: Pos | None
    anonymous_ok: bool
    requires: Tags
    #: run in a slot process no earlier job has run in
    isolate: bool
    #: re-run the job up to this many times when its code raises one of ``retry_on``
    retries: Annotated[int, Meta(ge=0, le=MAX_RETRIES)]
    retry_on: ExceptionNames
    #: content hashes of the shared blobs (attached files) the job uses, each sent
    #: once per message as a trailing blob (see :class:`Schema`)
    shared: JobShared


class RunSpec(TypedDict):
    """A job as the broker hands it to a monitor."""

    id: JobId
    name: Text | None
    kind: KindName
    timeout: PosFloat | None
    memory: Pos | None
    owner: Key
    trusted: bool
    isolate: bool
    #: which run of the job this is (1, then 2 after a retry): DSAGE_ATTEMPT
    attempt: Pos
    #: exceptions that make the slot say ``retry``; empty when no retry is left
    retry_on: ExceptionNames
    shared: JobShared


class ResultSpec(TypedDict):
    """A job's outcome as its monitor reports it."""

    id: JobId
    status: FinalStatusName
    error: LongText | None
    encoding: EncodingName
    result_from: ResultFromName
    sealed: bool
    started: float | None
    finished: float
    #: the result and output were uploaded with PUT (the blob frames are empty)
    staged: bool
    #: the run this is the outcome of (a result of an earlier run is stale)
    attempt: Pos
    #: the code raised an exception named in the run's ``retry_on``
    retry: bool


class WorkerInfo(TypedDict):
    id: Text
    host: Text
    anonymous: bool
    key: Key


class Record(TypedDict):
    """A job as the broker tells its owner about it."""

    id: JobId
    name: Text | None
    kind: KindName
    status: StatusName
    priority: Priority
    created: float
    started: float | None
    finished: float | None
    failures: NonNeg
    #: the job's run: 1, then one more after each retry
    attempt: Pos
    error: LongText | None
    worker: WorkerInfo | None
    encoding: EncodingName
    result_from: ResultFromName
    sealed: bool
    #: why a queued job is waiting (no connected worker can run it, say), else None
    reason: Text | None
    #: the result and output are not in this message: their owner fetches them
    #: with FETCH, in chunks (large results do not ride the events socket)
    by_ref: bool


class MonitorInfo(TypedDict):
    id: Text
    host: Text
    pid: Int
    slots: Pos
    busy: NonNeg
    anonymous: bool
    tags: Tags
    #: None when the asking key may not see other monitors' keys (no worker role)
    key: Key | None
    #: seconds since the broker last heard from the monitor
    quiet: float


class ErrorItem(TypedDict):
    id: JobId
    code: Text
    message: LongText


#: a key's jobs by state
class JobCounts(TypedDict):
    new: NonNeg
    processing: NonNeg
    completed: NonNeg
    failed: NonNeg
    killed: NonNeg


Monitors = Annotated[list[MonitorInfo], Meta(max_length=MAX_BATCH)]


JobSpecs = Annotated[list[JobSpec], Meta(max_length=MAX_BATCH)]
RunSpecs = Annotated[list[RunSpec], Meta(max_length=MAX_BATCH)]
ResultSpecs = Annotated[list[ResultSpec], Meta(max_length=MAX_BATCH)]
Records = Annotated[list[Record], Meta(max_length=MAX_BATCH)]
ErrorItems = Annotated[list[ErrorItem], Meta(max_length=MAX_BATCH)]


class Hello(TypedDict):
    req: NonNeg
    client: Text
    version: Text


class Submit(TypedDict):
    req: NonNeg
    shared: Hashes
    jobs: JobSpecs


class Kill(TypedDict):
    req: NonNeg
    ids: Ids
    #: cancel, not kill: only jobs still in the broker's queue end
    queued_only: bool


class Query(TypedDict):
    req: NonNeg
    ids: Ids


class ListJobs(TypedDict):
    """One page of a key's jobs, oldest first: ``after`` is the previous page's ``next``."""

    req: NonNeg
    status: StatusName | None
    name: Text | None
    since: float | None
    after: NonNeg
    limit: Annotated[int, Meta(ge=1, le=MAX_LIST)]


class Request(TypedDict):
    """A request with no arguments (WORKERS, STATUS)."""

    req: NonNeg


class Empty(TypedDict):
    pass


class Fetch(TypedDict):
    req: NonNeg
    id: JobId
    part: Part
    offset: NonNeg


class Purge(TypedDict):
    """Drop this key's final jobs (that finished before ``before``, if given)."""

    req: NonNeg
    before: float | None


class Chunk(TypedDict):
    req: NonNeg
    id: JobId
    part: Part
    offset: NonNeg
    total: NonNeg


class Welcome(TypedDict):
    req: NonNeg
    version: Text
    key: Key
    epoch: Text
    heartbeat: PosFloat
    max_message_size: Pos


class Ack(TypedDict):
    req: NonNeg
    ids: Ids
    errors: ErrorItems


class Jobs(TypedDict):
    """A long answer comes in several JOBS messages: all but the last say ``more``;
    the last page of a LIST says where the next one starts (``next``), if there is one."""

    req: NonNeg
    missing: Ids
    more: bool
    next: NonNeg | None
    jobs: Records


class State(TypedDict):
    """The broker's view for STATUS: this key's jobs by state, all queued and running
    jobs, and the monitors (as in WORKER_LIST)."""

    req: NonNeg
    version: Text
    uptime: float
    jobs: JobCounts
    queued: NonNeg
    processing: NonNeg
    workers: Monitors


class Purged(TypedDict):
    req: NonNeg
    count: NonNeg


class WorkerList(TypedDict):
    req: NonNeg
    workers: Monitors


class Pong(TypedDict):
    seq: NonNeg
    epoch: Text


class ErrorReply(TypedDict):
    req: NonNeg | None
    code: Text
    message: LongText


class Register(TypedDict):
    monitor: Text
    host: Text
    pid: Int
    slots: Pos
    tags: Tags
    running: Ids
    version: Text
    #: its largest frame accepted: it is sent no job with a larger payload or attached
    #: file (DEFAULT_MAX_MESSAGE_SIZE when missing, from an earlier patch version)
    max_message_size: NotRequired[Pos]


class Results(TypedDict):
    results: ResultSpecs


class Release(TypedDict):
    """``missing_blobs``: shared blobs the monitor was thought to keep and does not
    (it dropped them): the broker sends them again with the jobs."""

    ids: Ids
    reason: Text
    count_failure: bool
    missing_blobs: Hashes


class Registered(TypedDict):
    heartbeat: PosFloat
    liveness: Pos
    cancel: Ids
    #: the broker's configured prefetch: the jobs a monitor keeps queued beyond its busy
    #: slots when it gives back the others (1 when missing)
    prefetch: NotRequired[NonNeg]


class Run(TypedDict):
    """Jobs for a monitor; ``acked`` and ``attempts`` acknowledge results of it, as a
    RESULT_ACK does (they ride here when a RUN goes anyway)."""

    shared: Hashes
    jobs: RunSpecs
    acked: Ids
    attempts: Annotated[list[Pos], Meta(max_length=MAX_BATCH)]


class Cancel(TypedDict):
    ids: Ids
    reason: Text


class ResultAck(TypedDict):
    """``attempts``: of each acknowledged result, in the order of ``ids``."""

    ids: Ids
    attempts: Annotated[list[Pos], Meta(max_length=MAX_BATCH)]


class Put(TypedDict):
    id: JobId
    part: Part
    offset: NonNeg
    total: NonNeg


class PutAck(TypedDict):
    """``next``: the offset to send next; ``gone``: the job is not the monitor's (any
    more), so the rest need not be sent."""

    id: JobId
    part: Part
    next: NonNeg
    gone: bool


class Shutdown(TypedDict):
    """The broker stops and takes its monitors with it; only ever from the broker
    whose key the monitor checked (its CURVE server)."""

    reason: Text


class Event(TypedDict):
    seq: NonNeg
    epoch: Text
    jobs: Records


class Output(TypedDict):
    """Bytes ``offset``.. of a running job's output, sealed to its owner (LIVE_BYTES at
    most)."""

    id: JobId
    offset: NonNeg


@dataclass(frozen=True)
class Schema:
    """Header type and blob layout of one message type.

    ``items`` names the list in the header whose entries each own
    ``blobs_per_item`` blobs; otherwise the message has ``blobs`` blobs.
    ``shared`` names a header list of content hashes, each owning one more blob
    after those: content that several items use, sent once.
    """

    header: Any  # a TypedDict class
    items: str | None = None
    blobs_per_item: int = 0
    blobs: int = 0
    shared: str | None = None

    @property
    def fields(self) -> dict[str, Any]:
        """The header's keys and their types."""
        return get_type_hints(self.header, include_extras=True)

    @property
    def item_type(self) -> Any:
        """The TypedDict of one item of ``items``, or None."""
        if self.items is None:
            return None
        return get_args(get_args(self.fields[self.items])[0])[0]


SCHEMAS: dict[M, Schema] = {
    M.HELLO: Schema(Hello),
    M.SUBMIT: Schema(Submit, "jobs", 1, shared="shared"),
    M.KILL: Schema(Kill),
    M.QUERY: Schema(Query),
    M.LIST: Schema(ListJobs),
    M.WORKERS: Schema(Request),
    M.PING: Schema(Empty),
    M.FETCH: Schema(Fetch),
    M.STATUS: Schema(Request),
    M.PURGE: Schema(Purge),
    M.CHUNK: Schema(Chunk, blobs=1),
    M.WELCOME: Schema(Welcome),
    M.ACK: Schema(Ack),
    M.JOBS: Schema(Jobs, "jobs", 2),
    M.STATE: Schema(State),
    M.PURGED: Schema(Purged),
    M.WORKER_LIST: Schema(WorkerList),
    M.PONG: Schema(Pong),
    M.ERROR: Schema(ErrorReply),
    M.REGISTER: Schema(Register),
    M.HEARTBEAT: Schema(Empty),
    M.RESULT: Schema(Results, "results", 2),
    M.STOPPING: Schema(Empty),
    M.RELEASE: Schema(Release),
    M.REGISTERED: Schema(Registered),
    M.RUN: Schema(Run, "jobs", 1, shared="shared"),
    M.CANCEL: Schema(Cancel),
    M.RESULT_ACK: Schema(ResultAck),
    M.PUT: Schema(Put, blobs=1),
    M.PUT_ACK: Schema(PutAck),
    M.SHUTDOWN: Schema(Shutdown),
    M.EVENT: Schema(Event, "jobs", 2),
    M.OUTPUT: Schema(Output, blobs=1),
}
_DECODERS = {m: msgspec.json.Decoder(s.header) for m, s in SCHEMAS.items()}
_ENCODER = msgspec.json.Encoder()

CLIENT_REQUESTS = frozenset({M.HELLO, M.SUBMIT, M.KILL, M.QUERY, M.LIST, M.WORKERS, M.PING,
                             M.FETCH, M.STATUS, M.PURGE})
CLIENT_REPLIES = frozenset({M.WELCOME, M.ACK, M.JOBS, M.WORKER_LIST, M.PONG, M.CHUNK,
                            M.STATE, M.PURGED, M.ERROR})
MONITOR_REQUESTS = frozenset({M.REGISTER, M.HEARTBEAT, M.RESULT, M.STOPPING, M.RELEASE,
                              M.PUT, M.OUTPUT})
#: what comes on the events socket
EVENTS = frozenset({M.EVENT, M.OUTPUT})
MONITOR_REPLIES = frozenset({M.REGISTERED, M.HEARTBEAT, M.RUN, M.CANCEL, M.RESULT_ACK,
                             M.PUT_ACK, M.SHUTDOWN, M.ERROR})
_BY_WIRE = {m.value.encode(): m for m in M}


def encode(msg: Message) -> list[bytes]:
    """Frames for ``msg`` (no routing or topic frame)."""
    return [VERSION, msg.type.value.encode(), _ENCODER.encode(msg.header), *msg.blobs]


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
        header = _DECODERS[type_].decode(frames[2])
    except (msgspec.DecodeError, msgspec.ValidationError) as e:  # ValidationError first
        raise ProtocolError("header", f"bad '{type_}' header: {e}") from None
    schema = SCHEMAS[type_]
    blobs = [bytes(f) for f in frames[3:]]
    expected = schema.blobs_per_item * len(header[schema.items]) if schema.items is not None \
        else schema.blobs
    if schema.shared is not None:
        expected += len(header[schema.shared])
    if len(blobs) != expected:
        raise ProtocolError("frames", f"'{type_}' needs {expected} blob frames, got {len(blobs)}")
    return Message(type_, header, blobs)


def result_ids(frames: Sequence[bytes]) -> list[str]:
    """The job ids a RESULT that :func:`decode` refused names, read as leniently as
    it can be (a header of another dsage version, say), so that the broker can fail
    those jobs instead of leaving them running forever; [] when there are none."""
    if len(frames) < 3 or bytes(frames[1]) != M.RESULT.value.encode() \
            or len(frames[2]) > MAX_HEADER:
        return []
    try:
        header = msgspec.json.decode(frames[2])
    except (msgspec.DecodeError, RecursionError):
        return []
    items = header.get("results") if isinstance(header, dict) else None
    if not isinstance(items, list):
        return []
    ids = [r.get("id") for r in items[:MAX_BATCH] if isinstance(r, dict)]
    return [i for i in ids if is_job_id(i)]


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
