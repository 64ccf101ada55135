"""The monitor and its slots, over real processes, sockets and signals."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

import dsage
from dsage.slot import FrameError, recv_frame, send_frame


# --- the slot pipe


def test_frames_carry_a_header_and_two_raw_blobs() -> None:
    a, b = socket.socketpair()
    with a, b:
        big = os.urandom(1 << 22)  # larger than the socket buffer: sent while received
        sender = threading.Thread(target=send_frame, args=(a, {"id": "x", "n": 1}, big, b"out"))
        sender.start()
        assert recv_frame(b) == ({"id": "x", "n": 1}, big, b"out")
        sender.join()
        send_frame(a, {"ready": True})
        assert recv_frame(b) == ({"ready": True}, b"", b"")


def test_a_pipe_that_ends_between_frames_or_inside_one() -> None:
    a, b = socket.socketpair()
    with b:
        a.close()
        with pytest.raises(EOFError) as e:
            recv_frame(b)
        assert not isinstance(e.value, FrameError)  # no frame was cut: the other side left
    for cut in (3, 25, 40):  # inside the prefix, the header, the first blob
        a, b = socket.socketpair()
        with b:
            with a:
                send_frame(a, {"id": "x"}, b"r" * 100)
            whole = b.recv(1000)
        a, b = socket.socketpair()
        with b:
            with a:
                a.sendall(whole[:cut])
            with pytest.raises(FrameError):
                recv_frame(b)


@pytest.mark.parametrize("code, says", [
    # closes its pipe and goes on: killed, not waited for
    ("import os, sys, time\nos.close(int(sys.argv[1]))\ntime.sleep(300)",
     "broke its process's pipe"),
    # writes a bogus frame start into it and goes on
    ("import os, sys, time\nos.write(int(sys.argv[1]), b'\\xff' * 20)\ntime.sleep(300)",
     "broke its process's pipe"),
    # writes part of a frame and exits: a truncated frame from a dead slot
    ("import os, sys\nos.write(int(sys.argv[1]), b'\\x05\\x00')\nos._exit(7)",
     "exited with status 7"),
], ids=["closed", "garbage", "truncated"])
def test_a_job_that_breaks_its_slot_pipe_fails_and_the_monitor_goes_on(
        cluster: dsage.DSage, code: str, says: str) -> None:
    t0 = time.monotonic()
    j = cluster(code).wait(30)
    assert j.status == "failed", (j.status, j.error)
    assert says in (j.error or "")
    assert time.monotonic() - t0 < 20
    assert [cluster(f"{i} + 1").wait(60).result for i in range(4)] == [1, 2, 3, 4]
