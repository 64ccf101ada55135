"""One function per system. Each starts its cluster with 2 workers, measures, and
always shuts the cluster down (``try``/``finally``).

Every function returns a dict of measurements (see :func:`measure`); the runner
calls each in a fresh child process, so start-up is cold and one system's
threads, imports and leftovers cannot disturb the next.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .procs import cpu_per_job, role_ticks
from .tasks import ident, spin

WORKERS = 2


@dataclass
class Config:
    """What to measure and how much of it."""

    latency_jobs: int = 1000
    latency_warmup: int = 50
    tiny_jobs: int = 20_000
    cpu_jobs: int = 10_000
    #: dask and ipyparallel run at most this many tiny jobs (throughput and CPU
    #: per job): at their few hundred jobs/s, more would not fit the 5 minutes
    slow_jobs: int = 5_000
    cpu_tasks: int = 16
    cpu_iterations: int = 1_000_000  # set by calibration in the runner
    cpu_rounds: int = 2


#: systems whose job counts are capped at ``Config.slow_jobs``
SLOW = ("dask", "ipyparallel")


def capped(cfg: Config) -> Config:
    """``cfg`` with the tiny-job counts capped for a slow system."""
    return dataclasses.replace(cfg, tiny_jobs=min(cfg.tiny_jobs, cfg.slow_jobs),
                               cpu_jobs=min(cfg.cpu_jobs, cfg.slow_jobs))


def log(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


#: roles of the processes whose CPU time is counted: the client (this process
#: alone) and everything it started (a system's cluster, the pool's workers)
def default_roles() -> dict[str, list[tuple[int, str]]]:
    me = os.getpid()
    return {"client": [(me, "self")], "cluster": [(me, "descendants")]}


def round_trips(cfg: Config, prefix: str, call: Callable[[int], Any],
                expect: Callable[[int], Any]) -> dict[str, Any]:
    """Median and p90 of ``cfg.latency_jobs`` sequential ``call(i)`` after a warm-up."""
    for i in range(cfg.latency_warmup):
        call(i)
    lat = []
    for i in range(cfg.latency_jobs):
        t = time.perf_counter()
        r = call(i)
        lat.append(time.perf_counter() - t)
        if r != expect(i):
            raise AssertionError(f"round trip returned {r!r} for {i!r}")
    lat.sort()
    out = {f"{prefix}_median_ms": statistics.median(lat) * 1e3,
           f"{prefix}_p90_ms": lat[int(0.9 * (len(lat) - 1))] * 1e3}
    log(f"{prefix.replace('_', ' ')}: median {out[f'{prefix}_median_ms']:.2f} ms, "
        f"p90 {out[f'{prefix}_p90_ms']:.2f} ms")
    return out


def measure(cfg: Config, start_s: float, one: Callable[[int], Any],
            many: Callable[[Callable[[Any], Any], Iterable[Any]], list[Any]], *,
            code_one: Callable[[], Any] | None = None, code_expect: Any = None,
            roles: Callable[[], dict[str, list[tuple[int, str]]]] = default_roles,
            ) -> dict[str, Any]:
    """The shared measurements, given a running system.

    ``one(x)`` submits ``ident(x)`` and waits for its result; ``many(f, xs)``
    submits ``f(x)`` for every x, one job each (no chunking), and returns the
    results in order. ``code_one()``, where a system has code jobs, submits one
    and returns its result (``code_expect``). ``roles()`` says whose CPU time
    to count (see :func:`benchmarks.procs.role_ticks`).
    """
    out: dict[str, Any] = {"start_s": start_s}

    out.update(round_trips(cfg, "rtt", one, lambda i: i))
    if code_one is not None:
        out.update(round_trips(cfg, "rtt_code", lambda i: code_one(), lambda i: code_expect))

    xs = list(range(cfg.tiny_jobs))
    t = time.perf_counter()
    results = many(ident, xs)
    elapsed = time.perf_counter() - t
    if results != xs:
        raise AssertionError("tiny jobs returned wrong results")
    out["tiny_jobs"] = cfg.tiny_jobs
    out["tiny_s"] = elapsed
    out["tiny_per_s"] = cfg.tiny_jobs / elapsed
    log(f"tiny jobs: {cfg.tiny_jobs} in {elapsed:.2f} s = {out['tiny_per_s']:.0f}/s")

    # CPU time per job, over all the processes of the system (the client included)
    xs = list(range(cfg.cpu_jobs))
    who = roles()
    before = role_ticks(who)
    t = time.perf_counter()
    results = many(ident, xs)
    elapsed = time.perf_counter() - t
    after = role_ticks(who)
    if results != xs:
        raise AssertionError("tiny jobs returned wrong results")
    per = cpu_per_job(before, after, cfg.cpu_jobs)
    out["cpu_jobs"] = cfg.cpu_jobs
    out["cpu_jobs_s"] = elapsed
    out["cpu_job_ms"] = per.pop("total")
    out["cpu_job_ms_by_role"] = per
    log(f"CPU per job over {cfg.cpu_jobs} tiny jobs ({elapsed:.2f} s): "
        f"{out['cpu_job_ms']:.3f} ms (" + ", ".join(f"{k} {v:.3f}" for k, v in per.items()) + ")")

    # CPU-bound, paired with a local pool run just before each round, so that a
    # busy machine slows both sides alike and the ratio stays meaningful
    expected = spin(1000)  # sanity check on a small input, computed locally
    if many(spin, [1000])[0] != expected:
        raise AssertionError("spin returned a wrong result")
    from concurrent.futures import ProcessPoolExecutor

    walls, pool_walls = [], []
    with ProcessPoolExecutor(WORKERS) as ref:
        list(ref.map(ident, range(WORKERS * 4)))  # start its processes
        for _ in range(cfg.cpu_rounds):
            t = time.perf_counter()
            list(ref.map(spin, [cfg.cpu_iterations] * cfg.cpu_tasks))
            pool_walls.append(time.perf_counter() - t)
            t = time.perf_counter()
            many(spin, [cfg.cpu_iterations] * cfg.cpu_tasks)
            walls.append(time.perf_counter() - t)
    out["cpu_s"] = min(walls)
    out["cpu_all_s"] = walls
    out["cpu_pool_s"] = min(pool_walls)
    out["cpu_pool_all_s"] = pool_walls
    out["cpu_vs_pool"] = out["cpu_s"] / out["cpu_pool_s"]
    log(f"cpu-bound: {cfg.cpu_tasks} tasks in {out['cpu_s']:.2f} s (best of {len(walls)}); "
        f"paired local pool {out['cpu_pool_s']:.2f} s: {out['cpu_vs_pool']:.3f}x")
    return out


# --- the systems


def bench_pool(cfg: Config) -> dict[str, Any]:
    """concurrent.futures.ProcessPoolExecutor(2): the baseline."""
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    ex = ProcessPoolExecutor(WORKERS)
    try:
        ex.submit(ident, 0).result()
        start = time.perf_counter() - t0

        def many(f, xs):
            futs = [ex.submit(f, x) for x in xs]
            return [fu.result() for fu in futs]

        def roles():
            me = os.getpid()
            return {"client": [(me, "self")], "workers": [(me, "descendants")]}

        out = measure(cfg, start, lambda x: ex.submit(ident, x).result(), many, roles=roles)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    out["version"] = f"Python {sys.version.split()[0]}"
    return out


def bench_dsage(cfg: Config) -> dict[str, Any]:
    """dsage: ``start_all(workers=2, port=0)`` in a fresh DSAGE_HOME."""
    import dsage

    home = tempfile.mkdtemp(prefix="dsage-bench-")
    D = None
    try:
        t0 = time.perf_counter()
        D = dsage.start_all(workers=WORKERS, port=0, home=home)
        t_up = time.perf_counter() - t0
        D.eval_function(ident, (0,)).result()
        start = time.perf_counter() - t0
        log(f"start_all {t_up:.2f} s, first result at {start:.2f} s")

        def many(f, xs):
            jobs = [D.eval_function(f, (x,)) for x in xs]
            return [j.result() for j in jobs]

        def roles():
            me, c = os.getpid(), D._cluster
            return {"client": [(me, "self")], "broker": [(c.broker.pid, "tree")],
                    "monitor": [(m.pid, "self") for m in c.monitors],
                    "slots": [(m.pid, "descendants") for m in c.monitors]}

        out = measure(cfg, start, lambda x: D.eval_function(ident, (x,)).result(), many,
                      code_one=lambda: D("2+2").result(), code_expect=4, roles=roles)
        out["start_all_s"] = t_up
    finally:
        if D is not None:
            D.close()
        shutil.rmtree(home, ignore_errors=True)
    out["version"] = dsage.__version__
    return out


def bench_relay(cfg: Config) -> dict[str, Any]:
    """dsage's path with nothing on it (:mod:`benchmarks.relay`): the floor under its
    round trip and rate on this machine."""
    import zmq

    from .relay import Relay

    t0 = time.perf_counter()
    relay = Relay(WORKERS)
    try:
        relay.call(ident, 0)
        out = measure(cfg, time.perf_counter() - t0, lambda x: relay.call(ident, x), relay.map)
    finally:
        relay.close()
    out["version"] = f"pyzmq {zmq.__version__}"
    return out


def bench_dask(cfg: Config) -> dict[str, Any]:
    """dask.distributed: LocalCluster(n_workers=2, threads_per_worker=1)."""
    cfg = capped(cfg)
    import cloudpickle
    import dask
    from dask.distributed import Client, LocalCluster

    from . import tasks

    cloudpickle.register_pickle_by_value(tasks)
    t0 = time.perf_counter()
    cluster = client = None
    try:
        cluster = LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
        client.submit(ident, 0, pure=False).result()
        start = time.perf_counter() - t0

        def many(f, xs):
            return client.gather([client.submit(f, x, pure=False) for x in xs])

        out = measure(cfg, start, lambda x: client.submit(ident, x, pure=False).result(), many)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    out["version"] = dask.__version__
    return out


def bench_ray(cfg: Config) -> dict[str, Any]:
    """Ray: ``ray.init(num_cpus=2)``."""
    import cloudpickle
    import ray

    from . import tasks

    cloudpickle.register_pickle_by_value(tasks)
    t0 = time.perf_counter()
    try:
        ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
                 logging_level="warning")
        r_ident = ray.remote(ident)
        r_spin = ray.remote(spin)
        remote = {ident: r_ident, spin: r_spin}
        ray.get(r_ident.remote(0))
        start = time.perf_counter() - t0

        def many(f, xs):
            rf = remote[f]
            return ray.get([rf.remote(x) for x in xs])

        out = measure(cfg, start, lambda x: ray.get(r_ident.remote(x)), many)
    finally:
        ray.shutdown()
    out["version"] = ray.__version__
    return out


def bench_ipyparallel(cfg: Config) -> dict[str, Any]:
    """ipyparallel: a local Cluster(n=2), load-balanced view."""
    cfg = capped(cfg)
    import ipyparallel as ipp

    t0 = time.perf_counter()
    cluster = ipp.Cluster(n=WORKERS, log_level=40)
    rc = None
    try:
        rc = cluster.start_and_connect_sync()
        view = rc.load_balanced_view()
        view.apply_async(ident, 0).get()
        start = time.perf_counter() - t0

        def many(f, xs):
            ars = [view.apply_async(f, x) for x in xs]
            return [ar.get() for ar in ars]

        out = measure(cfg, start, lambda x: view.apply_async(ident, x).get(), many)
    finally:
        if rc is not None:
            rc.close()
        cluster.stop_cluster_sync()
    out["version"] = ipp.__version__
    return out


SYSTEMS: dict[str, tuple[str | None, Callable[[Config], dict[str, Any]]]] = {
    # name: (module that must be importable, function)
    "dsage": ("dsage", bench_dsage),
    "relay": ("zmq", bench_relay),
    "pool": (None, bench_pool),
    "dask": ("distributed", bench_dask),
    "ray": ("ray", bench_ray),
    "ipyparallel": ("ipyparallel", bench_ipyparallel),
}


def missing(name: str) -> str | None:
    """Why a system cannot run here (its package is not installed), or None."""
    import importlib.util

    module = SYSTEMS[name][0]
    if module is not None and importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install 'dsage[bench]')"
    return None


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
