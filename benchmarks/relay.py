"""The floor under dsage's numbers: its path with nothing on it.

A job in dsage goes client -> broker -> monitor -> slot and back: four ZeroMQ
hops over TCP with CURVE (each through the I/O threads at both ends) and two
on a slot's socket pair. This "system" is those hops and processes alone, in
plain pyzmq: a ROUTER/ROUTER broker that passes each request to the next
monitor in turn, a monitor that hands it to a free slot over a socket pair,
and slots that unpickle the call, run it and pickle the result. Nothing is
checked, stored, sealed, reset or retried, and the client has no I/O thread.
Whatever dsage measures above this row is the price of what it does on the
way; a target below it cannot be met by this design, however fast its code.

Run by the benchmark runner as ``relay`` (``benchmarks.systems``); the
broker and the monitor are this module run as a script:
``python -m benchmarks.relay broker|monitor ...``.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import zmq

#: a slot frame's start: the length of what follows and the request's tag
_FRAME = struct.Struct("<IQ")


def _curve(sock: zmq.Socket[bytes], server_public: bytes, server_secret: bytes | None,
           ) -> None:
    """Make ``sock`` a CURVE server (with the secret) or a client of that server."""
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if server_secret is not None:
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = server_public, server_secret
    else:
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.curve_serverkey = server_public


def run_broker(public: bytes, secret: bytes) -> None:
    """Bind two ROUTERs (clients, monitors), print their ports, relay until killed."""
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for s in (front, back):
        _curve(s, public, secret)
    print(front.bind_to_random_port("tcp://127.0.0.1"),
          back.bind_to_random_port("tcp://127.0.0.1"), flush=True)
    monitors: deque[bytes] = deque()
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        ready = dict(poller.poll())
        while back in ready:
            try:
                mid, cid, *body = back.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if cid == b"":
                monitors.append(mid)  # a monitor says hello
            else:
                front.send_multipart([cid, *body])
        while front in ready and monitors:
            try:
                cid, *body = front.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            monitors.rotate(-1)
            back.send_multipart([monitors[0], cid, *body])


def _serve_slot(sock: socket.socket) -> None:
    """A slot: run each pickled call that comes on ``sock``; send its pickled result."""
    f = sock.makefile("rb")
    while True:
        start = f.read(_FRAME.size)
        if len(start) < _FRAME.size:
            return
        n, tag = _FRAME.unpack(start)
        func, args = pickle.loads(f.read(n))
        out = pickle.dumps(func(*args))
        sock.sendall(_FRAME.pack(len(out), tag) + out)


def run_monitor(port: int, public: bytes, slots: int) -> None:
    """Fork ``slots`` slots, then take requests from the broker at ``port`` and run
    each in a free slot (queued here while none is), until killed."""
    pipes = []
    for _ in range(slots):
        mine, theirs = socket.socketpair()
        if os.fork() == 0:
            mine.close()
            _serve_slot(theirs)
            os._exit(0)
        theirs.close()
        pipes.append(mine)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    _curve(dealer, public, None)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send_multipart([b""])
    socks = {p.fileno(): p for p in pipes}
    files = {fd: p.makefile("rb") for fd, p in socks.items()}
    free = list(socks)
    waiting: deque[list[bytes]] = deque()
    running: dict[int, tuple[int, bytes, bytes]] = {}  # slot -> (tag, client, request)
    poller = zmq.Poller()
    poller.register(dealer, zmq.POLLIN)
    for p in pipes:
        poller.register(p.fileno(), zmq.POLLIN)
    tag = 0
    while True:
        ready = dict(poller.poll())
        for fd in [fd for fd in files if fd in ready]:
            start = files[fd].read(_FRAME.size)
            n, done = _FRAME.unpack(start)
            result = files[fd].read(n)
            t, cid, req = running.pop(fd)
            assert t == done
            dealer.send_multipart([cid, req, result])
            free.append(fd)
        while dealer in ready:
            try:
                waiting.append(dealer.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        while waiting and free:
            cid, req, call = waiting.popleft()
            fd = free.pop()
            tag += 1
            running[fd] = (tag, cid, req)
            socks[fd].sendall(_FRAME.pack(len(call), tag) + call)


class Relay:
    """The client side: a DEALER to the broker (no thread of its own), and the
    broker and monitor processes, stopped by :meth:`close`."""

    def __init__(self, slots: int) -> None:
        public, secret = zmq.curve_keypair()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path,
               "RELAY_PUBLIC": public.decode(), "RELAY_SECRET": secret.decode()}
        cmd = [sys.executable, "-m", "benchmarks.relay"]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        try:
            self.procs.append(subprocess.Popen([*cmd, "broker"], stdout=subprocess.PIPE,
                                               env=env))
            assert self.procs[0].stdout is not None
            front, back = map(int, self.procs[0].stdout.readline().split())
            self.procs.append(subprocess.Popen([*cmd, "monitor", str(back), str(slots)],
                                               env=env))
        except BaseException:
            self.close()  # (a broker that did not say its ports is not left running)
            raise
        _curve(self.sock, public, None)
        self.sock.connect(f"tcp://127.0.0.1:{front}")

    def call(self, func: Callable[..., Any], *args: Any) -> Any:
        self.sock.send_multipart([b"0", pickle.dumps((func, args))])
        return pickle.loads(self.sock.recv_multipart()[1])

    def map(self, func: Callable[[Any], Any], xs: Iterable[Any]) -> list[Any]:
        """One request per item, all sent before the first result is awaited."""
        items = list(xs)
        for i, x in enumerate(items):
            self.sock.send_multipart([b"%d" % i, pickle.dumps((func, (x,)))])
        out: list[Any] = [None] * len(items)
        for _ in items:
            index, result = self.sock.recv_multipart()
            out[int(index)] = pickle.loads(result)
        return out

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        for p in self.procs:
            p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()


def main(argv: list[str]) -> None:
    public, secret = os.environ["RELAY_PUBLIC"].encode(), os.environ["RELAY_SECRET"].encode()
    if argv[0] == "broker":
        run_broker(public, secret)
    else:
        run_monitor(int(argv[1]), public, int(argv[2]))


if __name__ == "__main__":
    main(sys.argv[1:])
