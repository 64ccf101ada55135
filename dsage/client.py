"""DSage: the client a script embeds.

One background I/O thread owns the ZeroMQ sockets (they are not thread-safe):
a DEALER to the broker's client port, which is the source of truth, and a SUB
to its events port, the fast path that keeps JobWrappers live. User threads
hand it commands through a queue and a wake-up socket pair.

Nothing is dropped on the way out: the thread keeps an ordered send queue and
writes it while the socket takes messages, then waits for it to be writable
again. A submitted job stays in memory until the broker acknowledges it; it is
sent again after a reconnection, and when the broker has answered a later ping
without acknowledging it (so it was lost, not merely slow). The number and
bytes of unacknowledged jobs are bounded: past the bound, submitting blocks.
After every (re)connection, and when events show a gap, the thread asks the
broker for the state of every unfinished job, so no result is ever missed.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import logging
import math
import numbers
import operator
import os
import queue
import re
import socket
import sys
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import __version__, attach, display
from . import keys as keys_mod
from .auth import make_client
from .functions import dump_call
from .errors import (
    BrokerUnreachable, DSageError, IncompatibleVersion, KeyRejected, SubmitRejected, UnknownJob,
)
from .job import JobWrapper, check_wait
from .protocol import (
    BATCH_BYTES, CLIENT_REPLIES, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_PRIORITY, EVENTS, FINAL,
    MAX_BATCH, MAX_HEADER, MAX_INT, MAX_LIST, MAX_PRIORITY, MAX_RETRIES, MAX_TAGS, MAX_TEXT,
    Kind, M, Message, ProtocolError, Status, batches, decode, encode, exception_name,
    is_job_id, make, new_job_id, shared_batches, text_problem,
)
from .protocol import MIN_MESSAGE_SIZE, batch_bytes
from .sage import SAGE_TAG
from .seal import Opener, binding
from .sockets import send_frames, unfound
from .words import plural

if TYPE_CHECKING:
    from .executor import DSageExecutor

__all__ = [
    "BrokerUnreachable", "DSage", "DSageError", "KeyRejected", "MonitorInfo", "SubmitRejected",
    "UnknownJob", "check_job_id", "parse_memory",
]

#: Default bounds on the jobs submitted and not yet acknowledged by the broker
#: (how many, and their payload bytes): past either, submitting blocks until
#: acknowledgements make room.
MAX_UNACKED_JOBS = 100_000
MAX_UNACKED_BYTES = 256 * 1024 * 1024
#: Heartbeats a job must have been unacknowledged, besides the broker having
#: answered a ping sent after it, before it is sent again.
RESEND_HEARTBEATS = 3
#: Upper bound on a job spec's JSON bytes apart from its name, tags, retry_on
#: names and shared hashes (the longest id, kind, float, and 64-bit integer: 238
#: bytes), and the bytes a submit header needs besides its specs.
_SPEC_FIXED_BYTES = 256
_HEADER_SLACK = 64
#: JSON bytes of one content hash in a list (quotes and comma)
_HASH_BYTES = 67
_SPEC_BUDGET = MAX_HEADER - _HEADER_SLACK
#: JSON bytes of one job id in a list of ids (quotes and comma)
_ID_BYTES = 35


log = logging.getLogger("dsage.client")

#: how long connections may be refused before a client waiting to connect says so
#: (a broker started just before its client may need a moment to listen)
REFUSED_GRACE = 3.0


def check_job_id(job_id: Any) -> str:
    """``job_id`` if it is a job id (32 lowercase hex digits), else ValueError."""
    if not is_job_id(job_id):
        raise ValueError(f"{job_id!r} is not a job id (32 hex digits)")
    return job_id


@dataclass(frozen=True)
class MonitorInfo:
    """A connected monitor, as ``D.workers()`` lists it. ``key`` and ``pid`` are
    shown only to keys with the worker role (None and 0 otherwise), except for
    the asking key's own monitors."""

    id: str
    host: str
    pid: int
    slots: int
    busy: int
    anonymous: bool
    tags: list[str]
    key: str | None
    #: seconds since the broker last heard from it
    quiet: float = 0.0


@dataclass(frozen=True)
class ClusterStatus:
    """What ``D.status()`` reports: the broker, this key's jobs by state, the queue,
    and the connected monitors."""

    server: str
    port: int
    version: str
    uptime: float
    #: this key's jobs by state ('new', 'processing', 'completed', 'failed', 'killed')
    jobs: dict[str, int]
    #: all queued and all running jobs on the broker, of every key
    queued: int
    processing: int
    workers: list[MonitorInfo]

    @property
    def slots(self) -> int:
        return sum(w.slots for w in self.workers)

    @property
    def busy(self) -> int:
        return sum(w.busy for w in self.workers)


class _Page(list[Any]):
    """One LIST reply's wrappers (or its jobs' ids and states), and where the next
    page starts (None: the last)."""

    next: int | None = None


# --- checking a job's options in the user's call, before anything is sent

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
          "tb": 1000**4, "tib": 1024**4}


def parse_memory(value: int | str | None) -> int | None:
    """Bytes from ``2GB``, ``512MiB``, ``1.5G`` or a number of bytes; at least one
    byte and at most 2**63-1 (what the broker stores)."""
    if value is None:
        return None
    n: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            n = int(Decimal(m.group(1)) * _UNITS[m.group(2).lower()])
    if n is None:
        raise ValueError(f"memory={value!r}: give bytes as an int, or a size like '2GB' "
                         f"or '512MiB'")
    if not 1 <= n <= MAX_INT:
        raise ValueError(f"memory={value!r}: give from 1 byte to {MAX_INT} bytes "
                         f"(about 9.2 EB)")
    return n


def _check_timeout(timeout: float | None) -> float | None:
    """The job's timeout as a float (seconds), or None for no limit."""
    if timeout is None:
        return None
    problem = f"timeout={timeout!r}: give a positive, finite number of seconds, or None"
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(problem)
    try:
        seconds = float(timeout)
    except OverflowError:
        raise ValueError(problem) from None
    if not 0 < seconds < float("inf"):
        raise ValueError(problem)
    return seconds


def _check_connection(server: Any, port: Any, heartbeat: Any, connect_timeout: Any) -> int:
    """Check DSage's connection arguments (a clear error in the call, not a failed
    connection later); the port as an int."""
    if not isinstance(server, str) or not server:
        raise ValueError(f"server={server!r}: give the broker's host name or address")
    try:
        number = operator.index(port)
    except TypeError:
        raise TypeError(f"port={port!r}: give an int, the broker's client port") from None
    if not 1 <= number <= 65533:
        raise ValueError(f"port={port!r}: give a port from 1 to 65533, the broker's client port")
    for name, value, least in (("heartbeat", heartbeat, "positive"),
                               ("connect_timeout", connect_timeout, "0 or more")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0 or (value == 0 and name == "heartbeat"):
            raise ValueError(f"{name}={value!r}: give a {least} number of seconds")
    return number


def _check_time(name: str, value: Any) -> float | None:
    """A point in time given as a ``time.time()`` value or a datetime (None: none)."""
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        raise TypeError(f"{name}={value!r}: give a time.time() value or a datetime")
    return float(value)


def _check_priority(priority: int) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) \
            or not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority={priority!r}: give an int from 0 (most urgent) "
                         f"to {MAX_PRIORITY}")
    return priority


def _check_name(name: str | None) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, not {type(name).__name__}")
    if len(name) > MAX_TEXT:
        raise ValueError(f"name is {len(name)} characters long; at most {MAX_TEXT} are allowed")
    problem = text_problem(name, MAX_TEXT)
    if problem:
        raise ValueError(f"name={name!r}: {problem}")
    return name


def _check_retries(retries: int, retry_on: Iterable[type[BaseException] | str] | None
                   ) -> tuple[int, list[str]]:
    """``retries`` and the names of the exception classes of ``retry_on`` (any
    ``Exception`` when None; none when there are no retries)."""
    if isinstance(retries, bool) or not isinstance(retries, int) \
            or not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries={retries!r}: give an int from 0 to {MAX_RETRIES}")
    if retry_on is None:
        retry_on = (Exception,)
    elif isinstance(retry_on, (str, type)):
        retry_on = (retry_on,)
    names = []
    for e in retry_on:
        if isinstance(e, type) and issubclass(e, BaseException):
            names.append(exception_name(e))
        elif isinstance(e, str) and e and not text_problem(e, MAX_TEXT):
            names.append(e)
        else:
            raise TypeError(f"retry_on: {e!r} is not an exception class (or its name)")
    if len(names) > MAX_TAGS:
        raise ValueError(f"retry_on: at most {MAX_TAGS} exception classes")
    return retries, names if retries else []


def _check_code_kind(kind: str) -> str:
    """A code job's kind, ``'python'`` or ``'sage'``."""
    if kind not in (Kind.PYTHON, Kind.SAGE):
        raise ValueError(f"kind={kind!r}: choose 'python' or 'sage' "
                         f"(use D.eval_function for functions)")
    return str(kind)


def _check_tags(requires: Iterable[str]) -> list[str]:
    """The job's required tags as a list, within the limits the broker accepts."""
    if isinstance(requires, (str, bytes)):
        raise TypeError(f"requires={requires!r}: give a list of tags, such as ['sage']")
    tags = [str(t) for t in requires]
    if len(tags) > MAX_TAGS or any(len(t) > MAX_TEXT for t in tags):
        raise ValueError(f"requires: at most {MAX_TAGS} tags of at most {MAX_TEXT} "
                         f"characters each")
    for t in tags:
        problem = text_problem(t, MAX_TEXT)
        if problem:
            raise ValueError(f"requires: the tag {t!r} is {problem}")
    return tags


def _json_text_bytes(s: str) -> int:
    """At most how many bytes ``s`` takes as a JSON string, quotes included (an
    escaped printable ASCII character takes 2, anything else at most 12)."""
    return (2 if s.isascii() and s.isprintable() else 12) * len(s) + 2


def _spec_bytes(spec: dict[str, Any]) -> int:
    """The JSON bytes of a job spec in a submit header (an upper bound, exact for
    the rare spec near the limit); ValueError if it cannot fit in one header."""
    name, tags = spec["name"], spec["requires"] + spec["retry_on"]
    # a shared blob's hash: in the spec, and at most once in the message's list
    size = _SPEC_FIXED_BYTES + (0 if name is None else _json_text_bytes(name)) \
        + sum(_json_text_bytes(t) + 1 for t in tags) + 2 * _HASH_BYTES * len(spec["shared"])
    if size > _SPEC_BUDGET:
        size = len(json.dumps(spec, separators=(",", ":")))
        if size > _SPEC_BUDGET:
            raise ValueError(f"the job's name, tags and retry_on take {size} bytes of message "
                             f"header; at most {_SPEC_BUDGET} fit (shorten them)")
    return size


# --- state shared between user threads and the I/O thread


@dataclass(slots=True)
class _Outgoing:
    """A submitted job, kept until the broker acknowledges it (or refuses it)."""

    spec: dict[str, Any]
    payload: bytes
    #: its spec's JSON bytes in a submit header (see :func:`_spec_bytes`)
    header_bytes: int
    #: when (monotonic) it was last handed to the socket; None while in the send queue
    sent: float | None = None
    #: the shared blobs it uses (attached files), by content hash
    shared: dict[str, bytes] = field(default_factory=dict)
    #: send every shared blob with it, also those the broker has (it said it did not)
    full: bool = False

    @property
    def size(self) -> int:
        """Its bytes in a message of its own: payload and shared blobs."""
        return len(self.payload) + sum(map(len, self.shared.values()))


class _Window:
    """Room for unacknowledged jobs: user threads take it when they submit (waiting
    while there is none), the I/O thread gives it back as the broker acknowledges."""

    def __init__(self, max_jobs: int, max_bytes: int) -> None:
        self.max_jobs, self.max_bytes = max_jobs, max_bytes
        self.jobs = 0
        self.bytes = 0
        self.waiting = 0
        self.cond = threading.Condition(threading.Lock())

    def take(self, size: int, check: Callable[[], None]) -> None:
        """Count one job of ``size`` payload bytes, first waiting for room; ``check``
        raises when waiting is pointless (the client was closed). A job larger than
        the byte bound goes alone."""
        with self.cond:
            while self.jobs >= self.max_jobs or (
                    self.jobs and self.bytes + size > self.max_bytes):
                check()
                self.waiting += 1
                try:
                    self.cond.wait(1.0)
                finally:
                    self.waiting -= 1
            self.jobs += 1
            self.bytes += size

    def give(self, jobs: int, size: int) -> None:
        """Give back the room of ``jobs`` jobs of ``size`` payload bytes in all."""
        with self.cond:
            self.jobs -= jobs
            self.bytes -= size
            if self.waiting:
                self.cond.notify_all()

    def wake(self) -> None:
        """Wake every waiting submitter (to notice the client was closed)."""
        with self.cond:
            self.cond.notify_all()


class _Conn:
    """State shared by the I/O thread and user threads (set only by the I/O thread)."""

    def __init__(self) -> None:
        self.welcomed = threading.Event()
        self.tcp_connected = False
        #: handshakes that failed other than by a key refusal (a wrong server key)
        self.handshake_failures = 0
        self.rejected: str | None = None
        #: the broker's refusal of this client's dsage version
        self.incompatible: str | None = None
        #: what the peer at the address said it is, when it is not a broker's client port
        self.wrong_port: str | None = None
        #: when the first connection attempt was refused (nothing listens at the
        #: address), if no connection was made since
        self.refused_since: float | None = None
        self.epoch: str | None = None
        #: the broker's largest accepted frame, from its welcome
        self.max_message_size: int | None = None

    @property
    def denied(self) -> bool:
        """Whether the broker refused this client (its key, or its dsage version)."""
        return bool(self.incompatible or self.rejected)

    def refusal(self) -> DSageError:
        """The error the broker's refusal of this client is."""
        if self.incompatible:
            return IncompatibleVersion(self.incompatible)
        return KeyRejected(self.rejected)


class _Host:
    """What a client's JobWrappers see of it (:class:`dsage.job.JobHost`)."""

    __slots__ = ("_client", "changed")

    def __init__(self, client: DSage, changed: threading.Condition) -> None:
        self._client = client
        self.changed = changed

    def check_usable(self) -> None:
        self._client._check_usable()

    def kill(self, job_id: str) -> None:
        self._client.kill(job_id)

    def cancel(self, job_id: str) -> None:
        self._client._kill(job_id, queued_only=True)

    def query(self, job_id: str) -> None:
        self._client._io.command("query", [job_id])

    def watch(self, watcher: Callable[[list[JobWrapper]], None]) -> None:
        io = self._client._io
        io.watchers = [*io.watchers, watcher]  # replaced, never changed: read unlocked

    def unwatch(self, watcher: Callable[[list[JobWrapper]], None]) -> None:
        io = self._client._io
        io.watchers = [w for w in io.watchers if w is not watcher]

    def open_sealed(self, rec: dict[str, Any], result: bytes,
                    output: bytes) -> tuple[bytes, bytes]:
        return self._client._opener.open_outcome(
            result, output, (rec["id"], self._client.keys.public.decode(), rec["status"],
                             rec["encoding"], rec["result_from"]),
            rec["worker"]["key"] if rec["worker"] else None)

    def open_live(self, job_id: str, sender: str | None, offset: int, sealed: bytes) -> bytes:
        """Open a chunk of a running job's output, sealed to this client for that job
        and offset (by its worker, when the client knows which)."""
        bound = binding(job_id, self._client.keys.public.decode(), "processing", "none", "none",
                        f"live:{offset}")
        return self._client._opener.open(sealed, bound, sender)


#: one item of the send queue: a job (by id, its spec in ``_IO.unacked``) or a message
_Queued = str | Message


class _IO(threading.Thread):
    """The thread that owns the sockets, the send queue and the table of wrappers."""

    def __init__(self, endpoint_host: str, port: int, keys: keys_mod.Keypair,
                 server_key: bytes, heartbeat: float, max_message_size: int,
                 window: _Window, unreachable: Callable[[float], DSageError]) -> None:
        super().__init__(name="dsage-client-io", daemon=True)
        self.host, self.port = endpoint_host, port
        self.keys, self.server_key = keys, server_key
        self.heartbeat = heartbeat
        self.max_message_size = max_message_size
        self.window = window
        self.unreachable = unreachable
        self.conn = _Conn()
        #: notified when jobs reach a final state; JobWrappers wait on it
        self.changed = threading.Condition()
        #: the face of the client that wrappers see; set by DSage before start()
        self.wrapper_host: _Host | None = None
        self.commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        #: a wake-up byte was sent and not yet consumed (set by user threads)
        self.woken = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.jobs: weakref.WeakValueDictionary[str, JobWrapper] = weakref.WeakValueDictionary()
        #: jobs not yet acknowledged, in the order they were (re)queued to be sent,
        #: which is also the order of their ``sent`` times (unsent ones last)
        self.unacked: dict[str, _Outgoing] = {}
        #: what to send, in order; a job is queued by id (it may be acknowledged
        #: before its turn comes, and is then skipped)
        self.outq: deque[_Queued] = deque()
        self.polling_out = False
        #: ids of jobs not known to be final, whose wrappers may still be alive
        self.open: set[str] = set()
        #: request id -> (future, whether its JOBS reply becomes a list of wrappers)
        self.requests: dict[int, tuple[Future[Any], bool]] = {}
        #: the wrappers so far of answers that come in several JOBS messages
        self.partial: dict[int, list[JobWrapper]] = {}
        #: large results being fetched, by job id
        self.fetches: dict[str, _Fetch] = {}
        #: hashes of the shared blobs sent to the broker on this connection: jobs that
        #: use them go without their content (the broker keeps it, see _refuse)
        self.broker_shared: set[str] = set()
        self.next_req = 1
        self.last_seq = 0
        self.last_ping = 0.0
        #: when the pings not yet answered were queued, oldest first
        self.pinged: deque[float] = deque(maxlen=10_000)
        #: when the request connection was last seen to drop
        self.disconnected_at = float("-inf")
        #: request ids of the resync queries in flight
        self.resync_reqs: set[int] = set()
        self.resync_wanted = False
        #: an event sequence number the broker sent that had not arrived yet
        self.expected_seq: int | None = None
        #: wrappers that became final since waiters were last notified
        self.settled: list[JobWrapper] = []
        #: called (by this thread) with the wrappers that changed, after each batch
        self.watchers: list[Callable[[list[JobWrapper]], None]] = []
        self.touched: list[JobWrapper] = []
        #: a running job's output came: threads following it (JobWrapper.tail) wake
        self.output_came = False
        self.running = True
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        #: messages sent to the broker, by type (``b"submit"``...): what tests count
        self.sent_messages: Counter[bytes] = Counter()
        self.ready = threading.Event()
        self.failure: BaseException | None = None

    # --- user-thread side

    def command(self, *cmd: Any) -> None:
        self.commands.put(cmd)
        if self.woken:
            return  # a wake-up is on its way, and the thread reads the queue after it
        self.woken = True
        try:
            self._wake_w.send(b"x")
        except BlockingIOError:
            pass  # the pipe is full: the thread is awake already
        except OSError:
            pass  # the thread has ended (the client is closed)

    def request(self, type_: M, timeout: float, wrap: bool | str = False, **header: Any) -> Any:
        """Send a request and wait for its reply: the Message, or with ``wrap`` the
        JobWrappers of the records in its JOBS reply (made by this thread), or with
        ``wrap="states"`` their ``(id, status)`` pairs (no wrapper made for a job
        that has none)."""
        fut: Future[Any] = Future()
        self.command("request", type_, header, fut, wrap)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise self.unreachable(timeout) from None
        except CancelledError:
            raise DSageError("this DSage connection was closed") from None

    # --- the thread

    def run(self) -> None:
        try:
            self._setup()
        except BaseException as e:  # noqa: BLE001 - reported to the constructor
            self.failure = e
            self.ready.set()
            return
        self.ready.set()
        try:
            while self.running:
                self._step()
        finally:
            for s in (self.dealer, self.sub, self.dealer_events, self.sub_events):
                s.close(linger=0)
            self.ctx.term()
            self._wake_r.close()
            self._wake_w.close()
            for fut, _ in self.requests.values():
                fut.cancel()
            self.window.wake()

    def _setup(self) -> None:
        self.dealer = self.ctx.socket(zmq.DEALER)
        make_client(self.dealer, self.keys, self.server_key, self.max_message_size)
        self.sub = self.ctx.socket(zmq.SUB)
        make_client(self.sub, self.keys, self.server_key, self.max_message_size)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, self.keys.public)
        watched = (zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                   | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_CONNECT_RETRIED)
        self.dealer_events = self.dealer.get_monitor_socket(watched)
        self.sub_events = self.sub.get_monitor_socket(watched)
        self.dealer.connect(f"tcp://{self.host}:{self.port}")
        self.sub.connect(f"tcp://{self.host}:{self.port + 2}")
        self.poller = zmq.Poller()
        for s in (self.dealer, self.sub, self.dealer_events, self.sub_events):
            self.poller.register(s, zmq.POLLIN)
        self.poller.register(self._wake_r.fileno(), zmq.POLLIN)

    def _step(self) -> None:
        ready = dict(self.poller.poll(int(self.heartbeat * 500)))
        if self._wake_r.fileno() in ready:
            try:
                while self._wake_r.recv(65536):
                    pass
            except BlockingIOError:
                pass
        self.woken = False  # before reading the queue: a later command wakes us again
        self._run_commands()
        if self.dealer_events in ready:
            self._socket_events(self.dealer_events, is_dealer=True)
        if self.sub_events in ready:
            self._socket_events(self.sub_events, is_dealer=False)
        if self.dealer in ready:
            self._drain(self.dealer, self._on_reply)
        if self.sub in ready:
            self._drain(self.sub, self._on_event)
        self._notify()
        self._timers()
        if self.outq or self.polling_out:
            self._flush()
            self._notify()  # jobs refused while sending

    def _drain(self, sock: zmq.Socket[bytes], handle: Callable[[list[bytes]], None]) -> None:
        for _ in range(10_000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handle(frames)

    def _touch(self, w: JobWrapper) -> None:
        if self.watchers:
            self.touched.append(w)

    def _notify(self) -> None:
        """Tell the watchers which wrappers changed; settle the wrappers that became
        final (their Future state, and the ``concurrent.futures`` waiters on them) and
        wake the threads waiting on wrappers, once for all of them; then call their
        done callbacks."""
        callbacks: list[JobWrapper] = []
        if self.settled or self.output_came:
            settled, self.settled = self.settled, []
            self.output_came = False
            with self.changed:
                callbacks = [w for w in settled if w._settle()]
                self.changed.notify_all()
        if self.touched:  # after settling: watchers see the final wrappers done
            touched, self.touched = self.touched, []
            for watcher in self.watchers:
                try:
                    watcher(touched)
                except Exception:  # noqa: BLE001 - a watcher must not stop the I/O thread
                    log.exception("a job watcher failed")
        for w in callbacks:
            w._run_callbacks()

    def _became_final(self, w: JobWrapper) -> None:
        """``w`` just became final: it is settled at the end of this loop turn."""
        self.settled.append(w)
        self._touch(w)

    def _run_commands(self) -> None:
        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "submit":
                for job, wrapper in zip(cmd[1], cmd[2]):
                    jid = job.spec["id"]
                    # registered before it is sent, so no event about it can come first
                    self.jobs[jid] = wrapper
                    self.open.add(jid)
                    self._queue_job(jid, job)
            elif cmd[0] == "request":
                type_, header, fut, wrap = cmd[1:]
                if self.conn.denied or self.conn.wrong_port:
                    if fut.set_running_or_notify_cancel():
                        fut.set_exception(self.unreachable(0.0))  # no answer would come
                elif fut.set_running_or_notify_cancel():
                    req = self._next_req()
                    self.requests[req] = (fut, wrap)
                    self._send(make(type_, req=req, **header))
            elif cmd[0] == "query":
                self._send_ids(M.QUERY, [i for i in cmd[1] if i not in self.unacked])
            elif cmd[0] == "kill":  # no reply awaited: the jobs' records update their wrappers
                self._send_ids(M.KILL, cmd[1], queued_only=False)
            elif cmd[0] == "close":
                self.running = False

    def _next_req(self) -> int:
        req = self.next_req
        self.next_req += 1
        return req

    # --- sending: one ordered queue, written while the socket takes it

    def _send(self, msg: Message) -> None:
        """Queue a message; it is sent in order after everything queued before it."""
        self.outq.append(msg)

    def _send_ids(self, type_: M, ids: list[str], req: int = 0, **header: Any) -> None:
        """Queue a message per batch of ``ids`` (a QUERY or KILL with ``req`` and the
        rest of its ``header``)."""
        for r in batches([_ID_BYTES] * len(ids), MAX_BATCH, _SPEC_BUDGET):
            self._send(make(type_, req=req, ids=ids[r.start:r.stop], **header))

    def _queue_job(self, jid: str, job: _Outgoing) -> None:
        """(Re)queue a job to be sent, last in both the send queue and ``unacked``."""
        job.sent = None
        self.unacked.pop(jid, None)
        self.unacked[jid] = job
        self.outq.append(jid)

    def _flush(self) -> None:
        """Send queued messages in order until the socket would block; then ask the
        poller to say when it is writable again, and go on from there."""
        q = self.outq
        while q:
            head = q[0]
            if isinstance(head, Message):
                if not self._try_send(encode(head)):
                    break
                q.popleft()
            elif not self._send_jobs():
                break
        want_out = bool(q)
        if want_out != self.polling_out:
            self.polling_out = want_out
            self.poller.modify(self.dealer, zmq.POLLIN | (zmq.POLLOUT if want_out else 0))

    def _try_send(self, frames: list[bytes]) -> bool:
        """Send a whole message, or nothing and return False if the socket is full."""
        try:
            send_frames(self.dealer, frames)
        except zmq.Again:
            return False
        self.sent_messages[frames[1]] += 1
        return True

    def _send_jobs(self) -> bool:
        """Send the jobs at the head of the send queue, in submit messages within the
        protocol's limits; False (those not sent back at the head) if the socket is full."""
        jobs = self._take_jobs()
        now = time.monotonic()
        limit = min(self.max_message_size, self.conn.max_message_size or self.max_message_size)
        for r in _submit_ranges(jobs, batch_bytes(limit), self.broker_shared):
            batch = jobs[r.start:r.stop]
            shared = {h: data for j in batch for h, data in j.shared.items()  # each once
                      if j.full or h not in self.broker_shared}
            msg = make(M.SUBMIT, [j.payload for j in batch] + list(shared.values()), req=0,
                       jobs=[j.spec for j in batch], shared=list(shared))
            if not self._try_send(encode(msg)):
                self.outq.extendleft(j.spec["id"] for j in reversed(jobs[r.start:]))
                return False
            self.broker_shared.update(shared)
            for j in batch:
                j.sent = now
        return True

    def _take_jobs(self) -> list[_Outgoing]:
        """Up to MAX_BATCH consecutive jobs from the head of the send queue, skipping
        acknowledged ones and refusing those larger than a message may be."""
        q = self.outq
        out: list[_Outgoing] = []
        limit = min(self.max_message_size, self.conn.max_message_size or self.max_message_size)
        while q and len(out) < MAX_BATCH and isinstance(q[0], str):
            job = self.unacked.get(q.popleft())  # type: ignore[arg-type]  # a str, as checked
            if job is None:
                continue  # acknowledged since it was queued
            if job.size > limit:
                # the broker would drop the connection: refuse here, never send it
                jid = job.spec["id"]
                self._forget([jid])
                self._end_job(jid, f"the job is {job.size} bytes, more than the "
                              f"largest message allowed ({limit} bytes, --max-message-size)",
                              refused="size")
                continue
            out.append(job)
        return out

    def _forget(self, ids: Iterable[str]) -> None:
        """Jobs acknowledged (or refused): drop them and give their room back."""
        count = size = 0
        for jid in ids:
            job = self.unacked.pop(jid, None)
            if job is not None:
                count += 1
                size += job.size
        if count:
            self.window.give(count, size)

    def _resend_sent(self, before: float) -> None:
        """Queue again the unacknowledged jobs handed to the socket at or before
        ``before`` (they may be lost; the broker ignores a copy of a stored job)."""
        stale = []
        for jid, job in self.unacked.items():
            if job.sent is None or job.sent > before:
                break  # the rest were sent later, or wait in the send queue
            stale.append(jid)
        for jid in stale:
            self._queue_job(jid, self.unacked[jid])

    # --- the connection

    def _socket_events(self, sock: zmq.Socket[bytes], is_dealer: bool) -> None:
        while True:
            try:
                ev = recv_monitor_message(sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = ev["event"]
            if kind == zmq.EVENT_CONNECTED:
                self.conn.tcp_connected = True
                self.conn.refused_since = None
            elif kind == zmq.EVENT_CONNECT_RETRIED and is_dealer and not self.conn.tcp_connected:
                if self.conn.refused_since is None:
                    self.conn.refused_since = time.monotonic()
            elif kind == zmq.EVENT_DISCONNECTED and is_dealer:
                self.disconnected_at = time.monotonic()
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.conn.rejected = (
                    f"the broker at {self.host}:{self.port} rejected this client's key "
                    f"{self.keys.public.decode()}: on the broker's machine run "
                    f"`dsage keys add NAME '{self.keys.public.decode()}'`")
                self._fail_requests()
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                          zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self.conn.handshake_failures += 1
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED and is_dealer:
                self.conn.rejected = None
                # Unacknowledged jobs are resent after the welcome (which gives the
                # broker's size limit), see _on_welcome.
                self._send(make(M.HELLO, req=self._next_req(), client=f"dsage {os.getpid()}",
                                version=__version__))

    def _fail_requests(self) -> None:
        """The broker refused this client, or the port is not a client port: each
        request waiting for an answer fails, saying which."""
        for fut, _ in self.requests.values():
            if not fut.done():
                fut.set_exception(self.unreachable(0.0))
        self.requests.clear()

    def _on_welcome(self, h: dict[str, Any]) -> None:
        """(Re)connected: resend what the lost connection may have dropped, and resync."""
        self.conn.epoch = h["epoch"]
        self.conn.max_message_size = h["max_message_size"]
        self.broker_shared.clear()  # what a lost connection dropped is sent again
        self._resend_sent(self.disconnected_at)
        self._resync(force=True)
        self._refetch()
        self.conn.welcomed.set()

    def _resync(self, force: bool = False) -> None:
        """Ask the broker for the state of every unfinished, acknowledged job.

        Called after a (re)connection (``force``) and when an event was missed,
        never on a timer. At most one such query is in flight: asked again
        meanwhile, the next is sent when it is answered, so a busy broker is never
        flooded with them.
        """
        if self.resync_reqs and not force:
            self.resync_wanted = True
            return
        self.resync_reqs.clear()
        self.resync_wanted = False
        open_ids = [jid for jid in self.open if jid not in self.unacked]
        for r in batches([_ID_BYTES] * len(open_ids), MAX_BATCH, _SPEC_BUDGET):
            req = self._next_req()
            self.resync_reqs.add(req)
            self._send(make(M.QUERY, req=req, ids=open_ids[r.start:r.stop]))

    def _check_missed_events(self, broker_seq: int, epoch: str) -> None:
        """The broker's PONG says the last event sequence number it sent us. One not
        received by the next PONG was dropped (a PUB socket can drop): resync."""
        if epoch != self.conn.epoch:
            return  # a restart: the reconnection resyncs
        if self.expected_seq is not None and self.last_seq < self.expected_seq:
            self._resync()
        self.expected_seq = broker_seq if broker_seq > self.last_seq else None

    def _on_pong(self, now: float) -> None:
        """The broker answered a ping, after acknowledging every job it got before it
        (replies keep the order of requests). So jobs sent before that ping and still
        unacknowledged were lost (or their acknowledgement was): resend those sent
        more than a few heartbeats ago. A broker that is merely slow sends no pong,
        so it is never sent copies. Pongs pair with pings oldest first; when one is
        lost the next pairs with an older ping, which only resends less."""
        if self.pinged:
            asked = self.pinged.popleft()
            self._resend_sent(min(asked, now - RESEND_HEARTBEATS * self.heartbeat))

    def _timers(self) -> None:
        now = time.monotonic()
        if now - self.last_ping >= self.heartbeat:
            self.last_ping = now
            self.pinged.append(now)
            self._send(make(M.PING))

    # --- incoming

    def _on_reply(self, frames: list[bytes]) -> None:
        try:
            msg = decode(frames, CLIENT_REPLIES)
        except ProtocolError:
            return
        h = msg.header
        if msg.type is M.PONG:
            self._check_missed_events(h["seq"], h["epoch"])
            self._on_pong(time.monotonic())
            return
        if msg.type is M.ERROR and h["code"] == "version" and not self.conn.welcomed.is_set():
            self.conn.incompatible = h["message"]  # the answer to HELLO
            self._fail_requests()
            return
        if msg.type is M.ERROR and h["code"] == "wrong_port" and not self.conn.welcomed.is_set():
            self.conn.wrong_port = h["message"]
            self._fail_requests()
            return
        if (msg.type is M.ERROR and h["code"] == "unauthorized"
                and not self.conn.welcomed.is_set()):
            # the answer to HELLO: this key may not be a client here (a worker's key)
            self.conn.rejected = (f"the broker at {self.host}:{self.port} refused this "
                                  f"client: {h['message']}")
            self._fail_requests()
            return
        entry = self.requests.pop(h["req"], None) if h.get("req") else None
        wrap = entry is not None and entry[1]
        result: Any = msg
        if msg.type is M.WELCOME:
            self._on_welcome(h)
        elif msg.type is M.ACK:
            self._forget(h["ids"])
            self._refuse(h["errors"])
        elif msg.type is M.CHUNK:
            self._on_chunk(h, msg.blobs[0])
        elif msg.type is M.JOBS:
            wrappers: list[Any] = self._apply(h["jobs"], msg.blobs, adopt=wrap is True)
            if wrap == "states":
                wrappers = [(r["id"], r["status"]) for r in h["jobs"]]
            self._unknown(h["missing"])
            if h["more"]:  # the rest of the answer follows
                if entry is not None:
                    self.requests[h["req"]] = entry
                    if wrap:
                        self.partial.setdefault(h["req"], []).extend(wrappers)
                return
            if wrap:
                result = _Page(self.partial.pop(h["req"], []) + wrappers)
                result.next = h["next"]
            if h["req"] in self.resync_reqs:
                self.resync_reqs.discard(h["req"])
                if not self.resync_reqs and self.resync_wanted:
                    self._resync()
        if entry is not None and not entry[0].done():
            self._notify()  # wrappers this reply ended are settled when the caller wakes
            if msg.type is M.ERROR:
                kind = KeyRejected if h["code"] == "unauthorized" else DSageError
                entry[0].set_exception(kind(f"broker error ({h['code']}): {h['message']}"))
            else:
                entry[0].set_result(result)

    def _refuse(self, errors: list[dict[str, str]]) -> None:
        """Jobs the broker did not accept: each fails, and its ``result`` raises
        :class:`SubmitRejected` with the broker's message. A job sent without the
        content of a shared blob the broker turned out not to have (it dropped it
        once no open job used it) is sent again, once, with all its content."""
        again = []
        for err in errors:
            job = self.unacked.get(err["id"])
            if err["code"] == "shared" and job is not None and not job.full:
                job.full = True
                self.broker_shared.difference_update(job.shared)
                again.append(err["id"])
        for jid in again:
            self._queue_job(jid, self.unacked[jid])
        errors = [err for err in errors if err["id"] not in again]
        self._forget(err["id"] for err in errors)
        for err in errors:
            self._end_job(err["id"], f"refused by the broker: {err['message']}",
                          refused=err["code"])

    def _unknown(self, ids: list[str]) -> None:
        """Jobs the broker no longer knows (pruned, or its store was replaced): their
        wrappers end, and ``wait()``/``result`` raise :class:`UnknownJob`."""
        for jid in ids:
            self.fetches.pop(jid, None)
            if jid not in self.unacked:  # not stored yet: the broker cannot know it
                self._end_job(jid, "the broker no longer knows this job (it was pruned "
                              "after --retention-days, or the broker's store was replaced)",
                              unknown=True)

    def _end_job(self, jid: str, error: str, refused: str | None = None,
                 unknown: bool = False) -> None:
        self.open.discard(jid)
        w = self.jobs.get(jid)
        if w is not None and w._end(error, refused, unknown):
            self._became_final(w)

    def _fetch(self, rec: dict[str, Any]) -> None:
        """Start fetching a final job's large result and output (one chunk in flight
        at a time, so a slow reader costs the broker nothing)."""
        if rec["id"] not in self.fetches:
            self.fetches[rec["id"]] = _Fetch(rec)
            self._send(make(M.FETCH, req=0, id=rec["id"], part="result", offset=0))

    def _on_chunk(self, h: dict[str, Any], data: bytes) -> None:
        f = self.fetches.get(h["id"])
        if f is None or h["part"] != f.part or h["offset"] != len(f.parts[f.part]):
            return  # a duplicate, or an answer to a fetch restarted since
        buf = f.parts[f.part]
        buf += data
        if len(buf) < h["total"] and data:
            self._send(make(M.FETCH, req=0, id=h["id"], part=f.part, offset=len(buf)))
        elif f.part == "result":
            f.part = "output"
            self._send(make(M.FETCH, req=0, id=h["id"], part="output", offset=0))
        else:
            del self.fetches[h["id"]]
            w = self.jobs.get(h["id"])
            if w is not None and w._update({**f.record, "by_ref": False},
                                           [bytes(f.parts["result"]), bytes(f.parts["output"])]):
                self._became_final(w)
            self.open.discard(h["id"])

    def _refetch(self) -> None:
        """After a reconnection: fetch what was being fetched from its start."""
        for jid, f in list(self.fetches.items()):
            del self.fetches[jid]
            self._fetch(f.record)

    def _on_event(self, frames: list[bytes]) -> None:
        if len(frames) < 2 or frames[0] != self.keys.public:
            return
        try:
            msg = decode(frames[1:], EVENTS)
        except ProtocolError:
            return
        h = msg.header
        if msg.type is M.OUTPUT:
            self._on_output(h["id"], h["offset"], msg.blobs[0])
            return
        gap = h["epoch"] != self.conn.epoch or h["seq"] != self.last_seq + 1
        self.conn.epoch, self.last_seq = h["epoch"], h["seq"]
        self._apply(h["jobs"], msg.blobs)
        if gap:
            self._resync()

    def _on_output(self, jid: str, offset: int, sealed: bytes) -> None:
        """What a running job printed lately (not kept by the broker: a chunk lost on
        the way leaves a gap until the whole output comes with the result)."""
        w = self.jobs.get(jid)
        if w is None or w.done() or self.wrapper_host is None:
            return
        try:
            data = self.wrapper_host.open_live(jid, w.worker.key if w.worker else None,
                                               offset, sealed)
        except ValueError:
            return  # not sealed to this key by the job's worker, for this job: dropped
        if w._add_live(offset, data):
            self.output_came = True
            self._touch(w)

    def _apply(self, records: list[dict[str, Any]], blobs: list[bytes],
               adopt: bool = False) -> list[JobWrapper]:
        """Update the wrappers of ``records``. With ``adopt`` (a reply to D.job or
        D.get_my_jobs) make and track wrappers for jobs that have none, and return
        the wrappers of all records; a record the broker knows is also an
        acknowledgement."""
        if self.unacked:
            self._forget([r["id"] for r in records if r["id"] in self.unacked])
        out: list[JobWrapper] = []
        fresh: list[str] = []
        for i, rec in enumerate(records):
            jid = rec["id"]
            w = self.jobs.get(jid)
            if w is None and adopt:
                w = JobWrapper(self.wrapper_host, jid, rec["name"], rec["kind"], rec["priority"])
                self.jobs[jid] = w
                if rec["status"] not in FINAL:
                    fresh.append(jid)
            if w is None:
                self.open.discard(jid)
                continue
            if rec.get("by_ref") and rec["status"] in FINAL:
                self._fetch(rec)  # the wrapper is final once its result is here
            elif w._update(rec, blobs[2 * i:2 * i + 2]):
                self._became_final(w)
            elif self.watchers:
                self.touched.append(w)
            if w._final:
                self.open.discard(jid)
            elif adopt:
                self.open.add(jid)
            if adopt:
                out.append(w)
        # An event sent before this reply may have come first, and found no wrapper:
        # ask once more, now that these are tracked.
        self._send_ids(M.QUERY, fresh)
        return out


class _Fetch:
    """A large result and output being fetched from the broker, chunk by chunk."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.parts = {"result": bytearray(), "output": bytearray()}
        self.part = "result"


def _submit_ranges(jobs: Sequence[_Outgoing], max_bytes: int = BATCH_BYTES,
                   known: set[str] | frozenset[str] = frozenset()) -> list[range]:
    """Split jobs into submit messages within the protocol's limits on items, blob
    bytes (``max_bytes``, for the broker's size limit) and header bytes; shared
    blobs count once per message, and not at all when ``known`` to the broker."""
    out: list[range] = []
    shared = [[(h, len(d)) for h, d in j.shared.items() if j.full or h not in known]
              for j in jobs]
    for r in shared_batches([len(j.payload) for j in jobs], shared, MAX_BATCH, max_bytes):
        sizes = [jobs[i].header_bytes + 1 for i in r]
        out.extend(range(r.start + h.start, r.start + h.stop)
                   for h in batches(sizes, MAX_BATCH, _SPEC_BUDGET))
    return out


class DSage:
    """A connection to a dsage broker.

    ``DSage(server, port)`` connects to a running broker (waiting up to
    ``connect_timeout`` seconds for it; 0 to return at once and let jobs wait
    for the broker). ``server_key`` is the broker's public key (z85 or a key
    file); by default the user's own, as when the keypair was copied.
    ``max_message_size`` caps every frame received (at least 1 MiB), and jobs larger
    than it (or than the broker's own limit) are refused without being sent.

    Submitting never waits for the broker, up to ``max_unacked_jobs`` jobs (or
    ``max_unacked_bytes`` of payload) that it has not acknowledged yet; past
    that, a submit blocks until acknowledgements make room (for as long as the
    broker is unreachable). A DSage belongs to the process that made it: in a
    forked child every call raises :class:`DSageError`.

    ``kind`` is the kind of code jobs when :meth:`eval` is given none: ``'python'``,
    or ``'sage'`` to run every code job through Sage's preparser (as the seed did).
    """

    def __init__(self, server: str = "localhost", port: int = 8081,
                 server_key: str | bytes | os.PathLike[str] | None = None, *,
                 home: str | os.PathLike[str] | None = None, connect_timeout: float = 10.0,
                 heartbeat: float = 1.0,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 max_unacked_jobs: int = MAX_UNACKED_JOBS,
                 max_unacked_bytes: int = MAX_UNACKED_BYTES, kind: str = "python") -> None:
        if max_unacked_jobs < 1 or max_unacked_bytes < 1:
            raise ValueError("max_unacked_jobs and max_unacked_bytes must be at least 1")
        port = _check_connection(server, port, heartbeat, connect_timeout)
        if max_message_size < MIN_MESSAGE_SIZE:
            raise ValueError(f"max_message_size must be at least {MIN_MESSAGE_SIZE} bytes "
                             f"(1 MiB): dsage's own messages need that much")
        #: the kind of code jobs that do not name one
        self.kind = _check_code_kind(kind)
        self.server, self.port = server, port
        self.home = keys_mod.home(home)
        self.keys = keys_mod.load_keypair(self.home)
        self.server_key = (keys_mod.parse_public_key(server_key) if server_key is not None
                           else self.keys.public)
        self._cluster: Any = None
        #: content addresses of the map functions sent so far (slots cache them)
        self._functions_sent: set[str] = set()
        self._closed = False
        self._pid = os.getpid()
        self._opener = Opener(self.keys)
        self._window = _Window(max_unacked_jobs, max_unacked_bytes)
        self._io = _IO(server, port, self.keys, self.server_key, heartbeat, max_message_size,
                       self._window, self._unreachable)
        self._host = _Host(self, self._io.changed)
        self._io.wrapper_host = self._host
        self._io.start()
        display.install()  # at a prompt, a job alone shows as the seed showed it
        self._io.ready.wait()
        if self._io.failure is not None:
            raise self._io.failure
        if connect_timeout:
            try:
                self.wait_connected(connect_timeout)
            except BaseException:
                self.close()
                raise

    # --- connection

    def _check_usable(self) -> None:
        """Raise DSageError if this client is closed, or this process is a fork of
        the one that made it (whose I/O thread it does not have)."""
        if os.getpid() != self._pid:
            raise DSageError(f"this DSage was created in process {self._pid}; create a new "
                             f"one in the child (process {os.getpid()})")
        if self._closed:
            raise DSageError("this DSage connection is closed")

    def _check_can_wait(self) -> None:
        """Raise DSageError if waiting for room to submit is pointless: the client is
        unusable, or its I/O thread (which makes the room) has stopped."""
        self._check_usable()
        if not self._io.is_alive():
            raise DSageError("this DSage's I/O thread has stopped; create a new DSage")

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Block until the broker has answered, raising a clear error if it does not."""
        self._check_usable()
        start = time.monotonic()
        c = self._io.conn
        while not c.welcomed.wait(0.05):
            waited = time.monotonic() - start
            # Said at once: the broker refused this client, the port is another of the
            # broker's, or a server drops handshake after handshake (it cannot decrypt
            # ours: the wrong server key or not a client port); and soon when nothing
            # listens there (refused for a few seconds: not a broker just starting).
            refused = c.refused_since is not None and (
                time.monotonic() - c.refused_since >= REFUSED_GRACE)
            if c.denied or waited > timeout or c.handshake_failures >= 3 or c.wrong_port \
                    or refused:
                raise self._unreachable(min(waited, timeout))

    def _unreachable(self, waited: float) -> DSageError:
        c = self._io.conn
        if c.denied:
            return c.refusal()
        where = f"{self.server}:{self.port}"
        if c.wrong_port:
            return BrokerUnreachable(f"{where} is not a broker's client port: {c.wrong_port}")
        if c.tcp_connected and not c.welcomed.is_set():
            return BrokerUnreachable(
                f"reached {where} but the encrypted handshake did not complete within "
                f"{waited:.3g} s: is the server key right? It must be the broker's public key "
                f"(its dsage_key.pub); this client used {self.server_key.decode()}. Or is "
                f"{self.port} not the broker's client port? A broker on port N uses N for "
                f"clients, N+1 for monitors and N+2 for job events: connect to N")
        if c.refused_since is not None and not c.tcp_connected:
            problem = unfound(self.server)
            if problem is not None:
                return BrokerUnreachable(f"no broker at {where}: {problem}")
            return BrokerUnreachable(
                f"no broker at {where}: the connection was refused (nothing listens on port "
                f"{self.port}). Start one with `dsage-broker --port {self.port}`, or check "
                f"the server and port (`dsage status` finds a start_all() session's broker)")
        return BrokerUnreachable(
            f"no broker at {where} (waited {waited:g} s): start one with "
            f"`dsage-broker --port {self.port}`, or check the server and port")

    # --- submitting

    def __call__(self, code: str, **options: Any) -> JobWrapper:
        """``D(code)`` is ``D.eval(code)``."""
        return self.eval(code, **options)

    def eval(self, code: str, timeout: float | None = 600, priority: int = DEFAULT_PRIORITY,
             name: str | None = None, kind: str | None = None,
             memory: int | str | None = None,
             anonymous_ok: bool = False, requires: Iterable[str] = (),
             isolate: bool = False, retries: int = 0,
             retry_on: Iterable[type[BaseException] | str] | None = None,
             files: Iterable[str | os.PathLike[str]] = (),
             user_vars: Mapping[str, Any] | None = None,
             load_files: Iterable[str | os.PathLike[str]] = ()) -> JobWrapper:
        """Run ``code`` on a worker. The result is ``DSAGE_RESULT`` if the code sets it,
        otherwise the value of its final expression.

        ``kind`` is ``'python'`` or ``'sage'`` (default: the client's
        :attr:`kind`); a Sage job requires the ``sage`` tag, so it waits for a worker
        that has Sage; ``timeout`` (seconds, None for no limit)
        and ``memory`` (bytes or ``'2GB'``) are hard limits; ``priority`` runs from 0
        (most urgent) to 9; ``anonymous_ok`` lets anonymous workers run the job;
        ``requires`` lists tags a worker must offer; ``isolate`` runs the job in a
        process no earlier job has run in. ``retries`` re-runs the job up to that
        many times when its code raises one of ``retry_on`` (exception classes or
        their names; any ``Exception`` by default). ``files`` are copied into the
        job's working folder, ``user_vars`` are bound before the code runs, and
        ``load_files`` run first. Blocks while the broker has not acknowledged
        ``max_unacked_jobs`` jobs (see :class:`DSage`).
        """
        if not isinstance(code, str):
            hint = (f"; to run a function, use D.eval_function({getattr(code, '__name__', 'f')}"
                    f", args, kwargs)" if callable(code) else "")
            raise TypeError(f"code must be a string, not {type(code).__name__}{hint}")
        kind = self.kind if kind is None else _check_code_kind(kind)
        payload, shared = attach.wrap(code.encode(), attach.collect(
            files, user_vars, load_files, limit=self._message_limit()))
        return self._submit(payload, kind, timeout, priority, name, memory, anonymous_ok,
                            requires, isolate, retries, retry_on, shared=shared)

    def eval_file(self, path: str | os.PathLike[str], name: str | None = None,
                  **options: Any) -> JobWrapper:
        """Run a file's code; its ``DSAGE_RESULT`` is the result. ``.sage`` files run as
        Sage, ``.py`` files as Python, others as the client's :attr:`kind`. Takes
        :meth:`eval`'s options."""
        p = Path(path)
        try:
            code = attach.read_file(p, "eval_file", self._message_limit()).decode()
        except UnicodeDecodeError:
            raise ValueError(f"eval_file: {p} is not UTF-8 text (code to run)") from None
        options.setdefault("kind", {".sage": Kind.SAGE.value, ".py": Kind.PYTHON.value}.get(
            p.suffix, self.kind))
        return self.eval(code, name=name if name is not None else p.name, **options)

    def eval_function(self, func: Callable[..., Any], args: Iterable[Any] = (),
                      kwargs: dict[str, Any] | None = None, **options: Any) -> JobWrapper:
        """Run ``func(*args, **kwargs)`` on a worker; the result is its return value.
        Takes :meth:`eval`'s options but ``kind``, ``user_vars`` and ``load_files``
        (pass values as arguments)."""
        if not callable(func):
            raise TypeError(f"{func!r} is not callable")
        for option in ("kind", "user_vars", "load_files"):
            if option in options:
                raise TypeError(f"eval_function takes no {option}= (a function's values "
                                f"are its arguments)")
        payload, shared = attach.wrap(dump_call(func, tuple(args), dict(kwargs or {})),
                                      attach.collect(options.pop("files", ()),
                                                     limit=self._message_limit()))
        options.setdefault("name", getattr(func, "__name__", None))
        return self._submit(payload, Kind.FUNCTION.value, shared=shared, **options)

    def _submit(self, payload: bytes, kind: str, timeout: float | None = 600,
                priority: int = DEFAULT_PRIORITY, name: str | None = None,
                memory: int | str | None = None, anonymous_ok: bool = False,
                requires: Iterable[str] = (), isolate: bool = False, retries: int = 0,
                retry_on: Iterable[type[BaseException] | str] | None = None,
                shared: dict[str, bytes] | None = None, **unknown: Any) -> JobWrapper:
        """Check the options, wait for room (see :class:`_Window`) and hand the job to
        the I/O thread, which registers its wrapper before sending it."""
        shared = shared or {}
        spec = self._spec(kind, timeout, priority, name, memory, anonymous_ok, requires,
                          isolate, retries, retry_on, shared=list(shared), **unknown)
        return self._submit_specs([(spec, payload)], shared)[0]

    def _spec(self, kind: str, timeout: float | None, priority: int, name: str | None,
              memory: int | str | None, anonymous_ok: bool, requires: Iterable[str],
              isolate: bool = False, retries: int = 0,
              retry_on: Iterable[type[BaseException] | str] | None = None,
              shared: Iterable[str] = (), **unknown: Any) -> dict[str, Any]:
        """A new job's spec (with a fresh id) from checked options."""
        if unknown:
            raise TypeError(f"unknown job option(s): {', '.join(sorted(unknown))}")
        retries, names = _check_retries(retries, retry_on)
        tags = _check_tags(requires)
        if kind == Kind.SAGE and SAGE_TAG not in tags:
            # only a worker with Sage takes it; on others it waits, saying why
            tags = _check_tags([*tags, SAGE_TAG])
        return {"id": new_job_id(), "name": _check_name(name), "kind": kind,
                "timeout": _check_timeout(timeout), "priority": _check_priority(priority),
                "memory": parse_memory(memory), "anonymous_ok": bool(anonymous_ok),
                "requires": tags, "isolate": bool(isolate),
                "retries": retries, "retry_on": names, "shared": list(shared)}

    def _submit_specs(self, jobs: Sequence[tuple[dict[str, Any], bytes]],
                      shared: Mapping[str, bytes] | None = None) -> list[JobWrapper]:
        """Submit jobs (spec and payload each; the shared blobs their specs name are in
        ``shared``) in one command to the I/O thread, so that they leave in as few
        messages as the batch limits allow."""
        self._check_usable()
        shared = shared or {}
        out = [_Outgoing(spec, payload, _spec_bytes(spec),
                         shared={d: shared[d] for d in spec["shared"]})
               for spec, payload in jobs]
        for job in out:
            if job.payload.startswith(attach.MAGIC):
                self._check_fits(job.size)
        wrappers: list[JobWrapper] = []
        try:
            for job in out:
                self._window.take(job.size, self._check_can_wait)
                spec = job.spec
                wrappers.append(JobWrapper(self._host, spec["id"], spec["name"], spec["kind"],
                                           spec["priority"]))
        except BaseException:
            taken = out[:len(wrappers)]
            self._window.give(len(taken), sum(j.size for j in taken))
            raise
        self._io.command("submit", out, wrappers)
        return wrappers

    def _kill_quietly(self, ids: Sequence[str]) -> None:
        """Ask the broker to kill jobs without waiting for its answer (their wrappers
        follow its records, as for any kill)."""
        if ids and not self._closed and os.getpid() == self._pid:
            self._io.command("kill", list(ids))

    def _slots(self, anonymous_ok: bool = False, timeout: float = 10.0) -> int:
        """How many worker slots could run this client's jobs now (at least 1)."""
        return max(1, sum(w.slots for w in self.workers(timeout)
                          if anonymous_ok or not w.anonymous))

    # --- many jobs

    def map(self, func: Callable[..., Any], *iterables: Iterable[Any],
            chunksize: int | None = None, ordered: bool = True, timeout: float | None = None,
            progress: bool = False, return_exceptions: bool = False,
            **job_options: Any) -> list[Any]:
        """``[func(*args) for args in zip(*iterables)]``, run on the workers.

        The function is sent once; the items go many per job (``chunksize`` of
        them, or as many as make ~0.1 s of work, measured as the map goes) and
        many jobs per message. A failing item raises :class:`JobError` naming its
        index, with the worker's traceback (or, with ``return_exceptions``, its
        exception takes its place in the list). ``timeout`` counts from this call
        (TimeoutError after). With ``ordered=False`` the list is in the order
        results came. ``progress`` shows a progress bar. ``job_options`` (priority,
        requires, memory, job_timeout for each chunk...) apply to every job of the map.
        """
        return list(self.imap(func, *iterables, chunksize=chunksize, ordered=ordered,
                              timeout=timeout, progress=progress,
                              return_exceptions=return_exceptions, **job_options))

    def imap(self, func: Callable[..., Any], *iterables: Iterable[Any],
             chunksize: int | None = None, ordered: bool = True, timeout: float | None = None,
             progress: bool = False, return_exceptions: bool = False,
             **job_options: Any) -> Iterator[Any]:
        """As :meth:`map`, yielding results as they come: in the order of the items,
        or with ``ordered=False`` as each chunk completes. Items are read from the
        iterables as chunks are sent, not all at once. Closing the iterator early
        kills the jobs still running."""
        from .mapping import MapRun

        run = MapRun(self, func, iterables, chunksize=chunksize, ordered=ordered,
                     timeout=timeout, return_exceptions=return_exceptions,
                     job_options=job_options)
        return run.results(progress)

    def executor(self, **job_options: Any) -> DSageExecutor:
        """A :class:`concurrent.futures.Executor` whose jobs run on this client's
        workers, each with ``job_options``."""
        from .executor import DSageExecutor

        self._check_job_options(job_options)
        return DSageExecutor(self, **job_options)

    def _check_job_options(self, options: Mapping[str, Any]) -> None:
        """Check the options of :meth:`eval_function` kept for later submits: an unknown or
        bad one raises now, as the submit would (the files are read then)."""
        rest = {k: v for k, v in options.items() if k != "files"}
        for option in ("kind", "user_vars", "load_files", "shared"):
            if option in rest:
                raise TypeError(f"unknown job option(s): {option} (a function's jobs take "
                                f"eval's options but kind, user_vars and load_files)")
        self._spec(Kind.FUNCTION.value, rest.pop("timeout", 600),
                   rest.pop("priority", DEFAULT_PRIORITY), rest.pop("name", None),
                   rest.pop("memory", None), rest.pop("anonymous_ok", False),
                   rest.pop("requires", ()), **rest)

    def _message_limit(self) -> int:
        """The largest message: this client's limit, or the broker's once it is known."""
        return min(self._io.max_message_size,
                   self._io.conn.max_message_size or self._io.max_message_size)

    def _check_fits(self, size: int) -> None:
        """ValueError, in the call, for a job with attachments larger than a message
        may be (this client's limit, or the broker's once it is known)."""
        limit = self._message_limit()
        if size > limit:
            raise ValueError(f"the job with its attachments is {size} bytes, more than the "
                             f"largest message allowed ({limit} bytes, --max-message-size): "
                             f"attach less, or put large files where the workers can read "
                             f"them")

    # --- looking at jobs

    def job(self, job_id: str, timeout: float = 10.0) -> JobWrapper:
        """The JobWrapper of an existing job of this key (also one another process submitted)."""
        check_job_id(job_id)
        self._check_usable()
        known = self._io.jobs.get(job_id)
        if known is not None:
            return known
        wrappers = self._io.request(M.QUERY, timeout, wrap=True, ids=[job_id])
        if not wrappers:
            raise UnknownJob(f"no job {job_id} belongs to this key on {self.server}:{self.port}",
                             job_id)
        return wrappers[0]

    def get_my_jobs(self, status: str | None = None, name: str | None = None,
                    since: float | None = None, limit: int | None = 1000,
                    timeout: float = 30.0) -> list[JobWrapper]:
        """This key's jobs, oldest first: of one ``status``, with one ``name``, created
        at or after ``since`` (a ``time.time()`` value or a datetime), at most ``limit`` of them
        (None: all). Fetched in pages of up to ``protocol.MAX_LIST`` jobs."""
        if status is not None and status not in {s.value for s in Status}:
            raise ValueError(f"status={status!r}: choose one of "
                             f"{', '.join(s.value for s in Status)}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ValueError(f"limit={limit!r}: a number of jobs >= 1, or None for all")
        name = _check_name(name)
        since = _check_time("since", since)
        self._check_usable()
        out: list[JobWrapper] = []
        after: int | None = 0
        while after is not None and (limit is None or len(out) < limit):
            page_size = MAX_LIST if limit is None else min(MAX_LIST, limit - len(out))
            page: _Page = self._io.request(M.LIST, timeout, wrap=True, status=status, name=name,
                                           since=since, after=after, limit=page_size)
            out.extend(page)
            after = page.next
        return out

    def status(self, timeout: float = 10.0) -> ClusterStatus:
        """The broker's view: uptime, this key's jobs by state, all queued and running
        jobs, and the connected monitors."""
        self._check_usable()
        h = self._io.request(M.STATUS, timeout).header
        return ClusterStatus(self.server, self.port, h["version"], h["uptime"], h["jobs"],
                             h["queued"], h["processing"], [MonitorInfo(**w) for w in h["workers"]])

    def kill_all(self, status: str | None = None, timeout: float = 30.0) -> int:
        """Kill every unfinished job of this key (only the queued ones with
        ``status='new'``, only the running ones with ``'processing'``); returns how
        many were killed. A page of ids at a time is listed and killed, so a million
        queued jobs cost this process no more than a thousand (and no wrappers)."""
        if status not in (None, Status.NEW.value, Status.PROCESSING.value):
            raise ValueError(f"status={status!r}: choose 'new', 'processing' or None (both)")
        self._check_usable()
        killed = 0
        for wanted in [status] if status else [Status.NEW.value, Status.PROCESSING.value]:
            after: int | None = 0
            while after is not None:
                page: _Page = self._io.request(M.LIST, timeout, wrap="states", status=wanted,
                                               name=None, since=None, after=after,
                                               limit=MAX_BATCH)
                after = page.next  # the pages follow the store's order: kills change no page
                if not page:
                    continue
                # with 'new', only jobs still queued: one that started meanwhile goes on
                states = self._io.request(M.KILL, timeout, wrap="states",
                                          ids=[jid for jid, _ in page],
                                          queued_only=status == Status.NEW.value)
                killed += sum(st == Status.KILLED.value for _, st in states)
        return killed

    def purge(self, before: float | None = None, timeout: float = 30.0) -> int:
        """Delete this key's finished jobs (completed, failed, killed) from the broker,
        only those that finished before ``before`` (a ``time.time()`` value or a datetime)
        if given; returns how many. Their wrappers keep what they hold."""
        self._check_usable()
        reply = self._io.request(M.PURGE, timeout, before=_check_time("before", before))
        count: int = reply.header["count"]
        return count

    def server_log(self, n: int = 50) -> str:
        """The last ``n`` lines of the broker's log: of the broker ``start_all`` started,
        else of a broker of this home on this machine (``$DSAGE_HOME/logs/broker.log``)."""
        return self._local_log("broker", n)

    def worker_log(self, n: int = 50) -> str:
        """The last ``n`` lines of the monitors' logs: those ``start_all`` started, else
        a monitor's of this home on this machine (``$DSAGE_HOME/logs/worker.log``)."""
        return self._local_log("worker", n)

    def _local_log(self, which: str, n: int) -> str:
        from .logs import default_log_file, tail

        if self._cluster is not None:
            procs = ([self._cluster.broker] if which == "broker" and self._cluster.broker
                     else self._cluster.monitors if which == "worker" else [])
            return "\n".join(tail(p.log, n) for p in procs)
        path = default_log_file(self.home, which)
        if not path.exists():
            raise DSageError(
                f"no {which} log here: {path} does not exist. The {which} writes it on its "
                f"own machine (see --log-file there)")
        return tail(path, n)

    def workers(self, timeout: float = 10.0) -> list[MonitorInfo]:
        """The monitors connected to the broker."""
        self._check_usable()
        reply = self._io.request(M.WORKERS, timeout)
        return [MonitorInfo(**w) for w in reply.header["workers"]]

    def kill(self, job_id: str, timeout: float = 10.0) -> None:
        """Kill a job of this key: queued ones are removed, running ones killed."""
        self._kill(job_id, timeout)

    def _kill(self, job_id: str, timeout: float = 10.0, queued_only: bool = False) -> None:
        """Kill a job (with ``queued_only``, only if it is still queued); its wrapper,
        if any, is updated before this returns."""
        check_job_id(job_id)
        self._check_usable()
        reply = self._io.request(M.KILL, timeout, ids=[job_id], queued_only=queued_only)
        if reply.header["missing"]:
            raise UnknownJob(f"no job {job_id} belongs to this key", job_id)

    # --- many jobs

    def as_completed(self, jobs: Iterable[JobWrapper],
                     timeout: float | None = None) -> Iterator[JobWrapper]:
        """Yield the jobs as they become final (those final already first), as
        ``concurrent.futures.as_completed`` does; TimeoutError if ``timeout``
        seconds pass (from this call) before all are."""
        jobs = list(dict.fromkeys(jobs))
        self._check_usable()
        timeout = check_wait(timeout)
        try:
            yield from cast(Iterator[JobWrapper], concurrent.futures.as_completed(jobs, timeout))
        except TimeoutError:
            left = [j for j in jobs if not j.done()]
            self._io.command("query", [j.job_id for j in left])  # the truth, should an
            # event have been lost
            raise TimeoutError(f"{len(left)} of {len(jobs)} jobs are not finished after "
                               f"{timeout} s") from None

    def block_on_jobs(self, jobs: Iterable[JobWrapper],
                      timeout: float | None = None) -> list[JobWrapper]:
        """Block until every job is final (TimeoutError after ``timeout`` seconds);
        return them, in the order given."""
        jobs = list(jobs)
        for _ in self.as_completed(jobs, timeout):
            pass
        return jobs

    def job_results_iter(self, jobs: Iterable[JobWrapper],
                         timeout: float | None = None) -> Iterator[Any]:
        """Yield the jobs' results as they become final (in that order); a failed job
        raises its :class:`JobError` at its turn. TimeoutError as :meth:`as_completed`."""
        for job in self.as_completed(jobs, timeout):
            yield job.result()

    # --- lifetime

    def close(self) -> None:
        """Disconnect, and stop the broker and monitors that ``start_all`` started.
        In a forked child it only marks this copy closed (the parent's connection and
        cluster are the parent's)."""
        if self._closed:
            return
        left = 0
        if self._cluster is not None and os.getpid() == self._pid:
            try:  # this key's unfinished jobs, which stay in the store
                jobs = self.status(timeout=1.0).jobs
                left = jobs[Status.NEW.value] + jobs[Status.PROCESSING.value]
            except DSageError:
                pass
        self._closed = True
        if os.getpid() != self._pid:
            return
        self._io.command("close")
        self._io.join(10)
        self._window.wake()
        unfinished = [w for w in list(self._io.jobs.values()) if not w.done()]
        if self._cluster is not None:
            self._cluster.stop(hurry=True)
            if left:
                print(f"dsage: stopped the local cluster; {plural(left, 'unfinished job')} "
                      f"stay{'s' if left == 1 else ''} in its store and run at the next "
                      f"start_all() on this home (D.kill_all() or `dsage kill --all` there "
                      f"drops them)", file=sys.stderr)
        why = "the DSage connection was closed before the job ended"
        for w in unfinished:
            w._abandon(why)
        for watcher in self._io.watchers:
            try:
                watcher(unfinished)
            except Exception:  # noqa: BLE001 - closing goes on
                log.exception("a job watcher failed")
        with self._io.changed:  # (the I/O thread has ended: settled here)
            callbacks = [w for w in unfinished if w._settle()]
            self._io.changed.notify_all()
        for w in callbacks:
            w._run_callbacks()

    def __enter__(self) -> DSage:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else (
            "connected" if self._io.conn.welcomed.is_set() else "connecting")
        return f"<DSage {self.server}:{self.port} {state}>"
