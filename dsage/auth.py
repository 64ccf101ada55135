"""CurveZMQ on every socket, and the ZAP policy that decides who gets in.

CURVE fails open: a CURVE server with no ZAP handler admits any key. So the
broker starts the authenticator before it binds, in the same context, and
sets ``zap_domain`` and ``ZAP_ENFORCE_DOMAIN`` on every server socket; if the
handler is missing, everyone is refused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from .keys import InsecureKeyFile, Keypair, authorized_dir, authorized_roles

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


class ZapPolicy:
    """ZAP callback: trusted keys everywhere; unknown keys on the monitor port
    only when anonymous workers are allowed."""

    def __init__(self, keyring: KeyRing, allow_anonymous: bool) -> None:
        self.keyring = keyring
        self.allow_anonymous = allow_anonymous

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keyring.trusted:
            return True
        if domain == MONITORS and self.allow_anonymous:
            return True
        log.warning("refused key %s on %s", key.decode(errors="replace"), domain)
        return False


def start_authenticator(ctx: zmq.Context[zmq.Socket[bytes]], policy: ZapPolicy) -> ThreadAuthenticator:
    """Run the ZAP handler for the three dsage domains; call before binding."""
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("dsage.zap"))
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
