"""Trust (issue 4): who gets in, what anonymous workers get, private results, isolation.

Real brokers and monitors on 127.0.0.1; the only in-process sockets are raw
peers that play a stranger or a hostile anonymous worker.
"""

from __future__ import annotations

import json
import os
import pickle
import pwd
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dill
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import recv_monitor_message

import dsage
from dsage import codec, keys, protocol
from dsage.auth import CLIENTS, make_client, make_server
from dsage.client import BrokerUnreachable, KeyRejected, SubmitRejected, UnknownJob
from dsage.cluster import ManagedProcess
from dsage.seal import Sealer, binding

from .conftest import HEARTBEAT, LIVENESS, Procs, done, skip_or_fail, wait_for

# --- helpers


def other_home(tmp_path: Path, name: str) -> Path:
    """A second user's dsage home, with its own keypair (not trusted by anyone yet)."""
    root = tmp_path / name
    keys.setup(root)
    return root


def broker_key(home: Path) -> bytes:
    """The public key the test broker serves with (the first home's)."""
    return keys.load_keypair(home).public


def user_client(procs: Procs, user_home: Path, **options: object) -> dsage.DSage:
    """A client of the test broker using another home's keypair; closed at teardown."""
    options.setdefault("heartbeat", HEARTBEAT)
    options.setdefault("connect_timeout", 30)
    d = dsage.DSage("127.0.0.1", procs.port, broker_key(procs.home), home=user_home,
                    **options)  # type: ignore[arg-type]
    procs.clients.append(d)
    return d


def other_worker(procs: Procs, worker_home: Path, workers: int = 1,
                 **options: object) -> ManagedProcess:
    """A monitor started from another home (its logs go there); ended at teardown."""
    options.setdefault("heartbeat", HEARTBEAT)
    options.setdefault("liveness", LIVENESS)
    options.setdefault("priority", 0)
    p = dsage.worker("127.0.0.1", procs.port, workers, blocking=False, home=worker_home,
                     **options)
    assert p is not None
    procs.started.append(p)
    return p


def client_if_trusted(procs: Procs, user_home: Path) -> dsage.DSage | None:
    """A client with another home's key, or None while the broker refuses the key (it
    rereads its authorized keys within a second of a change)."""
    try:
        return user_client(procs, user_home, connect_timeout=10)
    except KeyRejected:
        return None


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dsage.cli ARGS`` (``dsage``, or ``broker``/``worker`` launchers)."""
    return subprocess.run([sys.executable, "-m", "dsage.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def log_text(p: ManagedProcess) -> str:
    try:
        return p.log.read_text(errors="replace")
    except OSError:
        return ""


def db_rows(home: Path, sql: str) -> list[tuple[object, ...]]:
    """Read the broker's SQLite store directly (read-only; WAL allows it while it runs)."""
    con = sqlite3.connect(f"file:{home / 'db' / 'dsage.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


_HANDSHAKE = {zmq.EVENT_HANDSHAKE_SUCCEEDED: "ok", zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
              zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
              zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no-detail"}


def handshake(ctx: zmq.Context[zmq.Socket[bytes]], kind: int, endpoint: str,
              own: keys.Keypair, server: bytes, timeout: float = 10.0) -> str:
    """Connect a raw CURVE socket and report how its first handshake ended:
    'ok', 'auth' (the server's ZAP refused the key), 'protocol' or 'no-detail'."""
    sock = ctx.socket(kind)
    make_client(sock, own, server)
    mon = sock.get_monitor_socket()
    try:
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if mon.poll(100):
                ev = recv_monitor_message(mon)
                if ev["event"] in _HANDSHAKE:
                    return _HANDSHAKE[ev["event"]]
        return "timeout"
    finally:
        sock.disable_monitor()
        mon.close(linger=0)
        sock.close(linger=0)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield c
    finally:
        c.destroy(linger=0)


# --- private results


def test_database_holds_only_ciphertext_of_results_and_output(procs: Procs, home: Path) -> None:
    """Completed, timed-out and crashed jobs: the store keeps sealed blobs only."""
    procs.broker()
    procs.worker(2)
    D = procs.client()
    secret = "Sekrit-" + os.urandom(8).hex()
    rev = secret[::-1]  # the code holds the secret reversed, so payloads do not leak it
    jobs = [
        D(f"print({rev!r}[::-1])\n{rev!r}[::-1]"),
        D(f"import time\nprint({rev!r}[::-1], flush=True)\ntime.sleep(60)", timeout=1),
        D(f"import os, sys\nprint({rev!r}[::-1], flush=True)\nos._exit(3)"),
    ]
    for j in jobs:
        j.wait(60)
    assert jobs[0].result() == secret and secret in jobs[0].output
    assert jobs[1].status == "failed" and "timed out" in jobs[1].error
    assert jobs[2].status == "failed" and "exited with status 3" in jobs[2].error
    for j in jobs:
        assert secret in j.output, j.status
    rows = db_rows(home, "SELECT id, sealed, result, output FROM jobs")
    assert {r[0] for r in rows} == {j.job_id for j in jobs}
    for _, sealed, result, output in rows:
        assert sealed == 1
        assert secret.encode() not in (result or b"") + (output or b"")
        assert output and output[:1] == b"\x02"  # the sealed-blob format (bound)
    raw = b"".join(p.read_bytes() for p in (home / "db").iterdir() if p.is_file())
    assert secret.encode() not in raw  # not in any page, WAL frame or journal


def test_sealed_blobs_open_only_for_their_owner_job_and_worker() -> None:
    from dsage.seal import RESULT_ALONE, Opener, SealError, Sealer, binding

    monitor, owner, other = (keys.Keypair(*zmq.curve_keypair()) for _ in range(3))
    sealer = Sealer(monitor)
    bound = ("a" * 32, owner.public.decode(), "completed", "dill", "expression")
    bind = binding(*bound, "result")
    blob = sealer.seal(owner.public, b"result", bind)
    assert b"result" not in blob
    assert Opener(owner).open(blob, bind, monitor.public.decode()) == b"result"
    assert sealer.seal(owner.public, b"result", bind) != blob  # a fresh nonce each time
    empty = sealer.seal(owner.public, b"", bind)
    assert empty and Opener(owner).open(empty, bind) == b""  # blanking shows
    with pytest.raises(SealError):
        Opener(other).open(blob, bind)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(SealError):
        Opener(owner).open(tampered, bind)
    with pytest.raises(SealError):
        Opener(owner).open(b"\x01" + blob[1:], bind)
    with pytest.raises(SealError, match="another key"):  # claimed by another worker
        Opener(owner).open(blob, bind, other.public.decode())
    for changed in (("b" * 32, *bound[1:]), (*bound[:2], "failed", *bound[3:]),
                    (*bound[:3], "data", bound[4])):
        with pytest.raises(SealError, match="another job or another outcome"):
            Opener(owner).open(blob, binding(*changed, "result"))
    with pytest.raises(SealError, match="another job or another outcome"):
        Opener(owner).open(blob, binding(*bound, "output"))  # output swapped for result
    with pytest.raises(SealError, match="another job or another outcome"):
        Opener(owner).open(blob, binding(*bound, RESULT_ALONE))  # its output blanked
    alone = sealer.seal(owner.public, b"result", binding(*bound, RESULT_ALONE))
    with pytest.raises(SealError, match="another job or another outcome"):
        Opener(owner).open(alone, bind)  # an output planted beside it
    with pytest.raises(SealError):
        Opener(owner).open(b"", bind)


def test_sealed_blobs_are_nacl_boxes_with_fresh_nonces_also_in_a_forked_child() -> None:
    """A sealed blob is a NaCl Box's message (as results kept in a store from before
    open); its nonce is never used twice, also by a child forked while nonces read
    from the system were left unused."""
    from nacl.public import Box, PrivateKey, PublicKey
    from zmq.utils import z85

    from dsage.seal import VERSION, Opener, Sealer, binding

    monitor, owner = (keys.Keypair(*zmq.curve_keypair()) for _ in range(2))
    bind = binding("a" * 32, owner.public.decode(), "completed", "dill", "expression", "result")
    box = Box(PrivateKey(z85.decode(monitor.secret)), PublicKey(z85.decode(owner.public)))
    made_by_box = VERSION + z85.decode(monitor.public) + bytes(
        box.encrypt(len(bind).to_bytes(2, "big") + bind + b"data"))
    assert Opener(owner).open(made_by_box, bind, monitor.public.decode()) == b"data"
    sealer = Sealer(monitor)
    nonce = slice(33, 57)
    first = sealer.seal(owner.public, b"x", bind)[nonce]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write the nonces of its next blobs, then leave at once
        os.close(r)
        os.write(w, b"".join(sealer.seal(owner.public, b"x", bind)[nonce] for _ in range(300)))
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    theirs = {data[i:i + 24] for i in range(0, len(data), 24)}
    ours = {sealer.seal(owner.public, b"x", bind)[nonce] for _ in range(300)} | {first}
    assert len(theirs) == 300 and len(ours) == 301 and not theirs & ours


def test_swapped_or_planted_results_in_the_store_are_refused(procs: Procs, home: Path) -> None:
    """With the broker stopped, swapping two jobs' sealed results in its database, or
    planting an unsealed pickle, once made the client return the wrong result or run
    the planted code. Blanking a job's output is refused too: a job that printed
    nothing keeps no output blob, and its result says so."""
    procs.broker()
    procs.worker(1)
    D = procs.client()
    one, two = done(D("'one'"), 60), done(D("'two'"), 60)
    planted = done(D("'three'"), 60)
    printed = done(D("print('printed'); 'four'"), 60)
    assert printed.result() == "four" and printed.output == "printed\n"
    for p in reversed(procs.started):
        p.stop(timeout=10)
    procs.started.clear()
    db = sqlite3.connect(home / "db" / "dsage.db")
    r1, r2 = (db.execute("SELECT result FROM jobs WHERE id=?", (j.job_id,)).fetchone()[0]
              for j in (one, two))
    db.execute("UPDATE jobs SET result=? WHERE id=?", (r2, one.job_id))
    db.execute("UPDATE jobs SET result=? WHERE id=?", (r1, two.job_id))
    db.execute("UPDATE jobs SET sealed=0, encoding='dill', result=? WHERE id=?",
               (pickle.dumps("planted"), planted.job_id))
    assert db.execute("SELECT length(output) FROM jobs WHERE id=?",
                      (one.job_id,)).fetchone()[0] in (0, None)  # nothing printed: no blob
    db.execute("UPDATE jobs SET output=x'' WHERE id=?", (printed.job_id,))
    db.commit()
    db.close()
    procs.broker()
    D2 = procs.client()
    for j in (one, two, planted, printed):
        again = done(D2.job(j.job_id), 30)
        assert again.status == "failed" and "unreadable result" in (again.error or "")
        with pytest.raises(dsage.JobError):
            again.result()


# --- keys on the command line


def _key_starting_with_dash() -> bytes:
    """A real public key whose z85 form starts with '-' (as about one in 85 do)."""
    while True:
        public = zmq.curve_keypair()[0]
        if public.startswith(b"-"):
            return public


def test_keys_that_start_with_a_dash_pass_every_command_line(tmp_path: Path) -> None:
    home = other_home(tmp_path, "h")
    key = _key_starting_with_dash()
    r = cli("keys", "--home", str(home), "add", "dash", key.decode())
    assert r.returncode == 0, r.stderr
    assert keys.authorized_keys(home)["dash"] == key
    from dsage.cli import worker_parser
    from dsage.cluster import MONITOR_FIELDS, _as_args

    args = worker_parser().parse_args(_as_args({"server_key": key}, MONITOR_FIELDS, "worker"))
    assert args.server_key == key.decode()


def test_keys_command_shows_adds_lists_and_removes(tmp_path: Path) -> None:
    home = other_home(tmp_path, "h")
    alice = other_home(tmp_path, "alice")
    own = keys.load_keypair(home).public.decode()
    r = cli("keys", "--home", str(home))
    assert r.returncode == 0 and r.stdout.strip() == own
    r = cli("keys", "--home", str(home), "add", "alice", str(keys.public_key_file(alice)))
    assert r.returncode == 0, r.stderr
    bob_key = zmq.curve_keypair()[0].decode()
    assert cli("keys", "--home", str(home), "add", "bob", bob_key).returncode == 0
    listed = cli("keys", "--home", str(home), "list").stdout.splitlines()
    alice_key = keys.load_keypair(alice).public.decode()
    assert sorted(listed) == sorted([f"alice\t{alice_key}\tclient", f"bob\t{bob_key}\tclient",
                                     f"self\t{own}\tboth"])
    r = cli("keys", "--home", str(home), "add", "no good", bob_key)
    assert r.returncode == 2 and "not a valid key name" in r.stderr
    r = cli("keys", "--home", str(home), "add", "carol", "not-a-key")
    assert r.returncode == 2 and "neither a 40-character z85 key nor a key file" in r.stderr
    assert cli("keys", "--home", str(home), "remove", "alice").returncode == 0
    assert "alice" not in cli("keys", "--home", str(home), "list").stdout
    r = cli("keys", "--home", str(home), "remove", "alice")
    assert r.returncode == 2 and "no authorized key named 'alice'" in r.stderr


def test_secret_key_readable_by_others_is_refused_everywhere(tmp_path: Path, port: int) -> None:
    """setup, `dsage keys`, both launchers and the client refuse, saying to chmod 600."""
    home = other_home(tmp_path, "h")
    secret = home / keys.SECRET_NAME
    secret.chmod(0o644)
    for args in (["setup", "--home", str(home)], ["keys", "--home", str(home)],
                 ["broker", "--home", str(home), "--port", str(port)],
                 ["worker", "--home", str(home), "--port", str(port), "--workers", "1"]):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "too open" in r.stderr and f"chmod 600 {secret}" in r.stderr, args
    with pytest.raises(keys.InsecureKeyFile, match="chmod 600"):
        dsage.DSage("127.0.0.1", port, home=home, connect_timeout=0)
    with pytest.raises(keys.InsecureKeyFile, match="chmod 600"):
        dsage.start_all(1, port=port, home=home)
    secret.chmod(0o640)
    with pytest.raises(keys.InsecureKeyFile):
        keys.setup(home)
    secret.chmod(0o600)
    assert cli("setup", "--home", str(home)).returncode == 0


def test_key_add_and_remove_take_effect_on_a_running_broker(procs: Procs, home: Path,
                                                            tmp_path: Path) -> None:
    procs.broker()
    bob = other_home(tmp_path, "bob")
    with pytest.raises(KeyRejected):
        user_client(procs, bob, connect_timeout=10)

    r = cli("keys", "--home", str(home), "add", "bob", str(keys.public_key_file(bob)),
            "--role", "both")
    assert r.returncode == 0, r.stderr
    D = wait_for(lambda: client_if_trusted(procs, bob), 10,
                 "the broker to accept the added key")
    assert D.get_my_jobs() == []
    monitor = dsage.worker("127.0.0.1", procs.port, 1, blocking=False, home=bob,
                           heartbeat=HEARTBEAT, server_key=keys.load_keypair(home).public)
    assert monitor is not None
    procs.started.append(monitor)
    wait_for(lambda: any(w.key == keys.load_keypair(bob).public.decode()
                         for w in D.workers()), 30, "bob's monitor registered")
    assert cli("keys", "--home", str(home), "remove", "bob").returncode == 0
    wait_for(lambda: client_if_trusted(procs, bob) is None, 10,
             "the broker to refuse the removed key")
    # connections made before the removal lose their rights too
    with pytest.raises(KeyRejected, match="not authorized as a client"):
        D.get_my_jobs()
    refused = done(D("1"), 10)
    assert refused.status == "failed" and refused.refused == "unauthorized"
    owner = dsage.DSage("127.0.0.1", procs.port, home=home, connect_timeout=30)
    try:
        wait_for(lambda: not owner.workers(), 10, "bob's monitor dropped")
    finally:
        owner.close()


# --- strangers


def test_stranger_refused_on_each_of_the_three_ports(procs: Procs, home: Path,
                                                     ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    procs.broker(allow_anonymous=False)
    server = broker_key(home)
    stranger = keys.Keypair(*zmq.curve_keypair())
    trusted = keys.load_keypair(home)
    for offset, kind in ((0, zmq.DEALER), (1, zmq.DEALER), (2, zmq.SUB)):
        endpoint = f"tcp://127.0.0.1:{procs.port + offset}"
        # wait until the port answers at all (the broker may still be starting)
        wait_for(lambda: handshake(ctx, kind, endpoint, trusted, server, 2) == "ok", 30,
                 f"port +{offset} to admit the trusted key")
        assert handshake(ctx, kind, endpoint, stranger, server) == "auth", offset


def test_without_a_zap_handler_nobody_gets_in(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    """make_server fails closed: no authenticator in the context means refusal."""
    server = keys.Keypair(*zmq.curve_keypair())
    anyone = keys.Keypair(*zmq.curve_keypair())
    enforced = ctx.socket(zmq.ROUTER)
    make_server(enforced, server, CLIENTS, 1 << 20)
    port = enforced.bind_to_random_port("tcp://127.0.0.1")
    assert handshake(ctx, zmq.DEALER, f"tcp://127.0.0.1:{port}", anyone, server.public) \
        in ("no-detail", "protocol", "auth")
    assert enforced.poll(0) == 0
    # The control: the same socket without ZAP_ENFORCE_DOMAIN admits anyone (fails open).
    lax = ctx.socket(zmq.ROUTER)
    make_server(lax, server, CLIENTS, 1 << 20)
    lax.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 0)
    port = lax.bind_to_random_port("tcp://127.0.0.1")
    assert handshake(ctx, zmq.DEALER, f"tcp://127.0.0.1:{port}", anyone, server.public) == "ok"
    enforced.close(linger=0)
    lax.close(linger=0)


def test_stranger_client_gets_key_rejected_and_nothing_is_stored_or_run(
        procs: Procs, home: Path, tmp_path: Path) -> None:
    procs.broker()
    procs.worker(1)
    stranger = other_home(tmp_path, "stranger")
    marker = tmp_path / "ran"
    S = user_client(procs, stranger, connect_timeout=0)
    sneaky = S(f"open({str(marker)!r}, 'w').close()")
    start = time.monotonic()
    with pytest.raises(KeyRejected, match="rejected this client's key") as e:
        S.wait_connected(10)
    assert time.monotonic() - start < 10
    # the key quoted in the command it suggests: z85 holds $ ( > ! * ? for the shell
    assert f"dsage keys add NAME '{keys.load_keypair(stranger).public.decode()}'" \
        in str(e.value)
    start = time.monotonic()
    with pytest.raises(KeyRejected):
        user_client(procs, stranger, connect_timeout=10)
    assert time.monotonic() - start < 10
    D = procs.client()
    assert D("1+1").result(60) == 2  # the broker stored and ran this one
    assert [r[0] for r in db_rows(home, "SELECT owner FROM jobs")] == [D.keys.public.decode()]
    assert not sneaky.done() and not marker.exists()


def test_wrong_server_key_is_a_different_clear_error(procs: Procs) -> None:
    procs.broker()
    procs.client()  # the broker is up
    wrong = zmq.curve_keypair()[0]
    start = time.monotonic()
    with pytest.raises(BrokerUnreachable, match="server key") as e:
        procs.client(server_key=wrong, connect_timeout=10)
    assert time.monotonic() - start < 10
    assert not isinstance(e.value, KeyRejected)
    assert wrong.decode() in str(e.value)


def test_monitor_with_unknown_key_is_refused_and_never_gets_a_job(
        procs: Procs, home: Path, tmp_path: Path) -> None:
    broker = procs.broker()
    stranger_home = other_home(tmp_path, "stranger")
    stranger_key = keys.load_keypair(stranger_home).public.decode()
    D = procs.client()
    j = D("import os; os.getppid()")
    stranger = other_worker(procs, stranger_home, server_key=broker_key(home))
    wait_for(lambda: "rejected this worker's key" in log_text(stranger), 20,
             "the stranger monitor to log its refusal")
    assert "dsage keys add" in log_text(stranger)
    wait_for(lambda: f"refused key {stranger_key}" in log_text(broker), 10,
             "the broker to log the refused key")
    assert D.workers() == [] and j.status == "new"
    trusted = procs.worker(1)
    assert j.result(60) == trusted.pid
    assert j.worker is not None and j.worker.key != stranger_key
    assert all(w.key != stranger_key for w in D.workers())


# --- anonymous workers and untrusted results


def test_anonymous_worker_gets_only_anonymous_ok_jobs(procs: Procs, home: Path,
                                                      tmp_path: Path) -> None:
    procs.broker(allow_anonymous=True)
    anon_home = tmp_path / "anon"  # no keypair: only the broker's public key file
    anon = other_worker(procs, anon_home, 2, anonymous=True,
                        server_key=str(keys.public_key_file(home)))
    D = procs.client()
    procs.wait_workers(D, 2)
    assert not keys.has_keypair(anon_home)
    [info] = D.workers()
    assert info.anonymous and info.pid == anon.pid and info.key != D.keys.public.decode()
    code = "import os\nprint('from', os.getppid())\nos.getppid()"  # the slot's monitor
    # Round 1: only the anonymous monitor is up.
    trusted_only = [D(code) for _ in range(15)]
    anon_ok = [D(code, anonymous_ok=True) for _ in range(15)]
    odd = D("object()", anonymous_ok=True)
    for j in anon_ok:
        assert j.result(60) == anon.pid
        assert j.worker is not None and j.worker.anonymous and not j.trusted
        assert j.output.strip() == f"from {anon.pid}"
    assert isinstance(odd.result(60), dsage.codec.UntrustedResult)
    assert odd.result().startswith("<object object at")
    queued = {j.job_id for j in D.get_my_jobs("new")}
    assert queued == {j.job_id for j in trusted_only}  # what the anonymous one did not get
    # Round 2: a trusted monitor joins; jobs of both kinds arrive together.
    trusted = procs.worker(1)
    procs.wait_workers(D, 3)
    trusted_only += [D(code) for _ in range(15)]
    anon_ok += [D(code, anonymous_ok=True) for _ in range(15)]
    for j in trusted_only:
        assert j.result(60) == trusted.pid
        assert j.worker is not None and not j.worker.anonymous and j.trusted
    for j in anon_ok:
        j.wait(60)
        ran_anonymously = j.result() == anon.pid
        assert j.worker is not None and j.worker.anonymous == ran_anonymously
        assert j.trusted is not ran_anonymously


class Evil:
    """Unpickling this runs a shell command that creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.path}",))


def hostile_blobs(marker: Path) -> st.SearchStrategy[bytes]:
    """Pickles (plain and dill, every protocol) that create ``marker`` when loaded,
    also nested in containers, plus data-encoded-looking wrappers around them."""
    values = st.recursive(
        st.just(Evil(marker)),
        lambda inner: st.lists(inner, min_size=1, max_size=3)
        | st.tuples(inner, st.integers())
        | st.dictionaries(st.text(max_size=3), inner, min_size=1, max_size=2),
        max_leaves=4)
    pickled = st.builds(lambda v, proto, use_dill: (dill.dumps if use_dill else pickle.dumps)(
        v, protocol=proto), values, st.integers(0, pickle.HIGHEST_PROTOCOL), st.booleans())
    return pickled | st.builds(lambda p: b'["r",' + p + b"]", pickled)


def test_hostile_pickle_marker_really_runs_when_unpickled(tmp_path: Path) -> None:
    """The control for the tests below: loading these blobs does create the marker."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps([Evil(marker)]))
    assert marker.exists()


class FakeAnonymousMonitor:
    """A raw anonymous monitor that answers each job it is given with chosen bytes."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], port: int, server: bytes,
                 own: keys.Keypair | None = None) -> None:
        self.keys = own or keys.Keypair(*zmq.curve_keypair())  # own: a trusted monitor
        self.sock = ctx.socket(zmq.DEALER)
        make_client(self.sock, self.keys, server)
        self.sock.connect(f"tcp://127.0.0.1:{port + 1}")
        self.sealer = Sealer(self.keys)
        self._register()

    def _register(self) -> None:
        self._send(protocol.make(protocol.M.REGISTER, monitor="fake", host="fake", pid=1,
                                 slots=1, tags=[], running=[], version=dsage.__version__))

    def _send(self, msg: protocol.Message) -> None:
        self.sock.send_multipart(protocol.encode(msg))

    def next_job(self, timeout: float = 30.0) -> dict[str, object]:
        """The next RUN spec, heartbeating (and re-registering) meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._send(protocol.make(protocol.M.HEARTBEAT))
            if not self.sock.poll(100):
                continue
            msg = protocol.decode(self.sock.recv_multipart(), protocol.MONITOR_REPLIES)
            if msg.type is protocol.M.RUN:
                return msg.header["jobs"][0]  # type: ignore[no-any-return]
            if msg.type is protocol.M.ERROR and msg.header["code"] == "unregistered":
                self._register()
        raise AssertionError("the fake monitor got no job")

    def answer(self, spec: dict[str, object], encoding: str, blob: bytes, sealed: bool) -> None:
        owner = str(spec["owner"])
        bound = (str(spec["id"]), owner, "completed", encoding, "expression")
        result = self.sealer.seal(owner, blob, binding(*bound, "result")) if sealed else blob
        output = (self.sealer.seal(owner, b"hostile", binding(*bound, "output")) if sealed
                  else b"hostile")
        now = time.time()
        self._send(protocol.make(protocol.M.RESULT, [result, output], results=[{
            "id": spec["id"], "status": "completed", "error": None, "encoding": encoding,
            "result_from": "expression", "sealed": sealed, "started": now, "finished": now, "staged": False, "attempt": 1, "retry": False}]))

    def close(self) -> None:
        self.sock.close(linger=0)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_pickles_from_an_anonymous_worker_never_run(
        procs: Procs, home: Path, tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]],
        data: st.DataObject) -> None:
    if not procs.started:
        procs.broker(allow_anonymous=True, heartbeat=1.0)
        procs.fake = FakeAnonymousMonitor(ctx, procs.port, broker_key(home))  # type: ignore
        procs.D = procs.client()  # type: ignore[attr-defined]
    fake: FakeAnonymousMonitor = procs.fake  # type: ignore[attr-defined]
    D: dsage.DSage = procs.D  # type: ignore[attr-defined]
    marker = tmp_path / "pwned"
    blob = data.draw(hostile_blobs(marker), "blob")
    encoding = data.draw(st.sampled_from(["dill", "data"]), "encoding")
    sealed = data.draw(st.booleans(), "sealed")
    j = D("1", anonymous_ok=True)
    spec = fake.next_job()
    assert spec["id"] == j.job_id and spec["trusted"] is False
    fake.answer(spec, encoding, blob, sealed)
    j.wait(30)
    assert not j.trusted
    assert j.worker is not None and j.worker.anonymous and j.worker.key == \
        fake.keys.public.decode()
    if sealed:
        assert j.status == "completed"
        expected = dsage.UntrustedResultError if encoding == "dill" else ValueError
        with pytest.raises(expected):
            j.result()
        assert j.output == "hostile"
    else:  # an unsealed result is refused outright
        assert j.status == "failed" and "not sealed" in (j.error or "")
        with pytest.raises(dsage.JobError):
            j.result()
    assert not marker.exists()


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=64) | hostile_blobs(Path("/nonexistent/dsage-pwned")),
       encoding=st.sampled_from(["dill", "data", "none"]))
def test_wrapper_never_unpickles_what_an_anonymous_worker_sent(blob: bytes,
                                                               encoding: str) -> None:
    marker = Path("/nonexistent/dsage-pwned")
    w = dsage.JobWrapper(None, "0" * 32, None, "python")
    w._update({"status": "completed", "name": None, "priority": 5, "created": 0.0,
               "started": 0.0, "finished": 0.0, "failures": 0, "error": None,
               "worker": {"id": "m", "host": "h", "anonymous": True, "key": "k" * 40},
               "encoding": encoding, "result_from": "expression", "sealed": False},
              [blob, b""])
    assert not w.trusted
    try:
        value = w.result()
    except (dsage.UntrustedResultError, ValueError):
        pass
    else:
        assert encoding in ("data", "none")
        assert value is None or not isinstance(value, Evil)
    assert not marker.exists()


# --- the data-only encoding

data_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=4),
    max_leaves=20)


@given(value=data_values)
def test_data_encoding_round_trips_plain_values(value: object) -> None:
    blob = codec.dump_data(value)
    back = codec.load_data(blob)
    assert back == value and type(back) is type(value)


@given(value=st.builds(object) | st.builds(set, st.lists(st.integers(), max_size=3))
       | st.builds(lambda: Evil(Path("/nonexistent"))))
def test_other_values_become_their_repr_marked_untrusted(value: object) -> None:
    back = codec.load_data(codec.dump_data(value))
    assert isinstance(back, codec.UntrustedResult) and back == repr(value)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=12)
tagged = st.lists(st.sampled_from(list("nTFifsbltdr")) | json_like, min_size=1, max_size=3)


@settings(max_examples=300)
@given(blob=st.binary(max_size=200)
       | json_like.map(lambda v: json.dumps(v).encode())
       | tagged.map(lambda v: json.dumps(v).encode())
       | st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n))
def test_load_data_rejects_garbage_with_value_error_only(blob: bytes) -> None:
    try:
        codec.load_data(blob)
    except ValueError:
        pass


# --- isolation between users


def _alice_and_bob(procs: Procs, home: Path, tmp_path: Path,
                   slots: int) -> tuple[dsage.DSage, dsage.DSage]:
    """A cluster and two clients: alice (the broker's own key) and bob (another
    authorized key)."""
    bob_home = other_home(tmp_path, "bob")
    keys.add_key("bob", keys.public_key_file(bob_home), home)  # before the broker reads them
    procs.broker()
    procs.worker(slots)
    return procs.client(), user_client(procs, bob_home)


def test_two_users_cannot_see_fetch_list_or_kill_each_others_jobs(
        procs: Procs, home: Path, tmp_path: Path) -> None:
    A, B = _alice_and_bob(procs, home, tmp_path, slots=2)
    done_a = done(A("6*7"), 60)
    running_a = A("import time; time.sleep(60)")
    wait_for(lambda: running_a.status == "processing", 30, "alice's job to start")
    done_b = done(B("'bob'"), 60)
    assert done_a.result() == 42 and done_b.result() == "bob"
    for jid in (done_a.job_id, running_a.job_id):
        with pytest.raises(UnknownJob):
            B.job(jid)
        with pytest.raises(UnknownJob):
            B.kill(jid)
    with pytest.raises(UnknownJob):
        A.job(done_b.job_id)
    assert {j.job_id for j in B.get_my_jobs()} == {done_b.job_id}
    assert {j.job_id for j in A.get_my_jobs()} == {done_a.job_id, running_a.job_id}
    assert A.job(running_a.job_id).status == "processing"  # bob's kill did nothing
    running_a.kill()
    assert done(running_a, 30).status == "killed"


def test_events_socket_admits_only_the_subscribers_own_topic(
        procs: Procs, home: Path, tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    A, B = _alice_and_bob(procs, home, tmp_path, slots=1)
    alice_topic, bob_topic = A.keys.public, B.keys.public
    spy = ctx.socket(zmq.SUB)  # bob's key, asking for alice's topic and then his own
    make_client(spy, B.keys, broker_key(home))
    spy.setsockopt(zmq.SUBSCRIBE, alice_topic)
    spy.setsockopt(zmq.SUBSCRIBE, bob_topic)
    spy.connect(f"tcp://127.0.0.1:{procs.port + 2}")
    topics: list[bytes] = []
    jobs_seen: set[str] = set()

    def receive() -> None:
        while spy.poll(20):
            frames = spy.recv_multipart()
            topics.append(frames[0])
            msg = protocol.decode(frames[1:], frozenset({protocol.M.EVENT}))
            jobs_seen.update(r["id"] for r in msg.header["jobs"] if r["status"] == "completed")

    # Bob's own subscription is live once its first (empty) event arrives; the
    # refused one was sent before it on the same connection.
    wait_for(lambda: receive() or bob_topic in topics, 30, "the spy's own subscription")
    assert A("'alice secret'").result(60) == "alice secret"
    b = done(B("1"), 60)
    wait_for(lambda: receive() or b.job_id in jobs_seen, 30, "bob's own job events")
    assert alice_topic not in topics and set(topics) == {bob_topic}
    spy.close(linger=0)


# --- limits


def test_per_client_queue_cap_is_a_clear_error(procs: Procs) -> None:
    procs.broker(max_queued_per_client=2)
    D = procs.client()
    first, second, third = D("1"), D("2"), D("3")
    third.wait(30)
    assert third.refused == "quota" and third.status == "failed"
    with pytest.raises(SubmitRejected, match="--max-queued-per-client"):
        third.result()
    assert {j.job_id for j in D.get_my_jobs("new")} == {first.job_id, second.job_id}
    procs.worker(1)
    assert first.result(60) == 1 and second.result(60) == 2
    assert D("4").result(60) == 4  # room again


def test_max_message_size_is_enforced_with_clear_errors(procs: Procs) -> None:
    limit = 1 << 20
    procs.broker(max_message_size=limit)
    procs.worker(1, max_message_size=limit)
    D = procs.client()
    big = D("s = '" + "a" * (2 * limit) + "'\nlen(s)")
    with pytest.raises(SubmitRejected, match="largest message allowed"):
        big.result(30)
    assert big.refused == "size"
    huge_result = done(D(f"b'x' * {2 * limit}"), 60)
    assert huge_result.status == "failed" and "largest message allowed" in huge_result.error
    assert D("1+1").result(60) == 2  # the connections are fine


def test_a_frame_limit_too_small_for_dsage_itself_is_refused_saying_so(home: Path) -> None:
    """A client with a 300 KB limit waited forever for a 600 KB result: the chunks it is
    fetched in are 1 MiB, so each one dropped its connection, and the fetch began
    again. A broker or worker given 5 bytes started, and no peer could complete a
    handshake with it (a client blamed the key). Limits under what dsage's own
    messages need are refused where they are given, saying why; and dsage.server()
    and dsage.worker() running in this process check every option as the launchers
    do (they took any value)."""
    with pytest.raises(ValueError, match=f"at least {protocol.MIN_MESSAGE_SIZE} bytes"):
        dsage.DSage(home=home, max_message_size=300_000)
    for launcher in ("broker", "worker"):
        r = cli(launcher, "--max-message-size", "5", "--home", str(home))
        assert r.returncode == 2, r.stderr
        assert f"less than {protocol.MIN_MESSAGE_SIZE} bytes" in r.stderr
        assert "Traceback" not in r.stderr
    # the same checks where a broker or monitor runs in this process
    with pytest.raises(ValueError, match="max_message_size=5: 5 is less than"):
        dsage.server(port=1, home=home, max_message_size=5)
    with pytest.raises(ValueError, match="heartbeat=-1: -1 is not a positive number"):
        dsage.worker(port=1, home=home, heartbeat=-1)


# --- roles


def _worker_log_says_role(p: ManagedProcess) -> bool:
    text = log_text(p)
    return "client only, not as a worker" in text and "--role worker" in text


def test_a_client_key_cannot_register_as_a_worker_and_never_sees_a_job(
        procs: Procs, home: Path, tmp_path: Path) -> None:
    """A key added for a second user once registered as a trusted worker and was sent
    another user's job payload; with roles it is refused, and its log says why."""
    procs.broker()
    bob = other_home(tmp_path, "bob")
    assert cli("keys", "--home", str(home), "add", "bob",
               str(keys.public_key_file(bob))).returncode == 0  # a client: the default
    spy = other_worker(procs, bob, server_key=broker_key(home))
    A = procs.client()
    secret = A("api_token = 'alice-secret'\n1")
    wait_for(lambda: _worker_log_says_role(spy), 30, "the refused worker's log line")
    assert A.workers() == [] and secret.status == "new"
    assert "alice-secret" not in log_text(spy)
    B = user_client(procs, bob)  # bob is still a client
    assert B.get_my_jobs() == []
    # the same key as a worker: its monitor registers and runs the job
    assert cli("keys", "--home", str(home), "add", "bob", str(keys.public_key_file(bob)),
               "--role", "worker").returncode == 0
    assert secret.result(60) == 1
    with pytest.raises(KeyRejected, match="not authorized as a client"):
        B.get_my_jobs()


def test_a_worker_key_cannot_submit_or_subscribe(
        procs: Procs, home: Path, tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    machine = other_home(tmp_path, "machine")
    keys.add_key("machine", keys.public_key_file(machine), home, role="worker")
    procs.broker()
    with pytest.raises(KeyRejected, match="not authorized as a client"):
        user_client(procs, machine)
    own = keys.load_keypair(machine)
    sub = ctx.socket(zmq.SUB)
    make_client(sub, own, broker_key(home))
    sub.setsockopt(zmq.SUBSCRIBE, own.public)
    sub.connect(f"tcp://127.0.0.1:{procs.port + 2}")
    assert not sub.poll(1500)  # no subscription, so not even the empty first event
    sub.close(linger=0)


def test_roles_survive_in_key_files_and_the_own_key_is_both(tmp_path: Path) -> None:
    home = other_home(tmp_path, "h")
    k = zmq.curve_keypair()[0].decode()
    for name, role in (("c", "client"), ("w", "worker"), ("b", "both")):
        keys.add_key(name, k if name == "c" else zmq.curve_keypair()[0].decode(), home,
                     role=role)
    roles = {n: r for n, (_, r) in keys.authorized_roles(home).items()}
    assert roles == {"b": "both", "c": "client", "self": "both", "w": "worker"}
    legacy = keys.authorized_dir(home) / "old.pub"  # written before roles: a client
    legacy.write_text(keys.certificate_text(zmq.curve_keypair()[0]))
    assert keys.authorized_roles(home)["old"][1] == "client"
    with pytest.raises(keys.BadKey, match="role"):
        keys.add_key("x", k, home, role="admin")


# --- files at rest


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_at_rest_are_private_whatever_the_umask(procs: Procs, tmp_path: Path,
                                                      umask: int) -> None:
    root = tmp_path / f"h{umask:o}"
    old = os.umask(umask)
    try:
        keys.setup(root)
    finally:
        os.umask(old)
    for sub in ("", "db", "authorized_keys", "tmp_worker_files", "logs"):
        assert (root / sub).stat().st_mode & 0o777 == 0o700, sub
    assert (root / keys.SECRET_NAME).stat().st_mode & 0o777 == 0o600
    code = (f"import os, dsage\nos.umask({umask})\n"
            f"D = dsage.start_all(workers=1, port=0, home={str(root)!r})\n"
            f"assert D('1+1').result(60) == 2\nD.close()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    db_files = [p for p in (root / "db").iterdir() if p.name.startswith("dsage")]
    assert db_files
    for p in db_files:
        assert p.stat().st_mode & 0o777 == 0o600, p


def test_setup_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    root = tmp_path / "h"
    root.mkdir(mode=0o700)
    target = tmp_path / "victim"
    target.write_text("precious")
    (root / keys.PUBLIC_NAME).symlink_to(target)
    with pytest.raises(keys.BadKey, match="symbolic link"):
        keys.setup(root)
    assert target.read_text() == "precious"
    (root / keys.PUBLIC_NAME).unlink()
    (root / keys.SECRET_NAME).unlink()
    (root / keys.SECRET_NAME).symlink_to(target)
    with pytest.raises(keys.KeyProblem):  # refused, never written through
        keys.setup(root)
    assert target.read_text() == "precious"


@pytest.mark.parametrize("what", ["folder", "file"])
def test_authorized_keys_others_could_write_are_refused(home: Path, port: int,
                                                        what: str) -> None:
    keys.add_key("bob", zmq.curve_keypair()[0].decode(), home)
    path = keys.authorized_dir(home) if what == "folder" else \
        keys.authorized_dir(home) / "bob.pub"
    path.chmod(path.stat().st_mode | 0o020)
    r = cli("broker", "--home", str(home), "--port", str(port))
    assert r.returncode == 2 and f"chmod go-w {path}" in r.stderr, r.stderr
    path.chmod(path.stat().st_mode & ~0o022)
    assert "bob" in cli("keys", "--home", str(home), "list").stdout


def test_a_finished_jobs_payload_does_not_linger_in_the_store_files(procs: Procs,
                                                                    home: Path) -> None:
    procs.broker()
    procs.worker(1)
    D = procs.client()
    marker = "PAYLOAD-" + os.urandom(8).hex()
    assert D(f"len({marker!r})").result(60) == len(marker)

    def gone() -> bool:
        raw = b"".join(p.read_bytes() for p in (home / "db").iterdir() if p.is_file())
        return marker.encode() not in raw

    wait_for(gone, 30, "the payload overwritten in the database and gone from the WAL")


def test_untrusted_text_and_monitor_details_are_kept_from_clients(
        procs: Procs, home: Path, tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    """Output from anonymous workers reaches terminals without control sequences; a
    client-only key sees no other monitor's key or pid."""
    procs.broker(allow_anonymous=True, heartbeat=1.0)
    fake = FakeAnonymousMonitor(ctx, procs.port, broker_key(home))
    D = procs.client()
    j = D("1", anonymous_ok=True)
    spec = fake.next_job()
    owner = str(spec["owner"])
    bound = (str(spec["id"]), owner, "completed", "data", "expression")
    evil = b"\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x1b[0m text\r\n"
    now = time.time()
    fake._send(protocol.make(protocol.M.RESULT, [
        fake.sealer.seal(owner, codec.dump_data(1), binding(*bound, "result")),
        fake.sealer.seal(owner, evil, binding(*bound, "output"))], results=[{
            "id": spec["id"], "status": "completed", "error": None, "encoding": "data",
            "result_from": "expression", "sealed": True, "started": now, "finished": now,
            "staged": False, "attempt": 1, "retry": False}]))
    assert j.result(30) == 1
    assert j.output == "red text\n" and "\x1b" not in str(j)
    bob = other_home(tmp_path, "bob")
    keys.add_key("bob", keys.public_key_file(bob), home)  # a client only

    B = wait_for(lambda: client_if_trusted(procs, bob), 20, "the broker to accept bob's key")
    [seen] = B.workers()
    assert seen.key is None and seen.pid == 0 and seen.host == "fake"
    [full] = D.workers()  # the owner's key has the worker role
    assert full.key == fake.keys.public.decode() and full.pid == 1
    fake.close()


def test_a_slot_never_runs_jobs_of_two_owners(procs: Procs, home: Path,
                                              tmp_path: Path) -> None:
    """Bob's job once left code in its slot that spied on Alice's next job there."""
    A, B = _alice_and_bob(procs, home, tmp_path, slots=1)
    plant = ("import os, colorsys\n"
             "colorsys.planted = 'by bob'\n"  # a module it imports and changes itself
             "os.getpid()")
    look = "import os, colorsys\n(os.getpid(), getattr(colorsys, 'planted', None))"
    bob_pid = B(plant).result(60)
    alice_pid, planted = A(look).result(60)
    assert planted is None and alice_pid != bob_pid
    assert A(look).result(60)[0] == alice_pid  # the same owner keeps its slot


def test_error_texts_are_sealed_and_the_store_keeps_only_their_type(procs: Procs,
                                                                    home: Path) -> None:
    """Error summaries once held user data in plaintext (KeyError: 'PASSWORD-...')."""
    procs.broker()
    procs.worker(1)
    D = procs.client()
    secret = "PASSWORD-" + os.urandom(6).hex()
    failed = done(D(f"raise KeyError({secret[::-1]!r}[::-1])"), 60)
    slow = done(D("import time; time.sleep(30)", timeout=1), 60)
    assert failed.status == "failed" and secret in (failed.error or "")
    assert failed.error.startswith("KeyError")
    with pytest.raises(dsage.JobError, match=secret):
        failed.result()
    again = done(procs.client().job(failed.job_id), 30)  # another connection opens it too
    assert secret in (again.error or "")
    stored = dict(db_rows(home, "SELECT id, error FROM jobs"))
    assert stored[failed.job_id] == "KeyError"
    assert "timed out" in stored[slow.job_id]  # the monitor's own words stay readable
    raw = b"".join(p.read_bytes() for p in (home / "db").iterdir() if p.is_file())
    assert secret.encode() not in raw


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(blob=st.binary(max_size=200), encoding=st.sampled_from(["dill", "data", "error"]),
       sealed=st.booleans())
def test_garbage_from_a_trusted_worker_fails_the_job_cleanly(
        procs: Procs, home: Path, ctx: zmq.Context[zmq.Socket[bytes]], blob: bytes,
        encoding: str, sealed: bool) -> None:
    """Whatever bytes a trusted worker sends as a result, the client stays up, the job
    ends, and reading it either gives a value or raises an ordinary exception."""
    if not procs.started:
        procs.broker(heartbeat=1.0)
        procs.fake = FakeAnonymousMonitor(ctx, procs.port, broker_key(home),  # type: ignore
                                          own=keys.load_keypair(home))
        procs.D = procs.client()  # type: ignore[attr-defined]
    fake: FakeAnonymousMonitor = procs.fake  # type: ignore[attr-defined]
    D: dsage.DSage = procs.D  # type: ignore[attr-defined]
    j = D("1")
    spec = fake.next_job()
    assert spec["id"] == j.job_id and spec["trusted"] is True
    fake.answer(spec, encoding, blob, sealed)
    j.wait(30)
    assert j.done() and j.trusted
    try:
        j.result()
    except Exception:  # noqa: BLE001 - any ordinary error is fine; a crash is not
        pass
    assert isinstance(repr(j), str) and isinstance(j.output, str)
    assert D._io.is_alive()


# --- jobs as an unprivileged user (--run-as)


def _nobody() -> pwd.struct_passwd:
    """The user 'nobody', for tests that need root to run jobs as it."""
    if os.geteuid() != 0:
        skip_or_fail("running jobs as another user needs a monitor run as root")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        skip_or_fail("there is no user 'nobody' here")
        raise


_PEEK = """import os
def peek(path):
    try:
        open(path, 'rb').read()
        return 'read'
    except PermissionError:
        return 'PermissionError'
print('running as', os.getuid(), flush=True)
import fractions  # imports work, also where Python's folders are closed to nobody
assert b'\\xe9'.decode('cp1252') == '\\xe9' and fractions.Fraction(1, 2) * 2 == 1
(os.getuid(), os.getgid(), os.getgroups(), peek({home!r}), peek({worker!r}), os.environ['HOME'],
 os.getcwd().startswith(os.environ['HOME']))
"""


def _processes_with(arg: str) -> list[tuple[int, int]]:
    """(pid, uid) of the processes whose command line holds ``arg``."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if arg.encode() not in f.read().split(b"\0"):
                    continue
            found.append((int(name), os.stat(f"/proc/{name}").st_uid))
        except (OSError, ValueError):
            pass
    return found


def test_run_as_nobody_keeps_jobs_from_the_keys_and_still_contains_them(
        procs: Procs, home: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    nobody = _nobody()
    machine = other_home(tmp_path, "machine")  # a worker key of its own, as advised
    keys.add_key("machine", keys.load_keypair(machine).public, home, role="worker")
    # what a monitor killed before it could clean up left (pid 2**22 + 1 exists nowhere)
    stale = Path(tempfile.gettempdir()) / f"dsage-nobody-m-{2**22 + 1}-1-x"
    (stale / "work" / "job").mkdir(parents=True)
    request.addfinalizer(lambda: shutil.rmtree(stale, ignore_errors=True))
    procs.broker()
    other_worker(procs, machine, 1, run_as="nobody", server_key=broker_key(home))
    D = procs.client()
    procs.wait_workers(D, 1)
    assert not stale.exists()  # removed at the monitor's start
    j = D(_PEEK.format(home=str(home / keys.SECRET_NAME),
                       worker=str(machine / keys.SECRET_NAME)))
    uid, gid, groups, home_key, worker_key, job_home, inside = j.result(60)
    assert (uid, gid) == (nobody.pw_uid, nobody.pw_gid)
    assert set(groups) <= {nobody.pw_gid}  # root's groups are gone too
    assert (home_key, worker_key) == ("PermissionError", "PermissionError")
    assert not job_home.startswith((str(home), str(machine))) and inside
    assert j.output == f"running as {nobody.pw_uid}\n"
    assert D.eval_function(os.getuid, ()).result(60) == nobody.pw_uid  # a pickled call
    # a slot forked off the isolate template (which stays root) gives root up as well
    isolated = D(_PEEK.format(home=str(home / keys.SECRET_NAME),
                              worker=str(machine / keys.SECRET_NAME)), isolate=True)
    assert isolated.result(60)[:2] == (nobody.pw_uid, nobody.pw_gid), isolated.output
    assert isolated.result()[3:5] == ("PermissionError", "PermissionError")
    # timeouts and kills still end the job and all it started
    slow = done(D("import time; print('before', flush=True); time.sleep(60)", timeout=1), 60)
    assert slow.status == "failed" and "timed out" in (slow.error or "")
    assert slow.output.startswith("before\n")  # read from its capture file after the kill
    mark = f"{random.randrange(10**6)}.{random.randrange(10**6)}"
    k = D(f"import subprocess, time\np = subprocess.Popen(['sleep', '{mark}'])\n"
          f"print('child', p.pid, flush=True)\ntime.sleep(60)")
    [(child, child_uid)] = wait_for(lambda: _processes_with(mark), 30, "the job's child")
    assert child_uid == nobody.pw_uid
    k.kill()
    assert done(k, 30).status == "killed"
    wait_for(lambda: not _processes_with(mark), 10, "the job's child to die with it")
    assert D("6 * 7").result(60) == 42  # the monitor goes on


def test_a_job_cannot_make_the_monitor_read_a_file_for_it(procs: Procs, home: Path,
                                                          tmp_path: Path) -> None:
    """The monitor (root) reads a dead slot's captured output by path, in a folder the
    job may change: a link planted there is not followed."""
    _nobody()
    procs.broker()
    procs.worker(1, run_as="nobody")
    D = procs.client()
    procs.wait_workers(D, 1)
    secret = keys.load_keypair(home).secret.decode()
    plant = (f"import glob, os\nfor c in glob.glob('../.slot-*.out'):\n"
             f"    os.unlink(c)\n    os.symlink({str(home / keys.SECRET_NAME)!r}, c)\n"
             f"print('planted', flush=True)\nos._exit(3)")
    j = done(D(plant), 60)
    assert j.status == "failed" and "exited with status 3" in (j.error or "")
    assert secret not in j.output and "secret-key" not in j.output
    assert D("1 + 1").result(60) == 2


def test_an_anonymous_monitor_run_by_root_runs_jobs_as_nobody_by_default(
        procs: Procs, home: Path, tmp_path: Path) -> None:
    nobody = _nobody()
    procs.broker(allow_anonymous=True)
    other_worker(procs, tmp_path / "anon", 1, anonymous=True,
                 server_key=str(keys.public_key_file(home)))
    D = procs.client()
    procs.wait_workers(D, 1)
    assert D("import os; os.getuid()", anonymous_ok=True).result(60) == nobody.pw_uid
    procs.worker(1)  # a trusted monitor without --run-as runs jobs as its own user
    procs.wait_workers(D, 2)
    assert D("import os; os.getuid()").result(60) == os.getuid()


def _worker_main_unprivileged(argv: list[str]) -> tuple[int, str]:
    """``dsage-worker ARGV`` in a forked child that is not root (exit status, stderr)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            sys.stderr = open(w, "w", buffering=1)  # pytest replaced sys.stderr
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            from dsage.cli import worker_main

            status = worker_main(argv)
            sys.stderr.flush()
            os._exit(status)
        finally:
            os._exit(70)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        err = f.read().decode(errors="replace")
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


def test_run_as_is_refused_clearly_unless_root_and_a_real_user(port: int, home: Path) -> None:
    r = cli("worker", "--port", str(port), "--run-as", "no-such-user-of-dsage")
    assert r.returncode == 2
    assert "--run-as no-such-user-of-dsage: there is no such user" in r.stderr
    assert "Traceback" not in r.stderr
    other = "root" if os.geteuid() != 0 else "daemon"
    status, err = _worker_main_unprivileged(["--port", str(port), "--run-as", other])
    assert status == 2 and "only a monitor that runs as root" in err, err


# --- how many anonymous peers may be connected at once


class Peer:
    """A raw CURVE dealer on the monitor port that follows its own handshakes."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], port: int, server: bytes,
                 kp: keys.Keypair | None = None) -> None:
        public, secret = zmq.curve_keypair()
        self.sock = ctx.socket(zmq.DEALER)
        make_client(self.sock, kp or keys.Keypair(public, secret), server)
        self.events = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_DISCONNECTED)
        self.connected = False
        self.refusals = 0
        self.retry_at = 0.0
        self.endpoint = f"tcp://127.0.0.1:{port + 1}"
        self.sock.connect(self.endpoint)

    def poll(self) -> bool:
        """Take in the socket's events; whether it is connected now. A refused peer
        connects again at once (libzmq gives up on a connection ZAP refused)."""
        while self.events.poll(0):
            ev = recv_monitor_message(self.events)
            if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
            elif ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.refusals += 1
                self.retry_at = time.monotonic() + 0.05
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                self.connected = False
        if self.retry_at and time.monotonic() >= self.retry_at:
            self.retry_at = 0.0
            try:
                self.sock.disconnect(self.endpoint)
            except zmq.ZMQError:
                pass
            self.sock.connect(self.endpoint)
        return self.connected

    def close(self) -> None:
        self.sock.disable_monitor()
        self.events.close(linger=0)
        self.sock.close(linger=0)


def test_anonymous_connection_count_follows_connects_and_disconnects() -> None:
    from dsage.limits import AnonymousConnections

    c = AnonymousConnections(limit=2)
    for fd, address in ((10, "10.0.0.1"), (11, "10.0.0.2"), (12, "10.0.0.1"), (13, "10.0.0.3")):
        c.accepted(fd, address)
    assert c.waiting("10.0.0.1") == [10, 12] and c.waiting("10.0.0.9") == []
    c.claim(12, anonymous=True)
    c.claim(11, anonymous=False)  # trusted: never counted
    assert not c.full()
    c.claim(10, anonymous=True)
    assert c.full() and c.anonymous == {10, 12} and c.waiting("10.0.0.1") == []
    c.claim(13, anonymous=False)  # refused
    c.disconnected(13)  # and closed: nothing changes
    assert c.full()
    c.disconnected(10)
    assert not c.full()
    c.accepted(10, "10.0.0.4")  # the descriptor reused by a new connection
    assert not c.full() and c.waiting("10.0.0.4") == [10]
    c.claim(10, anonymous=True)
    c.claim(10, anonymous=True)  # twice: counted once
    assert c.anonymous == {10, 12} and not c.pending


def test_live_anonymous_connections_are_capped_and_freed_when_they_close(
        procs: Procs, home: Path, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    procs.broker(allow_anonymous=True, max_anonymous_connections=3)
    server = broker_key(home)
    peers = [Peer(ctx, procs.port, server) for _ in range(7)]
    try:
        def settled(n: int, live: list[Peer]) -> bool:
            """n connected, and each of the others refused twice since the last change."""
            up = [p for p in live if p.poll()]
            return len(up) == n and all(p.refusals >= 2 for p in live if not p.connected)

        wait_for(lambda: settled(3, peers), 30, "3 anonymous peers in, 4 refused")
        refused = [p for p in peers if not p.connected]
        # trusted keys are admitted at the limit: a client, and a worker that runs a job
        D = procs.client()
        procs.worker(1)
        procs.wait_workers(D, 1)
        assert D("6 * 7").result(60) == 42
        trusted = Peer(ctx, procs.port, server, keys.load_keypair(home))
        wait_for(trusted.poll, 20, "a trusted peer on the monitor port")
        peers.append(trusted)
        # two anonymous peers leave: two of those waiting get in, and no more
        for p in [p for p in peers if p.connected and p is not trusted][:2]:
            p.close()
            peers.remove(p)
        for p in refused:
            p.refusals = 0
        anonymous = [p for p in peers if p is not trusted]
        wait_for(lambda: settled(3, anonymous), 30, "2 waiting anonymous peers admitted")
        assert sum(p in refused and p.connected for p in anonymous) == 2
        assert trusted.poll()
    finally:
        for p in peers:
            p.close()


def test_an_anonymous_worker_past_the_connection_limit_says_so_and_gets_in_later(
        procs: Procs, home: Path, tmp_path: Path) -> None:
    procs.broker(allow_anonymous=True, max_anonymous_connections=1)
    key = str(keys.public_key_file(home))
    first = other_worker(procs, tmp_path / "first", 1, anonymous=True, server_key=key)
    D = procs.client()
    procs.wait_workers(D, 1)
    second = other_worker(procs, tmp_path / "second", 2, anonymous=True, server_key=key)
    wait_for(lambda: "refused this anonymous worker" in log_text(second), 20,
             "the second worker to say it was refused")
    assert "--max-anonymous-connections" in log_text(second)
    assert [w.slots for w in D.workers()] == [1]
    first.stop()
    wait_for(lambda: [w.slots for w in D.workers()] == [2], 30,
             "the second worker admitted once the first left")
    assert second.alive()
