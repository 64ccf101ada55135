"""The broker process: three CURVE sockets around :class:`BrokerState`.

One thread, one ``zmq.Poller`` loop: each ready socket is drained with
``NOBLOCK``, then the state ticks and flushes (dispatch, one commit) and the
outbox is sent. Payloads are never deserialised here.
"""

from __future__ import annotations

import errno
import math
import logging
import os
import signal
import socket
import sqlite3
import time
from typing import Any

import zmq

from . import keys as keys_mod
from . import running
from .auth import CLIENTS, EVENTS, MONITORS, KeyRing, ZapPolicy, make_server, start_authenticator
from .brokerstate import BrokerConfig, BrokerState, Dest, Out
from .limits import AnonymousConnections, RateLimit
from .options import BrokerOptions
from .protocol import (
    CLIENT_REQUESTS, MAX_FRAMES, MONITOR_REQUESTS, M, Message, ProtocolError, decode, encode, error,
    make, message_budget, result_ids,
)
from .sockets import send_frames
from .store import Store

log = logging.getLogger("dsage.broker")

#: most messages taken from one socket before the others get a turn
DRAIN_LIMIT = 2000
#: the largest frame an anonymous monitor may send (its results larger than this
#: are uploaded in chunks anyway)
ANONYMOUS_MAX_FRAME = 8 * 1024 * 1024
#: most event messages queued per subscriber (each at most protocol.BATCH_BYTES of blobs)
EVENTS_HWM = 64
#: most seconds a stopping broker (``--shutdown-monitors``) waits for its monitors to
#: say they stop and give their jobs back
SHUTDOWN_WAIT = 2.0


class PortInUse(Exception):
    """A port the broker needs is taken."""


class Broker:
    """A running broker; :meth:`run` until :meth:`stop` or SIGTERM/SIGINT."""

    def __init__(self, options: BrokerOptions) -> None:
        self.options = options
        self.home = keys_mod.home(options.home)
        self.keys = keys_mod.load_keypair(self.home)
        self.keyring = KeyRing(self.home, self.keys.public)
        store_path = options.store or self.home / "db" / "dsage.db"
        self.store = Store(store_path, durable=options.durable,
                           holder=f"pid {os.getpid()} on {socket.gethostname()}, "
                                  f"ports {options.port}-{options.port + 2}")
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sockets: list[zmq.Socket[bytes]] = []
        self.auth: Any = None
        self.stopping = False
        try:
            connections = AnonymousConnections(options.max_anonymous_connections) \
                if options.allow_anonymous else None
            self.auth = start_authenticator(
                self.ctx, ZapPolicy(self.keyring, options.allow_anonymous, connections))
            self.clients = self._bind(zmq.ROUTER, CLIENTS, options.port)
            self.monitors = self._bind(zmq.ROUTER, MONITORS, options.port + 1)
            self.events = self._bind(zmq.XPUB, EVENTS, options.port + 2)
        except BaseException:
            self.store.close()
            self._close_sockets()
            raise
        config = BrokerConfig(
            heartbeat=options.heartbeat, liveness=options.liveness,
            failure_limit=options.failure_limit, max_message_size=options.max_message_size,
            max_queued_per_client=options.max_queued_per_client,
            retention=options.retention_days * 86400.0, allow_anonymous=options.allow_anonymous,
            prefetch=options.prefetch, max_anonymous=options.max_anonymous)
        self.state = BrokerState(self.store, config, time.monotonic(), self.keyring.is_client,
                                 self.keyring.is_worker)
        self.anonymous_rate = RateLimit(options.anonymous_rate, 2 * options.anonymous_rate)
        #: most bytes of one message, all frames together (anonymous peers get less)
        self.budget = message_budget(options.max_message_size)
        self.anonymous_budget = message_budget(min(options.max_message_size,
                                                   ANONYMOUS_MAX_FRAME))
        self.poller = zmq.Poller()
        for s in (self.clients, self.monitors, self.events):
            self.poller.register(s, zmq.POLLIN)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.poller.register(self._wake_r.fileno(), zmq.POLLIN)
        self._last_key_check = 0.0
        #: keys with a live events subscription
        self.subscribed: set[str] = set()
        #: why the broker stopped by itself, if it did (run_broker reports it)
        self.failed: str | None = None
        log.info("dsage-broker serving %s on ports %d-%d (home %s%s)", self.keys.public.decode(),
                 options.port, options.port + 2, self.home,
                 ", anonymous workers allowed" if options.allow_anonymous else "")

    def _bind(self, kind: int, domain: str, port: int) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(kind)
        self._sockets.append(sock)
        make_server(sock, self.keys, domain, self.options.max_message_size)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        else:
            sock.setsockopt(zmq.XPUB_MANUAL, 1)
            sock.setsockopt(zmq.XPUB_NODROP, 1)
            # Bounded: a subscriber that does not read loses events past this (sends
            # fail at once), and catches up by query, as it does for any gap.
            sock.setsockopt(zmq.SNDHWM, EVENTS_HWM)
        if domain == MONITORS and self.options.allow_anonymous:
            self.auth.watch(sock)  # anonymous connections are counted (before binding)
        try:
            sock.bind(f"tcp://{self.options.bind}:{port}")
        except zmq.ZMQError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"port {port} is in use: the broker needs ports {self.options.port}-"
                    f"{self.options.port + 2}; is another dsage-broker running? "
                    f"Choose another with --port") from None
            raise
        return sock

    # --- the loop

    def step(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for messages, handle them, send what follows."""
        # whole milliseconds, rounded up: a timer due in 0.4 ms must not spin the loop
        ready = dict(self.poller.poll(math.ceil(timeout * 1000)))
        now = time.monotonic()
        if self.clients in ready:
            self._drain_clients(now)
        if self.monitors in ready:
            self._drain_monitors(now)
        if self.events in ready:
            self._drain_subscriptions()
        if self._wake_r.fileno() in ready:
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass
        if now - self._last_key_check >= 1.0:
            self._last_key_check = now
            if self.keyring.maybe_reload():
                self._recheck_subscriptions()
            self._check_authenticator()
            if self.options.exit_with_parent and os.getppid() != self.options.exit_with_parent:
                log.warning("parent process %d is gone: stopping", self.options.exit_with_parent)
                self.stopping = True
        try:
            self.state.tick(now)
        except sqlite3.Error as e:
            self.state.reload(now, str(e))
        self._send_all(self.state.flush(now, self._send_all))

    def run(self) -> None:
        """Serve until stopped; SIGTERM and SIGINT stop, SIGHUP rereads the keys."""
        restore = self._install_signals()
        try:
            running.record(self.home, self.options.port)
            while not self.stopping:
                self.step(self.state.next_wakeup(time.monotonic()))
            if self.options.shutdown_monitors:
                self._shutdown_monitors()
        finally:
            running.forget(self.home, self.options.port)
            restore()
            self.close()

    def _shutdown_monitors(self) -> None:
        """Tell every registered monitor to stop (SHUTDOWN), then serve on until each
        has said it stops (STOPPING) and given its jobs back, or SHUTDOWN_WAIT passed:
        those jobs are queued in the store for the next broker, not left running."""
        told = {m.monitor_id for m in self.state.monitors.values() if m.reachable}
        if not told:
            return
        log.info("stopping: telling %d monitors to stop too", len(told))
        for m in list(self.state.monitors.values()):
            if m.monitor_id in told:
                self._send(Out("monitor", m.rid, make(M.SHUTDOWN, reason="its broker stopped")))
        deadline = time.monotonic() + SHUTDOWN_WAIT
        while time.monotonic() < deadline and not self._monitors_gone(told):
            self.step(0.05)

    def _monitors_gone(self, told: set[str]) -> bool:
        """Whether each of the monitors ``told`` said it stops, or was lost, and holds
        no job of this broker's any more."""
        for monitor_id in told:
            entry = self.state.by_id.get(monitor_id)
            if (entry is not None and not entry.stopping) \
                    or self.state.sched.of_monitor(monitor_id):
                return False
        return True

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from a signal handler or another thread)."""
        self.stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _install_signals(self) -> Any:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_stop(signum: int, frame: Any) -> None:
            log.info("signal %d: stopping", signum)
            self.stop()

        def on_hup(signum: int, frame: Any) -> None:
            self._last_key_check = 0.0  # the next step rereads authorized_keys/
            try:
                self._wake_w.send(b"h")
            except OSError:
                pass

        def on_usr1(signum: int, frame: Any) -> None:
            log.info("signal %d: stopping, and telling the monitors to stop too", signum)
            self.options.shutdown_monitors = True  # (`dsage stop --monitors`)
            self.stop()

        old = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
        old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, on_usr1)

        def restore() -> None:
            for s, h in old.items():
                signal.signal(s, h)

        return restore

    # --- receiving

    def _drain_clients(self, now: float) -> None:
        for _ in range(DRAIN_LIMIT):
            try:
                frames = self.clients.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            rid, key = frames[0].bytes, _user_id(frames)
            if self._over_budget("client", rid, key, frames, self.budget):
                continue
            body = [f.bytes for f in frames[1:]]
            try:
                msg = decode(body, CLIENT_REQUESTS)
            except ProtocolError as e:
                log.warning("bad message from client %s: %s", key[:8], e)
                self._send(Out("client", rid, error(e.code, str(e))))
                continue
            try:
                self.state.on_client(now, rid, key, msg)
            except Exception as e:  # noqa: BLE001 - one message must not stop the broker
                self._failed("client", rid, key, msg, e)

    def _drain_monitors(self, now: float) -> None:
        for _ in range(DRAIN_LIMIT):
            try:
                frames = self.monitors.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            rid, key = frames[0].bytes, _user_id(frames)
            trusted = self.keyring.is_trusted(key)
            if not trusted and not self.anonymous_rate.allow(key, now):
                continue  # an anonymous peer over its message rate: dropped unread
            budget = self.budget if trusted else self.anonymous_budget
            if self._over_budget("monitor", rid, key, frames, budget):
                continue
            body = [f.bytes for f in frames[1:]]
            try:
                msg = decode(body, MONITOR_REQUESTS)
            except ProtocolError as e:
                if len(body) > 1 and body[1] == M.HELLO.value.encode():
                    self._send(Out("monitor", rid, error(
                        "wrong_port", f"port {self.options.port + 1} is this broker's port "
                        f"for monitors; clients connect to port {self.options.port}")))
                    continue
                log.warning("bad message from monitor %s: %s", key[:8], e)
                self._send(Out("monitor", rid, error(e.code, str(e))))
                if ids := result_ids(body):
                    self.state.on_unreadable_result(now, rid, key, ids, str(e))
                continue
            if trusted and not self.keyring.is_worker(key):
                self._not_a_worker(now, rid, key)
                continue
            try:
                self.state.on_monitor(now, rid, key, not trusted, msg)
            except Exception as e:  # noqa: BLE001 - one message must not stop the broker
                self._failed("monitor", rid, key, msg, e)

    def _recheck_subscriptions(self) -> None:
        """After a key change: a key that lost the client role loses its events."""
        for key in list(self.subscribed):
            if not self.keyring.is_client(key):
                self.events.setsockopt(zmq.UNSUBSCRIBE, key.encode())
                self.subscribed.discard(key)
                log.info("dropped the events subscription of %s (no longer a client)", key[:8])

    def _check_authenticator(self) -> None:
        """With its ZAP thread dead, every handshake would hang: stop, saying why."""
        thread = getattr(self.auth, "thread", None)
        if thread is not None and not thread.is_alive() and not self.stopping:
            log.error("the authentication (ZAP) thread died, so no peer could connect any "
                      "more: stopping the broker; start it again")
            self.failed = "the authentication thread died"
            self.stopping = True

    def _over_budget(self, dest: Dest, rid: bytes, key: str, frames: list[zmq.Frame],
                     budget: int) -> bool:
        """Refuse a message whose frames together exceed ``budget`` bytes or the frame
        count, before anything of it is copied or parsed."""
        if len(frames) <= MAX_FRAMES + 1 and sum(len(f) for f in frames) <= budget:
            return False
        log.warning("refused a message of %d frames and %d bytes from %s %s", len(frames),
                    sum(len(f) for f in frames), dest, key[:8] or "?")
        self._send(Out(dest, rid, error("size", f"the message is larger than this broker "
                                        f"accepts from this peer ({budget} bytes, "
                                        f"{MAX_FRAMES} frames)")))
        return True

    def _not_a_worker(self, now: float, rid: bytes, key: str) -> None:
        """A key trusted as a client only speaks on the monitor port: refused, with the
        command that grants the role (a monitor already registered is dropped)."""
        if rid in self.state.monitors:
            self.state.lose_monitor(now, rid, "its key no longer has the worker role")
        log.warning("refused monitor messages from %s: its key is a client's, not a worker's",
                    key[:8])
        self._send(Out("monitor", rid, error(
            "unauthorized", f"this key ({key}) is authorized as a client only, not as a "
            f"worker: on the broker's machine run `dsage keys add NAME '{key}' --role worker` "
            f"(or --role both)")))

    def _failed(self, dest: Dest, rid: bytes, key: str, msg: Message, e: Exception) -> None:
        """Handling one message raised: log it with its sender, answer with an error,
        and go on (what the message asked for is sent again or reported)."""
        log.exception("could not handle a %s message from %s %s", msg.type.value, dest,
                      key[:8] or "?")
        self._send(Out(dest, rid, error("internal", f"the broker could not handle this "
                                        f"'{msg.type.value}' message: {type(e).__name__}: {e}",
                                        msg.header.get("req"))))

    def _drain_subscriptions(self) -> None:
        for _ in range(DRAIN_LIMIT):
            try:
                frame = self.events.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            data = frame.bytes
            if not data or data[0] not in (0, 1):
                continue
            if data[0] == 0:
                # Unsubscriptions come when a subscriber's connection ends, and its
                # subscriptions end with it; with XPUB_MANUAL, passing them on
                # could drop another subscriber's topic.
                continue
            topic = data[1:]
            key = _user_id([frame])
            if self.state.on_subscribe(key, topic):
                self.events.setsockopt(zmq.SUBSCRIBE, topic)
                self.subscribed.add(key)
            else:
                log.warning("refused a subscription of %s to another topic", key[:8] or "?")

    # --- sending

    def _send_all(self, outs: list[Out]) -> None:
        for out in outs:
            self._send(out)

    def _send(self, out: Out) -> None:
        frames = encode(out.msg)
        try:
            if out.dest == "event":
                send_frames(self.events, [out.to, *frames])
            else:
                sock = self.clients if out.dest == "client" else self.monitors
                send_frames(sock, [out.to, *frames])
        except zmq.ZMQError as e:
            if out.dest == "event":
                return  # a subscriber not reading: it finds the gap and queries
            # The peer is gone or not reading. Clients resync by query (events
            # carry sequence numbers); a monitor that cannot take its jobs is lost.
            if out.dest == "monitor" and e.errno == zmq.EHOSTUNREACH:
                self.state.unreachable(out.to)  # disconnected: it may register again
                return
            log.warning("could not send %s to a %s: %s", out.msg.type, out.dest, e.strerror)
            if out.dest == "monitor":
                self.state.lose_monitor(time.monotonic(), out.to, f"unreachable ({e.strerror})")

    def _close_sockets(self) -> None:
        for s in self._sockets:
            s.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()

    def close(self) -> None:
        """Commit, close the store and every socket."""
        try:
            self.store.close()
        finally:
            self._close_sockets()
            self._wake_r.close()
            self._wake_w.close()
        log.info("dsage-broker stopped")


def _user_id(frames: list[zmq.Frame]) -> str:
    """The authenticated z85 key of a message's sender (set by ZAP)."""
    try:
        return str(frames[-1].get("User-Id") or "")
    except zmq.ZMQError:
        return ""


class BrokerFailed(Exception):
    """The broker stopped by itself because it could not go on safely."""


def run_broker(options: BrokerOptions) -> None:
    """Run a broker in this process until it is stopped."""
    broker = Broker(options)
    broker.run()
    if broker.failed:
        raise BrokerFailed(broker.failed)
