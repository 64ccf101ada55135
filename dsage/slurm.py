"""Monitors on a SLURM cluster: ``dsage slurm submit`` and ``dsage.slurm_workers()``.

A batch job asks for ``nodes`` nodes and runs one ``dsage-worker`` per node
through ``srun``, with ``workers_per_node`` slots (and as many CPUs) each. The
monitors offer the tag ``slurm-JOBID`` beside any given, so jobs can be sent to
that allocation (``requires=['slurm-1234']``) and ``D.workers()`` shows where
each monitor came from. Their log is the batch job's output file, in
``$DSAGE_HOME/slurm/``. Cancelling the batch job (``scancel``) sends the
monitors SIGTERM: running jobs get the monitor's grace time, then go back to
the broker.

:func:`sbatch_script` is pure (the text of the script); :func:`submit` and
:func:`cancel` call SLURM's ``sbatch`` and ``scancel``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import keys as keys_mod
from .cluster import MONITOR_FIELDS, _as_args
from .options import port as port_number, positive_int, tag_list

__all__ = ["SlurmError", "SlurmJob", "SlurmRequest", "cancel", "sbatch_script", "slurm_workers", "submit"]

#: how long ``sbatch`` and ``scancel`` may take to answer
COMMAND_TIMEOUT = 60.0

_TAG = re.compile(r"^[A-Za-z0-9_.+-]+$")


class SlurmError(RuntimeError):
    """SLURM's commands are missing or refused the request."""


@dataclass
class SlurmRequest:
    """What to ask SLURM for, and how its monitors reach the broker."""

    nodes: int
    workers_per_node: int
    server: str
    port: int = 8081
    time: str | None = None
    partition: str | None = None
    job_name: str = "dsage-workers"
    #: where the batch job's output (the monitors' log) goes; %j is the job id
    output: Path | None = None
    #: the dsage folder the monitors use (must hold a trusted keypair on the nodes)
    home: Path | None = None
    #: the command that runs a monitor (default ``dsage-worker``)
    worker_command: list[str] = field(default_factory=lambda: ["dsage-worker"])
    #: further ``dsage-worker`` arguments (``--priority=5``, ...)
    worker_args: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.workers_per_node < 1:
            raise ValueError("nodes and workers_per_node must be at least 1")
        for tag in self.tags:
            if not _TAG.match(tag):
                raise ValueError(f"tag {tag!r}: use letters, digits and _ . + -")


def sbatch_script(r: SlurmRequest) -> str:
    """The batch script: ``#SBATCH`` lines for the allocation, then one monitor per
    node through ``srun``, tagged with the job id (expanded by the shell on the node)."""
    header = [f"--job-name={r.job_name}", f"--nodes={r.nodes}", "--ntasks-per-node=1",
              f"--cpus-per-task={r.workers_per_node}"]
    if r.time:
        header.append(f"--time={r.time}")
    if r.partition:
        header.append(f"--partition={r.partition}")
    if r.output:
        header.append(f"--output={r.output}")
    lines = ["#!/bin/sh", *(f"#SBATCH {shlex.quote(h)}" for h in header), "",
             "# dsage monitors, one per node; written by `dsage slurm submit`"]
    if r.home is not None:
        lines.append(f"export DSAGE_HOME={shlex.quote(str(r.home))}")
    tags = "".join(f"{t}," for t in r.tags)
    worker = [*map(shlex.quote, r.worker_command),
              "--server", shlex.quote(r.server), "--port", str(r.port),
              "--workers", str(r.workers_per_node), *map(shlex.quote, r.worker_args),
              "--log-file", "-", f'--tags={tags}slurm-"$SLURM_JOB_ID"']
    lines.append(f"exec srun --ntasks-per-node=1 --cpus-per-task={r.workers_per_node} "
                 "--kill-on-bad-exit=0 " + " ".join(worker))
    return "\n".join(lines) + "\n"


@dataclass
class SlurmJob:
    """A submitted batch job of monitors."""

    job_id: str
    script: Path

    @property
    def tag(self) -> str:
        """The tag its monitors offer."""
        return f"slurm-{self.job_id}"

    @property
    def output(self) -> Path:
        """The batch job's output file: the monitors' log."""
        return self.script.parent / f"dsage-workers-{self.job_id}.out"

    def cancel(self) -> None:
        """End the batch job (its monitors get SIGTERM, then their grace time)."""
        cancel(self.job_id)


def _run(args: list[str]) -> str:
    if shutil.which(args[0]) is None:
        raise SlurmError(f"{args[0]} not found: run this where SLURM's commands are on PATH "
                         "(the cluster's login node)")
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise SlurmError(f"{args[0]} did not answer within {COMMAND_TIMEOUT:.0f} s") from e
    if done.returncode != 0:
        raise SlurmError(f"{shlex.join(args)} failed: "
                         f"{done.stderr.strip() or done.stdout.strip() or done.returncode}")
    return done.stdout


def submit(r: SlurmRequest, sbatch_args: list[str] | None = None) -> SlurmJob:
    """Write the script into ``$DSAGE_HOME/slurm/`` and submit it with ``sbatch``."""
    folder = keys_mod.home(r.home) / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    if r.output is None:
        r = dataclasses.replace(r, output=folder / "dsage-workers-%j.out")
    fd, name = tempfile.mkstemp(prefix="dsage-workers-", suffix=".sh", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(sbatch_script(r))
    script = Path(name)
    out = _run(["sbatch", "--parsable", *(sbatch_args or []), str(script)]).strip()
    job_id = out.split(";")[0]  # "id" or "id;cluster"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch answered {out!r}, not a job id")
    final = folder / f"dsage-workers-{job_id}.sh"
    script.rename(final)
    return SlurmJob(job_id, final)


def cancel(job_id: str) -> None:
    """``scancel`` the batch job."""
    if not str(job_id).isdigit():
        raise SlurmError(f"{job_id!r} is not a SLURM job id")
    _run(["scancel", str(job_id)])


def slurm_workers(nodes: int = 1, workers_per_node: int | None = None,
                  server: str | None = None, port: int = 8081, time: str | None = None,
                  partition: str | None = None, sbatch_args: list[str] | None = None,
                  home: str | os.PathLike[str] | None = None, python: str | None = None,
                  tags: list[str] | None = None, **options: Any) -> SlurmJob:
    """Submit a SLURM batch job running a monitor on each of ``nodes`` nodes with
    ``workers_per_node`` slots (default: this machine's core count) for the broker at
    ``server:port`` (default: this host's name). ``python`` runs the monitors as
    ``python -m dsage.cli worker`` (default: ``dsage-worker`` from the nodes' PATH);
    ``options`` are those of ``dsage-worker`` (``priority=5``, ...); ``sbatch_args`` go
    to ``sbatch`` as they are. Returns the :class:`SlurmJob` (``.job_id``, ``.cancel()``).
    """
    args = _as_args(options, MONITOR_FIELDS - {"tags", "exit_with_parent"}, "worker")
    keys_mod.load_keypair(keys_mod.home(home))  # the monitors need it: say so now
    r = SlurmRequest(
        nodes=nodes, workers_per_node=workers_per_node or os.cpu_count() or 1,
        server=server or socket.gethostname(), port=port, time=time, partition=partition,
        home=keys_mod.home(home),
        worker_command=[python, "-m", "dsage.cli", "worker"] if python else ["dsage-worker"],
        worker_args=args, tags=list(tags or []))
    return submit(r, sbatch_args)


def add_commands(sub: Any) -> None:
    """``dsage slurm submit`` and ``dsage slurm cancel``."""
    s = sub.add_parser("slurm", help="run monitors on a SLURM cluster (submit, cancel)")
    ss = s.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = ss.add_parser(
        "submit", help="submit a batch job with a monitor on each node; prints the job id",
        description="Write an sbatch script into $DSAGE_HOME/slurm/ that runs `srun "
        "dsage-worker` on each node of the allocation, submit it, print the SLURM job id. "
        "The monitors offer the tag slurm-JOBID. Arguments after -- go to sbatch.")
    a.add_argument("--nodes", type=positive_int, default=1, help="nodes (default 1)")
    a.add_argument("--workers-per-node", type=positive_int, default=None, metavar="K",
                   help="slots (and CPUs asked for) per node (default: this machine's cores)")
    a.add_argument("--time", default=None, help="time limit, as sbatch takes it (1:00:00)")
    a.add_argument("--partition", default=None, help="the SLURM partition")
    a.add_argument("--server", default=None,
                   help="the broker's host as the nodes reach it (default: this host's name)")
    a.add_argument("--port", type=port_number, default=8081, help="the broker's port (default 8081)")
    a.add_argument("--tags", type=tag_list, default=[], metavar="TAG,TAG",
                   help="more tags the monitors offer")
    a.add_argument("--server-key", default=None, metavar="KEY",
                   help="the broker's public key, z85 or a key file (needed when the nodes' "
                   "dsage folder holds a worker key, not the broker owner's keypair)")
    a.add_argument("--python", default=None, metavar="PATH", help="run the monitors as "
                   "PATH -m dsage.cli worker (default: dsage-worker from the nodes' PATH)")
    a.add_argument("--home", type=Path, default=None,
                   help="the dsage folder, as the nodes see it (default: $DSAGE_HOME)")
    a.add_argument("sbatch_args", nargs="*", metavar="-- SBATCH_ARG",
                   help="further sbatch arguments, after --")
    a.set_defaults(func=_cmd_submit)
    c = ss.add_parser("cancel", help="cancel a batch job of monitors (scancel)")
    c.add_argument("job_id", help="the SLURM job id")
    c.set_defaults(func=_cmd_cancel)


def _cmd_submit(a: Any) -> int:
    try:
        job = slurm_workers(nodes=a.nodes, workers_per_node=a.workers_per_node,
                            server=a.server, port=a.port, time=a.time, partition=a.partition,
                            sbatch_args=a.sbatch_args, home=a.home, python=a.python,
                            tags=a.tags, server_key=a.server_key)
    except (SlurmError, ValueError) as e:
        print(f"dsage slurm: error: {e}", file=sys.stderr)
        return 2
    print(job.job_id)
    return 0


def _cmd_cancel(a: Any) -> int:
    try:
        cancel(a.job_id)
    except SlurmError as e:
        print(f"dsage slurm: error: {e}", file=sys.stderr)
        return 2
    return 0
