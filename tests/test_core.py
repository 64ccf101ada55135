"""The seed's quick start and the core client API, over real processes and sockets."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

import dsage
from dsage import keys

from .conftest import HEARTBEAT, Procs, alive, done, run_python, wait_for


def test_quick_start_with_start_all(home: Path, tmp_path: Path) -> None:
    D = dsage.start_all(workers=2, port=0, home=home, heartbeat=HEARTBEAT)
    try:
        j = D("2+2")
        assert j.wait(60) is None  # so that `j.wait()` at the prompt shows nothing
        assert str(j) == "4"
        assert j.result() == 4
        assert j.status == "completed"
        assert j.worker is not None and not j.worker.anonymous
        script = tmp_path / "dsage.py"
        script.write_text("DSAGE_RESULT = sorted([3, 1, 2])\n")
        j = D.eval_file(script, "test_job")
        j.wait(60)
        assert str(j) == "No output."
        assert j.result() == [1, 2, 3]
        assert j.name == "test_job"
        assert sum(w.slots for w in D.workers()) == 2
        pids = [p.pid for p in D._cluster.processes()]
    finally:
        D.close()
    for pid in pids:
        assert not alive(pid, group=True), "start_all left a process group running"


def test_display_rules(cluster: dsage.DSage) -> None:
    """A job shows as the seed showed it (str, and alone at the prompt); in a list it
    once showed as its output only (``[4, No output., 0]``): now id, name and status."""
    D = cluster
    assert str(done(D("print('hello')"), 60)) == "hello"
    assert str(done(D("x = 5"), 60)) == "No output."
    assert str(done(D("DSAGE_RESULT = 7"), 60)) == "No output."
    named = done(D("'a' * 3", name="triple"), 60)
    assert str(named) == "'aaa'"
    assert repr([named]) == f"[<job {named.job_id} 'triple' completed>]"
    slow = D("import time; time.sleep(30)")
    assert str(slow) == "No output yet."
    assert repr(slow) in (f"<job {slow.job_id} new>", f"<job {slow.job_id} processing>")
    slow.kill()


def test_a_job_at_the_prompt_shows_once_as_the_seed_showed_it(home: Path,
                                                              tmp_path: Path) -> None:
    """`j = D('2+2'); j.wait(); j` once showed 4 twice (wait() returned the job)."""
    from .test_functions import Repl

    (tmp_path / "repl").mkdir()  # not beside the home folder 'dsage', which would shadow it
    repl = Repl(tmp_path / "repl")
    try:
        repl.type(f"import dsage\nD = dsage.start_all(workers=1, port=0, home={str(home)!r})\n"
                  "j = D('2+2', name='four')\nj.wait(60)\nprint('<' + 'after wait>')\n")
        repl.read_until(b"<after wait>", 90)
        repl.type("j\nprint('<' + 'after j>')\n[j]\nD.close()\nprint('<' + 'end>')\n")
        text = repl.read_until(b"<end>", 60).decode(errors="replace").replace("\r", "")
    finally:
        repl.close()
    waited = text[:text.index("<after wait>")]
    assert "\n4\n" not in waited.split("j.wait(60)")[-1]  # wait() shows nothing
    shown = text[text.index("<after wait>"):text.index("<after j>")]
    assert "\n4\n" in shown
    assert "[<job " in text and "'four' completed>]" in text


def test_output_captures_stdout_stderr_and_child_processes(cluster: dsage.DSage) -> None:
    j = done(cluster("import sys, os\nprint('out')\nprint('err', file=sys.stderr)\n"
                "os.system('echo from-a-child')\n"), 60)
    assert "out" in j.output and "err" in j.output and "from-a-child" in j.output


def test_failed_job_has_traceback_and_result_raises(cluster: dsage.DSage) -> None:
    j = done(cluster("x = 1\n1/0", name="bad"), 60)
    assert j.status == "failed"
    assert "ZeroDivisionError" in j.error
    assert "Traceback" in j.output and "ZeroDivisionError" in j.output
    assert "slot.py" not in j.output  # only the job's own frames
    with pytest.raises(dsage.JobError) as e:
        j.result()
    assert "ZeroDivisionError" in e.value.output
    assert cluster("1+1").result(60) == 2  # the slot goes on


def test_syntax_error_and_sys_exit_fail_clearly(cluster: dsage.DSage) -> None:
    j = done(cluster("x = 1\ndef ("), 60)
    assert j.status == "failed" and "SyntaxError" in j.error
    # the traceback starts at the job's code, not in the ast module that parsed it
    assert "ast.py" not in j.output and 'File "<dsage job>", line 2' in j.output, j.output
    j = done(cluster("import sys; sys.exit(3)"), 60)
    assert j.status == "failed" and "sys.exit(3)" in j.error


def test_eval_function_and_unpicklable_arguments(cluster: dsage.DSage) -> None:
    def power(x: int, n: int = 2) -> int:
        return x ** n

    assert cluster.eval_function(power, (3,), {"n": 3}).result(60) == 27
    with pytest.raises(TypeError, match="argument 0"):
        cluster.eval_function(power, ((x for x in []),))


def test_bad_arguments_are_refused_at_once(cluster: dsage.DSage) -> None:
    with pytest.raises(ValueError, match="timeout"):
        cluster("1", timeout=-1)
    with pytest.raises(ValueError, match="kind"):
        cluster("1", kind="perl")
    with pytest.raises(ValueError, match="priority"):
        cluster("1", priority=42)
    with pytest.raises(ValueError, match="memory"):
        cluster("1", memory="lots")
    with pytest.raises(TypeError, match="unknown job option"):
        cluster.eval_function(print, colour="red")
    with pytest.raises(TypeError, match="code must be a string"):
        cluster(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"use D.eval_function\(len, args, kwargs\)"):
        cluster(len)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="eval_file: no file /nonexistent/dsage.py"):
        cluster.eval_file("/nonexistent/dsage.py")


def test_bad_waits_and_times_are_refused_at_once(cluster: dsage.DSage) -> None:
    """j.result('5') raised "'<' not supported" from inside, j.wait(nan) waited for the
    job, and get_my_jobs(since='x') or purge(before='x') raised float()'s message."""
    import datetime

    j = cluster("'done'")
    with pytest.raises(TypeError, match="timeout='5': give None or a number of seconds"):
        j.result("5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout=nan: give None or a number of seconds"):
        j.wait(float("nan"))
    with pytest.raises(ValueError, match="timeout=-1"):
        j.exception(-1)
    with pytest.raises(ValueError, match="timeout=-1"):
        list(cluster.as_completed([j], timeout=-1))
    with pytest.raises(ValueError, match="timeout=-1"):
        cluster.map(abs, [1], timeout=-1)
    for call, name in ((lambda v: cluster.get_my_jobs(since=v), "since"),
                       (lambda v: cluster.purge(before=v), "before")):
        with pytest.raises(TypeError, match=f"{name}='x': give a time.time.. value or a datetime"):
            call("x")
    assert j.result(60) == "done"
    hour_ago = datetime.datetime.now() - datetime.timedelta(hours=1)
    assert j.job_id in [w.job_id for w in cluster.get_my_jobs(since=hour_ago)]
    assert cluster.purge(before=hour_ago) == 0


def test_job_fetched_by_id_from_a_second_client_process(procs: Procs, cluster: dsage.DSage) -> None:
    j = done(cluster("DSAGE_RESULT = {'answer': 42}"), 60)
    code = (f"import dsage\nD = dsage.DSage('127.0.0.1', {procs.port})\n"
            f"j = D.job('{j.job_id}')\nprint(j.result(30)['answer'], j.status)\n"
            f"print(len(D.get_my_jobs('completed')))\nD.close()\n")
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[:2] == ["42", "completed"]
    assert int(lines[2]) >= 1


def test_unknown_job_id(cluster: dsage.DSage) -> None:
    with pytest.raises(dsage.UnknownJob):
        cluster.job("0" * 32)
    with pytest.raises(ValueError):
        cluster.job("not-an-id")


def test_get_my_jobs_and_workers(cluster: dsage.DSage) -> None:
    jobs = [cluster(f"{i}*2") for i in range(5)]
    for j in jobs:
        j.wait(60)
    mine = {j.job_id for j in cluster.get_my_jobs(status="completed")}
    assert {j.job_id for j in jobs} <= mine
    with pytest.raises(ValueError):
        cluster.get_my_jobs(status="bogus")
    [w] = cluster.workers()
    assert w.slots == 2 and not w.anonymous and w.host


def test_kill_running_and_queued_jobs(procs: Procs) -> None:
    D = procs.up(1)
    running = D("import time; time.sleep(60)")
    wait_for(lambda: running.status == "processing", 30, "the job to start")
    queued = D("1")
    running.kill()
    assert running.status == "killed"
    assert done(running, 10).status == "killed"
    with pytest.raises(dsage.JobError):
        running.result()
    assert queued.result(30) == 1  # the slot was respawned
    q2 = D("import time; time.sleep(60)")
    q3 = D("2")
    wait_for(lambda: q2.status == "processing", 30, "the job to start")
    q3.kill()
    assert q3.status == "killed"
    q2.kill()


def test_launchers_as_separate_processes(home: Path, port: int) -> None:
    env = {**os.environ, "DSAGE_HOME": str(home)}
    broker = subprocess.Popen([sys.executable, "bin/dsage-broker", "--port", str(port),
                               "--heartbeat", "0.2"], env=env, start_new_session=True,
                              cwd=Path(__file__).parent.parent, stderr=subprocess.PIPE)
    worker = subprocess.Popen([sys.executable, "bin/dsage-worker", "--server", "127.0.0.1",
                               "--port", str(port), "--workers", "1", "--heartbeat", "0.2"],
                              env=env, start_new_session=True, cwd=Path(__file__).parent.parent,
                              stderr=subprocess.PIPE)
    try:
        with dsage.DSage("127.0.0.1", port, connect_timeout=30) as D:
            assert D("6*7").result(60) == 42
        for p in (worker, broker):
            p.send_signal(signal.SIGTERM)
            assert p.wait(30) == 0
    finally:
        for p in (worker, broker):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_client_started_before_its_broker(procs: Procs) -> None:
    D = procs.client(connect_timeout=0)
    j = D("'early'")
    procs.broker()
    procs.worker(1)
    assert j.result(60) == "early"


def test_no_broker_is_a_clear_error_at_once(home: Path, port: int) -> None:
    """With nothing listening, the client once waited its whole connect_timeout."""
    began = time.monotonic()
    with pytest.raises(dsage.BrokerUnreachable,
                       match=f"no broker at 127.0.0.1:{port}: the connection was refused"):
        dsage.DSage("127.0.0.1", port, connect_timeout=60)
    assert time.monotonic() - began < 30  # refused for a few seconds: not waited out


def test_a_host_that_cannot_be_found_is_named_so(home: Path) -> None:
    """A host name that does not resolve was reported as a refused connection, and a
    monitor said only that the broker was silent."""
    with pytest.raises(dsage.BrokerUnreachable, match="'no-such-host.invalid' cannot be found"):
        dsage.DSage("no-such-host.invalid", 8081, connect_timeout=60)
    monitor = subprocess.run(
        [sys.executable, "-m", "dsage.cli", "worker", "--server", "no-such-host.invalid",
         "--workers", "1", "--heartbeat", "0.2", "--idle-exit", "3", "--log-file", "-"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    # looked up once per outage (a resolver that does not answer blocks the monitor's
    # loop): the retries after the first say only that they reconnect
    assert monitor.stderr.count("'no-such-host.invalid' cannot be found") == 1, monitor.stderr
    assert re.search(r"; reconnecting$", monitor.stderr, re.M), monitor.stderr


def test_connection_and_cluster_arguments_are_checked_in_the_call(home: Path) -> None:
    """DSage(port=0) waited to say nothing listens on port 0, port='8081' raised a
    TypeError from inside, heartbeat=0 spun for 12 s; start_all(workers=-1) or
    (heartbeat=-1) started a broker, then failed with the monitor's usage text in a
    StartError. Each is refused in the call, naming the argument, starting nothing."""
    for kwargs, error, says in (
            ({"port": 0}, ValueError, "port=0: give a port from 1 to 65533"),
            ({"port": "8081"}, TypeError, "port='8081': give an int"),
            ({"server": ""}, ValueError, "server='': give the broker's host name"),
            ({"heartbeat": 0}, ValueError, "heartbeat=0: give a positive number"),
            ({"connect_timeout": float("nan")}, ValueError, "connect_timeout=nan: give a 0")):
        with pytest.raises(error, match=says):
            dsage.DSage(**kwargs)
    for kwargs, says in (({"workers": -1}, "workers=-1: -1 is not a positive integer"),
                         ({"port": 70000}, "port=70000: 70000 is not a port"),
                         ({"heartbeat": -1}, "heartbeat=-1: -1 is not a positive number")):
        with pytest.raises(ValueError, match=says):
            dsage.start_all(**kwargs)
    with pytest.raises(ValueError, match="workers=-1"):  # before any ssh is run
        dsage.start_workers("node1", workers=-1, port=8081)
    assert not (home / "logs").exists() or not list((home / "logs").iterdir())  # none started


def test_the_monitor_and_event_ports_are_named_to_a_client(procs: Procs) -> None:
    """A client on the monitors' port once heard only 'is the server key right?'."""
    procs.broker()
    with pytest.raises(dsage.BrokerUnreachable,
                       match=f"port {procs.port + 1} is this broker's port for monitors; "
                             f"clients connect to port {procs.port}"):
        dsage.DSage("127.0.0.1", procs.port + 1, connect_timeout=60)
    with pytest.raises(dsage.BrokerUnreachable,
                       match="N for clients, N\\+1 for monitors and N\\+2 for job events"):
        dsage.DSage("127.0.0.1", procs.port + 2, connect_timeout=60)


def test_requests_on_the_monitor_port_fail_naming_it(procs: Procs) -> None:
    """A request made before the broker's answer to the greeting, or after it, fails
    as the connection does: the port is named. The one made before once raised
    KeyRejected with no message."""
    procs.broker()
    D = dsage.DSage("127.0.0.1", procs.port + 1, connect_timeout=0)
    try:
        for _ in range(2):  # the first is sent at once; the second after the answer
            with pytest.raises(dsage.BrokerUnreachable,
                               match=f"port {procs.port + 1} is this broker's port for "
                                     f"monitors"):
                D.status(timeout=60)
    finally:
        D.close()


def test_no_keypair_says_run_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSAGE_HOME", str(tmp_path / "empty"))
    with pytest.raises(keys.NoKeypair, match="dsage setup"):
        dsage.DSage(connect_timeout=1)
    r = subprocess.run([sys.executable, "-m", "dsage.cli", "worker", "--port", "9"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "dsage setup" in r.stderr


def test_port_in_use_is_a_clear_error(procs: Procs) -> None:
    first = procs.broker()
    with dsage.DSage("127.0.0.1", procs.port, connect_timeout=30):
        pass
    r = subprocess.run([sys.executable, "-m", "dsage.cli", "broker", "--port", str(procs.port)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "in use" in r.stderr
    assert first.alive()


def test_setup_twice_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "h"
    assert keys.setup(root) is True
    files = sorted(p for p in root.rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    assert keys.setup(root) is False
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
    assert (root / "dsage_key").stat().st_mode & 0o777 == 0o600
    for sub in ("db", "tmp_worker_files", "authorized_keys"):
        assert (root / sub).is_dir()
    public, secret = zmq.auth.load_certificate(root / "dsage_key")
    assert secret is not None and len(public) == 40
    assert zmq.auth.load_certificate(root / "dsage_key.pub")[0] == public
    assert public in keys.authorized_keys(root).values()


def test_setup_command(tmp_path: Path) -> None:
    env = {**os.environ, "DSAGE_HOME": str(tmp_path / "h")}
    for expected in ("created", "already set up"):
        r = subprocess.run([sys.executable, "-m", "dsage.cli", "setup"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and expected in r.stdout


def test_a_home_that_cannot_be_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    """`dsage setup` and start_all() with DSAGE_HOME naming a file, or a folder that
    cannot be made, ended in a traceback from pathlib."""
    (tmp_path / "file").write_text("")
    for home, says in ((tmp_path / "file", "is a file, where dsage keeps a folder"),
                       (tmp_path / "file" / "sub", "cannot make the folder"),
                       (Path("/proc/dsage-home"), "cannot make the folder")):
        r = subprocess.run([sys.executable, "-m", "dsage.cli", "setup"],
                           env={**os.environ, "DSAGE_HOME": str(home)},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(keys.HomeUnusable, match="is a file"):
        dsage.start_all(home=tmp_path / "file")


@pytest.mark.parametrize("cmd", [["dsage.cli"], ["dsage.cli", "broker"], ["dsage.cli", "worker"],
                                 ["dsage.cli", "keys"], ["dsage.cli", "demo"]])
def test_every_command_has_help(cmd: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", *cmd, "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "usage:" in r.stdout


def test_temp_folders_are_removed(home: Path, cluster: dsage.DSage) -> None:
    j = done(cluster("import os; open('scratch.txt', 'w').write('x'); os.getcwd()"), 60)
    job_dir = Path(j.result())
    assert job_dir.name == j.job_id
    wait_for(lambda: not job_dir.exists(), 10, "the job folder to be removed")


def test_priorities_order_the_queue(procs: Procs) -> None:
    procs.broker()
    D = procs.client()
    low = [D(f"{i}", priority=9) for i in range(3)]
    urgent = D("'urgent'", priority=0)
    for j in [*low, urgent]:
        wait_for(lambda j=j: j.created, 10, "the submit to be acknowledged")
    procs.worker(1)
    urgent.wait(60)
    for j in low:
        j.wait(60)
    assert all(urgent.started <= j.started for j in low)


def test_job_error_message_shows_the_end_of_a_long_output(cluster: dsage.DSage) -> None:
    j = done(cluster("print('x' * 100_000)\nraise ValueError('the end')"), 60)
    with pytest.raises(dsage.JobError) as e:
        j.result()
    message = str(e.value)
    assert "ValueError: the end" in message and len(message) < 5000
    assert len(e.value.output) > 100_000


def test_calls_and_results_pickle_fast_where_they_can_and_by_value_where_they_must() -> None:
    """Importable functions go by reference with the standard pickler; anything from
    __main__ (or that it cannot pickle) goes by value (cloudpickle), loaded with dill."""
    import dill
    import pickle

    from dsage.codec import dump_trusted

    fast = dump_trusted((os.path.join, ("a", "b"), {}))
    assert fast == pickle.dumps((os.path.join, ("a", "b"), {}), protocol=pickle.HIGHEST_PROTOCOL)
    square = eval("lambda x: x * x")  # noqa: S307 - a lambda: the standard pickler refuses it
    assert dill.loads(dump_trusted(square))(7) == 49
    main_fn = type(test_no_broker_is_a_clear_error_at_once)(
        (lambda: 5).__code__, {"__name__": "__main__"}, "made_in_main")
    main_fn.__module__ = "__main__"
    by_value = dump_trusted(main_fn)
    assert b"made_in_main" in by_value and dill.loads(by_value)() == 5
