"""Monitors on other machines through the system's OpenSSH client.

``ssh`` runs with the user's own config, agent and known_hosts, in batch mode
(it never prompts: a host it cannot reach without asking is reported). Each
remote monitor runs in a pty-less session with ``--exit-on-stdin-eof``: when
the local ``ssh`` ends (the cluster stops, or the script dies), the session's
standard input closes and the monitor stops, giving its jobs back. Its log
lines come back over the session and are written, prefixed by the host, to
``$DSAGE_HOME/logs/ssh-HOST.log``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from . import __version__
from . import keys as keys_mod

#: always passed to ssh: never prompt, give up on a dead host in seconds
BATCH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10")
#: how the installation check and the key copy are bounded, in seconds
CHECK_TIMEOUT = 60.0


class RemoteError(RuntimeError):
    """A host could not start a monitor; the message names the host and why."""


@dataclass(frozen=True)
class Host:
    """``[user@]name[:port]`` as the user wrote it, split for ssh."""

    text: str
    target: str
    port: int | None

    @classmethod
    def parse(cls, text: str) -> Host:
        target, sep, port = text.rpartition(":")
        if sep and port.isdigit() and target and ":" not in target:  # (not a bare IPv6)
            return cls(text, target, int(port))
        if text.startswith("[") and "]:" in text:  # [ipv6]:port
            addr, _, port = text[1:].partition("]:")
            if port.isdigit():
                return cls(text, addr, int(port))
        return cls(text, text, None)

    def ssh_args(self, ssh_options: Sequence[str]) -> list[str]:
        """The ``ssh`` command line up to (and including) the destination."""
        return ["ssh", *BATCH_OPTIONS, *ssh_options,
                *(["-p", str(self.port)] if self.port else []), "--", self.target]

    @property
    def log_name(self) -> str:
        return "ssh-" + "".join(c if c.isalnum() or c in "-_.@" else "_" for c in self.text)


def compatible(remote: str, local: str = __version__) -> bool:
    """Same major and minor version (the wire protocol changes only with those)."""
    return remote.split(".")[:2] == local.split(".")[:2]


def _ssh_failure(host: Host, what: str, proc: subprocess.CompletedProcess[str]) -> RemoteError:
    said = (proc.stderr or proc.stdout or "").strip().splitlines()
    reason = said[-1] if said else f"exit status {proc.returncode}"
    if proc.returncode == 255:  # ssh's own failure: unreachable, refused, not authorized
        return RemoteError(f"{host.text}: ssh could not {what}: {reason}")
    return RemoteError(f"{host.text}: {what} failed: {reason}")


def _run(host: Host, ssh_options: Sequence[str], command: str, what: str,
         stdin: str = "") -> str:
    try:
        proc = subprocess.run([*host.ssh_args(ssh_options), command], input=stdin,
                              capture_output=True, text=True, timeout=CHECK_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RemoteError(f"{host.text}: ssh did not {what} within {CHECK_TIMEOUT:g} s") \
            from None
    except FileNotFoundError:
        raise RemoteError("no `ssh` command here: install the OpenSSH client "
                          "(Debian: apt-get install openssh-client)") from None
    if proc.returncode != 0:
        raise _ssh_failure(host, what, proc)
    return proc.stdout


def check_dsage(host: Host, python: str, ssh_options: Sequence[str]) -> str:
    """The dsage version importable by ``python`` on ``host``; a RemoteError saying
    how to install it when it is missing or incompatible."""
    code = "import dsage; print(dsage.__version__)"
    install = f"on {host.text}, run `{python} -m pip install dsage=={__version__}`"
    try:
        out = _run(host, ssh_options, f"{python} -c {shlex.quote(code)}", "run Python")
    except RemoteError as e:
        if "No module named" in str(e) or "ModuleNotFoundError" in str(e):
            raise RemoteError(f"{host.text}: dsage is not installed for `{python}` there; "
                              f"{install}") from None
        raise
    version = out.strip().splitlines()[-1] if out.strip() else "?"
    if not compatible(version):
        raise RemoteError(f"{host.text}: dsage {version} there cannot work with dsage "
                          f"{__version__} here; {install}")
    return version


def receive_keypair(home: str | None) -> None:
    """The remote side of :func:`copy_keypair`: write the keypair read as JSON from
    standard input into ``home`` (private folders and files, as ``dsage setup``)."""
    data = json.load(sys.stdin)
    root = keys_mod.home(home)
    for sub in ("", "db", "tmp_worker_files", "authorized_keys", "logs"):
        keys_mod.private_dir(root / sub)
    secret = root / keys_mod.SECRET_NAME
    if secret.exists() or secret.is_symlink():
        if secret.is_symlink() or secret.read_text() != data["secret"]:
            raise SystemExit(f"{secret} holds another keypair: remove it first, or give "
                             f"this machine a worker key of its own")
    else:
        keys_mod._write_private(secret, data["secret"])
    keys_mod._write_public(root / keys_mod.PUBLIC_NAME, data["public"])
    keys_mod.load_keypair(root)  # what was written is a usable keypair


def copy_keypair(host: Host, python: str, ssh_options: Sequence[str], source: Path,
                 remote_home: str | None) -> None:
    """Install the keypair in the folder ``source`` as the dsage keypair on ``host``."""
    payload = json.dumps({"secret": (source / keys_mod.SECRET_NAME).read_text(),
                          "public": (source / keys_mod.PUBLIC_NAME).read_text()})
    code = f"from dsage.remote import receive_keypair; receive_keypair({remote_home!r})"
    _run(host, ssh_options, f"{python} -c {shlex.quote(code)}", "copy the keypair", payload)


def worker_command(python: str, server: str, port: int, workers: int | None,
                   remote_home: str | None, extra: Sequence[str]) -> str:
    """The remote shell command running a monitor that ends with the session (with
    ``python`` as written: it may be ``env VAR=... python3``)."""
    args = ["-m", "dsage.cli", "worker", "--server", server, "--port", str(port),
            *(["--workers", str(workers)] if workers else []),
            "--exit-on-stdin-eof", "--log-file", "-",
            *(["--home", remote_home] if remote_home else []), *extra]
    return f"{python} {shlex.join(args)} 2>&1"


def start_session(host: Host, ssh_options: Sequence[str], command: str,
                  log: Path) -> tuple[subprocess.Popen[bytes], threading.Thread]:
    """Run ``command`` on ``host`` in its own process group; a thread copies its
    output, each line prefixed with the host, to ``log``."""
    proc = subprocess.Popen([*host.ssh_args(ssh_options), command], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    assert proc.stdout is not None
    pump = threading.Thread(target=_copy_lines, args=(proc.stdout, log, host.text),
                            daemon=True, name=f"dsage-ssh-{host.text}")
    pump.start()
    return proc, pump


def _copy_lines(stream: IO[bytes], log: Path, prefix: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with stream, open(log, "ab", buffering=0) as out:
        for line in stream:
            out.write(f"[{prefix}] ".encode() + line)


def prepare_all(hosts: Sequence[Host], python: str, ssh_options: Sequence[str],
                copy_from: Path | None, remote_home: str | None
                ) -> dict[Host, RemoteError | None]:
    """Check (and with ``copy_from``, install the keypair on) every host at once;
    None for a host that is ready, else why it is not."""
    def prepare(host: Host) -> RemoteError | None:
        try:
            check_dsage(host, python, ssh_options)
            if copy_from is not None:
                copy_keypair(host, python, ssh_options, copy_from, remote_home)
        except RemoteError as e:
            return e
        return None

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(hosts)))) as pool:
        return dict(zip(hosts, pool.map(prepare, hosts)))
