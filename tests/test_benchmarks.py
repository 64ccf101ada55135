"""The parts of the benchmarks that are not a system of someone else's: the relay,
dsage's path with nothing on it, whose row is the floor under dsage's numbers."""

from __future__ import annotations

from pathlib import Path

from benchmarks.procs import all_stats, descendants
from benchmarks.relay import Relay
from benchmarks.tasks import ident, spin

from .conftest import wait_for


def _gone(pid: int) -> bool:
    """Whether a process has ended (a zombie left to a parent that does not reap
    it has ended too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_the_relay_runs_calls_and_maps_in_its_slots_and_ends_every_process() -> None:
    relay = Relay(2)
    try:
        assert relay.call(ident, 7) == 7
        assert relay.map(spin, [10, 20]) == [spin(10), spin(20)]
        assert relay.map(ident, range(3000)) == list(range(3000))  # results in order
        broker, monitor = (p.pid for p in relay.procs)
        slots = descendants(monitor, all_stats())
        assert len(slots) == 2  # the monitor's two slots ran the jobs
    finally:
        relay.close()
    for pid in (broker, monitor, *slots):
        wait_for(lambda: _gone(pid), what=f"process {pid} to end")
