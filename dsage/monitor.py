"""The monitor (``dsage-worker``): one DEALER to the broker, N worker slots.

Each slot is a long-lived child process (:mod:`dsage.slot`); a kill, a timeout
or a crash costs that slot a respawn, never the monitor. Results are kept
until the broker acknowledges them and are sent again after a reconnect, so a
broker restart loses none. Every job the monitor holds (queued here, running,
or finished with its result unacknowledged) is listed when it registers, so
the broker never runs one of them a second time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import __version__, contain, runas
from .capabilities import offered_tags
from . import keys as keys_mod
from .auth import make_client
from .options import MonitorOptions
from .seal import Sealer, binding
from .slot import (PIPE_LOST, TEMPLATE, FrameError, recv_frame, remove_folder, send_frame,
                   spare_folder)
from .sockets import send_frames, unfound
from .protocol import (
    CHUNK_BYTES, LIVE_BYTES, MAX_BATCH, MAX_LONG_TEXT, MAX_TEXT, MONITOR_REPLIES,
    UPLOAD_BYTES, M, Message, ProtocolError, Status, batch_bytes, batches, clip, decode,
    encode, make,
)
from .words import plural

log = logging.getLogger("dsage.monitor")

#: why the monitor killed a slot that broke its pipe (closed it, or sent a malformed frame)
PIPE_BROKEN = "its pipe to the monitor broke"
#: why a job failed whose slot an OOM killer killed that was not its cap's
OOM_KILLED = ("the job's process was killed by the OOM killer (SIGKILL): memory ran out on "
              "the machine, or in a cgroup the monitor runs in, not at a cap of the slot's")
#: how long a slot whose pipe ended may take to exit before it is killed
REAP_WAIT = 1.0
#: how often what running jobs print is sent on (seconds)
LIVE_INTERVAL = 0.5
#: the longest a finished job's result waits for others to go in one message with it,
#: while jobs queued here keep the slots busy (seconds; see :func:`holding`)
HOLD_TIME = 0.002
#: Seconds after which a job queued here behind the next one to start goes back to
#: the broker, while every slot is busy: the broker sent it on its estimate that the
#: jobs here are short (its STALE_AFTER), and they are not. A monitor keeps the
#: broker's configured prefetch, and gives back the rest for idle monitors to take.
GIVE_BACK_AFTER = 0.05
#: a slot's program: ``python -m dsage.slot`` would run the module a second time, as
#: ``__main__``, after the package's imports had loaded it (and warn about it). ``-c``
#: puts '' (the current folder) first on sys.path; it is made absolute, as ``-m``
#: would, so that modules beside the monitor's working folder stay importable after
#: the slot moves into its job folders (functions pickled by reference)
#: the package's ``__init__`` (the client, ZeroMQ) is not loaded: a bare package
#: module stands in while the slot imports :mod:`dsage.slot`, and is dropped after,
#: so a job's ``import dsage`` gets the real package
_SLOT_MAIN = ("import os, sys, types; sys.path[0] = sys.path[0] or os.getcwd(); "
              "p = types.ModuleType('dsage'); p.__path__ = [sys.argv[-1]]; "
              "sys.modules['dsage'] = p; from dsage.slot import main; "
              "del sys.modules['dsage']; sys.exit(main(sys.argv[1:]))")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
#: how long the monitor waits for the template to fork a slot (the first time, for
#: the template to start)
FORK_WAIT = 5.0
#: spawn failures in a row after which a monitor stops taking jobs for a while
SPAWN_FAILURES = 3
#: the longest pause between tries to start slots that keep failing
MAX_BACKOFF = 30.0
#: the header of a slot's first frame, of its frame after each job, and of the one
#: that asks for a fresh process after a job (see dsage.slot)
_READY_KEYS = frozenset({"ready", "rss"})
_FAILED_KEYS = frozenset({"failed"})
_REPLY_KEYS = frozenset({"id", "status", "error", "encoding", "result_from", "started",
                         "finished", "rss", "retry", "base_rss"})
_REPLACE_KEYS = frozenset({"replace", "id"})
#: a job queued on a monitor: run spec, payload, the shared blobs it uses as (hash,
#: content), when it came
Queued = tuple[dict[str, Any], bytes, list[tuple[str, bytes]], float]


@dataclass
class Slot:
    """A worker slot: its process, pipe and current job."""

    index: int
    #: a process the monitor started, or one forked off the template that it adopted
    proc: subprocess.Popen[bytes] | contain.Adopted
    sock: socket.socket
    capture: Path
    #: the slot's cgroups, one per hierarchy, the one to kill first (none without
    #: cgroups), and a pidfd that is readable once it exits
    groups: tuple[str, ...] = ()
    pidfd: int = -1
    #: its v1 memory cgroup, one of ``groups`` ('' without one)
    memory_group: str = ""
    ready: bool = False
    #: the job the slot was handed, as it was queued (to queue again if the slot never
    #: starts it)
    queued: Queued | None = None
    #: the id of the last job the slot answered for
    last_job: str = ""
    started: float = 0.0
    deadline: float | None = None
    #: why the monitor killed the slot while it ran a job ('killed', 'timeout', ...)
    kill_reason: str | None = None
    jobs_done: int = 0
    base_rss: int = 0
    #: why the slot could not start, as it said
    failure: str = ""
    #: what the job did that killed its slot, when the monitor can tell (see _why_killed)
    cause: str = ""
    #: the key whose jobs this slot process runs: it never runs another owner's
    owner: str | None = None
    #: the capture file, open to read what the running job printed so far, and how
    #: much of it was sent
    live_fd: int = -1
    live_offset: int = 0

    @property
    def job(self) -> dict[str, Any] | None:
        """The run spec of the slot's job, if it has one."""
        return None if self.queued is None else self.queued[0]

    def kill(self) -> None:
        """Kill the slot process and every descendant of it: its cgroup at once, and
        (with or without one) its process tree, which holds the job's orphans too."""
        if self.groups:
            contain.kill_cgroup(self.groups[0])
        if self.proc.poll() is None:
            contain.kill_tree(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Monitor:
    """A running monitor; :meth:`run` until stopped."""

    def __init__(self, options: MonitorOptions) -> None:
        self.options = options
        self.home = keys_mod.home(options.home)
        #: whom the slots run jobs as (None: this process's user)
        self.run_as = runas.resolve(options.run_as, options.anonymous)
        if options.anonymous:
            if options.server_key is None:
                raise keys_mod.BadKey("an anonymous worker needs the broker's public key "
                                      "(--server-key FILE_OR_Z85)")
            public, secret = zmq.curve_keypair()
            self.keys = keys_mod.Keypair(public, secret)
        else:
            self.keys = keys_mod.load_keypair(self.home)
        self.server_key = options.server_key or self.keys.public
        self.sealer = Sealer(self.keys)
        #: most blob bytes per message, within the broker's per-message budget
        self._batch_bytes = batch_bytes(options.max_message_size)
        self.tmpdir = self.home / "tmp_worker_files"
        if self.run_as is not None:  # a folder of the run-as user's, outside the home
            self.tmpdir = Path(runas.working_folder(tempfile.gettempdir(), self.run_as))
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        #: the tags offered: ``--tags`` and what is installed (povray, sage)
        self.tags = offered_tags(options.tags, detect=not options.no_detect)
        self.monitor_id = uuid.uuid4().hex
        #: when the broker was last heard from on any connection (for ``--idle-exit``)
        self.last_contact = time.monotonic()
        #: whether the broker's host name was looked up since the monitor last registered
        #: (once per outage: a resolver that does not answer blocks the loop)
        self.host_asked = False
        self.host = socket.gethostname()
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.poller = zmq.Poller()
        self.sock: zmq.Socket[bytes] | None = None
        self.events: zmq.Socket[bytes] | None = None
        self.registered = False
        self.registering = False
        #: the broker's refusal of this anonymous worker was logged
        self._busy_said = False
        #: the broker refused this monitor for good (another dsage version): it exits
        #: with status 2
        self.refused = False
        self.last_heard = time.monotonic()
        self.last_sent = 0.0
        self.last_live = 0.0
        #: set by SIGTERM/SIGINT; the loop then calls :meth:`begin_stop`
        self.stop_requested = False
        #: a second stop request (SIGTERM or Ctrl-C again): no grace, give jobs back now
        self.hurry = False
        self.stopping = False
        #: the broker answered a message sent after STOPPING: no RUN is on its way
        self.stop_confirmed = False
        self.stop_deadline: float | None = None
        #: jobs received and not started yet, in order (the broker may send more
        #: jobs than there are free slots)
        self.pending: OrderedDict[str, Queued] = OrderedDict()
        #: jobs kept queued here when the others go back (the broker's ``--prefetch``)
        self.keep_queued = 1
        #: finished jobs whose result the broker has not acknowledged: (item, result, output)
        self.unacked: dict[str, tuple[dict[str, Any], bytes, bytes]] = {}
        #: results to send at the end of this loop turn, or a little later (an ordered
        #: set; see :func:`holding`), and when the first of them was queued
        self.outgoing: dict[str, None] = {}
        self.held_since = 0.0
        #: large results being uploaded: job id -> (part, offset of the chunk in flight)
        self.uploads: dict[str, tuple[str, int]] = {}
        self.stalled_uploads: dict[str, float] = {}
        self.slots: list[Slot] = []
        #: shared blobs (attached files) received, which the broker then leaves out
        self.blobs = BlobCache()
        #: slots waiting to be started again (spawns kept failing): index -> when
        self.respawn_at: dict[int, float] = {}
        self.spawn_failures = 0
        #: the monitor stepped back from taking jobs (its slots cannot start)
        self.paused = False
        self._generation = 0
        #: the never-used slot process that slots are forked from (see :meth:`_template`)
        self.template: Slot | None = None
        self._contain()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.poller.register(self._wake_r.fileno(), zmq.POLLIN)
        self._connect()
        if options.isolate:
            self._start_template()
        for i in range(options.workers):
            self.slots.append(self._spawn(i))
        log.info("dsage-worker %s: %s, broker %s:%d%s%s", self.monitor_id[:8],
                 plural(options.workers, "slot"), options.server, options.port + 1,
                 " (anonymous)" if options.anonymous else "",
                 f", jobs run as {self.run_as.name}" if self.run_as else "")

    def _contain(self) -> None:
        """Make this monitor's cgroups (as :func:`contain.choose` finds, or
        ``DSAGE_CGROUP`` asks), after killing what is left in those of monitors that
        are gone, and start its watchdog."""
        self.groups: list[str] = []
        self.memory_group = ""
        self.watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_pipe = -1
        self._oom_seen = contain.kernel_oom_kills()
        backend = contain.choose()
        if backend is None:
            log.warning("DSAGE_CGROUP=%s is not possible here; choosing another way",
                        os.environ.get("DSAGE_CGROUP"))
            backend = contain.choose("auto")
            assert backend is not None  # 'none' always is
        self.backend = backend
        if self.options.slot_memory and backend.memory is None:
            log.warning("--slot-memory is ignored: no writable cgroup v1 memory hierarchy")
        if backend.kind == "none":
            log.info("no cgroups: a job's descendants are tracked as its slot's process tree")
            return
        stale = sum(contain.sweep_stale(base) for base in backend.bases)
        if stale:
            log.warning("killed what was left in %d cgroups of monitors that are gone", stale)
        name = contain.monitor_group_name()
        self.groups = [g for g in backend.groups(name) if contain.make_cgroup(g)]
        if backend.memory and os.path.join(backend.memory, name) in self.groups:
            self.memory_group = os.path.join(backend.memory, name)
        self.watchdog, self._watchdog_pipe = contain.start_watchdog(self.groups)
        log.info("slots are contained by cgroups %s: %s", backend.kind, ", ".join(self.groups))

    # --- broker connection

    def _connect(self) -> None:
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.close(linger=0)
        if self.events is not None:
            self.poller.unregister(self.events)
            self.events.close(linger=0)
        sock = self.ctx.socket(zmq.DEALER)
        make_client(sock, self.keys, self.server_key, self.options.max_message_size)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        self.events = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_DISCONNECTED)
        sock.connect(f"tcp://{self.options.server}:{self.options.port + 1}")
        self.sock = sock
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.events, zmq.POLLIN)
        self.registered = False
        self.registering = False
        self.last_heard = time.monotonic()

    def _send(self, msg: Message) -> bool:
        assert self.sock is not None
        try:
            send_frames(self.sock, encode(msg))
        except zmq.Again:
            return False  # not connected: what matters is sent again after registering
        self.last_sent = time.monotonic()
        return True

    def _register(self) -> None:
        self.registering = self._send(make(
            M.REGISTER, monitor=self.monitor_id, host=self.host, pid=os.getpid(),
            slots=len(self.slots), tags=self.tags, running=self._held(),
            version=__version__, max_message_size=self.options.max_message_size))

    def _running(self) -> list[str]:
        return [s.job["id"] for s in self.slots if s.job is not None]

    def _held(self) -> list[str]:
        """Every job this monitor holds, for REGISTER's ``running``: running, queued
        here, and finished with the result unacknowledged. The broker keeps the open
        ones here (the result sent after REGISTERED closes those that finished) and
        answers the others in ``cancel``; a job left off would be run again. Past
        the protocol's limit of ids, the finished ones are left off first: their
        results are still accepted late, and a job sent again whose result is held
        here is answered with that result, not run."""
        held = list(dict.fromkeys([*self._running(), *self.pending, *self.unacked]))
        if len(held) > MAX_BATCH:
            log.warning("holding %d jobs; registering with the first %d", len(held), MAX_BATCH)
        return held[:MAX_BATCH]

    def _on_socket_event(self) -> None:
        assert self.events is not None
        while True:
            try:
                ev = recv_monitor_message(self.events, zmq.NOBLOCK)
            except zmq.Again:
                return
            if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                log.info("connected to the broker; registering")
                self._busy_said = False
                self._register()
            elif ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH and self.options.anonymous:
                if not self._busy_said:  # said once: it is retried every second
                    log.warning("the broker refused this anonymous worker (status %s): it "
                                "does not allow anonymous workers (--allow-anonymous), or "
                                "has as many anonymous connections as it takes "
                                "(--max-anonymous-connections); trying again", ev["value"])
                self._busy_said = True
            elif ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                log.error("the broker rejected this worker's key (status %s): add it with "
                          "`dsage keys add NAME '%s' --role worker` on the broker, or start "
                          "the broker with --allow-anonymous and this worker with --anonymous",
                          ev["value"], self.keys.public.decode())
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                log.warning("disconnected from the broker; reconnecting")
                self.registered = False

    def _on_broker(self) -> None:
        assert self.sock is not None
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.last_heard = self.last_contact = time.monotonic()
            try:
                msg = decode(frames, MONITOR_REPLIES)
            except ProtocolError as e:
                log.warning("bad message from the broker: %s", e)
                continue
            self._handle(msg)

    def _handle(self, msg: Message) -> None:
        h = msg.header
        if msg.type is M.REGISTERED:
            self.registered, self.registering = True, False
            self.host_asked = False
            self.keep_queued = h.get("prefetch", 1)
            for jid in h["cancel"]:
                self._cancel(jid, "taken back by the broker")
            if self.stopping:
                self._announce_stop()  # a new registration starts with credit
            elif self.paused:
                self._send(make(M.STOPPING))
            self._resend_unacked()
        elif msg.type is M.RUN:
            self._acknowledged(h["acked"], h["attempts"])
            n = len(h["jobs"])
            shared = dict(zip(h["shared"], msg.blobs[n:]))
            self.blobs.add(shared)
            self._take_jobs(h["jobs"], msg.blobs[:n], shared)
            if self.paused and self.pending:
                self._release(list(self.pending), "its monitor cannot start worker slots")
                self.pending.clear()
        elif msg.type is M.CANCEL:
            for jid in h["ids"]:
                self._cancel(jid, h["reason"])
        elif msg.type is M.PUT_ACK:
            self._on_put_ack(h)
        elif msg.type is M.SHUTDOWN:
            self._shutdown(h["reason"])
        elif msg.type is M.RESULT_ACK:
            self._acknowledged(h["ids"], h["attempts"])
            if not h["ids"] and self.stopping:
                self.stop_confirmed = True  # the answer to the empty RESULT after STOPPING
        elif msg.type is M.ERROR:
            if h["code"] == "version":  # a broker of another dsage version: nothing to do
                log.error("the broker refused this worker: %s; stopping", h["message"])
                self.refused = True
                self.request_stop()
                self.request_stop()  # no grace: it runs nothing for this broker
            elif h["code"] == "unregistered":
                self.registered = False
                if not self.registering:  # an answer to what we sent before registering
                    self._register()
            else:
                if h["code"] == "unauthorized":  # refused: register again once allowed
                    self.registered = self.registering = False
                log.warning("broker error: %s", h["message"])

    def _acknowledged(self, ids: list[str], attempts: list[int]) -> None:
        """The broker stored these results (of these runs): they need not be kept."""
        for jid, attempt in zip(ids, attempts):
            held = self.unacked.get(jid)
            if held is not None and held[0]["attempt"] == attempt:  # not a later run's
                del self.unacked[jid]
                self.uploads.pop(jid, None)

    def _take_jobs(self, specs: list[dict[str, Any]], payloads: list[bytes],
                   shared: dict[str, bytes]) -> None:
        """Queue the jobs of a RUN. A job whose result is held here already gets that
        result again instead of a second run, one queued or running here is not
        queued twice, and jobs that reach a stopping monitor (sent before the broker
        had its STOPPING) go back at once, counting no failure."""
        running = set(self._running())
        now = time.monotonic()
        give_back = []
        lacking: dict[str, list[str]] = {}
        for spec, payload in zip(specs, payloads):
            jid = spec["id"]
            held = self.unacked.get(jid)
            if held is not None and held[0]["attempt"] != spec["attempt"]:
                # the broker had that result and re-queued the job for another attempt
                del self.unacked[jid]
                self.uploads.pop(jid, None)
                held = None
            if held is not None:
                self._queue_result(jid)
            elif jid in self.pending or jid in running:
                continue
            elif self.stopping:
                give_back.append(jid)
            else:
                found = {d: shared.get(d) or self.blobs.get(d) for d in spec["shared"]}
                missing = [d for d, b in found.items() if b is None]
                if missing:
                    lacking[jid] = missing  # dropped from the cache: the broker resends
                else:
                    self.pending[jid] = (spec, payload,
                                         [(d, b) for d, b in found.items() if b is not None],
                                         now)
        if give_back:
            self._release(give_back, "sent to a monitor that is stopping")
        if lacking:
            self._release(list(lacking), "its monitor no longer had an attached file",
                          missing=sorted({d for ds in lacking.values() for d in ds}))

    def _resend_unacked(self) -> None:
        self._send_results(list(self.unacked))

    def _send_results(self, ids: list[str]) -> None:
        """Send the held results of ``ids`` (those still unacknowledged), split into
        messages within the protocol's item and byte limits; large ones are uploaded
        in chunks first (their RESULT follows the last chunk)."""
        held = []
        for jid in ids:
            if jid not in self.unacked:
                continue
            _, result, output = self.unacked[jid]
            if len(result) + len(output) > min(UPLOAD_BYTES, self._batch_bytes):
                self._upload(jid, "result", 0)  # (again) from the start
            else:
                held.append(self.unacked[jid])
        for part in batches([len(result) + len(output) for _, result, output in held],
                            MAX_BATCH, self._batch_bytes):
            blobs: list[bytes] = []
            for _, result, output in held[part.start:part.stop]:
                blobs += [result, output]
            self._send(make(M.RESULT, blobs,
                            results=[item for item, _, _ in held[part.start:part.stop]]))

    def _upload(self, jid: str, part: str, offset: int) -> None:
        """Send one chunk of a large result (one in flight per job); after the last
        chunk of the output, the RESULT itself, marked ``staged``."""
        item, result, output = self.unacked[jid]
        data = result if part == "result" else output
        if offset >= len(data) and part == "result":
            part, offset, data = "output", 0, output
        if offset >= len(data):
            self.uploads.pop(jid, None)
            self._send(make(M.RESULT, [b"", b""], results=[{**item, "staged": True}]))
            return
        self.uploads[jid] = (part, offset)
        self._send(make(M.PUT, [data[offset:offset + CHUNK_BYTES]], id=jid, part=part,
                        offset=offset, total=len(data)))

    def _on_put_ack(self, h: dict[str, Any]) -> None:
        jid = h["id"]
        if self.uploads.get(jid, ("", -1))[0] != h["part"] or jid not in self.unacked:
            return  # an answer to an upload restarted since, or finished
        if h["gone"]:  # not this monitor's job any more: the RESULT says so
            self._upload(jid, "output", len(self.unacked[jid][2]))
        elif h["next"] == self.uploads[jid][1]:
            self.stalled_uploads[jid] = time.monotonic() + self.options.heartbeat
        else:
            self._upload(jid, h["part"], h["next"])

    def _retry_uploads(self, now: float) -> None:
        """Chunks the broker could not keep (a full disk) are sent again a heartbeat later."""
        for jid, when in list(self.stalled_uploads.items()):
            if now >= when:
                del self.stalled_uploads[jid]
                if jid in self.uploads and jid in self.unacked:
                    self._upload(jid, *self.uploads[jid])

    def _queue_result(self, jid: str) -> None:
        if not self.outgoing:
            self.held_since = time.monotonic()
        self.outgoing[jid] = None

    def _flush_results(self, now: float) -> None:
        """Send the results held (when not registered, they go after REGISTERED), unless
        they are :func:`holding` for more (never while stopping)."""
        if self.outgoing and (self.stopping or not holding(
                len(self.outgoing), len(self.pending), self.held_since, now)):
            ids, self.outgoing = list(self.outgoing), {}
            if self.registered:
                self._send_results(ids)

    # --- slots

    def _spawn(self, index: int, template: bool = False) -> Slot:
        """Start slot ``index``: forked off the template when there is one (its imports
        are paid once), else a process of its own; with ``template``, start the template
        itself (never polled: it only answers :meth:`_fork`)."""
        try:
            self.tmpdir.mkdir(parents=True, exist_ok=True)  # again, if a job removed it
        except OSError:
            pass  # the slot says why it cannot start
        parent, child = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET if template else socket.SOCK_STREAM)
        capture = self.tmpdir / f".slot-{self.monitor_id[:8]}-{index}.out"
        self._generation += 1
        name = f"t{self._generation}" if template else f"s{index}-{self._generation}"
        groups = tuple(os.path.join(g, name) for g in self.groups if contain.make_cgroup(
            os.path.join(g, name), self.options.slot_memory if g == self.memory_group else None))
        memory_group = next((g for g in groups if g.startswith(self.memory_group + "/")), "") \
            if self.memory_group else ""
        adopted = None if template else self._fork(child, capture, groups)
        proc: subprocess.Popen[bytes] | contain.Adopted
        if adopted is not None:
            proc = adopted
        else:
            proc = subprocess.Popen(
                [sys.executable, "-c", _SLOT_MAIN, str(child.fileno()),
                 TEMPLATE if template else str(capture), str(self.tmpdir),
                 str(self.options.priority), ",".join(groups),
                 self.run_as.name if self.run_as else "", _PACKAGE_DIR],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, process_group=0)
        child.close()
        slot = Slot(index, proc, parent, capture, groups, memory_group=memory_group)
        if template:
            return slot
        self.poller.register(parent.fileno(), zmq.POLLIN)
        try:
            slot.pidfd = os.pidfd_open(proc.pid)
            self.poller.register(slot.pidfd, zmq.POLLIN)
        except OSError:
            pass  # an old kernel: the slot's death shows as the end of its pipe only
        return slot

    def _start_template(self) -> None:
        """Start the template slots are forked from, and make this monitor the subreaper
        that adopts them (the template's child that forks each exits at once)."""
        if self.template is None and contain.set_subreaper():
            self.template = self._spawn(-1, template=True)
            log.info("slots are forked from a template process (pid %d)",
                     self.template.proc.pid)

    def _reap_strays(self) -> None:
        """As the subreaper of the slots it forks, this monitor also adopts what a job
        left behind a slot that died: kill and reap any child that is not its own."""
        if self.template is not None:
            known = {s.proc.pid for s in self.slots} | {self.template.proc.pid}
            contain.reap_strays(known | ({self.watchdog.pid} if self.watchdog else set()))

    def _stop_template(self) -> None:
        if self.template is not None:
            template, self.template = self.template, None
            template.kill()
            template.sock.close()
            template.proc.wait()
            self._bury(template)

    def _fork(self, child: socket.socket, capture: Path, groups: tuple[str, ...]
              ) -> contain.Adopted | None:
        """A slot forked off the template, its end of the pipe ``child``; None without
        a template, or when it fails (then it is stopped, and slots start afresh)."""
        if self.template is None:
            return None
        sock = self.template.sock
        sock.settimeout(FORK_WAIT)
        try:
            socket.send_fds(sock, [json.dumps({"capture": str(capture),
                                               "groups": ",".join(groups)}).encode()],
                            [child.fileno()])
            pid = int(json.loads(sock.recv(4096) or b"{}").get("pid", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            pid = 0
        if pid > 0:
            return contain.Adopted(pid)
        log.warning("the template process could not fork a slot; starting slots afresh")
        self._stop_template()
        return None

    def _respawn(self, slot: Slot) -> None:
        self._close_pipe(slot)
        slot.kill()
        slot.proc.wait()
        self._bury(slot)
        if self.spawn_failures >= SPAWN_FAILURES:
            backoff = min(MAX_BACKOFF, 0.5 * 2 ** (self.spawn_failures - SPAWN_FAILURES))
            self.respawn_at[slot.index] = time.monotonic() + backoff
            self.slots[slot.index] = slot  # a dead placeholder until then
            return
        self.slots[slot.index] = self._spawn(slot.index)

    def _bury(self, slot: Slot) -> None:
        """Remove what a dead slot leaves: its capture file, its spare job folder, its
        cgroup."""
        if slot.live_fd >= 0:
            os.close(slot.live_fd)
            slot.live_fd = -1
        try:
            slot.capture.unlink(missing_ok=True)
        except OSError:
            pass  # its folder is gone, or is not a folder any more
        remove_folder(spare_folder(str(slot.capture)))
        for group in slot.groups:
            contain.remove_cgroup(group, wait=0.5)

    def _spawn_due(self, now: float) -> None:
        for index, when in list(self.respawn_at.items()):
            if now >= when and not self.stopping:
                del self.respawn_at[index]
                self.slots[index] = self._spawn(index)

    def _close_pipe(self, slot: Slot) -> None:
        if slot.sock.fileno() >= 0:
            self.poller.unregister(slot.sock.fileno())
            slot.sock.close()
        if slot.pidfd >= 0:
            self.poller.unregister(slot.pidfd)
            os.close(slot.pidfd)
            slot.pidfd = -1

    def _give_back_stale(self, now: float) -> None:
        """Give the broker back the jobs queued here beyond ``keep_queued`` that have
        waited GIVE_BACK_AFTER with every slot busy (no failure counted)."""
        if any(s.job is None for s in self.slots):
            return  # a slot is free, or starting: the jobs go to it
        first = next(islice(self.pending.values(), self.keep_queued, None))
        if now - first[3] < GIVE_BACK_AFTER:
            return  # (the oldest of them has not waited so long)
        ids = list(self.pending)[self.keep_queued:]
        for jid in ids:
            del self.pending[jid]
        self._release(ids, "its monitor's slots are busy with longer jobs than it was "
                      "sent them for")

    def _start_jobs(self) -> None:
        for slot in self.slots:
            if not self.pending:
                return
            self._start_next(slot)

    def _start_next(self, slot: Slot) -> None:
        """Hand the next queued job to ``slot`` if it is free (and the monitor not stopping)."""
        if not self.pending or self.stopping or self.paused or not slot.ready \
                or slot.job is not None:
            return
        nxt = next(iter(self.pending.values()))[0]
        if slot.jobs_done and (self.options.isolate or nxt.get("isolate")
                               or slot.owner not in (None, nxt["owner"])):
            # the job gets a process no earlier job ran in; and a process that ran one
            # owner's jobs never runs another's (a job could leave code for the next)
            if nxt.get("isolate"):
                self._start_template()
            self._respawn(slot)
            return
        _, slot.queued = self.pending.popitem(last=False)
        spec, payload, blobs, _ = slot.queued
        slot.started, slot.owner = time.time(), spec["owner"]
        slot.live_offset = 0  # (the slot emptied its capture file before its last reply)
        slot.deadline = time.monotonic() + spec["timeout"] if spec["timeout"] else None
        slot.kill_reason = None
        header = {**spec, "blobs": [[d, len(b)] for d, b in blobs]} if blobs else spec
        try:
            send_frame(slot.sock, header, payload, b"".join(b for _, b in blobs))
        except OSError:
            pass  # the slot died; its EOF is handled as a crash

    def _on_slot(self, slot: Slot) -> None:
        try:
            reply, result, output = recv_frame(slot.sock)
            if reply.keys() not in (_READY_KEYS, _REPLY_KEYS, _FAILED_KEYS, _REPLACE_KEYS):
                raise FrameError(f"a frame with the header keys {sorted(reply)[:10]}")
        except (EOFError, OSError) as e:
            if isinstance(e, FrameError):
                log.warning("slot %d: %s", slot.index, e)
            self._slot_died(slot)
            return
        if "failed" in reply:
            slot.failure = str(reply["failed"])
            return  # its exit follows
        if reply.get("ready"):
            slot.ready, slot.base_rss = True, reply["rss"]
            self._slot_started()
            self._start_next(slot)
            return
        if "replace" in reply:
            self._replace(slot, str(reply["replace"])[:1000])
            return
        job = slot.job
        if job is None or reply.get("id") != job["id"]:
            return
        slot.queued, slot.deadline = None, None
        slot.last_job = job["id"]
        slot.jobs_done += 1
        if reply["base_rss"]:  # the slot loaded Sage: its growth counts from there
            slot.base_rss = reply["base_rss"]
        recycle = (self._worn(slot, reply["rss"]) or self.options.isolate
                   or bool(job.get("isolate")))
        if not recycle:
            self._start_next(slot)  # before anything else: the slot idles for no result
        self._finish(job, reply, result, output)
        if recycle:
            if self.options.isolate or job.get("isolate"):
                self._start_template()  # every isolated job leaves its slot
            else:
                log.info("recycling slot %d after %d jobs (%d MB)", slot.index,
                         slot.jobs_done, reply["rss"] >> 20)
            self._respawn(slot)
            remove_folder(str(self.tmpdir / job["id"]))  # if the slot was killed before it could

    def _replace(self, slot: Slot, why: str) -> None:
        """The slot could not put itself back as it was after its last job: a fresh
        process takes its place. A job sent to it since was never started: it is first
        in line again (given back to the broker, if the monitor is stopping)."""
        log.info("replacing slot %d: job %s %s", slot.index, slot.last_job, why)
        if slot.queued is not None:
            jid = slot.queued[0]["id"]
            if self.stopping:  # (its queue was given back already)
                log.info("job %s, sent to slot %d since, goes back to the broker", jid,
                         slot.index)
                self._release([jid], "released by a stopping monitor")
            else:
                log.info("job %s, sent to slot %d since, goes to the fresh one", jid,
                         slot.index)
                self.pending[jid] = slot.queued
                self.pending.move_to_end(jid, last=False)
        slot.queued, slot.deadline = None, None
        self._respawn(slot)
        if slot.last_job:
            remove_folder(str(self.tmpdir / slot.last_job))  # if the slot could not

    def _worn(self, slot: Slot, rss: int) -> bool:
        """Whether a slot is due for a fresh process: it ran its quota of jobs, or its
        memory grew past the allowed factor of its size at start."""
        limit = self.options.max_jobs_per_slot
        return bool((limit and slot.jobs_done >= limit)
                    or (slot.base_rss and rss > self.options.memory_growth * slot.base_rss))

    def _release(self, ids: list[str], reason: str, count_failure: bool = False,
                 missing: list[str] | None = None) -> None:
        """Give jobs back to the broker's queue (counting a failure: as if their
        worker had been lost), in messages within the protocol's limit of ids;
        ``missing``: the shared blobs that the jobs lack here."""
        reason = clip(reason, MAX_TEXT)
        for part in batches([0] * len(ids), MAX_BATCH):
            self._send(make(M.RELEASE, ids=ids[part.start:part.stop], reason=reason,
                            count_failure=count_failure,
                            missing_blobs=(missing or [])[:MAX_BATCH]))

    def _reap(self, slot: Slot) -> int:
        """The exit status of a slot whose pipe ended. One that goes on running
        without it (its job closed the pipe, or wrote into it) is killed."""
        try:
            return slot.proc.wait(REAP_WAIT)
        except subprocess.TimeoutExpired:
            pass
        if slot.kill_reason is None:
            slot.kill_reason = PIPE_BROKEN
        slot.kill()
        return slot.proc.wait()

    def _slot_started(self) -> None:
        if self.paused:
            log.warning("worker slots start again: taking jobs")
            self.paused = False
            if self.registered and not self.stopping:
                self._register()  # a new registration restores this monitor's credit
        self.spawn_failures = 0

    def _spawn_failed(self, slot: Slot, rc: int) -> None:
        """A slot died before it was ready. After a few in a row, the monitor steps back:
        it gives its queued jobs back (no failure counted), tells the broker it takes
        none, says why once, and tries again later, less and less often."""
        self.spawn_failures += 1
        if self.spawn_failures < SPAWN_FAILURES or self.paused:
            return
        self.paused = True
        log.error("worker slots fail to start (%s); taking no jobs until one starts, "
                  "trying again with a growing pause", slot.failure or f"exit status {rc}")
        if self.pending:
            self._release(list(self.pending), "its monitor cannot start worker slots")
            self.pending.clear()
        self._send(make(M.STOPPING))

    def _slot_died(self, slot: Slot) -> None:
        job = slot.job
        # read before the slot is reaped: limits its job lowered explain some deaths
        lowered = contain.lowered_limits(
            slot.proc.pid, ("Max address space",) if job and job.get("memory") else ())
        self._close_pipe(slot)
        rc = self._reap(slot)
        if slot.groups:
            contain.kill_cgroup(slot.groups[0])  # its descendants die with it
        self._reap_strays()
        if not slot.ready and not self.stopping:
            self._spawn_failed(slot, rc)
        if job is not None and slot.kill_reason is None and rc == -signal.SIGKILL:
            slot.cause = self._why_killed(slot, lowered)
        if job is not None and slot.kill_reason is None and rc == -signal.SIGKILL \
                and not slot.cause:
            # Killed from outside (an admin): the worker was lost, not the job's
            # fault. It goes back to the queue; the failure limit stops a job that
            # keeps doing this.
            log.warning("slot %d was killed from outside while running job %s; giving it "
                        "back", slot.index, job["id"])
            self._release([job["id"]], f"its slot process on {self.host} was killed (SIGKILL)",
                          count_failure=True)
            remove_folder(str(self.tmpdir / job["id"]))
        elif job is not None:
            status, error = self._death_outcome(slot, rc, lowered)
            output = _read_capture(slot.capture)[-(1 << 20):]
            if error:
                output += f"\n[dsage] {error}\n".encode()
            remove_folder(str(self.tmpdir / job["id"]))  # the slot could not
            self._finish(job, {"status": status.value, "error": error, "encoding": "none",
                               "result_from": "none", "sealed": False, "started": slot.started,
                               "finished": time.time()}, b"", output)
        elif not self.stopping and slot.ready:
            log.warning("slot %d exited (status %s) while idle; restarting it", slot.index, rc)
        slot.queued = None
        if not self.stopping:
            self._respawn(slot)

    def _why_killed(self, slot: Slot, lowered: list[str]) -> str:
        """Why a slot died of a SIGKILL the monitor did not send, when the job caused it
        (an OOM killer: its own cap's, or the kernel's or a parent cgroup's; limits it
        lowered); '' when something outside did. The slot's memory cgroup counts the
        OOM kills of its members whoever ordered them, and its ``failcnt`` whether its
        own cap was reached; without one, the kernel's count rising says an OOM kill."""
        oom = contain.kernel_oom_kills()
        kernel_oom, self._oom_seen = oom > self._oom_seen, oom
        if slot.memory_group and contain.oom_kills(slot.memory_group) > 0:
            if self.options.slot_memory and contain.cap_reached(slot.memory_group):
                return (f"the job's slot went past its memory cap of "
                        f"{_size(self.options.slot_memory)} (--slot-memory) and the "
                        f"out-of-memory killer of its cgroup killed it (SIGKILL)")
            return OOM_KILLED
        if kernel_oom and not slot.memory_group:
            return OOM_KILLED
        if lowered:
            return (f"the job's process died of SIGKILL after the job lowered its own "
                    f"limits: {', '.join(lowered)}")
        return ""

    @staticmethod
    def _death_outcome(slot: Slot, rc: int, lowered: list[str]) -> tuple[Status, str]:
        assert slot.job is not None
        if slot.cause:
            return Status.FAILED, slot.cause
        if slot.kill_reason == "timeout":
            return Status.FAILED, f"timed out after {slot.job['timeout']:g} s (the job was killed)"
        if slot.kill_reason == PIPE_BROKEN or (slot.kill_reason is None and rc == PIPE_LOST):
            return Status.FAILED, ("the job broke its process's pipe to the monitor (closed it, "
                                   "replaced it or wrote into it), so the process "
                                   + ("was killed" if slot.kill_reason else "ended"))
        if slot.kill_reason is not None:
            return Status.KILLED, f"killed ({slot.kill_reason})"
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            return Status.FAILED, f"the job's process died of {name} (signal {-rc})" + (
                f"; the job had lowered its own limits: {', '.join(lowered)}" if lowered else "")
        return Status.FAILED, f"the job's process exited with status {rc} (os._exit or a crash)"

    def _finish(self, job: dict[str, Any], reply: dict[str, Any], result: bytes,
                output: bytes) -> None:
        """Queue a job's outcome for the broker, its result and output sealed to the
        job's owner (every path ends here: results, crashes, timeouts, kills)."""
        error = reply["error"]
        item = {"id": job["id"], "status": reply["status"],
                "error": None if error is None else clip(error, MAX_LONG_TEXT),
                "encoding": reply["encoding"], "result_from": reply["result_from"],
                "sealed": True, "started": reply["started"],
                "finished": reply["finished"], "staged": False, "attempt": job["attempt"],
                "retry": bool(reply.get("retry")) and reply["status"] == Status.FAILED}
        result, output = self._fit(item, result, output)
        if item["error"] and not result and item["encoding"] == "none":
            # the error text may hold the job's data (KeyError: 'PASSWORD-...'): it
            # travels sealed, and the broker keeps only its type
            result = item["error"].encode()
            item["encoding"], item["error"] = "error", error_summary(item["error"])
        result, output = self.sealer.seal_outcome(
            job["owner"], (job["id"], job["owner"], item["status"], item["encoding"],
                           item["result_from"]), result, output)
        self.unacked[job["id"]] = (item, result, output)
        self._queue_result(job["id"])

    def _fit(self, item: dict[str, Any], result: bytes, output: bytes) -> tuple[bytes, bytes]:
        """Keep each blob within the message size limit (less the sealing overhead):
        a result too large fails the job; output keeps its end."""
        limit = self.options.max_message_size - 4096
        if len(result) > limit:
            item.update(status=Status.FAILED.value, encoding="none", result_from="none",
                        error=f"the result is {len(result)} bytes, more than the largest "
                        f"message allowed ({self.options.max_message_size} bytes)")
            result = b""
        if len(output) > limit:
            output = b"[... output cut ...]\n" + output[-(limit - 64):]
        return result, output

    def _cancel(self, job_id: str, reason: str) -> None:
        """Stop a job the broker takes back: a queued one is answered as killed (which
        frees its credit), a running one's slot is killed. A job whose result is held
        already keeps it: that result is sent until acknowledged, and the broker,
        which keeps the first final outcome, drops it if the job is over."""
        if job_id in self.pending:
            spec = self.pending.pop(job_id)[0]
            self._finish(spec, {"status": "killed", "error": f"killed ({reason})",
                                "encoding": "none", "result_from": "none",
                                "started": None, "finished": time.time()}, b"", b"")
            return
        for slot in self.slots:
            if slot.job is not None and slot.job["id"] == job_id:
                slot.kill_reason = reason
                slot.kill()

    # --- the loop

    def step(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds; handle the broker, the slots, timeouts; send
        this turn's results."""
        if self.outgoing:  # held: sent by HOLD_TIME after the first of them at the latest
            timeout = min(timeout, max(0.0, self.held_since + HOLD_TIME - time.monotonic()))
        ready = dict(self.poller.poll(math.ceil(timeout * 1000)))
        if self._wake_r.fileno() in ready:
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass
        if self.stop_requested:
            self.begin_stop()
        if self.events is not None and self.events in ready:
            self._on_socket_event()
        if self.sock is not None and self.sock in ready:
            self._on_broker()
        for slot in list(self.slots):
            if slot.sock.fileno() in ready:
                self._on_slot(slot)
        for slot in list(self.slots):
            if slot.pidfd in ready and slot.sock.fileno() >= 0 and _exited(slot.proc.pid):
                self._slot_died(slot)  # exited, though a descendant may hold its pipe
        now = time.monotonic()
        if self.respawn_at:
            self._spawn_due(now)
        for slot in self.slots:
            if slot.job is not None and slot.deadline is not None and now > slot.deadline \
                    and slot.kill_reason is None:
                slot.kill_reason = "timeout"
                slot.kill()
        self._start_jobs()
        if len(self.pending) > self.keep_queued:
            self._give_back_stale(now)
        self._flush_results(now)
        if now - self.last_live >= LIVE_INTERVAL:
            self.last_live = now
            self._stream_output()
        if self.stalled_uploads:
            self._retry_uploads(now)
        self._keepalive(now)

    def _stream_output(self) -> None:
        """Send what running jobs printed since last time (LIVE_BYTES per job at most),
        sealed to their owners; their clients show it while the job runs."""
        for slot in self.slots:
            job = slot.job
            if job is None or not self.registered:
                continue
            fd = self._live_fd(slot)
            if fd < 0:
                continue
            try:
                size = os.fstat(fd).st_size
                if size <= slot.live_offset:
                    slot.live_offset = min(slot.live_offset, size)
                    continue
                data = os.pread(fd, min(LIVE_BYTES, size - slot.live_offset), slot.live_offset)
            except OSError:
                continue
            bound = binding(job["id"], job["owner"], "processing", "none", "none",
                            f"live:{slot.live_offset}")
            self._send(make(M.OUTPUT, [self.sealer.seal(job["owner"], data, bound)],
                            id=job["id"], offset=slot.live_offset))
            slot.live_offset += len(data)

    def _live_fd(self, slot: Slot) -> int:
        """The slot's capture file, opened once to read (see :func:`_open_capture`)."""
        if slot.live_fd < 0:
            slot.live_fd = _open_capture(slot.capture)
        return slot.live_fd

    def _keepalive(self, now: float) -> None:
        window = self.options.heartbeat * self.options.liveness
        if now - self.last_sent >= self.options.heartbeat:
            self._send(make(M.HEARTBEAT))
            self.last_sent = now  # also when not connected, so this is not retried at once
            self._reap_strays()
        if now - self.last_heard > window:
            problem = None
            if not self.registered and not self.host_asked:
                self.host_asked = True
                problem = unfound(self.options.server)
            log.warning("no word from the broker for %.1f s; reconnecting%s",
                        now - self.last_heard, f": {problem}" if problem else "")
            self._connect()
        if (self.options.exit_with_parent and not self.stopping
                and os.getppid() != self.options.exit_with_parent):
            log.warning("parent process is gone: stopping")
            self.begin_stop()
        idle = self.options.idle_exit
        if idle is not None and not self.stopping and now - self.last_contact > idle:
            log.warning("no word from the broker for %.1f s (--idle-exit %g): stopping",
                        now - self.last_contact, idle)
            self.begin_stop()

    def _shutdown(self, reason: str) -> None:
        """The broker stops and takes its monitors with it (it came on this
        connection, whose CURVE handshake checked the broker's key): stop at once,
        giving running jobs back (the broker queues them for the next start)."""
        log.warning("the broker says stop (%s): giving jobs back and exiting", reason)
        self.hurry = True
        self.begin_stop()

    def request_stop(self) -> None:
        """Ask the loop to :meth:`begin_stop` (safe from a signal handler: it sends
        nothing itself, so it cannot cut into a message being sent). A second request
        ends the grace period at once."""
        if self.stop_requested:
            self.hurry = True
        self.stop_requested = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def begin_stop(self) -> None:
        """Stop taking jobs; running ones get ``grace`` seconds, the rest go back."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + (0.0 if self.hurry else self.options.grace)
        self._announce_stop()
        if self.pending:
            self._release(list(self.pending), "released by a stopping monitor")
            self.pending.clear()

    def _announce_stop(self) -> None:
        """Send STOPPING, then an empty RESULT: its acknowledgement comes after every
        RUN the broker sent before it knew, so the monitor waits for it, and gives
        those jobs back, before it exits."""
        self.stop_confirmed = False
        self._send(make(M.STOPPING))
        self._send(make(M.RESULT, results=[]))

    def _busy(self) -> bool:
        return any(s.job is not None for s in self.slots)

    def run(self) -> None:
        """Work until stopped; SIGTERM/SIGINT start a graceful stop."""
        restore = self._install_signals()
        if self.options.exit_on_stdin_eof:
            threading.Thread(target=self._stop_on_stdin_eof, daemon=True,
                             name="dsage-stdin").start()
        try:
            while not self.stopping:
                self.step(self.options.heartbeat / 2)
            self._drain_on_stop()
        finally:
            restore()
            self.close()

    def _stop_on_stdin_eof(self) -> None:
        """Follow standard input (an ssh session's): a line asks for a graceful stop,
        its end (the session is gone) for a stop at once."""
        fd = sys.stdin.fileno()  # read raw: a buffered reader's lock would hang the
        try:                     # interpreter's exit while this daemon thread waits in it
            while chunk := os.read(fd, 4096):
                if b"stop" in chunk:
                    log.info("asked to stop over standard input")
                    self.request_stop()
        except (OSError, ValueError):
            pass
        log.warning("standard input closed (the session that started this monitor ended): "
                    "stopping now")
        self.request_stop()
        self.request_stop()  # a second request: no grace period

    def _drain_on_stop(self) -> None:
        assert self.stop_deadline is not None
        while self._busy() and time.monotonic() < self.stop_deadline and not self.hurry:
            self.step(0.1)
        left = [s.job["id"] for s in self.slots if s.job is not None]
        if left:
            log.info("%s: giving %s back", "stopping now" if self.hurry else "grace period over",
                     plural(len(left), "running job"))
            for s in self.slots:
                if s.job is not None:
                    s.kill_reason = "released"
                    s.queued = None
                    s.kill()
            self._release(left, "released by a stopping monitor")
        end = time.monotonic() + (0.5 if self.hurry else min(2.0, self.options.grace))
        while (self.unacked or (self._connected() and not self.stop_confirmed)) \
                and time.monotonic() < end:
            if self.outgoing:
                ids, self.outgoing = list(self.outgoing), {}
                self._send_results(ids)
            self.step(0.1)

    def _connected(self) -> bool:
        """Registered, or registering: the broker may send jobs on this connection."""
        return self.registered or self.registering

    def _install_signals(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_stop(signum: int, frame: Any) -> None:
            self.request_stop()

        old = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        return lambda: [signal.signal(s, h) for s, h in old.items()]

    def close(self) -> None:
        for slot in self.slots:
            slot.kill()
            self._close_pipe(slot)
        for slot in self.slots:
            slot.proc.wait()
            self._bury(slot)
        self._stop_template()
        for group in self.groups:
            contain.remove_cgroup(group, wait=2.0)
        if self._watchdog_pipe >= 0:
            os.close(self._watchdog_pipe)  # its sweep finds nothing left
            self._watchdog_pipe = -1
        if self.run_as is not None:  # the run-as user's working folder, and root's around it
            shutil.rmtree(self.tmpdir.parent, ignore_errors=True)
        if self.sock is not None:
            # a moment for what is queued (jobs given back on a stop) to leave
            self.sock.close(linger=500)
        if self.events is not None:
            self.events.close(linger=0)
        self.ctx.term()
        self._wake_r.close()
        self._wake_w.close()
        log.info("dsage-worker stopped")


def holding(held: int, queued: int, since: float, now: float) -> bool:
    """Whether ``held`` results, the first finished at ``since``, wait for more before
    they are sent: only while the ``queued`` jobs waiting here for a slot outnumber
    them (so the slots stay busy until the broker, told of these results, sends more),
    and at most HOLD_TIME. A monitor kept busy by many short jobs so sends their
    results many to a message, and the broker handles them, and sends the next jobs,
    many per loop turn; a monitor that is idle, or about to be, sends each result at
    once."""
    return held < min(queued, MAX_BATCH) and now < since + HOLD_TIME


def _open_capture(path: Path) -> int:
    """A slot's capture file, open to read, or -1. Its folder is the job's to change:
    it is opened only as a regular file, never through a link or as a pipe a job put
    in its place (the monitor may be root, and would read it for the job)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return -1
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return -1


def _read_capture(path: Path) -> bytes:
    """What a dead slot's capture file holds (see :func:`_open_capture`)."""
    fd = _open_capture(path)
    if fd < 0:
        return b""
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError:
        return b""
    finally:
        os.close(fd)


class BlobCache:
    """Shared blobs by hash, the least recently used dropped past ``limit`` bytes
    (a job that needs one dropped is given back, and the broker sends it again)."""

    def __init__(self, limit: int = 256 * 1024 * 1024) -> None:
        self.limit = limit
        self.blobs: OrderedDict[str, bytes] = OrderedDict()
        self.size = 0

    def add(self, blobs: dict[str, bytes]) -> None:
        for digest, data in blobs.items():
            if digest not in self.blobs:
                self.blobs[digest] = data
                self.size += len(data)
            self.blobs.move_to_end(digest)
        while self.size > self.limit and len(self.blobs) > 1:
            _, old = self.blobs.popitem(last=False)
            self.size -= len(old)

    def get(self, digest: str) -> bytes | None:
        data = self.blobs.get(digest)
        if data is not None:
            self.blobs.move_to_end(digest)
        return data


def _exited(pid: int) -> bool:
    """Whether a child process has exited, without reaping it (its /proc entry stays
    readable until it is waited for)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} bytes"


def error_summary(error: str) -> str:
    """What of a failed job's error the broker may keep in plaintext: the exception's
    type ("KeyError") when the text starts with one, else the monitor's own words
    (a timeout, a kill, a signal: no data of the job's)."""
    head, sep, _ = error.partition(":")
    if sep and head.replace(".", "").replace("_", "").isalnum() and " " not in head:
        return head
    return error


def run_monitor(options: MonitorOptions) -> int:
    """Run a monitor in this process until it is stopped; its exit status: 0, or 2 when
    the broker refused it for good (another dsage version)."""
    monitor = Monitor(options)
    monitor.run()
    return 2 if monitor.refused else 0
