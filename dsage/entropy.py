"""Random bytes read from the system many at a time.

``os.urandom`` lets go of the interpreter lock for its system call, and another
thread (the client's I/O thread) may then hold the lock for a while: reading
a few kilobytes at once and handing them out in pieces makes that once per
many job ids or nonces instead of once each.
"""

from __future__ import annotations

import os


class RandomPool:
    """Random byte strings of ``size`` bytes, ``per_read`` of them read at a time. A
    child forked while some are left never hands out its parent's (it reads its own)."""

    def __init__(self, size: int, per_read: int = 256) -> None:
        self.size, self.per_read = size, per_read
        self._left: list[bytes] = []
        os.register_at_fork(after_in_child=self._left.clear)

    def take(self) -> bytes:
        """A fresh random string (safe from several threads: each gets its own)."""
        try:
            return self._left.pop()
        except IndexError:
            raw = os.urandom(self.size * self.per_read)
            self._left.extend(raw[i:i + self.size] for i in range(0, len(raw), self.size))
            return self._left.pop()
