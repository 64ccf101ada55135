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
