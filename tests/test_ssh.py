"""Monitors on other machines over SSH, against a real OpenSSH server.

The test starts its own ``sshd`` on a random 127.0.0.1 port (a host key and an
authorized client key made here, its own config), and ``start_workers`` logs in
as root through it with the system's ``ssh`` client. The remote monitors carry
a marker in their environment, so the test finds them (and their slots) in the
process table, and ends them if a failing test left any.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import dsage
from dsage import keys, remote
from dsage.cli import main as cli_main
from dsage.cluster import free_port
from tests.conftest import HEARTBEAT, LIVENESS, Procs, done, skip_or_fail, wait_for

REPO = Path(dsage.__file__).resolve().parent.parent


@dataclass
class Sshd:
    port: int
    ssh_options: list[str]
    log: Path
    mark: str

    @property
    def host(self) -> str:
        return f"root@127.0.0.1:{self.port}"

    def python(self, extra_env: str = "") -> str:
        """The remote Python command: this checkout's dsage, and the marker."""
        return (f"env PYTHONPATH={REPO} DSAGE_TEST_MARK={self.mark} {extra_env} "
                f"{sys.executable}")


def marked(mark: str) -> list[int]:
    """Processes whose environment holds ``DSAGE_TEST_MARK=mark``."""
    needle = f"DSAGE_TEST_MARK={mark}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _sshd_binary() -> str:
    if os.geteuid() != 0:
        skip_or_fail("the SSH tests log in as root through a test sshd: run as root")
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd")
                                     else None)
    if found is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        skip_or_fail("OpenSSH is not installed (Debian: apt-get install openssh-server "
                     "openssh-client)")
    assert found is not None
    return found


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    binary = _sshd_binary()
    d = tmp_path_factory.mktemp("sshd")
    os.chmod(d, 0o700)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True, timeout=30)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation
    mark = uuid.uuid4().hex
    proc: subprocess.Popen[bytes] | None = None
    log = d / "sshd.log"
    try:
        for _ in range(5):
            port = free_port()
            (d / "sshd_config").write_text(
                f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
                f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
                "UsePAM no\nStrictModes no\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
                "PubkeyAuthentication yes\nAllowUsers root\nLogLevel VERBOSE\n")
            with open(log, "ab") as out:
                proc = subprocess.Popen([binary, "-D", "-e", "-f", str(d / "sshd_config")],
                                        stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            wait_for(lambda: proc.poll() is not None or _listening(port), 30,
                     "sshd to listen or exit")
            if proc.poll() is None:
                break
        assert proc is not None and proc.poll() is None, log.read_text()
        options = ["-F", "/dev/null", "-i", str(d / "client_key"), "-o", "IdentitiesOnly=yes",
                   "-o", f"UserKnownHostsFile={d / 'known_hosts'}",
                   "-o", "StrictHostKeyChecking=accept-new"]
        yield Sshd(port, options, log, mark)
    finally:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        for pid in marked(mark):  # a remote monitor a failing test left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_start_workers_runs_jobs_over_ssh_and_stops_with_the_cluster(
        sshd: Sshd, procs: Procs, tmp_path: Path) -> None:
    procs.broker()
    d = procs.client()
    keys.issue_worker_key("node1", procs.home)
    remote_home = tmp_path / "remote-home"
    down = f"root@127.0.0.1:{closed_port()}"
    cluster = dsage.start_workers(
        [sshd.host, down], workers=2, python=sshd.python(), server="127.0.0.1", client=d,
        copy_key="node1", remote_home=str(remote_home), ssh_options=sshd.ssh_options,
        heartbeat=HEARTBEAT, liveness=LIVENESS, priority=0)
    try:
        # the host that is down is reported, naming it and ssh's reason; the other runs
        assert list(cluster.failed) == [down], (cluster.failed, sshd.log.read_text())
        assert down in cluster.failed[down] and "refused" in cluster.failed[down]
        assert [m.name for m in cluster.monitors] == [f"ssh {sshd.host}"]
        # the worker key was installed there, private, and the monitor uses it
        secret = remote_home / keys.SECRET_NAME
        assert secret.stat().st_mode & 0o777 == 0o600
        worker_key = keys.load_keypair(keys.worker_key_dir("node1", procs.home)).public
        assert keys.load_keypair(remote_home).public == worker_key
        [w] = d.workers()
        assert w.slots == 2 and f"ssh:{sshd.host}" in w.tags
        jobs = [d(f"{i}*{i}") for i in range(6)]
        assert [done(j).result() for j in jobs] == [i * i for i in range(6)]
        # its log lines come back, prefixed with the host
        log = cluster.monitors[0].log
        wait_for(lambda: f"[{sshd.host}] " in log.read_text(errors="replace"), 20,
                 "the remote monitor's log lines")
        assert marked(sshd.mark), "the remote monitor should be in the process table"
    finally:
        d.close()  # stops the cluster start_workers added to it
    wait_for(lambda: not marked(sshd.mark), 30, "the remote monitor and its slots to exit")
    assert "standard input closed" in log.read_text(errors="replace")
    assert cluster.monitors[0].proc.returncode == 0  # the remote monitor's own exit status


def test_a_cluster_of_remote_monitors_stops_gracefully(sshd: Sshd, procs: Procs) -> None:
    """Without a client: the broker by address; ``stop()`` lets the monitor finish."""
    procs.broker()
    cluster = dsage.start_workers(
        sshd.host, workers=1, python=sshd.python(), server="127.0.0.1", port=procs.port,
        home=procs.home, remote_home=str(procs.home), ssh_options=sshd.ssh_options,
        heartbeat=HEARTBEAT, liveness=LIVENESS)
    try:
        d = procs.client()
        assert done(d("6*7")).result() == 42
    finally:
        cluster.stop()
    [m] = cluster.monitors
    assert not m.alive() and m.proc.returncode == 0
    text = m.log.read_text(errors="replace")
    assert "asked to stop over standard input" in text and "dsage-worker stopped" in text
    wait_for(lambda: not marked(sshd.mark), 30, "the remote monitor and its slots to exit")


def test_dsage_worker_ssh_runs_monitors_there_until_stopped(sshd: Sshd, procs: Procs) -> None:
    procs.broker()
    d = procs.client()
    log = procs.home / "logs" / "launcher.log"
    with open(log, "wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "dsage.cli", "worker", "--ssh", sshd.host, "--server",
             "127.0.0.1", "--port", str(procs.port), "--workers", "1", "--python",
             sshd.python(), f"--ssh-options={' '.join(sshd.ssh_options)}", "--remote-home",
             str(procs.home), "--heartbeat", str(HEARTBEAT), "--tags", "far"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        procs.wait_workers(d, 1, timeout=60)
        [w] = d.workers()
        assert "far" in w.tags and f"ssh:{sshd.host}" in w.tags  # options went there
        assert done(d("2**10", requires=["far"])).result() == 1024
        wait_for(lambda: "Ctrl-C stops them" in log.read_text(), 30, "the launcher to wait")
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(30) == 0, log.read_text()
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    wait_for(lambda: not marked(sshd.mark), 30, "the remote monitor and its slots to exit")
    assert "asked to stop over standard input" in \
        (procs.home / "logs" / f"{remote.Host.parse(sshd.host).log_name}.log").read_text()


def test_a_remote_monitor_ends_when_its_ssh_is_killed(sshd: Sshd, procs: Procs) -> None:
    """The script (and its ssh) dying without a word ends the session: the monitor
    there stops by itself."""
    procs.broker()
    d = procs.client()
    cluster = dsage.start_workers(sshd.host, workers=1, python=sshd.python(),
                                  server="127.0.0.1", client=d, remote_home=str(procs.home),
                                  ssh_options=sshd.ssh_options, heartbeat=HEARTBEAT)
    [m] = cluster.monitors
    assert marked(sshd.mark)
    procs.kill9(m)
    wait_for(lambda: not marked(sshd.mark), 30, "the remote monitor and its slots to exit")
    wait_for(lambda: not d.workers(), 30, "the monitor to leave the broker")


def test_no_broker_ends_the_sessions_it_started(sshd: Sshd, home: Path) -> None:
    with pytest.raises(dsage.BrokerUnreachable):
        dsage.start_workers(sshd.host, workers=1, python=sshd.python(), server="127.0.0.1",
                            port=free_port(), home=home, remote_home=str(home),
                            ssh_options=sshd.ssh_options, timeout=3)
    wait_for(lambda: not marked(sshd.mark), 30, "the remote monitor and its slots to exit")


def test_missing_dsage_is_reported_with_how_to_install_it(sshd: Sshd) -> None:
    host = remote.Host.parse(sshd.host)
    without = sshd.python().replace(f"PYTHONPATH={REPO}", "-u PYTHONPATH") + " -S"
    with pytest.raises(remote.RemoteError) as e:
        remote.check_dsage(host, without, sshd.ssh_options)
    assert sshd.host in str(e.value) and "pip install dsage==" in str(e.value)
    assert remote.check_dsage(host, sshd.python(), sshd.ssh_options) == dsage.__version__


def test_copy_key_installs_the_own_keypair(sshd: Sshd, home: Path, tmp_path: Path) -> None:
    host = remote.Host.parse(sshd.host)
    target = tmp_path / "there"
    for _ in range(2):  # a second copy of the same keypair changes nothing
        remote.copy_keypair(host, sshd.python(), sshd.ssh_options, home, str(target))
    assert keys.load_keypair(target) == keys.load_keypair(home)
    assert (target / keys.SECRET_NAME).stat().st_mode & 0o777 == 0o600


def test_no_host_started_is_an_error(sshd: Sshd, procs: Procs) -> None:
    procs.broker()
    d = procs.client()
    down = f"127.0.0.1:{closed_port()}"
    with pytest.raises(dsage.StartError, match=down):
        dsage.start_workers(down, python=sshd.python(), server="127.0.0.1", client=d,
                            ssh_options=sshd.ssh_options)


# --- the pieces that need no sshd


def test_host_parsing() -> None:
    assert remote.Host.parse("alice@node1") == remote.Host("alice@node1", "alice@node1", None)
    assert remote.Host.parse("node2:2222") == remote.Host("node2:2222", "node2", 2222)
    assert remote.Host.parse("[::1]:22") == remote.Host("[::1]:22", "::1", 22)
    assert remote.Host.parse("::1") == remote.Host("::1", "::1", None)
    with pytest.raises(ValueError, match="twice"):
        dsage.start_workers(["node1", "node1"], port=8081)
    assert remote.compatible("0.1.7", "0.1.0") and not remote.compatible("0.2.0", "0.1.0")


def test_monitor_exits_when_its_stdin_closes(home: Path, port: int) -> None:
    log = home / "logs" / "stdin.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsage.cli", "worker", "--port", str(port), "--workers",
             "1", "--exit-on-stdin-eof", "--log-file", "-", "--home", str(home)],
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        wait_for(lambda: "dsage-worker " in log.read_text() or proc.poll() is not None,
                 30, "the monitor to start")
        assert proc.poll() is None, log.read_text()
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(30) == 0
        assert "standard input closed" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_idle_exit_ends_a_monitor_whose_broker_is_gone(procs: Procs) -> None:
    b = procs.broker()
    m = procs.worker(1, idle_exit=3.0)
    d = procs.client()
    procs.wait_workers(d, 1)
    assert m.alive()  # a broker that answers keeps it
    procs.kill9(b)
    wait_for(lambda: not m.alive(), 30, "the idle monitor to exit")
    assert "--idle-exit 3" in m.log.read_text()
    assert m.proc.returncode == 0


def test_issue_worker_makes_a_worker_key_and_says_how_to_install_it(
        home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["keys", "--home", str(home), "issue-worker", "node7"]) == 0
    out = capsys.readouterr().out
    folder = keys.worker_key_dir("node7", home)
    key = keys.load_keypair(folder).public
    assert keys.authorized_roles(home)["node7"] == (key, "worker")
    assert str(folder / keys.SECRET_NAME) in out and str(folder / keys.PUBLIC_NAME) in out
    own = keys.load_keypair(home).public.decode()
    # the --server-key to give, quoted for a shell (a z85 key holds $, &, ( and the like)
    assert f"--server-key={shlex.quote(own)}" in out
    assert cli_main(["keys", "--home", str(home), "issue-worker", "node7"]) == 2  # not twice
