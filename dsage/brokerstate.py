"""The broker's tables and job state machine, apart from sockets.

:class:`BrokerState` takes decoded messages with the time and the sender's
authenticated key, updates the store and its in-memory tables, and queues what
to send in an outbox. :meth:`BrokerState.flush` dispatches queued jobs to
monitors with free slots, commits the store, and hands back the outbox, so
nothing is acknowledged or announced before it is durable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from . import __version__
from .protocol import FINAL, MAX_BATCH, M, Message, Status, error, make
from .store import Outcome, Record, Store, WorkerRef

log = logging.getLogger("dsage.broker")

Dest = Literal["client", "monitor", "event"]


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
    inflight: set[str] = field(default_factory=set)
    stopping: bool = False
    #: False once its connection is gone: it gets no jobs, and is lost after the
    #: liveness window unless it registers again (from a new connection)
    reachable: bool = True

    @property
    def credit(self) -> int:
        if self.stopping or not self.reachable:
            return 0
        return max(0, self.slots - len(self.inflight))

    def ref(self) -> WorkerRef:
        return WorkerRef(self.monitor_id, self.host, self.key, self.anonymous)


class BrokerState:
    """Everything the broker knows, and the rules for changing it."""

    def __init__(self, store: Store, config: BrokerConfig, now: float,
                 is_trusted: Callable[[str], bool]) -> None:
        self.store = store
        self.config = config
        self.is_trusted = is_trusted
        self.monitors: dict[bytes, MonitorEntry] = {}
        self.outbox: list[Out] = []
        self.events: dict[str, list[Record]] = {}
        self.event_seq: dict[str, int] = {}
        #: job id -> monitor id, for jobs taken from a monitor declared lost,
        #: whose late result is still welcome while the job is open
        self.lost_assignments: dict[str, str] = {}
        self.queued, self.queued_anon, self.queued_by_owner = store.queued_counts()
        #: jobs found processing at start, waiting for their monitor to come back
        grace = config.heartbeat * config.liveness * 2
        self.orphans: dict[str, str | None] = dict(store.processing())
        self.orphan_deadline = now + grace
        self.last_heartbeat = now
        self.last_tick = now
        self.last_prune = 0.0
        self.rotation = 0

    # --- helpers

    def _send(self, dest: Dest, to: bytes, msg: Message) -> None:
        self.outbox.append(Out(dest, to, msg))

    def _announce(self, owner: str, *records: Record) -> None:
        self.events.setdefault(owner, []).extend(records)

    def _unqueue(self, owner: str, anonymous_ok: bool) -> None:
        self.queued -= 1
        self.queued_anon -= int(anonymous_ok)
        self.queued_by_owner[owner] = self.queued_by_owner.get(owner, 1) - 1

    def _enqueue(self, owner: str, anonymous_ok: bool) -> None:
        self.queued += 1
        self.queued_anon += int(anonymous_ok)
        self.queued_by_owner[owner] = self.queued_by_owner.get(owner, 0) + 1

    def _announce_ids(self, ids: list[str]) -> None:
        for owner, rec in self.store.owned_records(ids):
            self._announce(owner, rec)

    # --- clients

    def on_client(self, now: float, rid: bytes, key: str, msg: Message) -> None:
        h = msg.header
        if not self.is_trusted(key):
            self._unauthorized_client(rid, msg)
            return
        if msg.type is M.HELLO:
            self._send("client", rid, make(
                M.WELCOME, req=h["req"], version=__version__, key=key, epoch=self.config.epoch,
                heartbeat=self.config.heartbeat, max_message_size=self.config.max_message_size))
        elif msg.type is M.SUBMIT:
            self._submit(now, rid, key, h, msg.blobs)
        elif msg.type is M.KILL:
            self._kill(now, key, h["ids"])
            self._reply_records(rid, key, h["req"], h["ids"])
        elif msg.type is M.QUERY:
            self._reply_records(rid, key, h["req"], h["ids"])
        elif msg.type is M.LIST:
            status = None if h["status"] is None else Status(h["status"])
            recs = self.store.list(key, status, MAX_BATCH)
            self._send("client", rid, _records_message(M.JOBS, recs, req=h["req"], missing=[]))
        elif msg.type is M.WORKERS:
            self._send("client", rid, make(M.WORKER_LIST, req=h["req"], workers=[
                {"id": m.monitor_id, "host": m.host, "pid": m.pid, "slots": m.slots,
                 "busy": len(m.inflight), "anonymous": m.anonymous, "tags": m.tags,
                 "key": m.key} for m in self.monitors.values()]))
        elif msg.type is M.PING:
            # the last event sequence number of this key: a client that has not
            # seen it (an event was dropped) asks for its jobs' state
            self._send("client", rid, make(M.PONG, seq=self.event_seq.get(key, 0),
                                           epoch=self.config.epoch))

    def _unauthorized_client(self, rid: bytes, msg: Message) -> None:
        """A connection made with a key that has since been removed: refuse what it asks
        (jobs one by one, so the client can fail them)."""
        text = "this client's key is no longer authorized on this broker"
        if msg.type is M.SUBMIT:
            self._send("client", rid, make(M.ACK, req=msg.header["req"], ids=[], errors=[
                {"id": s["id"], "code": "unauthorized", "message": text}
                for s in msg.header["jobs"]]))
        else:
            self._send("client", rid, error("unauthorized", text, msg.header.get("req")))

    def _submit(self, now: float, rid: bytes, key: str, h: dict[str, Any],
                payloads: list[bytes]) -> None:
        specs = h["jobs"]
        wall = time.time()  # stored times are wall-clock; ``now`` is only for liveness
        cap = self.config.max_queued_per_client
        ids: list[str] = []
        errors: list[dict[str, str]] = []
        queued: list[Record] = []
        for spec, payload in zip(specs, payloads):
            jid = spec["id"]
            if self.queued_by_owner.get(key, 0) < cap and self.store.insert(
                    key, spec, payload, wall):
                self._enqueue(key, spec["anonymous_ok"])
                ids.append(jid)
                queued.append(_open_record(jid, spec["name"], spec["kind"], Status.NEW,
                                           spec["priority"], wall, 0))
                continue
            owner = self.store.owner_of([jid]).get(jid)
            if owner == key:
                ids.append(jid)  # a resend: already stored
            elif owner is not None:
                errors.append({"id": jid, "code": "exists", "message": "job id in use"})
            else:
                errors.append({"id": jid, "code": "quota", "message":
                               f"this client already has {cap} queued jobs "
                               f"(the broker's --max-queued-per-client)"})
        self._send("client", rid, make(M.ACK, req=h["req"], ids=ids, errors=errors))
        if queued:
            self._announce(key, *queued)

    def _kill(self, now: float, key: str, ids: list[str]) -> None:
        for jid in ids:
            state = self.store.state(jid)
            if state is None or state.owner != key or state.status in FINAL:
                continue  # another client's job is invisible to this one
            outcome = Outcome(Status.KILLED, "killed by its owner", "none", "none", False,
                              None, time.time(), b"", b"")
            done = self.store.finish(jid, outcome)
            if done:
                self._announce(*done)
                if state.status is Status.NEW:
                    self._unqueue(key, state.anonymous_ok)
                else:
                    self._cancel_on_monitor(jid, state.worker_id, "killed")
                self.orphans.pop(jid, None)
                self.lost_assignments.pop(jid, None)

    def _cancel_on_monitor(self, job_id: str, monitor_id: str | None, reason: str) -> None:
        for m in self.monitors.values():
            if job_id in m.inflight or m.monitor_id == monitor_id:
                self._send("monitor", m.rid, make(M.CANCEL, ids=[job_id], reason=reason))

    def _reply_records(self, rid: bytes, key: str, req: int, ids: list[str]) -> None:
        found = self.store.records(ids, owner=key)
        missing = [i for i in ids if i not in found]
        self._send("client", rid, _records_message(
            M.JOBS, list(found.values()), req=req, missing=missing))

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
            self._results(now, entry, msg)
        elif msg.type is M.STOPPING:
            entry.stopping = True
        elif msg.type is M.RELEASE:
            h = msg.header
            for jid in h["ids"]:
                if jid in entry.inflight:
                    entry.inflight.discard(jid)
                    self._requeue(jid, h["count_failure"], h["reason"], now)

    def _register(self, now: float, rid: bytes, key: str, anonymous: bool,
                  h: dict[str, Any]) -> None:
        # A monitor that reconnected keeps its identity. Jobs its old entry had
        # that it no longer runs were lost in transit or finished with the result
        # still to come: re-queue them, but welcome their late results.
        running = set(h["running"])
        for old_rid, old in list(self.monitors.items()):
            if old.monitor_id == h["monitor"] and old.key == key:
                del self.monitors[old_rid]
                for jid in old.inflight - running:
                    self.lost_assignments[jid] = old.monitor_id
                    self._requeue(jid, False, "its monitor reconnected without it", now)
        entry = MonitorEntry(rid, key, anonymous, h["monitor"], h["host"], h["pid"],
                             h["slots"], h["tags"], now)
        cancel: list[str] = []
        adopted: list[str] = []
        for jid in h["running"]:
            if self._adopt(entry, jid):
                adopted.append(jid)
            else:
                cancel.append(jid)
        self.monitors[rid] = entry
        if adopted:
            self._announce_ids(adopted)
        log.info("monitor %s registered from %s (%d slots%s, %d running)", entry.monitor_id,
                 entry.host, entry.slots, ", anonymous" if anonymous else "", len(adopted))
        self._send("monitor", rid, make(M.REGISTERED, heartbeat=self.config.heartbeat,
                                        liveness=self.config.liveness, cancel=cancel))

    def _adopt(self, entry: MonitorEntry, jid: str) -> bool:
        """Whether a job a (re)registering monitor says it runs may go on there."""
        state = self.store.state(jid)
        if state is None or state.status in FINAL:
            return False
        if entry.anonymous and not state.anonymous_ok:
            return False
        if state.status is Status.PROCESSING:
            if state.worker_id != entry.monitor_id and any(
                    m.monitor_id == state.worker_id for m in self.monitors.values()):
                return False  # running elsewhere already
        else:  # requeued while the monitor was away: take it back out of the queue
            self._unqueue(state.owner, state.anonymous_ok)
        self.store.start([jid], entry.ref(), time.time())
        entry.inflight.add(jid)
        self.orphans.pop(jid, None)
        self.lost_assignments.pop(jid, None)
        return True

    def _results(self, now: float, entry: MonitorEntry, msg: Message) -> None:
        results = msg.header["results"]
        acked: list[str] = []
        for i, r in enumerate(results):
            jid = r["id"]
            acked.append(jid)
            mine = jid in entry.inflight
            late = entry.monitor_id in (self.lost_assignments.get(jid), self.orphans.get(jid))
            entry.inflight.discard(jid)
            if not (mine or late):
                continue  # not this monitor's job (any more): ignore
            outcome = Outcome(Status(r["status"]), r["error"], r["encoding"], r["result_from"],
                              r["sealed"], r["started"], r["finished"],
                              msg.blobs[2 * i], msg.blobs[2 * i + 1])
            if late:
                self._take_back(jid, entry)
            done = self.store.finish(jid, outcome, entry.ref())
            if done:
                self._announce(*done)
            self.lost_assignments.pop(jid, None)
            self.orphans.pop(jid, None)
        self._send("monitor", entry.rid, make(M.RESULT_ACK, ids=acked))

    def _take_back(self, jid: str, entry: MonitorEntry) -> None:
        """A late result is about to close a job that was re-queued: undo what the
        re-queue started (its place in the queue, or its run on another monitor)."""
        state = self.store.state(jid)
        if state is None:
            return
        if state.status is Status.NEW:
            self._unqueue(state.owner, state.anonymous_ok)
        elif state.status is Status.PROCESSING and state.worker_id != entry.monitor_id:
            self._cancel_on_monitor(jid, state.worker_id, "finished elsewhere")

    def _requeue(self, jid: str, count_failure: bool, reason: str, now: float) -> None:
        new = self.store.requeue(jid, count_failure, self.config.failure_limit, reason,
                                 time.time())
        if new is Status.NEW:
            state = self.store.state(jid)
            if state is not None:
                self._enqueue(state.owner, state.anonymous_ok)
        if new is not None:
            self._announce_ids([jid])

    def unreachable(self, rid: bytes) -> None:
        """A monitor's connection is gone. It often comes back at once (a reconnect,
        a broker that was stalled), registering with the jobs it still runs, so wait
        for that, or for the liveness window, before re-queueing its jobs."""
        entry = self.monitors.get(rid)
        if entry is not None and entry.reachable:
            entry.reachable = False
            log.info("monitor %s on %s disconnected; waiting for it to register again",
                     entry.monitor_id, entry.host)

    def lose_monitor(self, now: float, rid: bytes, reason: str) -> None:
        """Forget a monitor and put its jobs back in the queue, counting a failure."""
        entry = self.monitors.pop(rid, None)
        if entry is None:
            return
        log.warning("monitor %s on %s lost (%s); re-queueing %d jobs", entry.monitor_id,
                    entry.host, reason, len(entry.inflight))
        for jid in entry.inflight:
            self.lost_assignments[jid] = entry.monitor_id
            self._requeue(jid, True, f"worker {entry.host} lost", now)

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
        self.last_tick = now
        for rid, m in list(self.monitors.items()):
            if now - m.last_seen > window:
                self.lose_monitor(now, rid, f"no heartbeat for {now - m.last_seen:.1f} s")
        if now - self.last_heartbeat >= self.config.heartbeat:
            self.last_heartbeat = now
            for m in self.monitors.values():
                if m.reachable:
                    self._send("monitor", m.rid, make(M.HEARTBEAT))
        if self.orphans and now >= self.orphan_deadline:
            for jid in list(self.orphans):
                self._requeue(jid, False, "its monitor did not come back after a broker restart",
                              now)
            self.orphans.clear()
        wall = time.time()
        if wall - self.last_prune > 3600:
            self.last_prune = wall
            pruned = self.store.prune(wall - self.config.retention)
            if pruned:
                log.info("pruned %d finished jobs older than the retention period", pruned)

    def next_wakeup(self, now: float) -> float:
        """Seconds until :meth:`tick` has something to do."""
        return max(0.0, min(self.last_heartbeat + self.config.heartbeat - now, 1.0))

    # --- events socket

    def on_subscribe(self, key: str, topic: bytes) -> bool:
        """Whether a subscriber authenticated as ``key`` may have ``topic``: only its own."""
        if topic != key.encode():
            return False
        self.events.setdefault(key, [])  # an empty event tells it the subscription is live
        return True

    # --- dispatch and flush

    def dispatch(self, now: float) -> None:
        monitors = list(self.monitors.values())
        if not monitors or self.queued <= 0:
            return
        self.rotation = (self.rotation + 1) % len(monitors)
        for m in monitors[self.rotation:] + monitors[:self.rotation]:
            if self.queued <= 0:
                break
            credit = m.credit
            if credit <= 0 or (m.anonymous and self.queued_anon <= 0):
                continue
            jobs = self.store.next_queued(min(credit, MAX_BATCH), m.anonymous)
            if not jobs:
                continue
            ids = [j.id for j in jobs]
            wall = time.time()
            worker = m.ref()
            self.store.start(ids, worker, wall)
            m.inflight.update(ids)
            specs, blobs = [], []
            for j in jobs:
                self._unqueue(j.owner, j.anonymous_ok)
                specs.append({"id": j.id, "name": j.name, "kind": j.kind, "timeout": j.timeout,
                              "memory": j.memory, "owner": j.owner,
                              "trusted": not m.anonymous})
                blobs.append(j.payload)
                self._announce(j.owner, _open_record(j.id, j.name, j.kind, Status.PROCESSING,
                                                     j.priority, j.created, j.failures,
                                                     wall, worker))
            self._send("monitor", m.rid, make(M.RUN, blobs, jobs=specs))

    def flush(self, now: float) -> list[Out]:
        """Dispatch, commit, and return everything to send (acks, jobs, events)."""
        self.dispatch(now)
        self.store.commit()
        out, self.outbox = self.outbox, []
        for owner, records in self.events.items():
            seq = self.event_seq.get(owner, 0) + 1
            self.event_seq[owner] = seq
            out.append(Out("event", owner.encode(), _records_message(
                M.EVENT, records, seq=seq, epoch=self.config.epoch)))
        self.events = {}
        return out


def _open_record(job_id: str, name: str | None, kind: str, status: Status, priority: int,
                 created: float, failures: int, started: float | None = None,
                 worker: WorkerRef | None = None) -> Record:
    """The record of a job that is not final (nothing to carry but its state)."""
    return ({"id": job_id, "name": name, "kind": kind, "status": status.value,
             "priority": priority, "created": created, "started": started, "finished": None,
             "failures": failures, "error": None,
             "worker": None if worker is None else {"id": worker.id, "host": worker.host,
                                                    "key": worker.key,
                                                    "anonymous": worker.anonymous},
             "encoding": "none", "result_from": "none", "sealed": False, "reason": None},
            [b"", b""])


def _records_message(type_: M, records: list[Record], **header: Any) -> Message:
    blobs: list[bytes] = []
    for _, b in records:
        blobs.extend(b)
    return make(type_, blobs, jobs=[r[0] for r in records], **header)
