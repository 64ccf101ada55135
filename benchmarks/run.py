"""Run the benchmarks: ``python -m benchmarks`` or ``python benchmarks/run.py``.

Each system runs in its own child process (``--child NAME``), one after the
other, so each start is cold and a system that hangs is killed (its whole
process group) after ``--timeout`` seconds without stopping the run. The
parent prints one table row per system and can write everything as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.systems import SYSTEMS, Config, missing, repo_root  # noqa: E402
from benchmarks.tasks import calibrate  # noqa: E402

DEFAULT_SYSTEMS = "dsage,relay,pool,dask,ray,ipyparallel"

#: the targets dsage is held to (DESIGN.md, "Performance"; the issue "Core v2"),
#: each checked against the numbers of the same run
TARGETS = {
    "rtt_vs_pool": 3.0,    # round-trip median at most 3x the pool's
    "rtt_vs_ray": 0.6,     # ... and at most 0.6x Ray's
    "tiny_vs_pool": 0.55,  # unchunked jobs/s at least 0.55x the pool's
    "tiny_vs_ray": 2.5,    # ... and at least 2.5x Ray's
    "cpu_job_ms": 0.4,     # CPU per job over all processes at most 0.4 ms
    "cpu": 1.10,           # CPU-bound wall time within 1.10x the pool's
    "start_s": 1.0,        # start to first result under 1 s
    "owed_mb": 300.0,      # broker RSS while a stopped client is owed 12 x 25 MB
    "million_mb": 1024.0,  # a million queued jobs under 1 GB of broker RSS
    "list_s": 1.0,         # 10,000 jobs listed (get_my_jobs) in under a second
    "map_vs_pool1": 5.0,   # D.map of tiny items at least 5x the pool's map(chunksize=1)
    "example2": 1.10,      # the seed's Example 2 within 1.10x the pool's map(chunksize=1)
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=DEFAULT_SYSTEMS,
                   help=f"comma-separated, from {','.join(SYSTEMS)} (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="fewer jobs and shorter CPU tasks (about a minute in all)")
    p.add_argument("--million", action="store_true",
                   help="also measure the dsage broker's memory with 1,000,000 queued jobs")
    p.add_argument("--million-count", type=int, default=1_000_000, help=argparse.SUPPRESS)
    p.add_argument("--no-owed", action="store_true",
                   help="skip the broker's memory while a stopped client is owed 12 x 25 MB "
                        "(run by default with dsage)")
    p.add_argument("--no-many", action="store_true",
                   help="skip D.map and the seed's Example 2 against the pool (run by default "
                        "when dsage and pool are both among the systems)")
    p.add_argument("--latency-jobs", type=int, help="sequential round trips (default 1000)")
    p.add_argument("--tiny-jobs", type=int, help="tiny jobs for throughput (default 20000)")
    p.add_argument("--cpu-jobs", type=int, help="tiny jobs for CPU per job (default 10000)")
    p.add_argument("--cpu-seconds", type=float, help="length of one CPU task (default 0.25)")
    p.add_argument("--timeout", type=float, default=240.0,
                   help="seconds before one system's run is abandoned (default 240)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_main(args: argparse.Namespace) -> int:
    """Run one system in this process and write its measurements to ``--out``."""
    if args.child == "million":
        from benchmarks.million import bench_million

        result = bench_million(json.loads(args.config)["count"])
    elif args.child == "many":
        from benchmarks.many import bench_many

        result = bench_many(**json.loads(args.config))
    elif args.child == "owed":
        from benchmarks.owed import bench_owed

        result = bench_owed(**json.loads(args.config))
    else:
        cfg = Config(**json.loads(args.config))
        result = SYSTEMS[args.child][1](cfg)
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


def run_child(name: str, config: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``--child name`` in a new process group; its result, or ``{"error": ...}``."""
    fd, out = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".json")
    os.close(fd)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root(), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "benchmarks", "--child", name, "--config", json.dumps(config),
           "--out", out]
    proc = subprocess.Popen(cmd, env=env, cwd=repo_root(), start_new_session=True)
    try:
        rc = proc.wait(timeout)
        if rc != 0:
            return {"error": f"exited with status {rc}"}
        with open(out) as f:
            return json.load(f)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    finally:
        if proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(10)
                    break
                except subprocess.TimeoutExpired:
                    pass
        os.unlink(out)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _pair(r: dict[str, Any], prefix: str) -> str:
    """``median / p90`` of a round trip, or ``-``."""
    if f"{prefix}_median_ms" not in r:
        return "-"
    return f"{r[f'{prefix}_median_ms']:.2f} / {r[f'{prefix}_p90_ms']:.2f}"


def print_table(results: dict[str, dict[str, Any]], million: dict[str, Any] | None,
                owed: dict[str, Any] | None = None, many: dict[str, Any] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="dsage and the alternatives, 2 workers each")
    cols = ("system", "version", "round trip ms\nmedian / p90", "D('2+2') ms\nmedian / p90",
            "jobs/s\nunchunked", "CPU ms per\njob, all procs", "CPU-bound\nwall s",
            "CPU vs\npaired pool", "start to\n1st result s")
    for col in cols:
        t.add_column(col, justify="left" if col in ("system", "version") else "right")
    for name, r in results.items():
        if "error" in r or "skipped" in r:
            t.add_row(name, "", f"[yellow]{r.get('skipped') or r.get('error')}[/]",
                      *[""] * (len(cols) - 3))
            continue
        ratio = r.get("cpu_vs_pool")
        t.add_row(name, str(r.get("version", "")), _pair(r, "rtt"), _pair(r, "rtt_code"),
                  _fmt(r.get("tiny_per_s"), ",.0f"), _fmt(r.get("cpu_job_ms"), ".3f"),
                  _fmt(r.get("cpu_s"), ".2f"), _fmt(ratio, ".3f") + ("x" if ratio else ""),
                  _fmt(r.get("start_s"), ".2f"))
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(t)
    if any("cpu_jobs" in r for r in results.values()):
        console.print("jobs per system (throughput, CPU per job): " + "; ".join(
            f"{n} {r['tiny_jobs']:,}, {r['cpu_jobs']:,}" for n, r in results.items()
            if "cpu_jobs" in r))
    for name, r in results.items():
        by = r.get("cpu_job_ms_by_role")
        if by:
            console.print(f"CPU ms per job, {name}: " + ", ".join(
                f"{role} {ms:.3f}" for role, ms in by.items()) + f" (total {r['cpu_job_ms']:.3f})")
    if owed is not None:
        if "error" in owed:
            console.print(f"broker owing a stopped client results: [red]{owed['error']}[/]")
        else:
            console.print(
                f"broker while a stopped client is owed {owed['owed_jobs']} x "
                f"{owed['owed_bytes_each'] / 1e6:g} MB: RSS {owed['owed_broker_rss_mb']:.0f} MB "
                f"(peak {owed['owed_broker_hwm_mb']:.0f} MB, idle "
                f"{owed['owed_broker_idle_mb']:.0f} MB), all completed "
                f"{owed['owed_completed_s']:.1f} s after the client started "
                f"({owed['owed_done_before_stop']} done before it stopped)")
    if many is not None:
        if "error" in many:
            console.print(f"many jobs: [red]{many['error']}[/]")
        else:
            console.print(
                f"D.map of {many['map_items']:,} tiny items {many['map_s']:.3f} s: "
                f"{many['map_vs_pool1']:.1f}x the pool's map(chunksize=1) "
                f"({many['map_pool1_s']:.2f} s), {many['map_vs_pool_best']:.2f}x its best chunked "
                f"map (chunksize={many['map_pool_best_chunksize']:,}, "
                f"{many['map_pool_best_s']:.3f} s)")
            console.print(
                f"Example 2, {many['example2_numbers']:,} factorings: pool map(chunksize=1) "
                f"{many['example2_pool_s']:.2f} s; D.eval_function jobs "
                f"{many['example2_jobs_s']:.2f} s ({many['example2_jobs_vs_pool']:.3f}x); "
                f"D.map {many['example2_map_s']:.2f} s ({many['example2_map_vs_pool']:.3f}x)")
            if "list_s" in many:
                console.print(f"listing {many['list_jobs']:,} jobs with get_my_jobs(limit=None) "
                              f"in a fresh client: {many['list_s']:.2f} s")
    if million is not None:
        if "error" in million:
            console.print(f"million queued jobs: [red]{million['error']}[/]")
        else:
            console.print(
                f"{million['million_jobs']:,} queued jobs (no workers): broker RSS "
                f"{million['broker_rss_mb']:.0f} MB (peak {million['broker_hwm_mb']:.0f} MB, "
                f"idle {million['broker_rss_idle_mb']:.0f} MB), store "
                f"{million['store_mb']:.0f} MB on disk, submitted at "
                f"{million['million_submit_per_s']:,.0f} jobs/s")
    checks = targets(results, million, owed, many)
    if checks:
        tt = Table(title="dsage against its targets (measured in this run)")
        for col in ("target", "measured", ""):
            tt.add_column(col)
        for name, measured, ok in checks:
            verdict = ("[green]met[/]" if ok else "[red]missed[/]") if ok is not None \
                else "[yellow]not measured[/]"
            tt.add_row(name, measured, verdict)
        console.print(tt)


def targets(results: dict[str, dict[str, Any]], million: dict[str, Any] | None,
            owed: dict[str, Any] | None = None,
            many: dict[str, Any] | None = None) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for dsage against the others of the same run; met is
    None when the system to compare with was not measured."""
    T = TARGETS
    d = results.get("dsage", {})
    if "rtt_median_ms" not in d:
        d = {}
    out: list[tuple[str, str, bool | None]] = []

    def vs(label: str, key: str, other: str, limit: float, at_most: bool, spec: str,
           unit: str = "", other_key: str | None = None) -> None:
        """dsage's ``key`` over ``other``'s ``other_key`` (the same key by default)."""
        o, ok = results.get(other, {}), other_key or key
        if key not in d:
            return
        if ok not in o:
            out.append((label, f"{d[key]:{spec}}{unit} ({other} not measured)", None))
            return
        r = d[key] / o[ok]
        out.append((label, f"{r:.2f}x ({d[key]:{spec}} against {o[ok]:{spec}}{unit})",
                    r <= limit if at_most else r >= limit))

    # the others have one kind of job: both of dsage's round trips are held to it
    for key, what in (("rtt_median_ms", "round trip (eval_function)"),
                      ("rtt_code_median_ms", "round trip (code job D('2+2'))")):
        for other, limit in (("pool", T["rtt_vs_pool"]), ("ray", T["rtt_vs_ray"])):
            vs(f"{what} median <= {limit:g}x {other}'s", key, other, limit, True, ".2f", " ms",
               "rtt_median_ms")
    for other, limit in (("pool", T["tiny_vs_pool"]), ("ray", T["tiny_vs_ray"])):
        vs(f"unchunked jobs/s >= {limit:g}x {other}'s", "tiny_per_s", other, limit, False, ",.0f")
    if "cpu_job_ms" in d:
        out.append((f"CPU per job (all processes) <= {T['cpu_job_ms']:g} ms",
                    f"{d['cpu_job_ms']:.3f} ms", d["cpu_job_ms"] <= T["cpu_job_ms"]))
    if "cpu_vs_pool" in d:
        out.append((f"CPU-bound within {T['cpu']:.2f}x the pool", f"{d['cpu_vs_pool']:.3f}x",
                    d["cpu_vs_pool"] <= T["cpu"]))
    if "start_s" in d:
        out.append((f"start to first result < {T['start_s']:g} s", f"{d['start_s']:.2f} s",
                    d["start_s"] < T["start_s"]))
    if owed is not None and "owed_broker_rss_mb" in owed:
        out.append((f"broker RSS owing a stopped client {owed['owed_jobs']} x "
                    f"{owed['owed_bytes_each'] / 1e6:g} MB <= {T['owed_mb']:g} MB",
                    f"{owed['owed_broker_rss_mb']:.0f} MB (peak {owed['owed_broker_hwm_mb']:.0f})",
                    owed["owed_broker_rss_mb"] <= T["owed_mb"]))
    if many is not None and "map_s" in many:
        out.append((f"D.map of tiny items >= {T['map_vs_pool1']:g}x the pool's "
                    f"map(chunksize=1)", f"{many['map_vs_pool1']:.1f}x",
                    many["map_vs_pool1"] >= T["map_vs_pool1"]))
        for key, what in (("example2_jobs_vs_pool", "D.eval_function jobs"),
                          ("example2_map_vs_pool", "D.map")):
            out.append((f"Example 2 ({what}) within {T['example2']:.2f}x the pool's "
                        f"map(chunksize=1)", f"{many[key]:.3f}x", many[key] <= T["example2"]))
        if "list_s" in many:
            out.append((f"listing {many['list_jobs']:,} jobs < {T['list_s']:g} s",
                        f"{many['list_s']:.2f} s", many["list_s"] < T["list_s"]))
    if million is not None and "broker_rss_mb" in million:
        out.append((f"{million['million_jobs']:,} queued jobs < 1 GB",
                    f"{million['broker_rss_mb']:.0f} MB",
                    million["broker_rss_mb"] < T["million_mb"]))
    return out


def git_revision() -> str | None:
    """The repository's commit (with ``+dirty`` when dsage/ has local changes), if known."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_root(),
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dsage"], cwd=repo_root(),
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty else "")) or None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        print(f"unknown system(s): {', '.join(unknown)}; known: {', '.join(SYSTEMS)}",
              file=sys.stderr)
        return 2
    quick = args.quick
    cpu_seconds = args.cpu_seconds or (0.1 if quick else 0.25)
    cfg = Config(latency_jobs=args.latency_jobs or (200 if quick else 1000),
                 latency_warmup=20 if quick else 50,
                 tiny_jobs=args.tiny_jobs or (1000 if quick else 20_000),
                 cpu_jobs=args.cpu_jobs or (1000 if quick else 10_000),
                 cpu_rounds=1 if quick else 2,
                 cpu_iterations=calibrate(cpu_seconds))
    revision = git_revision()
    print(f"dsage at {revision or '?'}; {platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f}; CPU task = spin({cfg.cpu_iterations:,}) "
          f"~{cpu_seconds:g} s", file=sys.stderr)
    t_all = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        why = missing(name)
        if why:
            print(f"{name}: skipped, {why}", file=sys.stderr)
            results[name] = {"skipped": why}
            continue
        print(f"{name}:", file=sys.stderr, flush=True)
        t = time.perf_counter()
        results[name] = run_child(name, dataclasses.asdict(cfg), args.timeout)
        if "error" in results[name]:
            print(f"  {name} failed: {results[name]['error']}", file=sys.stderr)
        print(f"  ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    owed = None
    if "dsage" in names and not args.no_owed and "skipped" not in results["dsage"]:
        print("dsage, broker owing a stopped client large results:", file=sys.stderr, flush=True)
        t = time.perf_counter()
        owed = run_child("owed", {}, args.timeout)
        if "error" in owed:
            print(f"  failed: {owed['error']}", file=sys.stderr)
        print(f"  ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    many = None
    if "dsage" in names and "pool" in names and not args.no_many \
            and "skipped" not in results["dsage"]:
        print("dsage and pool, many jobs (D.map, Example 2):", file=sys.stderr, flush=True)
        t = time.perf_counter()
        many = run_child("many", {"items": 10_000 if quick else 50_000,
                                  "numbers": 200 if quick else 1000,
                                  "rounds": 1 if quick else 2}, args.timeout)
        if "error" in many:
            print(f"  failed: {many['error']}", file=sys.stderr)
        print(f"  ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    million = None
    if args.million:
        print("dsage, million queued jobs:", file=sys.stderr, flush=True)
        million = run_child("million", {"count": args.million_count}, max(args.timeout, 1800))
    total = time.perf_counter() - t_all
    print_table(results, million, owed, many)
    print(f"total {total:.0f} s; load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        doc = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
               "cpus": os.cpu_count(), "revision": revision, "python": platform.python_version(),
               "config": dataclasses.asdict(cfg), "cpu_task_seconds": cpu_seconds,
               "results": results, "owed": owed, "million": million, "many": many,
               "targets": [{"target": n, "measured": m, "met": ok}
                           for n, m, ok in targets(results, million, owed, many)],
               "total_s": total}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
