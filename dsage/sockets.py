"""Sending frames from the event loops; why a host cannot be reached."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import zmq

_MORE_NOBLOCK = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_NOBLOCK = int(zmq.NOBLOCK)
#: frames at least this large are sent without a copy
ZERO_COPY = 64 * 1024


def send_frames(sock: zmq.Socket[bytes], frames: Sequence[bytes]) -> None:
    """``send_multipart`` without blocking: raises ``zmq.Again`` (or another
    ``ZMQError``) before anything is sent. Flags are plain ints, because pyzmq's
    enum flag arithmetic costs more per frame than a small send."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, _MORE_NOBLOCK if i < last else _NOBLOCK, copy=len(frame) < ZERO_COPY)


def unfound(host: str) -> str | None:
    """Why ``host`` cannot be found (its name does not resolve), or None if it can."""
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"the host {host!r} cannot be found ({e.strerror})"
    return None
