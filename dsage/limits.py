"""Rate limits for untrusted peers: a token bucket per key, pure (time passed in)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RateLimit:
    """At most ``rate`` messages a second per key on average, in bursts of ``burst``.

    Keys not heard from for a minute are forgotten, so a flood of fresh keys (an
    anonymous peer makes a new key per process) cannot grow the table without
    bound; at most ``max_keys`` are kept."""

    rate: float
    burst: float
    max_keys: int = 10_000
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def allow(self, key: str, now: float) -> bool:
        """Whether a message from ``key`` at ``now`` is within its rate (and count it)."""
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._forget(now)
            if len(self._buckets) >= self.max_keys:
                return False  # too many peers at once: the newest waits
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def _forget(self, now: float) -> None:
        for key, (_, last) in list(self._buckets.items()):
            if now - last > 60.0:
                del self._buckets[key]


@dataclass
class AnonymousConnections:
    """The live connections of anonymous peers on one port, at most ``limit`` of them.

    Kept from the port's connection events (:meth:`accepted`, :meth:`disconnected`,
    each naming the connection's file descriptor) and the handshakes answered on it
    (:meth:`claim`). A handshake names the peer's address, not its connection: the
    caller picks which of the connections from that address still :meth:`waiting`
    it is (see :mod:`dsage.auth`)."""

    limit: int
    #: connections accepted and not yet claimed by a handshake: descriptor -> address
    pending: dict[int, str] = field(default_factory=dict)
    #: descriptors of live connections admitted as anonymous
    anonymous: set[int] = field(default_factory=set)

    def accepted(self, fd: int, address: str) -> None:
        self.anonymous.discard(fd)  # a descriptor is reused only after it closed
        self.pending[fd] = address

    def disconnected(self, fd: int) -> None:
        self.pending.pop(fd, None)
        self.anonymous.discard(fd)

    def full(self) -> bool:
        return len(self.anonymous) >= self.limit

    def waiting(self, address: str) -> list[int]:
        """The unclaimed connections from ``address``, oldest first."""
        return [fd for fd, a in self.pending.items() if a == address]

    def claim(self, fd: int, anonymous: bool) -> None:
        """Connection ``fd`` got its handshake's answer: counted if admitted as
        ``anonymous``."""
        if self.pending.pop(fd, None) is not None and anonymous:
            self.anonymous.add(fd)
