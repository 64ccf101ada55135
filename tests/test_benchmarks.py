"""The parts of the benchmarks that are not a system of someone else's: the relay,
dsage's path with nothing on it, whose row is the floor under dsage's numbers."""

from __future__ import annotations

from benchmarks.procs import all_stats, descendants
from benchmarks.relay import Relay
from benchmarks.tasks import ident, spin

from .conftest import all_gone


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
    all_gone([broker, monitor, *slots])
