"""Soak: thousands of tiny jobs while slots and whole monitors are killed at random.

A monitor killed with SIGKILL (its whole process group) or a slot killed from
outside loses nothing: the jobs they ran are re-queued and run elsewhere. At
the end every job is completed exactly once with the right result.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

import dsage
from dsage.cluster import ManagedProcess

from .conftest import Procs, wait_for

JOBS = 3000
ROUNDS = 6
SOAK = {"heartbeat": 0.2, "liveness": 5}


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (the slots of a monitor)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != b"Z":
            out.append(int(entry))
    return out


def _kill_a_slot(rng: random.Random, monitors: list[ManagedProcess]) -> bool:
    """SIGKILL one slot process of a random live monitor; True if one was killed."""
    live = [m for m in monitors if m.alive()]
    if not live:
        return False
    slots = _children(rng.choice(live).pid)
    if not slots:
        return False
    try:
        os.kill(rng.choice(slots), signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_soak_random_kills_lose_nothing(procs: Procs) -> None:
    rng = random.Random(os.environ.get("DSAGE_SOAK_SEED", time.time_ns()))
    procs.broker(failure_limit=50, **SOAK)
    monitors = [procs.worker(2, **SOAK) for _ in range(2)]
    D = procs.client()
    procs.wait_workers(D, 4)
    jobs: dict[int, dsage.JobWrapper] = {}
    slot_kills = monitor_kills = 0
    per_round = JOBS // ROUNDS
    for r in range(ROUNDS):
        batch = {i: D(f"{i} * {i}") for i in range(r * per_round, (r + 1) * per_round)}
        jobs.update(batch)
        wait_for(lambda: any(j.status != "new" for j in batch.values()), 60,
                 "the batch under way")
        if r % 2 == 0:
            victim = rng.choice([m for m in monitors if m.alive()])
            procs.kill9(victim)
            monitor_kills += 1
            monitors.append(procs.worker(2, **SOAK))
        for _ in range(2):
            slot_kills += _kill_a_slot(rng, monitors)
    deadline = time.monotonic() + 80
    for j in jobs.values():
        j.wait(max(1.0, deadline - time.monotonic()))
    for i, j in jobs.items():
        assert j.status == "completed", (i, j.status, j.error)
        assert j.result() == i * i
    stored = D.get_my_jobs(limit=None)
    assert len(stored) == JOBS
    assert len({w.job_id for w in stored}) == JOBS
    assert all(w.status == "completed" for w in stored)
    assert monitor_kills == ROUNDS // 2
    print(f"soak: {JOBS} jobs, {monitor_kills} monitors and {slot_kills} slots killed, "
          f"{sum(j.failures > 0 for j in jobs.values())} re-queued")
