"""CurveZMQ on every socket, and the ZAP policy that decides who gets in.

CURVE fails open: a CURVE server with no ZAP handler admits any key. So the
broker starts the authenticator before it binds, in the same context, and
sets ``zap_domain`` and ``ZAP_ENFORCE_DOMAIN`` on every server socket; if the
handler is missing, everyone is refused.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.thread import AuthenticationThread, ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from .keys import InsecureKeyFile, Keypair, authorized_dir, authorized_roles
from .limits import AnonymousConnections

log = logging.getLogger("dsage.auth")

CLIENTS = "dsage-clients"
MONITORS = "dsage-monitors"
EVENTS = "dsage-events"


class KeyRing:
    """The keys the broker trusts: its own, and those in ``authorized_keys/``.

    :meth:`maybe_reload` rereads the folder when any file in it changed, so
    ``dsage keys add/remove`` takes effect on a running broker.
    """

    def __init__(self, home: Path, own: bytes) -> None:
        self.home = home
        self.own = own
        self.trusted: frozenset[bytes] = frozenset({own})
        self.clients: frozenset[bytes] = frozenset({own})
        self.workers: frozenset[bytes] = frozenset({own})
        self._stamp: tuple[tuple[str, int, int, int], ...] | None = None
        self.maybe_reload()

    def _current_stamp(self) -> tuple[tuple[str, int, int, int], ...]:
        """Names, times, sizes and modes of the folder and its key files."""
        folder = authorized_dir(self.home)
        try:
            entries = list(os.scandir(folder))
            own = folder.stat()
        except OSError:
            return ()
        stamp = [("", 0, 0, own.st_mode)]
        for e in entries:
            if e.name.endswith(".pub"):
                try:
                    st = e.stat()
                except OSError:
                    continue
                stamp.append((e.name, st.st_mtime_ns, st.st_size, st.st_mode))
        return tuple(sorted(stamp))

    def maybe_reload(self) -> bool:
        """Reread the keys if the folder changed; True when it did."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return False
        first = self._stamp is None
        self._stamp = stamp
        roles: dict[bytes, set[str]] = {self.own: {"client", "worker"}}
        try:
            found = authorized_roles(self.home)
        except InsecureKeyFile as e:
            if first:
                raise  # the broker does not start on keys that others could have written
            log.error("%s; until then only the broker's own key is trusted", e)
            found = {}
        for key, role in found.values():
            roles.setdefault(key, set()).update(("client", "worker") if role == "both"
                                                else (role,))
        keys = frozenset(roles)
        if keys != self.trusted:
            log.info("authorized keys: %d trusted", len(keys))
        # single assignments: the auth thread sees old or new, never half
        self.clients = frozenset(k for k, r in roles.items() if "client" in r)
        self.workers = frozenset(k for k, r in roles.items() if "worker" in r)
        self.trusted = keys
        return True

    def is_trusted(self, key: str | bytes) -> bool:
        return _raw(key) in self.trusted

    def is_client(self, key: str | bytes) -> bool:
        """Whether the key may submit jobs (and see its own)."""
        return _raw(key) in self.clients

    def is_worker(self, key: str | bytes) -> bool:
        """Whether the key may run jobs as a trusted worker."""
        return _raw(key) in self.workers


def _raw(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


#: what the server side of a CURVE handshake has received before the client's
#: INITIATE: a greeting (64 bytes) and HELLO (202); more means INITIATE came, and
#: the connection waits for its ZAP answer
_BEFORE_INITIATE = 64 + 202
#: how long the ZAP thread looks for the connection it just answered
_PLACE_WAIT = 0.5


class ZapPolicy:
    """ZAP callback: trusted keys everywhere; unknown keys on the monitor port
    only when anonymous workers are allowed, and only while fewer than the limit
    of anonymous connections are live there (``connections``)."""

    def __init__(self, keyring: KeyRing, allow_anonymous: bool,
                 connections: AnonymousConnections | None = None) -> None:
        self.keyring = keyring
        self.allow_anonymous = allow_anonymous
        self.connections = connections
        #: the address of the handshake being answered (set by the authenticator)
        self.address = ""
        #: the handshake on the monitor port being answered: (address, counted: whether
        #: it is admitted as anonymous)
        self.answer: tuple[str, bool] | None = None
        self._full = False

    def callback(self, domain: str, key: bytes) -> bool:
        self.answer = None
        trusted = key in self.keyring.trusted
        anonymous = not trusted and domain == MONITORS and self.allow_anonymous
        if domain == MONITORS and self.connections is not None:
            self.answer = (self.address, anonymous)
            if anonymous and (self.connections.full()
                              or not self.connections.waiting(self.address)):
                if not self._full:  # said once per time the limit is reached
                    log.warning("refusing anonymous connections: %d are live (the broker's "
                                "--max-anonymous-connections)", len(self.connections.anonymous))
                self._full = True
                self.answer = (self.address, False)
                return False
            self._full = self._full and self.connections.full()
        if trusted or anonymous:
            return True
        log.warning("refused key %s on %s", key.decode(errors="replace"), domain)
        return False

    def accepted(self, fd: int) -> None:
        if self.connections is not None:
            self.connections.accepted(fd, _peer_address(fd))

    def disconnected(self, fd: int) -> None:
        if self.connections is not None:
            self.connections.disconnected(fd)


def _peer_address(fd: int) -> str:
    """The address of the peer of a connection libzmq holds as ``fd`` (a copy of the
    descriptor is asked, so libzmq's own is never closed here); '' when it is gone."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            return str(s.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return ""


def _tcp_bytes(fd: int) -> tuple[int, int] | None:
    """Bytes received and sent so far on the TCP connection ``fd`` (Linux's
    ``tcp_info``), or None when it is gone or the kernel does not say."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError):
        return None
    if len(info) < 208:
        return None  # a kernel before 4.19: no tcpi_bytes_sent
    return struct.unpack_from("=Q", info, 128)[0], struct.unpack_from("=Q", info, 200)[0]


def _answered(sent: dict[int, int]) -> int | None:
    """Of connections waiting for their ZAP answer (descriptor -> bytes sent to them
    before the answer went out), the one answered: the only one the server writes
    to (READY, or ERROR) until their own answers go out. None if that cannot be seen."""
    if len(sent) == 1:
        return next(iter(sent))
    deadline = time.monotonic() + _PLACE_WAIT
    while sent and time.monotonic() < deadline:
        now = {fd: _tcp_bytes(fd) for fd in sent}
        # written to, or closed already (a refused one is, at once, after its ERROR;
        # its descriptor may even be another connection's by now)
        moved = [fd for fd, b in now.items() if b is None or b[1] != sent[fd]]
        if len(moved) == 1:
            return moved[0]
        if moved:
            return None
        time.sleep(0.0002)
    return None


class _Thread(AuthenticationThread):
    """pyzmq's ZAP thread, which also reads the connection events of the sockets
    :meth:`Authenticator.watch` gave it, and all of them before each handshake."""

    authenticator: Authenticator

    async def _run(self) -> None:
        auth = self.authenticator
        self.poller = zmq.asyncio.Poller()
        self.poller.register(self.pipe, zmq.POLLIN)
        self.poller.register(auth.zap_socket, zmq.POLLIN)
        self.started.set()
        while True:
            events = dict(await self.poller.poll())
            if self.pipe in events and self._handle_pipe_message(self.pipe.recv_multipart()):
                return
            auth.read_events()
            if auth.zap_socket in events:
                msg = auth.zap_socket.recv_multipart()
                auth.read_events()  # the handshake's own connection is known by now
                await auth.handle_zap_message(msg)

    def _handle_pipe_message(self, msg: list[bytes]) -> bool:
        if msg[0] == b"WATCH":
            for reader in self.authenticator.take_new_readers():
                assert self.poller is not None
                self.poller.register(reader, zmq.POLLIN)
            return False
        return super()._handle_pipe_message(msg)


class Authenticator(ThreadAuthenticator):
    """The ZAP handler: answers with :class:`ZapPolicy`, and tells it which address
    each handshake comes from, when connections of watched sockets open and close,
    and which connection each answered handshake was.

    A ZAP request names the peer's address, not its connection. When several
    connections from one address wait for their answer, the one answered is the
    one the server then writes to (READY, or ERROR): the others get nothing until
    their own answers go out, one at a time from this thread.

    A handshake refused for the count is answered as any refusal (400: libzmq
    closes the connection at once; a 300, "try later", would leave it open until
    the handshake times out)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], policy: ZapPolicy) -> None:
        super().__init__(ctx, log=logging.getLogger("dsage.zap"))
        self.policy = policy
        self.readers: list[zmq.Socket[bytes]] = []
        self._new_readers: list[zmq.Socket[bytes]] = []

    def start(self) -> None:
        """As pyzmq's, with a thread that also reads connection events."""
        zmq.auth.Authenticator.start(self)
        self.pipe = self.context.socket(zmq.PAIR, socket_class=zmq.Socket)
        self.pipe.linger = 1
        self.pipe.bind(self.pipe_endpoint)
        thread_pipe = self.context.socket(zmq.PAIR, socket_class=zmq.Socket)
        thread_pipe.linger = 1
        thread_pipe.connect(self.pipe_endpoint)
        self.thread = _Thread(authenticator=self, pipe=thread_pipe)
        self.thread.start()
        if not self.thread.started.wait(timeout=10):
            raise RuntimeError("the authentication thread did not start")

    def watch(self, sock: zmq.Socket[bytes]) -> None:
        """Follow the connections of ``sock`` (call before it binds). libzmq's I/O
        thread blocks on a full event pipe, and on one with no reader yet: the reader
        is connected first, with no high-water mark, and the thread reads at once."""
        endpoint = f"inproc://dsage-connections-{id(sock)}"
        sock.monitor(endpoint, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        reader = self.context.socket(zmq.PAIR, socket_class=zmq.Socket)
        reader.linger = 0
        reader.rcvhwm = 0
        reader.connect(endpoint)
        self._new_readers.append(reader)
        self.pipe.send(b"WATCH")

    def take_new_readers(self) -> list[zmq.Socket[bytes]]:
        new, self._new_readers = self._new_readers, []
        self.readers += new
        return new

    def read_events(self) -> None:
        for reader in self.readers:
            while True:
                try:
                    event = parse_monitor_message(reader.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if event["event"] == zmq.EVENT_ACCEPTED:
                    self.policy.accepted(int(event["value"]))
                elif event["event"] == zmq.EVENT_DISCONNECTED:
                    self.policy.disconnected(int(event["value"]))

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self.policy.address = msg[3].decode(errors="replace") if len(msg) > 3 else ""
        self.policy.answer = None
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        answer, self.policy.answer = self.policy.answer, None
        connections = self.policy.connections
        if answer is None or connections is None:
            super()._send_zap_reply(request_id, status_code, status_text, user_id)
            return
        address, counted = answer
        fds = connections.waiting(address)
        sent: dict[int, int] = {}  # those waiting for their answer: bytes sent to them
        for candidate in fds if len(fds) > 1 else ():
            counters = _tcp_bytes(candidate)
            if counters is not None and counters[0] > _BEFORE_INITIATE:
                sent[candidate] = counters[1]
        super()._send_zap_reply(request_id, status_code, status_text, user_id)
        fd = fds[0] if len(fds) == 1 else _answered(sent)
        if fd is None and fds:
            fd = fds[0]  # not seen (an old kernel): the oldest, which is most often it
            log.debug("could not tell which connection from %s was answered", address)
        if fd is not None:
            connections.claim(fd, counted and status_code == b"200")

    def stop(self) -> None:
        super().stop()
        for reader in self.readers + self._new_readers:
            reader.close(linger=0)
        self.readers, self._new_readers = [], []


def start_authenticator(ctx: zmq.Context[zmq.Socket[bytes]], policy: ZapPolicy) -> Authenticator:
    """Run the ZAP handler for the three dsage domains; call before binding."""
    auth = Authenticator(ctx, policy)
    auth.start()
    for domain in (CLIENTS, MONITORS, EVENTS):
        auth.configure_curve_callback(domain, credentials_provider=policy)
    return auth


def make_server(sock: zmq.Socket[bytes], keys: Keypair, domain: str, max_message_size: int) -> None:
    """Make ``sock`` a CURVE server that refuses everyone ZAP does not admit."""
    sock.linger = 0
    sock.curve_server = True
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.zap_domain = domain.encode()
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)


def make_client(sock: zmq.Socket[bytes], keys: Keypair, server_key: bytes,
                max_message_size: int = -1) -> None:
    """Make ``sock`` a CURVE client of the server with public key ``server_key``."""
    sock.linger = 0
    sock.curve_serverkey = server_key
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    if max_message_size > 0:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    # ZMTP heartbeats drop a dead TCP peer so that reconnection starts.
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
