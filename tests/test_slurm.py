"""Monitors on SLURM: the batch script (pure, and run by a shell against a stand-in
``srun``), and ``dsage slurm submit``/``cancel`` and ``dsage.slurm_workers()``
against a real single-node SLURM (Debian ``slurm-wlm`` with ``munge``) that the
test starts as root and always stops."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dsage
from dsage.cli import main
from dsage.cluster import free_port
from dsage.slurm import SlurmError, SlurmRequest, cancel, sbatch_script, slurm_workers

from .conftest import Procs, alive, skip_or_fail, wait_for

SLURM_COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scancel", "squeue",
                  "sinfo")


# -- the script ------------------------------------------------------------------------

def test_script_asks_for_the_nodes_and_runs_one_tagged_monitor_per_node() -> None:
    text = sbatch_script(SlurmRequest(
        nodes=3, workers_per_node=4, server="login1", port=9000, time="1:30:00",
        partition="short", output=Path("/h/slurm/dsage-workers-%j.out")))
    lines = text.splitlines()
    assert lines[0] == "#!/bin/sh"
    assert [ln for ln in lines if ln.startswith("#SBATCH")] == [
        "#SBATCH --job-name=dsage-workers", "#SBATCH --nodes=3",
        "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=4",
        "#SBATCH --time=1:30:00", "#SBATCH --partition=short",
        "#SBATCH --output=/h/slurm/dsage-workers-%j.out"]
    [run] = [ln for ln in lines if "srun" in ln]
    assert run.startswith("exec srun --ntasks-per-node=1 --cpus-per-task=4 ")
    assert "dsage-worker --server login1 --port 9000 --workers 4 " in run
    assert run.endswith('--tags=slurm-"$SLURM_JOB_ID"')


def test_script_leaves_out_what_was_not_asked_for() -> None:
    text = sbatch_script(SlurmRequest(nodes=1, workers_per_node=1, server="h"))
    assert "--time" not in text and "--partition" not in text and "--output" not in text
    assert "DSAGE_HOME" not in text


@pytest.mark.parametrize("bad", [dict(nodes=0), dict(workers_per_node=0),
                                 dict(tags=["a,b"]), dict(tags=["$(reboot)"])])
def test_a_request_that_cannot_work_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SlurmRequest(**{"nodes": 1, "workers_per_node": 1, "server": "h", **bad})


def test_the_script_passes_every_argument_intact_to_srun(tmp_path: Path) -> None:
    """Run the script with ``sh`` and a stand-in ``srun`` that prints its arguments:
    quoting survives a home with spaces and quotes, and the job id is filled in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "srun"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$DSAGE_HOME" "$@"\n')
    fake.chmod(0o755)
    home = tmp_path / "it's a home"
    script = tmp_path / "job.sh"
    script.write_text(sbatch_script(SlurmRequest(
        nodes=2, workers_per_node=3, server="node 0", port=8100, home=home,
        worker_command=[sys.executable, "-m", "dsage.cli", "worker"],
        worker_args=["--priority=5"], tags=["gpu", "big"])))
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                              "SLURM_JOB_ID": "4242"}, check=True).stdout
    assert out.splitlines() == [
        str(home), "--ntasks-per-node=1", "--cpus-per-task=3", "--kill-on-bad-exit=0",
        sys.executable, "-m", "dsage.cli", "worker", "--server", "node 0", "--port", "8100",
        "--workers", "3", "--priority=5", "--log-file", "-", "--tags=gpu,big,slurm-4242"]


def test_without_slurm_the_error_says_what_is_missing(home: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no scancel
    with pytest.raises(SlurmError, match="sbatch not found"):
        slurm_workers(nodes=1, workers_per_node=1, server="h")
    assert main(["slurm", "cancel", "12"]) == 2
    assert "scancel not found" in capsys.readouterr().err
    with pytest.raises(SlurmError, match="not a SLURM job id"):
        cancel("12; rm -rf /")


def test_submit_writes_the_script_and_prints_the_job_id(home: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """Against a stand-in ``sbatch`` that keeps its arguments and answers as a
    federated SLURM does ("id;cluster")."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/args\necho "77;west"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    key = "-" + "a" * 39  # a z85 key may start with '-'
    assert main(["slurm", "submit", "--nodes", "2", "--workers-per-node", "3", "--server",
                 "login1", "--port", "9000", f"--server-key={key}", "--",
                 "--account=physics", "--qos", "long"]) == 0
    assert capsys.readouterr().out == "77\n"
    script = home / "slurm" / "dsage-workers-77.sh"
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:4] == ["--parsable", "--account=physics", "--qos", "long"]
    assert Path(args[4]).parent == script.parent and not Path(args[4]).exists()  # renamed
    text = script.read_text()
    assert f"--server-key={key} " in text and f"export DSAGE_HOME={home}" in text
    assert f"#SBATCH --output={home}/slurm/dsage-workers-%j.out" in text


def test_unknown_worker_options_are_refused(home: Path) -> None:
    with pytest.raises(TypeError, match="unknown worker option 'wrokers'"):
        slurm_workers(nodes=1, server="h", wrokers=2)


@pytest.mark.parametrize("cmd", [["slurm"], ["slurm", "submit"], ["slurm", "cancel"]])
def test_slurm_commands_have_help(cmd: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "dsage.cli", *cmd, "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "usage:" in r.stdout


# -- a real single-node SLURM ---------------------------------------------------------

class Slurm:
    """munged, slurmctld and slurmd for one node ("localhost", 2 CPUs), in foreground
    mode in their own process groups, configured under a test's folder."""

    def __init__(self, root: Path, munge_dir: Path) -> None:
        self.root, self.munge_dir = root, munge_dir
        self.conf = root / "slurm.conf"
        self.socket = munge_dir / "munge.socket"
        self.daemons: list[tuple[str, subprocess.Popen[bytes]]] = []
        #: in the environment of the daemons (and so of slurmstepd): found at teardown
        self.marker = f"DSAGE_TEST_SLURM={root}"

    def write_conf(self) -> None:
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir()
        r = self.root
        # RealMemory at most what the machine has (more would drain the node);
        # config_overrides keeps CPUs=2 on a smaller machine
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
        ctld_port = free_port()
        slurmd_port = wait_for(lambda: (p := free_port()) != ctld_port and p, 10, "a port")
        self.conf.write_text(f"""\
ClusterName=dsagetest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
NodeName=localhost CPUs=2 RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        env = {**os.environ, "SLURM_CONF": str(self.conf), "DSAGE_TEST_SLURM": str(self.root)}
        with log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.daemons.append((name, proc))

    def start(self) -> None:
        self.write_conf()
        key = self.munge_dir / "key" / "munge.key"
        key.parent.mkdir(mode=0o700)
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        m = self.munge_dir
        self._start("munged", ["munged", "--foreground", f"--socket={self.socket}",
                               f"--key-file={key}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'seed'}"])
        wait_for(lambda: self.socket.exists() or self._died(), 30, "munged's socket")
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._start("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
        wait_for(lambda: self._idle() or self._died(), 60, "the SLURM node to be idle")
        if self._died():
            raise AssertionError(f"a SLURM daemon exited:\n{self.logs()}")

    def _died(self) -> bool:
        return any(p.poll() is not None for _, p in self.daemons)

    def _idle(self) -> bool:
        out = self.run(["sinfo", "--noheader", "--format=%T"], check=False).stdout
        return out.strip() == "idle"

    def run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, timeout=30, check=check,
                              env={**os.environ, "SLURM_CONF": str(self.conf)})

    def jobs(self) -> list[str]:
        return self.run(["squeue", "--noheader", "--format=%i"]).stdout.split()

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").iterdir()):
            tail = f.read_text(errors="replace").splitlines()[-20:]
            parts.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def _ours(self) -> list[int]:
        """Processes of this SLURM: the daemons and slurmstepd (by the marker in their
        environment) and the jobs' processes (by their SLURM_CONF and SLURM_JOB_ID)."""
        conf = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if self.marker.encode() in env or (
                    conf in env and any(v.startswith(b"SLURM_JOB_ID=") for v in env)):
                found.append(int(entry))
        return found

    def stop(self) -> None:
        """Cancel every job, stop the daemons (whole groups), then SIGKILL whatever of
        this SLURM is left (a slurmstepd or a job's process in a group of its own)."""
        if not self._died():
            try:
                self.run(["scancel", "--full", "--user=root"], check=False)
                wait_for(lambda: not self.jobs(), 30, "the jobs to end")
            except (AssertionError, subprocess.SubprocessError):
                pass
        for _, proc in reversed(self.daemons):
            _end_group(proc)
        for pid in self._ours():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: not self._ours(), 30, "this SLURM's processes to end")


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # anything else of the group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture
def slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Slurm]:
    if os.geteuid() != 0:
        skip_or_fail("a private SLURM needs root (slurmd runs jobs as their users)")
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        skip_or_fail(f"SLURM is not installed (missing {', '.join(missing)}): "
                     "apt-get install slurm-wlm munge")
    # munged wants every folder above its socket open to all; pytest's are 0700
    munge_dir = Path(tempfile.mkdtemp(prefix="dsage-munge-"))
    munge_dir.chmod(0o755)
    s = Slurm(tmp_path / "slurm", munge_dir)
    s.root.mkdir()
    monkeypatch.setenv("SLURM_CONF", str(s.conf))
    try:
        s.start()
        yield s
    finally:
        try:
            s.stop()
        finally:
            shutil.rmtree(munge_dir, ignore_errors=True)


def _monitor(d: dsage.DSage, tag: str) -> dsage.MonitorInfo | None:
    return next((w for w in d.workers() if tag in w.tags), None)


@pytest.mark.timeout(240)
def test_monitors_run_on_slurm_jobs_and_leave_when_cancelled(
        slurm: Slurm, procs: Procs, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("dsage-worker") is None:
        skip_or_fail("dsage-worker is not on PATH (pip install -e .)")
    procs.broker(heartbeat=1.0, liveness=3)  # the monitors' defaults
    d = procs.client()
    # one batch job from the command line, one from Python: a CPU each
    assert main(["slurm", "submit", "--nodes", "1", "--workers-per-node", "1",
                 "--server", "127.0.0.1", "--port", str(procs.port), "--time", "10",
                 "--tags", "cli", "--", "--job-name=dsage-cli"]) == 0, capsys.readouterr().err
    cli_id = capsys.readouterr().out.strip()
    assert cli_id.isdigit()
    script = home / "slurm" / f"dsage-workers-{cli_id}.sh"
    assert "srun" in script.read_text()
    api = slurm_workers(nodes=1, workers_per_node=1, server="127.0.0.1", port=procs.port,
                        python=sys.executable, sbatch_args=["--job-name=dsage-api"])
    assert api.job_id != cli_id and api.tag == f"slurm-{api.job_id}"

    def both() -> bool:
        return _monitor(d, f"slurm-{cli_id}") is not None and _monitor(d, api.tag) is not None
    try:
        wait_for(both, 90, "the monitors of both SLURM jobs")
    except AssertionError:
        raise AssertionError(f"{slurm.logs()}\n--- squeue {slurm.jobs()}\n"
                             + "\n".join(f.read_text() for f in (home / "slurm").glob("*.out")))
    cli_monitor = _monitor(d, f"slurm-{cli_id}")
    assert cli_monitor is not None and "cli" in cli_monitor.tags and cli_monitor.pid > 0
    names = slurm.run(["squeue", "--noheader", "--format=%i %j"]).stdout.split("\n")
    assert {f"{cli_id} dsage-cli", f"{api.job_id} dsage-api"} <= set(names)  # sbatch args
    # the monitor logs to the job's output (srun forwards it as it comes)
    wait_for(lambda: "connected to the broker" in api.output.read_text(), 30,
             "the monitor's log in the job's output file")

    # jobs sent to each allocation run inside that SLURM job
    code = "import os; os.environ['SLURM_JOB_ID']"
    for job_id in (cli_id, api.job_id):
        j = d(code, requires=[f"slurm-{job_id}"])
        assert j.result(timeout=60) == job_id

    assert main(["slurm", "cancel", cli_id]) == 0
    wait_for(lambda: _monitor(d, f"slurm-{cli_id}") is None, 60, "the cancelled monitor to leave")
    wait_for(lambda: not alive(cli_monitor.pid), 30, "the cancelled monitor to exit")
    assert _monitor(d, api.tag) is not None  # the other allocation goes on
    assert d(code, requires=[api.tag]).result(timeout=60) == api.job_id

    api.cancel()
    wait_for(lambda: _monitor(d, api.tag) is None, 60, "the second monitor to leave")
    wait_for(lambda: not slurm.jobs(), 60, "SLURM to end both jobs")
    assert d.workers() == []
