"""The broker's rules, apart from sockets.

:class:`BrokerState` takes decoded messages with the time and the sender's
authenticated key, changes the in-memory :class:`~dsage.scheduler.Scheduler`
and journals each change to the store, and queues what to send in an outbox.
:meth:`BrokerState.flush` dispatches queued jobs to monitors with credit,
commits the store once, and hands back the outbox, so nothing is
acknowledged or announced before it is durable.

A failed store write (a full disk, say) leaves the job as it was and its
message unacknowledged: the client or monitor sends it again later. A failed
commit makes the state reload from the store and drops the outbox, so
nothing is acknowledged that the store does not hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from . import __version__
from .protocol import (
    CHUNK_BYTES, DEFAULT_MAX_MESSAGE_SIZE, LIVE_BYTES, MAX_BATCH, MAX_LONG_TEXT, M, Message,
    Status, batches, clip, error, make, shared_batches, version_problem,
)
from .seal import OVERHEAD as SEAL_OVERHEAD
from .scheduler import Job, Scheduler, Taker, Where, waiting_reason
from .store import Outcome, Record, Store, WorkerRef, by_ref, record
from .words import plural

log = logging.getLogger("dsage.broker")

Dest = Literal["client", "monitor", "event"]

#: seconds without open jobs after which the broker empties the store's WAL
IDLE_TRUNCATE = 1.0
#: Seconds a monitor's stored results may wait for their acknowledgement to ride on
#: the next RUN to it before a RESULT_ACK of their own leaves.
ACK_DELAY = 0.05
#: Seconds after its dispatch that a job's "processing" record is stored and
#: announced to its owner: a job done by then is stored and announced once, final
#: (one statement, one record, and one wake-up of the client fewer per short job).
ANNOUNCE_DELAY = 0.1
#: Seconds of work a monitor running short jobs is sent beyond its free slots (as
#: estimated from its jobs' run times), so that it runs them from its own queue while
#: their results and the next jobs travel, many to a message; at most MAX_PREFETCH
#: jobs. Long jobs get only the configured prefetch (default 1), which keeps them
#: spread over the monitors as they free up.
PREFETCH_TIME = 0.005
MAX_PREFETCH = 64
#: seconds a slot takes to go from one job to the next, beyond the job's own run time
#: (the round trip to its monitor, and the reset between jobs)
SLOT_TURNAROUND = 0.0002
#: the weight of each new run time in a monitor's average
RUN_TIME_WEIGHT = 0.1
#: Seconds without a result from a monitor with jobs out after which its jobs are no
#: longer taken for short, whatever its average says: it is sent the configured
#: prefetch only (and gives back what waits there beyond that: the monitor's
#: GIVE_BACK_AFTER).
STALE_AFTER = 0.05


@dataclass(frozen=True)
class Out:
    """A message to send: to a routing id on a ROUTER, or to a topic on the events socket."""

    dest: Dest
    to: bytes
    msg: Message


@dataclass
class BrokerConfig:
    heartbeat: float = 1.0
    #: a peer is lost after this many heartbeat intervals without a message
    liveness: int = 3
    failure_limit: int = 3
    max_queued_per_client: int = 1_000_000
    max_message_size: int = 256 * 1024 * 1024
    retention: float = 7 * 24 * 3600.0
    #: admit monitors whose key is not trusted, as anonymous workers
    allow_anonymous: bool = False
    #: jobs sent to a monitor beyond its free slots, so no slot idles for a round trip
    prefetch: int = 1
    #: most anonymous monitors registered at once
    max_anonymous: int = 64
    #: payload bytes of queued jobs kept in memory; the rest is read from the store
    payload_memory: int = 256 * 1024 * 1024
    #: changes at every broker start, so clients notice a restart
    epoch: str = field(default_factory=lambda: f"{time.time():.6f}")


@dataclass
class MonitorEntry:
    """A registered monitor, addressed by the routing id of its connection."""

    rid: bytes
    key: str
    anonymous: bool
    monitor_id: str
    host: str
    pid: int
    slots: int
    tags: list[str]
    last_seen: float
    stopping: bool = False
    #: False once its connection is gone: it gets no jobs, and is lost after the
    #: liveness window unless it registers again (from a new connection)
    reachable: bool = True
    #: hashes of the shared blobs sent to it since it registered: it keeps them (in
    #: a cache; one it dropped comes back in a RELEASE's ``missing_blobs``)
    blobs: set[str] = field(default_factory=set)
    #: results stored this loop turn: acknowledged once committed, as (id, attempt)
    acks: list[tuple[str, int]] = field(default_factory=list)
    #: committed results not yet acknowledged, since ``acks_since``: they ride on the
    #: next RUN to this monitor, or go in a RESULT_ACK after ACK_DELAY
    committed_acks: list[tuple[str, int]] = field(default_factory=list)
    acks_since: float = 0.0
    #: it sent an empty RESULT (it is stopping): answer it after the commit
    answer_due: bool = False
    #: the average run time of its jobs (a moving average, in seconds; None before the
    #: first result)
    run_time: float | None = None
    #: when (broker time) it last sent results, or was sent jobs with none out
    progress: float = 0.0
    #: the largest frame it takes (its --max-message-size)
    max_frame: int = DEFAULT_MAX_MESSAGE_SIZE

    def __post_init__(self) -> None:
        self.taker = Taker(self.monitor_id, frozenset(self.tags), self.anonymous,
                           self.max_frame)

    def ref(self) -> WorkerRef:
        return WorkerRef(self.monitor_id, self.host, self.key, self.anonymous)


class BrokerState:
    """Everything the broker knows, and the rules for changing it."""

    def __init__(self, store: Store, config: BrokerConfig, now: float,
                 is_client: Callable[[str], bool],
                 is_worker: Callable[[str], bool] | None = None) -> None:
        self.store = store
        self.config = config
        #: whether a key has the client role (may submit, query, subscribe)
        self.is_client = is_client
        #: whether a key has the worker role (sees other monitors' keys and pids)
        self.is_worker = is_worker or is_client
        self.outbox: list[Out] = []
        self.events: dict[str, list[Record]] = {}
        self.event_seq: dict[str, int] = {}
        self.last_heartbeat = now
        self.last_tick = now
        self.started = now
        self.last_prune = 0.0
        self.rotation = 0
        self.idle_since: float | None = None
        #: dispatched jobs whose "processing" record is not announced yet, and when it
        #: is due (in dispatch order, so due times only grow)
        self.starting: dict[str, float] = {}
        self._values: dict[Any, Any] = {}
        self._tag_sets: dict[tuple[str, ...], frozenset[str]] = {}
        self._load(now)

    def _load(self, now: float) -> None:
        """(Re)build the in-memory state from the store. Jobs found processing wait
        a grace period for their monitor to register again before being re-queued."""
        self.monitors: dict[bytes, MonitorEntry] = {}
        self.by_id: dict[str, MonitorEntry] = {}
        #: the monitors with results to acknowledge (see :meth:`_acknowledge`), so that a
        #: loop turn looks at those only
        self.acking: dict[bytes, MonitorEntry] = {}
        self.sched = Scheduler()
        self.payload_bytes = 0
        for o in self.store.open_jobs(self.config.payload_memory):
            processing = o.status is Status.PROCESSING and o.worker_id is not None
            self.sched.add(Job(
                o.id, o.owner, o.name, self._shared(o.kind), o.priority, self._shared(o.timeout),
                o.memory, o.anonymous_ok, self._tags(o.requires), o.created, o.failures, o.seq,
                o.payload, isolate=o.isolate, retries=o.retries,
                retry_on=self._names(o.retry_on), attempt=o.attempt, shared=self._names(o.shared),
                frame=o.frame, monitor=o.worker_id if processing else None, started=o.started))
            self.payload_bytes += len(o.payload or b"")
        self.orphan_deadline: float | None = (
            now + self.config.heartbeat * self.config.liveness * 2
            if self.sched.assigned else None)

    def reload(self, now: float, why: str) -> None:
        """The store could not commit: forget what was not committed and start again
        from the store. Monitors are told to register again; clients resend."""
        log.error("the job store could not commit (%s): reloading from the store; "
                  "unacknowledged submits and results will be sent again", why)
        self.store.rollback()
        rids = list(self.monitors)
        self.outbox, self.events = [], {}
        self._load(now)
        for rid in rids:
            self._send("monitor", rid, error("unregistered", "the broker restarted its "
                                             "state: register again"))

    # --- helpers

    def _shared(self, value: Any) -> Any:
        """One object for equal small values (a job's kind, its timeout), so a million
        queued jobs do not hold a million copies."""
        if value is None:
            return None
        return self._values.setdefault(value, value) if len(self._values) < 10_000 else value

    def _tags(self, requires: list[str]) -> frozenset[str]:
        """One frozenset per set of required tags (an empty frozenset is 216 bytes)."""
        key = tuple(requires)
        tags = self._tag_sets.get(key)
        if tags is None:
            tags = frozenset(requires)
            if len(self._tag_sets) < 10_000:
                self._tag_sets[key] = tags
        return tags

    def _names(self, names: Any) -> tuple[str, ...]:
        """One tuple per list of names (exception classes, shared blob hashes): most
        jobs share one, or have none."""
        key = tuple(names)
        if not key:
            return ()
        return self._values.setdefault(key, key) if len(self._values) < 10_000 else key

    def _send(self, dest: Dest, to: bytes, msg: Message) -> None:
        self.outbox.append(Out(dest, to, msg))

    def _announce(self, owner: str, *records: Record) -> None:
        self.events.setdefault(owner, []).extend(records)

    def _takers(self) -> list[Taker]:
        return [m.taker for m in self.monitors.values() if m.reachable and not m.stopping]

    def _credit(self, m: MonitorEntry, now: float) -> int:
        if m.stopping or not m.reachable:
            return 0
        out = self.sched.assigned.get(m.monitor_id, ())
        run_time = m.run_time
        if out and now - m.progress > STALE_AFTER:
            run_time = None  # its jobs run longer than the average says: trust it no more
        return max(0, m.slots + prefetch(m.slots, run_time, self.config.prefetch) - len(out))

    def _cancel_on(self, monitor_id: str | None, job_id: str, reason: str) -> None:
        m = self.by_id.get(monitor_id) if monitor_id is not None else None
        if m is not None and m.reachable:
            self._send("monitor", m.rid, make(M.CANCEL, ids=[job_id], reason=reason))

    # --- clients

    def on_client(self, now: float, rid: bytes, key: str, msg: Message) -> None:
        h = msg.header
        if not self.is_client(key):
            self._unauthorized_client(rid, msg)
            return
        if msg.type is M.HELLO:
            problem = version_problem(h["version"], "client", __version__)
            if problem is not None:
                log.warning("refused client %s: %s", key[:8], problem)
                self._send("client", rid, error("version", problem, req=h["req"]))
                return
            self._send("client", rid, make(
                M.WELCOME, req=h["req"], version=__version__, key=key, epoch=self.config.epoch,
                heartbeat=self.config.heartbeat, max_message_size=self.config.max_message_size))
        elif msg.type is M.SUBMIT:
            self._submit(rid, key, h, msg.blobs)
        elif msg.type is M.KILL:
            self._kill(key, h["ids"], h["queued_only"])
            self._reply_records(rid, key, h["req"], h["ids"])
        elif msg.type is M.QUERY:
            self._reply_records(rid, key, h["req"], h["ids"])
        elif msg.type is M.LIST:
            status = None if h["status"] is None else Status(h["status"])
            recs, after = self.store.list(key, status, h["limit"], name=h["name"],
                                          since=h["since"], after=h["after"])
            self._send_records(rid, h["req"], self._with_reasons(recs), [], after)
        elif msg.type is M.WORKERS:
            self._send("client", rid, make(M.WORKER_LIST, req=h["req"],
                                           workers=self._monitor_infos(key, now)))
        elif msg.type is M.STATUS:
            self._send("client", rid, make(
                M.STATE, req=h["req"], version=__version__, uptime=now - self.started,
                jobs=self.store.counts(key), queued=self.sched.queued,
                processing=sum(map(len, self.sched.assigned.values())),
                workers=self._monitor_infos(key, now)))
        elif msg.type is M.PURGE:
            count = self.store.purge(key, h["before"])
            self._send("client", rid, make(M.PURGED, req=h["req"], count=count))
        elif msg.type is M.FETCH:
            self._fetch(rid, key, h)
        elif msg.type is M.PING:
            # the last event sequence number of this key: a client that has not
            # seen it (an event was dropped) asks for its jobs' state
            self._send("client", rid, make(M.PONG, seq=self.event_seq.get(key, 0),
                                           epoch=self.config.epoch))

    def _fetch(self, rid: bytes, key: str, h: dict[str, Any]) -> None:
        """One chunk of a large result or output, to its owner only."""
        got = self.store.read_part(h["id"], key, h["part"], h["offset"], CHUNK_BYTES)
        if got is None:  # not this key's, or not final (any more): say it is missing
            self._send_records(rid, h["req"], [], [h["id"]])
            return
        data, total = got
        self._send("client", rid, make(M.CHUNK, [data], req=h["req"], id=h["id"],
                                       part=h["part"], offset=h["offset"], total=total))

    def _unauthorized_client(self, rid: bytes, msg: Message) -> None:
        """A connection made with a key that has since been removed: refuse what it asks
        (jobs one by one, so the client can fail them)."""
        text = ("this key is not authorized as a client on this broker (removed, or "
                "added with --role worker)")
        if msg.type is M.SUBMIT:
            self._send("client", rid, make(M.ACK, req=msg.header["req"], ids=[], errors=[
                {"id": s["id"], "code": "unauthorized", "message": text}
                for s in msg.header["jobs"]]))
        else:
            self._send("client", rid, error("unauthorized", text, msg.header.get("req")))

    def _submit(self, rid: bytes, key: str, h: dict[str, Any], blobs: list[bytes]) -> None:
        wall = time.time()  # stored times are wall-clock; ``now`` is only for liveness
        cap = self.config.max_queued_per_client
        ids: list[str] = []
        errors: list[dict[str, str]] = []
        queued: list[Record] = []
        takers = self._takers()
        unstored, why = 0, ""
        n = len(h["jobs"])
        # shared blobs (attached files), each sent once; one whose content does not
        # match its hash is not taken (the jobs that use it are refused)
        shared = {digest: data for digest, data in zip(h["shared"], blobs[n:])
                  if hashlib.sha256(data).hexdigest() == digest}
        kept: set[str] = set()
        in_store: dict[str, int | None] = {}
        for spec, payload in zip(h["jobs"], blobs):
            jid = spec["id"]
            known = self.sched.jobs.get(jid)
            if known is not None:
                self._resent(key, jid, known.owner, ids, errors)
                continue
            if self.sched.queued_by_owner.get(key, 0) >= cap:
                errors.append({"id": jid, "code": "quota", "message":
                               f"this client already has {cap} queued jobs "
                               f"(the broker's --max-queued-per-client)"})
                continue
            sizes = [len(shared[d]) if d in shared else self._shared_size(key, d, in_store)
                     for d in spec["shared"]]
            if None in sizes:
                # the client sends the job again with the content
                errors.append({"id": jid, "code": "shared", "message":
                               "an attached file's content is neither in this message nor "
                               "kept by the broker, or does not match its hash"})
                continue
            try:
                for digest in spec["shared"]:
                    if digest in shared and digest not in kept:
                        self.store.put_shared(key, digest, shared[digest])
                        kept.add(digest)
                seq = self.store.insert(key, spec, payload, wall)
                if seq is None:
                    self._resent(key, jid, self.store.owner_of([jid]).get(jid), ids, errors)
                    continue
            except sqlite3.Error as e:
                unstored += 1  # not acknowledged: the client sends it again later
                why = str(e)
                continue
            keep = self.payload_bytes + len(payload) <= self.config.payload_memory
            self.payload_bytes += len(payload) if keep else 0
            job = Job(jid, key, spec["name"], self._shared(spec["kind"]), spec["priority"],
                      self._shared(spec["timeout"]), spec["memory"], spec["anonymous_ok"],
                      self._tags(spec["requires"]), wall, 0, seq, payload if keep else None,
                      isolate=spec["isolate"], retries=spec["retries"],
                      retry_on=self._names(spec["retry_on"]), shared=self._names(spec["shared"]),
                      frame=max([len(payload), *(n for n in sizes if n is not None)])
                      if sizes else len(payload))
            self.sched.add(job)
            ids.append(jid)
            reason = waiting_reason(job, takers)
            if reason is not None:
                # The ACK tells the client its job is queued; an event is only needed
                # to say why it cannot run yet.
                queued.append(_open_record(job, reason))
        if unstored:
            log.error("could not store %d jobs of client %s (%s); they stay unacknowledged",
                      unstored, key[:8], why)
        self._send("client", rid, make(M.ACK, req=h["req"], ids=ids, errors=errors))
        if queued:
            self._announce(key, *queued)

    def _shared_size(self, key: str, digest: str, in_store: dict[str, int | None]) -> int | None:
        """The size of ``key``'s shared blob ``digest`` if the store keeps it (asked once
        per message)."""
        if digest not in in_store:
            in_store[digest] = self.store.shared_size(key, digest)
        return in_store[digest]

    @staticmethod
    def _resent(key: str, jid: str, owner: str | None, ids: list[str],
                errors: list[dict[str, str]]) -> None:
        if owner == key:
            ids.append(jid)  # a resend: already stored
        else:
            errors.append({"id": jid, "code": "exists", "message": "job id in use"})

    def _kill(self, key: str, ids: list[str], queued_only: bool = False) -> None:
        """Kill the owner's jobs; with ``queued_only`` (a cancel) only those still queued."""
        for jid in ids:
            job = self.sched.jobs.get(jid)
            if job is None or job.owner != key:
                continue  # final already, or another client's job: invisible to this one
            if queued_only and job.where is not Where.QUEUED:
                continue  # a worker has it: a cancel leaves it running
            why = "cancelled by its owner before it ran" if queued_only else "killed by its owner"
            outcome = Outcome(Status.KILLED, why, "none", "none", False,
                              None, time.time(), b"", b"")
            m = self._holder(job)
            self._finish(job, outcome, None if m is None else m.ref())
            if job.where is Where.ASSIGNED:
                self._cancel_on(job.monitor, jid, "killed")
            self._forget(job)

    def _forget(self, job: Job) -> None:
        self.sched.remove(job.id)
        if job.payload is not None:
            self.payload_bytes -= len(job.payload)
            job.payload = None

    def _reply_records(self, rid: bytes, key: str, req: int, ids: list[str]) -> None:
        found = self.store.records(ids, owner=key)
        missing = [i for i in ids if i not in found]
        self._send_records(rid, req, self._with_reasons(list(found.values())), missing)

    def _send_records(self, rid: bytes, req: int, records: list[Record],
                      missing: list[str], next_page: int | None = None) -> None:
        """JOBS replies, split within the protocol's limits (the last carries ``missing``
        and, for a LIST, where its next page starts)."""
        parts = batches([len(b[0]) + len(b[1]) for _, b in records]) or [range(0)]
        for n, part in enumerate(parts):
            last = n == len(parts) - 1
            self._send("client", rid, _records_message(
                M.JOBS, [records[i] for i in part], req=req, missing=missing if last else [],
                more=not last, next=next_page if last else None))

    def _monitor_infos(self, key: str, now: float) -> list[dict[str, Any]]:
        """The connected monitors as ``key`` may see them: their keys and pids only to
        keys that run monitors themselves (and each key sees its own)."""
        full = self.is_worker(key)
        return [{"id": m.monitor_id, "host": m.host,
                 "pid": m.pid if full or m.key == key else 0, "slots": m.slots,
                 # jobs past its slot count wait in its prefetch queue
                 "busy": min(m.slots, len(self.sched.assigned.get(m.monitor_id, ()))),
                 "anonymous": m.anonymous, "tags": m.tags,
                 "key": m.key if full or m.key == key else None,
                 "quiet": max(0.0, now - m.last_seen)}
                for m in self.monitors.values()]

    def _with_reasons(self, records: list[Record]) -> list[Record]:
        """Queued jobs' records say why they wait, when no connected monitor can run them."""
        takers = self._takers()
        for rec, _ in records:
            if rec["status"] == Status.NEW:
                job = self.sched.jobs.get(rec["id"])
                if job is not None:
                    rec["reason"] = waiting_reason(job, takers)
        return records

    # --- monitors

    def on_monitor(self, now: float, rid: bytes, key: str, anonymous: bool, msg: Message) -> None:
        entry = self.monitors.get(rid)
        if entry is not None:
            entry.last_seen = now
            if entry.anonymous != anonymous:
                # Its key was removed from (or added to) the authorized keys while
                # connected: it may no longer run what it was given.
                self.lose_monitor(now, rid, "its key's trust changed")
                entry = None
        if anonymous and not self.config.allow_anonymous:
            self._send("monitor", rid, error(
                "unauthorized", "this monitor's key is no longer authorized on this broker"))
            return
        if msg.type is M.REGISTER:
            self._register(now, rid, key, anonymous, msg.header)
            return
        if entry is None or entry.key != key:
            self._send("monitor", rid, error(
                "unregistered", "this monitor is not registered (or was lost): register again"))
            return
        if msg.type is M.RESULT:
            entry.progress = now
            self._results(entry, msg)
        elif msg.type is M.PUT:
            self._put(entry, msg.header, msg.blobs[0])
        elif msg.type is M.OUTPUT:
            self._live_output(entry, msg)
        elif msg.type is M.STOPPING:
            entry.stopping = True
        elif msg.type is M.RELEASE:
            h = msg.header
            entry.blobs.difference_update(h["missing_blobs"])
            for jid in h["ids"]:
                job = self.sched.jobs.get(jid)
                if job is not None and job.monitor == entry.monitor_id:
                    self._requeue(job, h["count_failure"], h["reason"], None)

    def _register(self, now: float, rid: bytes, key: str, anonymous: bool,
                  h: dict[str, Any]) -> None:
        monitor_id = h["monitor"]
        problem = version_problem(h["version"], "worker", __version__)
        if problem is not None:
            log.warning("refused monitor %s on %s: %s", monitor_id[:8], h["host"], problem)
            self._send("monitor", rid, error("version", problem))
            return
        old = self.by_id.get(monitor_id)
        if old is not None and old.key != key:
            log.warning("refused a monitor registering as %s with another key (%s)",
                        monitor_id, key[:8])
            self._send("monitor", rid, error("monitor_id", "this monitor id belongs to "
                                             "another key: register with a new id"))
            return
        if anonymous and old is None and sum(m.anonymous for m in self.monitors.values()) \
                >= self.config.max_anonymous:
            self._send("monitor", rid, error(
                "busy", f"this broker admits at most {self.config.max_anonymous} anonymous "
                "workers at once; try again later"))
            return
        same_conn = self.monitors.get(rid)
        if same_conn is not None and same_conn.monitor_id != monitor_id:
            # The connection now speaks for another monitor: the old one is gone.
            self.lose_monitor(now, rid, "re-registered as another monitor", count=False)
        holds = set(h["running"])
        if old is not None:
            self._drop_entry(old)
        # It reconnected (to this broker, or to one restarted from the store). Jobs
        # assigned to it that it does not hold were lost in transit (a RUN sent just
        # before a broker crash, say): re-queue them, but welcome their late results.
        for jid in self.sched.of_monitor(monitor_id):
            if jid not in holds:
                self._requeue(self.sched.jobs[jid], False,
                              "its monitor reconnected without it", monitor_id)
        entry = MonitorEntry(rid, key, anonymous, monitor_id, h["host"], h["pid"],
                             h["slots"], h["tags"], now,
                             max_frame=h.get("max_message_size", DEFAULT_MAX_MESSAGE_SIZE))
        self.monitors[rid] = entry
        self.by_id[monitor_id] = entry
        cancel: list[str] = []
        adopted: list[Job] = []
        for jid in h["running"]:
            job = self._adoptable(entry, jid)
            if job is None:
                cancel.append(jid)
            else:
                adopted.append(job)
        if adopted:
            wall = time.time()
            for job in adopted:
                self.sched.adopt(job.id, monitor_id)
                job.started = job.started or wall
                self._announce(job.owner, _open_record(job, None, entry.ref()))
            self.store.start([(j.id, j.started or wall) for j in adopted], entry.ref())
        log.info("monitor %s registered from %s (%s%s, %d held)", monitor_id, entry.host,
                 plural(entry.slots, "slot"), ", anonymous" if anonymous else "", len(adopted))
        self._send("monitor", rid, make(M.REGISTERED, heartbeat=self.config.heartbeat,
                                        liveness=self.config.liveness, cancel=cancel,
                                        prefetch=self.config.prefetch))

    def _live_output(self, entry: MonitorEntry, msg: Message) -> None:
        """What a running job printed lately: passed on to its owner's events, not
        kept (the whole output comes with the result). Only from the job's monitor,
        and at most LIVE_BYTES (and the seal) at once."""
        job = self.sched.jobs.get(msg.header["id"])
        if job is None or job.monitor != entry.monitor_id or job.where is not Where.ASSIGNED \
                or len(msg.blobs[0]) > LIVE_BYTES + SEAL_OVERHEAD:
            return
        self.outbox.append(Out("event", job.owner.encode(), msg))

    def _adoptable(self, entry: MonitorEntry, jid: str) -> Job | None:
        """The job a (re)registering monitor says it holds, if it may keep it."""
        job = self.sched.jobs.get(jid)
        if job is None or (entry.anonymous and not job.anonymous_ok):
            return None
        if job.monitor != entry.monitor_id and self._holder(job) is not None:
            return None  # running on another connected monitor already
        return job

    def _holder(self, job: Job) -> MonitorEntry | None:
        """The connected monitor a job is assigned to, if any."""
        return self.by_id.get(job.monitor) if job.where is Where.ASSIGNED and job.monitor \
            else None

    def _results(self, entry: MonitorEntry, msg: Message) -> None:
        acked: list[tuple[str, int]] = []
        for i, r in enumerate(msg.header["results"]):
            jid = r["id"]
            job = self.sched.jobs.get(jid)
            if job is None or not (job.monitor == entry.monitor_id
                                   or entry.monitor_id in (job.lost_from or ())):
                acked.append((jid, r["attempt"]))  # not this monitor's job (any more): drop it
                continue
            if r["attempt"] != job.attempt:
                self._stale_result(entry, job)
                acked.append((jid, r["attempt"]))
                continue
            if r["retry"] and r["status"] == Status.FAILED and job.retries_left:
                if job.monitor == entry.monitor_id:
                    try:
                        self._retry(job)
                    except sqlite3.Error as e:
                        log.error("could not re-queue job %s for a retry: %s", jid, e)
                        continue  # not acknowledged: the monitor sends it again
                # else: a late result of a lost run; the run going on elsewhere decides
                acked.append((jid, r["attempt"]))
                continue
            if r["started"] is not None and r["finished"] is not None:
                entry.run_time = moving_average(entry.run_time, r["finished"] - r["started"])
            outcome = Outcome(Status(r["status"]), r["error"], r["encoding"], r["result_from"],
                              r["sealed"], r["started"], r["finished"],
                              msg.blobs[2 * i], msg.blobs[2 * i + 1], r["staged"])
            try:
                self._finish(job, outcome, entry.ref())
            except sqlite3.Error as e:
                log.error("could not store the result of job %s: %s", jid, e)
                continue  # not acknowledged: the monitor sends it again
            acked.append((jid, r["attempt"]))
            if job.where is Where.ASSIGNED and job.monitor != entry.monitor_id:
                self._cancel_on(job.monitor, jid, "finished elsewhere")
            self._forget(job)
        entry.acks.extend(acked)
        self.acking[entry.rid] = entry
        if not msg.header["results"]:
            # always answered: a stopping monitor waits for the answer to its empty
            # RESULT, which comes after any RUN sent before its STOPPING was read
            entry.answer_due = True

    def on_unreadable_result(self, now: float, rid: bytes, key: str, ids: list[str],
                             why: str) -> None:
        """A registered monitor sent a RESULT this broker cannot read (``why``), for
        ``ids``: those of its jobs fail saying so, and are acknowledged so that it
        drops them, rather than staying ``processing`` with their result stuck there."""
        entry = self.monitors.get(rid)
        if entry is None or entry.key != key:
            return
        for jid in ids:
            job = self.sched.jobs.get(jid)
            if job is None or job.monitor != entry.monitor_id:
                continue
            message = clip(f"its worker ({entry.host}) sent a result this broker cannot read "
                           f"({why}); is dsage on the worker the broker's version?",
                           MAX_LONG_TEXT)
            outcome = Outcome(Status.FAILED, message, "none", "none", False, job.started,
                              time.time(), b"", b"")
            try:
                self._finish(job, outcome, entry.ref())
            except sqlite3.Error as e:
                log.error("could not store the failure of job %s: %s", jid, e)
                continue
            entry.acks.append((jid, job.attempt))
            self.acking[entry.rid] = entry
            self._forget(job)

    def _finish(self, job: Job, outcome: Outcome, worker: WorkerRef | None) -> None:
        """Store an open job's final state, and announce its record (made from what the
        broker holds, as the store would give it back). A job stopped before its own
        start time was reported started when it left for its monitor."""
        if outcome.started is None and job.started is not None:
            outcome = dataclasses.replace(outcome, started=job.started)
        if not self.store.finish(job.id, outcome, worker):
            return
        big = by_ref(outcome)
        self._announce(job.owner, record(
            job.id, job.name, job.kind, outcome.status.value, job.priority, job.created,
            outcome.started, outcome.finished,
            job.failures, job.attempt, outcome.error, worker, outcome.encoding,
            outcome.result_from, outcome.sealed, b"" if big else outcome.result,
            b"" if big else outcome.output, big))

    def _retry(self, job: Job) -> None:
        """The job's code raised an exception it may be re-run for: back to its queue,
        for its next attempt (the failure limit, for lost workers, is not touched)."""
        self.store.retry(job.id, job.attempt + 1)
        self.sched.retry(job.id)
        self._announce(job.owner, _open_record(job, waiting_reason(job, self._takers())))

    def _stale_result(self, entry: MonitorEntry, job: Job) -> None:
        """A result of an earlier attempt of a job that went on (sent again after a
        reconnection). If the job is assigned to that same monitor, the monitor held
        only that old result when it registered and runs nothing of the job: the job
        goes back to the queue (no failure counted; a result of the monitor is still
        welcome, should it run the job after all)."""
        if job.where is Where.ASSIGNED and job.monitor == entry.monitor_id:
            self._requeue(job, False, "its monitor held only an earlier attempt's result",
                          entry.monitor_id)

    def _put(self, entry: MonitorEntry, h: dict[str, Any], data: bytes) -> None:
        """A chunk of a large result; answered after the commit that keeps it."""
        jid = h["id"]
        job = self.sched.jobs.get(jid)
        if job is None or not (job.monitor == entry.monitor_id
                               or entry.monitor_id in (job.lost_from or ())):
            self._send("monitor", entry.rid, make(M.PUT_ACK, id=jid, part=h["part"],
                                                  next=h["total"], gone=True))
            return
        try:
            nxt = self.store.stage(jid, entry.monitor_id, h["part"], h["offset"], data)
        except sqlite3.Error as e:
            log.error("could not store a chunk of job %s's result: %s", jid, e)
            nxt = h["offset"]  # not kept: the monitor sends it again
        self._send("monitor", entry.rid, make(M.PUT_ACK, id=jid, part=h["part"], next=nxt,
                                              gone=False))

    def _requeue(self, job: Job, count_failure: bool, reason: str, lost_from: str | None) -> None:
        """An assigned job goes back to the queue, or fails past the failure limit."""
        failures = job.failures + int(count_failure)
        limit = self.config.failure_limit
        if failures >= limit:
            done = self.store.fail(job.id, failures, clip(
                f"{reason}: lost its worker {failures} times (failure limit {limit})"),
                time.time())
            self._forget(job)
            if done:
                self._announce(*done)
            return
        self.store.requeue(job.id, failures)
        job.failures = failures
        self.sched.requeue(job.id, lost_from)
        self._announce(job.owner, _open_record(job, waiting_reason(job, self._takers())))

    def _drop_entry(self, entry: MonitorEntry) -> None:
        if self.monitors.get(entry.rid) is entry:
            del self.monitors[entry.rid]
        if self.by_id.get(entry.monitor_id) is entry:
            del self.by_id[entry.monitor_id]

    def unreachable(self, rid: bytes) -> None:
        """A monitor's connection is gone. It often comes back at once (a reconnect,
        a broker that was stalled), registering with the jobs it still holds, so wait
        for that, or for the liveness window, before re-queueing its jobs."""
        entry = self.monitors.get(rid)
        if entry is not None and entry.reachable:
            entry.reachable = False
            log.info("monitor %s on %s disconnected; waiting for it to register again",
                     entry.monitor_id, entry.host)

    def lose_monitor(self, now: float, rid: bytes, reason: str, count: bool = True) -> None:
        """Forget a monitor and put its jobs back in the queue (counting a failure)."""
        entry = self.monitors.get(rid)
        if entry is None:
            return
        self._drop_entry(entry)
        ids = self.sched.of_monitor(entry.monitor_id)
        log.warning("monitor %s on %s lost (%s); re-queueing %d jobs", entry.monitor_id,
                    entry.host, reason, len(ids))
        for jid in ids:
            self._requeue(self.sched.jobs[jid], count, f"worker {entry.host} lost",
                          entry.monitor_id)

    # --- time

    def tick(self, now: float) -> None:
        """Liveness checks, heartbeats, orphan re-queueing and pruning."""
        window = self.config.heartbeat * self.config.liveness
        stalled = now - self.last_tick - 2 * self.config.heartbeat
        if stalled > 0:
            # The broker itself did not run (stopped, swapped out): that silence was
            # its own, not the monitors'. It does not count against them.
            log.warning("the broker did not run for %.1f s; not counting that against "
                        "monitors", now - self.last_tick)
            for m in self.monitors.values():
                m.last_seen = min(now, m.last_seen + stalled)
            if self.orphan_deadline is not None:
                self.orphan_deadline += stalled
        self.last_tick = now
        for rid, m in list(self.monitors.items()):
            if now - m.last_seen > window:
                self.lose_monitor(now, rid, f"no heartbeat for {now - m.last_seen:.1f} s")
        if now - self.last_heartbeat >= self.config.heartbeat:
            self.last_heartbeat = now
            for m in self.monitors.values():
                if m.reachable:
                    self._send("monitor", m.rid, make(M.HEARTBEAT))
        if self.orphan_deadline is not None and now >= self.orphan_deadline:
            self.orphan_deadline = None
            for monitor_id in list(self.sched.assigned):
                if monitor_id not in self.by_id:
                    for jid in self.sched.of_monitor(monitor_id):
                        self._requeue(self.sched.jobs[jid], False, "its monitor did not come "
                                      "back after a broker restart", monitor_id)
        if self.sched.jobs:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = now
        elif now - self.idle_since >= IDLE_TRUNCATE and self.store.changed_since_truncate():
            self.store.truncate_wal()  # idle a while: no old payload lingers in the WAL
        wall = time.time()
        if wall - self.last_prune > 3600:
            self.last_prune = wall
            pruned = self.store.prune(wall - self.config.retention)
            if pruned:
                log.info("pruned %d finished jobs older than the retention period", pruned)

    def next_wakeup(self, now: float) -> float:
        """Seconds until :meth:`tick` has something to do."""
        started = next(iter(self.starting.values()), now + 1.0) - now
        return max(0.0, min(self.last_heartbeat + self.config.heartbeat - now, 1.0,
                            self.next_ack(now), started))

    # --- events socket

    def on_subscribe(self, key: str, topic: bytes) -> bool:
        """Whether a subscriber authenticated as ``key`` may have ``topic``: only its own."""
        if topic != key.encode() or not self.is_client(key):
            return False
        self.events.setdefault(key, [])  # an empty event tells it the subscription is live
        return True

    # --- dispatch and flush

    def dispatch(self, now: float) -> None:
        """Send queued jobs to monitors with credit, in turn."""
        if not self.sched.queued or not self.monitors:
            return
        monitors = list(self.monitors.values())
        self.rotation = (self.rotation + 1) % len(monitors)
        for m in monitors[self.rotation:] + monitors[:self.rotation]:
            if not self.sched.queued:
                break
            credit = self._credit(m, now)
            if credit <= 0:
                continue
            idle = m.monitor_id not in self.sched.assigned
            jobs = self.sched.take(m.taker, credit)
            if not jobs:
                continue
            if idle:
                m.progress = now
            wall = time.time()
            payloads = [j.payload if j.payload is not None else self.store.payload(j.id)
                        for j in jobs]
            blobs = self._shared_blobs(jobs, m.blobs)
            uses = [[(d, len(blobs[j.owner, d])) for d in j.shared if (j.owner, d) in blobs]
                    for j in jobs]
            acked, m.committed_acks = m.committed_acks[:MAX_BATCH], m.committed_acks[MAX_BATCH:]
            for part in shared_batches([len(p) for p in payloads], uses):
                specs = []
                sent: dict[str, bytes] = {}
                for i in part:
                    j = jobs[i]
                    j.started = wall
                    specs.append({"id": j.id, "name": j.name, "kind": j.kind,
                                  "timeout": j.timeout, "memory": j.memory, "owner": j.owner,
                                  "trusted": not m.anonymous, "isolate": j.isolate,
                                  "attempt": j.attempt,
                                  "retry_on": list(j.retry_on) if j.retries_left else [],
                                  "shared": list(j.shared)})
                    for d, _ in uses[i]:
                        sent.setdefault(d, blobs[j.owner, d])
                    self.starting.pop(j.id, None)  # (dispatched again: due later)
                    self.starting[j.id] = now + ANNOUNCE_DELAY
                self._send("monitor", m.rid, make(
                    M.RUN, payloads[part.start:part.stop] + list(sent.values()), jobs=specs,
                    shared=list(sent), acked=[i for i, _ in acked],
                    attempts=[a for _, a in acked]))
                acked = []
                m.blobs.update(sent)

    def _shared_blobs(self, jobs: list[Job], has: set[str]) -> dict[tuple[str, str], bytes]:
        """The shared blobs of ``jobs`` that the monitor does not have (``has``), from the
        store, each read once. One missing from the store is left out: the job fails
        in its slot, saying which file did not come."""
        out: dict[tuple[str, str], bytes] = {}
        for j in jobs:
            for digest in j.shared:
                if digest not in has and (j.owner, digest) not in out:
                    data = self.store.shared_blob(j.owner, digest)
                    if data is not None:
                        out[j.owner, digest] = data
        return out

    def flush(self, now: float, send_early: Callable[[list[Out]], None] | None = None
              ) -> list[Out]:
        """Dispatch, commit, and return everything to send (acks, events).

        With ``send_early``, jobs dispatched now are handed to it before the commit,
        so a job's way to its monitor does not wait for the disk. That keeps the
        delivery guarantee: a RUN promises nothing to the client. If the broker dies
        before the commit, the job is either unacknowledged (its client sends it
        again) or still queued in the store (the monitor that got it lists it when
        it registers again, and keeps it); so is a job whose start is not stored yet
        (see ANNOUNCE_DELAY). Acknowledgements and final states still leave only
        after the commit."""
        try:
            self.dispatch(now)
            if send_early is not None:
                runs = [o for o in self.outbox if o.msg.type is M.RUN]
                if runs:
                    self.outbox = [o for o in self.outbox if o.msg.type is not M.RUN]
                    send_early(runs)
            self._announce_started(now)
            self.store.commit()
        except sqlite3.Error as e:
            self.reload(now, str(e))
            return []
        self._acknowledge(now)
        out, self.outbox = self.outbox, []
        for owner, records in self.events.items():
            topic = owner.encode()
            if len(records) > 1:
                # a job announced twice in one turn (queued, then dispatched): the
                # last state is all its client needs
                records = list({r[0]["id"]: r for r in records}.values())
            parts = batches([len(b[0]) + len(b[1]) for _, b in records]) or [range(0)]
            for part in parts:
                seq = self.event_seq.get(owner, 0) + 1
                self.event_seq[owner] = seq
                out.append(Out("event", topic, _records_message(
                    M.EVENT, [records[i] for i in part], seq=seq, epoch=self.config.epoch)))
        self.events = {}
        return out

    def _acknowledge(self, now: float) -> None:
        """After a commit: the results stored since are acknowledged, on the next RUN
        to their monitor or, after ACK_DELAY (at once when it is stopping), in a
        RESULT_ACK. Either way one message fewer per job than an answer per RESULT."""
        for rid, m in list(self.acking.items()):
            if self.monitors.get(rid) is not m:  # gone: it sends its results again
                del self.acking[rid]
                continue
            if m.acks:
                if not m.committed_acks:
                    m.acks_since = now
                m.committed_acks.extend(m.acks)
                m.acks = []
            if m.committed_acks and (m.answer_due or m.stopping
                                     or now - m.acks_since >= ACK_DELAY):
                acked, m.committed_acks = m.committed_acks, []
                for part in batches([0] * len(acked)):
                    done = acked[part.start:part.stop]
                    self._send("monitor", m.rid, make(M.RESULT_ACK, ids=[i for i, _ in done],
                                                      attempts=[a for _, a in done]))
            if m.answer_due:
                m.answer_due = False
                self._send("monitor", m.rid, make(M.RESULT_ACK, ids=[], attempts=[]))
            if not m.committed_acks:
                del self.acking[rid]

    def _announce_started(self, now: float) -> None:
        """Store and announce the start of the jobs dispatched ANNOUNCE_DELAY ago that
        are still running there (before the commit; the records leave after it)."""
        started: dict[str, tuple[WorkerRef, list[tuple[str, float]]]] = {}
        while self.starting:
            jid, due = next(iter(self.starting.items()))
            if due > now:
                break
            del self.starting[jid]
            job = self.sched.jobs.get(jid)
            m = None if job is None else self._holder(job)
            if job is not None and m is not None:
                ref, jobs = started.setdefault(m.monitor_id, (m.ref(), []))
                jobs.append((jid, job.started or time.time()))
                self._announce(job.owner, _open_record(job, None, ref))
        for ref, jobs in started.values():
            self.store.start(jobs, ref)

    def next_ack(self, now: float) -> float:
        """Seconds until a monitor's acknowledgements are due (see :meth:`_acknowledge`)."""
        due = [m.acks_since + ACK_DELAY - now for m in self.acking.values()
               if m.committed_acks]
        return max(0.0, min(due)) if due else 1.0


def prefetch(slots: int, run_time: float | None, least: int) -> int:
    """How many jobs a monitor with ``slots`` slots is sent beyond its free ones: enough
    to keep the slots busy for PREFETCH_TIME at its jobs' average ``run_time``, and at
    least ``least`` (also before any job of its has run)."""
    if run_time is None:
        return least
    per_slot = PREFETCH_TIME / (max(0.0, run_time) + SLOT_TURNAROUND)
    return max(least, min(MAX_PREFETCH, int(slots * per_slot)))


def moving_average(average: float | None, value: float) -> float:
    """``average`` moved toward ``value`` by RUN_TIME_WEIGHT (``value`` if there is none)."""
    if average is None:
        return value
    return average + RUN_TIME_WEIGHT * (value - average)


def _open_record(job: Job, reason: str | None, worker: WorkerRef | None = None) -> Record:
    """The record of a job that is not final (nothing to carry but its state)."""
    queued = job.where is Where.QUEUED
    return ({"id": job.id, "name": job.name, "kind": job.kind,
             "status": (Status.NEW if queued else Status.PROCESSING).value,
             "priority": job.priority, "created": job.created,
             "started": None if queued else job.started, "finished": None,
             "failures": job.failures, "attempt": job.attempt, "error": None,
             "worker": None if worker is None else {"id": worker.id, "host": worker.host,
                                                    "key": worker.key,
                                                    "anonymous": worker.anonymous},
             "encoding": "none", "result_from": "none", "sealed": False, "reason": reason,
             "by_ref": False},
            [b"", b""])


def _records_message(type_: M, records: list[Record], **header: Any) -> Message:
    blobs: list[bytes] = []
    for _, b in records:
        blobs.extend(b)
    return make(type_, blobs, jobs=[r[0] for r in records], **header)
