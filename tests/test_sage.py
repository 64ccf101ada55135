"""Sage jobs (issue "DistributedFunction, distributed factoring and POV-Ray
rendering, and Sage jobs that work end to end"): the seed's session verbatim,
the preparser and Sage's globals for kind='sage', .sage files and
start_all(kind='sage'); Sage results read by a client that has not imported
Sage, and by one that cannot (the repr, with a note); Sage jobs waiting, with a
reason, for a monitor that has Sage; DistributedFactor on workers with Sage.
Sage is the ``sage`` extra: these tests skip without it (and fail in CI)."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import dsage
from dsage.dist_functions import DistributedFactor
from dsage.dist_functions.ecm import certify
from dsage.dist_functions.sagefactor import PROVEN_SAGE, sage_factor_job

from .conftest import HEARTBEAT, Procs, done, run_python, skip_or_fail, wait_for

from .test_distributed import P20, Q21, R10  # primes of 20, 21 and 10 digits


@functools.cache
def _sage_problem() -> str | None:
    """Why this Python cannot run Sage jobs (Sage imported in a child process, so
    that this one does not import it), or None."""
    check = "import dsage.sage as s; raise SystemExit(s.main())"
    r = subprocess.run([sys.executable, "-c", check],
                       capture_output=True, text=True, timeout=120)
    return None if r.returncode == 0 else (r.stderr.strip() or "Sage does not import")


@pytest.fixture
def sage() -> None:
    problem = _sage_problem()
    if problem:
        skip_or_fail(f"the sage extra is not installed: {problem}")


def _client_script(port: int, code: str) -> str:
    """A second client process connected to the test broker, running ``code``."""
    return ("import json, sys\n"
            "import dsage\n"
            f"D = dsage.DSage('127.0.0.1', {port}, connect_timeout=30, heartbeat={HEARTBEAT})\n"
            + code + "\nD.close()\n")


def test_seed_example_1_verbatim(sage: None, cluster: dsage.DSage, tmp_path: Path) -> None:
    (tmp_path / "dsage.sage").write_text("DSAGE_RESULT = factor(randint(10^20, 10^30))\n")
    D = cluster
    j = D.eval_file(tmp_path / "dsage.sage", "test_job")
    done(j, 120)
    assert str(j) == "No output."  # the seed's `j`
    assert j.name == "test_job" and j.kind == "sage"
    f = j.result()
    n = math.prod(int(p) ** int(e) for p, e in f)
    assert 10**20 <= n <= 10**30
    assert all(certify(int(p)) for p, _ in f)
    assert str(f) == " * ".join(f"{p}^{e}" if e > 1 else str(p) for p, e in f)


def test_sage_code_runs_through_the_preparser_with_sages_globals(
        sage: None, cluster: dsage.DSage) -> None:
    jobs = {
        "power": cluster("2^10", kind="sage"),
        "half": cluster("1/2", kind="sage"),
        "ring": cluster("ZZ", kind="sage"),
        "matrix": cluster("m = matrix(ZZ, [[1, 2], [3, 4]])\n"
                          "DSAGE_RESULT = (m^2, m.det(), m.change_ring(QQ).inverse())",
                          kind="sage"),
        "python": cluster("2^10"),  # a Python job: ^ is xor
    }
    assert jobs["power"].result(120) == 1024 and str(jobs["power"]) == "1024"
    assert str(jobs["half"].result(60)) == "1/2" and jobs["half"].result() * 2 == 1
    assert str(jobs["ring"].result(60)) == "Integer Ring"
    square, det, inverse = jobs["matrix"].result(60)
    assert [list(r) for r in square] == [[7, 10], [15, 22]] and det == -2
    assert str(inverse) == "[  -2    1]\n[ 3/2 -1/2]"
    assert jobs["python"].result(60) == 8
    assert all(j.kind == "sage" for name, j in jobs.items() if name != "python")


def test_start_all_with_kind_sage_runs_the_seeds_session(
        sage: None, home: Path, tmp_path: Path) -> None:
    D = dsage.start_all(kind="sage", heartbeat=HEARTBEAT)
    try:
        j = D("2+2")
        j.wait()
        assert str(j) == "4"  # the seed's `j` after `j.wait()`
        assert D("2^10").result(120) == 1024 and D.kind == "sage"
        assert D("2^10", kind="python").result(60) == 8
        (tmp_path / "script.py").write_text("DSAGE_RESULT = 2^10\n")
        (tmp_path / "script.txt").write_text("DSAGE_RESULT = 2^10\n")
        assert D.eval_file(tmp_path / "script.py").result(60) == 8  # .py stays Python
        assert D.eval_file(tmp_path / "script.txt").result(60) == 1024  # the client's kind
        assert "sage" in D.workers()[0].tags
    finally:
        D.close()


def test_a_slot_loads_sage_once_and_keeps_it_for_the_next_sage_jobs(
        sage: None, procs: Procs) -> None:
    """Sage's import starts a BLAS thread pool, rebinds names in the modules it loads
    and doubles the slot's memory: all the slot's, not the job's, so the slot that
    ran one Sage job runs the next ones too (without reloading Sage for each)."""
    d = procs.up(1)
    code = "import os\n(os.getpid(), 2^10)"
    first = d(code, kind="sage").result(120)
    rest = [d(code, kind="sage").result(60) for _ in range(3)]
    python = d("import os\nos.getpid()").result(60)
    assert first[1] == 1024 and {r for r in rest} == {first}  # the same process
    assert python == first[0]


def _pid_and_load(blob: bytes) -> tuple[int, str]:
    import os

    import dill

    return os.getpid(), str(dill.loads(blob))


def test_calls_of_sage_objects_load_sage_in_the_slot_once(sage: None, procs: Procs) -> None:
    """A function job whose arguments are Sage objects has the slot load Sage first
    too, so the slot runs the next such call as well."""
    d = procs.up(1)
    # in a slot of its own, so that the monitor's slot has not loaded Sage
    j = done(d("factor(2^64 + 1)", kind="sage", isolate=True), 120)
    sage_pickle = j._result_blob[4 + int.from_bytes(j._result_blob[:4], "big"):]
    assert b"sage." in sage_pickle
    calls = [d.eval_function(_pid_and_load, (sage_pickle,)).result(120) for _ in range(3)]
    assert {text for _, text in calls} == {"274177 * 67280421310721"}
    assert len({pid for pid, _ in calls}) == 1


def test_a_sage_result_loads_in_a_client_that_has_not_imported_sage(
        sage: None, cluster: dsage.DSage, procs: Procs) -> None:
    r = run_python(_client_script(procs.port, (
        "j = D('factor(2^64 + 1)', kind='sage')\n"
        "j.wait(120)\n"
        "before = 'sage' in sys.modules\n"
        "f = j.result()\n"
        "print(json.dumps([before, type(f).__name__, str(f), f.value() == 2**64 + 1]))")),
        timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == [
        False, "IntegerFactorization", "274177 * 67280421310721", True]


def test_without_sage_a_client_gets_the_results_repr_with_a_note(
        sage: None, cluster: dsage.DSage, procs: Procs) -> None:
    """A client whose Python cannot import Sage (a real process, with Sage blocked
    in its sys.modules before anything runs) shows a Sage result as the repr the
    worker sent, saying why; results that are plain Python load as usual."""
    r = run_python("import sys\nsys.modules['sage'] = None  # Sage cannot be imported here\n"
                   + _client_script(procs.port, (
                       "j = D('factor(2^64 + 1)', kind='sage')\n"
                       "f = j.result(120)\n"
                       "plain = D('int(2^10)', kind='sage').result(60)\n"
                       "print(json.dumps([type(f).__name__, str(f), repr(f), str(j), plain,\n"
                       "                  len(f.pickle) > 0, 'sage' in sys.modules and\n"
                       "                  sys.modules['sage'] is not None]))")),
                   timeout=120)
    assert r.returncode == 0, r.stderr
    kind, text, shown, job_shown, plain, has_pickle, imported = \
        json.loads(r.stdout.splitlines()[-1])
    assert kind == "NeedsSage" and text == "274177 * 67280421310721"
    assert shown.startswith(text) and "Sage is not installed here" in shown
    assert "pip install 'dsage[sage]'" in shown
    assert job_shown == shown  # the job at the prompt shows the same
    assert plain == 1024 and has_pickle and not imported


def test_a_sage_job_waits_with_a_reason_for_a_monitor_with_sage(
        sage: None, procs: Procs) -> None:
    procs.broker()
    procs.worker(1, no_detect=True)  # Sage is installed, but this monitor does not offer it
    d = procs.client()
    procs.wait_workers(d, 1)
    assert [w.tags for w in d.workers()] == [[]]
    j = d("2^10", kind="sage")
    both = d("2^10", kind="sage", requires=["big"])
    assert d("2^10").result(60) == 8  # the monitor runs Python jobs meanwhile
    wait_for(lambda: j.reason and both.reason, 30, "the broker to say why the jobs wait")
    assert j.status == "new" and j.reason == \
        "no connected worker offers the tag sage that the job requires"
    assert both.reason == \
        "no connected worker offers the tags big, sage that the job requires"
    procs.worker(1)  # a monitor that offers 'sage'
    assert j.result(120) == 1024 and j.reason is None
    assert both.status == "new"  # it requires 'big' as well, which no monitor offers
    procs.worker(1, tags=["big"])
    assert both.result(120) == 1024


def test_distributed_factor_uses_sage_on_workers_that_offer_it(
        sage: None, cluster: dsage.DSage) -> None:
    n = P20 * Q21 * R10 ** 2
    run = DistributedFactor(cluster, n).start()
    assert run.sage is True
    assert run.wait(120) == sorted([(P20, 1), (Q21, 1), (R10, 2)])
    assert set(run.certificates.values()) == {PROVEN_SAGE}
    assert [job.func for _, job in run.jobs.values()] == [sage_factor_job]
    assert all("sage" in job.options["requires"] for _, job in run.jobs.values())


@pytest.mark.parametrize("n, expected", [
    (1, []), (97, [(97, 1)]), (Q21 ** 3, [(Q21, 3)]),
    (2 ** 64 + 1, [(274177, 1), (67280421310721, 1)]),
    (2 ** 128 + 1, [(59649589127497217, 1), (5704689200685129054721, 1)]),
])
def test_distributed_factor_with_sage_on_every_kind_of_n(
        sage: None, cluster: dsage.DSage, n: int, expected: list[tuple[int, int]]) -> None:
    run = DistributedFactor(cluster, n, sage=True).start()
    assert run.wait(120) == expected
    assert set(run.certificates) == {p for p, _ in expected}


def test_the_kind_is_checked_and_the_sage_tag_counts_against_the_limit(procs: Procs) -> None:
    procs.broker()
    with pytest.raises(ValueError, match="kind='perl'"):
        procs.client(kind="perl")
    D = procs.client(kind="sage")
    with pytest.raises(ValueError, match="at most 64 tags"):
        D("1", requires=[f"t{i}" for i in range(64)])  # and 'sage'
    with pytest.raises(ValueError, match="at most 64 tags"):
        D.eval_file(Path(__file__), kind="sage", requires=[f"t{i}" for i in range(64)])
    assert D.get_my_jobs() == []


def test_monitors_find_sage_without_importing_it(sage: None) -> None:
    r = run_python("import sys, dsage.sage as s\nprint(s.missing())\n"
                   "print(sorted(m for m in sys.modules if m.startswith('sage.')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["None", "['sage.repl']"]  # its package, not Sage
    r = run_python("import sys\nsys.modules['sage'] = None\n"
                   "from dsage.capabilities import detected_tags\n"
                   "import dsage.sage as s\nprint(s.missing())\nprint(detected_tags())")
    assert r.returncode == 0, r.stderr
    missing, tags = r.stdout.splitlines()
    assert missing == "Sage is not installed here: pip install 'dsage[sage]'"
    assert "sage" not in tags


def test_which_pickles_refer_to_sage_and_malformed_sage_results() -> None:
    import pickle

    from dsage import codec

    assert codec.mentions_sage(b"\x8c\x12sage.rings.integer\x94")
    assert codec.mentions_sage(b"csage.rings.integer\nmake_integer\n")  # protocol 0
    for blob in (pickle.dumps(codec.dump_data), pickle.dumps("a message. usage.sage"),
                 pickle.dumps({"Sage.x": 1})):
        assert not codec.mentions_sage(blob)
    for blob in (b"", b"\0\0\0", b"\0\0\1\0ab"):
        with pytest.raises(ValueError, match="malformed Sage result"):
            codec.load_sage(blob)
    shown = codec.dump_sage(object(), b"")
    assert b"<object object at" in shown
