"""Retries (issue "Many jobs"): ``retries=N`` re-runs a job whose code raised one of
``retry_on`` (any Exception by default), by the broker, up to N times; the job
reads its attempt from DSAGE_ATTEMPT; a lost worker is not a retry. Real
processes throughout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import dsage

from .conftest import Procs

FLAKY = ("import os\nn = int(os.environ['DSAGE_ATTEMPT'])\n"
         "if n < {until}: raise {exc}(f'attempt {{n}}')\nn")


def attempt_or_raise(until: int) -> int:
    """A function job: raises ConnectionError until attempt ``until``."""
    n = int(os.environ["DSAGE_ATTEMPT"])
    if n < until:
        raise ConnectionError(f"attempt {n}")
    return n


def test_a_job_that_raises_is_run_again_and_reads_its_attempt(cluster: dsage.DSage,
                                                              tmp_path: Path) -> None:
    D = cluster
    j = D(FLAKY.format(until=3, exc="ValueError"), retries=3)
    assert j.result(60) == 3 and j.attempt == 3 and j.failures == 0
    assert D("import os; os.environ['DSAGE_ATTEMPT']").result(60) == "1"
    f = D.eval_function(attempt_or_raise, args=(2,), retries=1)
    assert f.result(60) == 2 and f.attempt == 2
    script = tmp_path / "flaky.py"
    script.write_text(FLAKY.format(until=2, exc="OSError") + "\nDSAGE_RESULT = n\n")
    assert D.eval_file(script, retries=1, retry_on=[OSError]).result(60) == 2


def test_the_last_attempt_s_failure_is_the_job_s(cluster: dsage.DSage) -> None:
    j = cluster(FLAKY.format(until=99, exc="ValueError"), retries=2)
    with pytest.raises(dsage.JobError, match="ValueError: attempt 3"):
        j.result(60)
    assert j.status == "failed" and j.attempt == 3 and "attempt 3" in j.output


def test_retry_on_names_classes_and_their_bases_and_nothing_else_is_retried(
        cluster: dsage.DSage) -> None:
    D = cluster
    other = D(FLAKY.format(until=2, exc="ValueError"), retries=3, retry_on=(KeyError,))
    base = D(FLAKY.format(until=2, exc="KeyError"), retries=3, retry_on=(LookupError,))
    own = D("import os\nclass Flaky(Exception): pass\n"
            "if os.environ['DSAGE_ATTEMPT'] == '1': raise Flaky()\n'ok'",
            retries=1, retry_on=["__main__.Flaky"])
    exits = D("import sys; sys.exit(2)", retries=2)  # not an Exception: not retried
    with pytest.raises(dsage.JobError, match="ValueError"):
        other.result(60)
    assert other.attempt == 1
    assert base.result(60) == 2
    assert own.result(60) == "ok" and own.attempt == 2
    with pytest.raises(dsage.JobError, match="sys.exit"):
        exits.result(60)
    assert exits.attempt == 1


def test_a_lost_worker_is_not_a_retry(procs: Procs, tmp_path: Path) -> None:
    """The job's slot is SIGKILLed from outside on its first run: the job goes back
    to the queue as a lost worker (failures 1), on the same attempt, its retry unused."""
    D = procs.up(1)
    marker = tmp_path / "killed-once"
    j = D(f"import os, signal\nif not os.path.exists({str(marker)!r}):\n"
          f"    open({str(marker)!r}, 'w').close()\n    os.kill(os.getpid(), signal.SIGKILL)\n"
          f"n = int(os.environ['DSAGE_ATTEMPT'])\nif n == 1: raise ValueError('then raises')\n"
          f"n", retries=1)
    assert j.result(60) == 2
    assert j.failures == 1 and j.attempt == 2


@pytest.mark.parametrize("options, error", [
    ({"retries": -1}, ValueError), ({"retries": 101}, ValueError),
    ({"retries": True}, ValueError), ({"retries": 1, "retry_on": [3]}, TypeError),
    ({"retries": 1, "retry_on": [int]}, TypeError), ({"retries": 1, "retry_on": [""]}, TypeError),
])
def test_bad_retry_options_fail_in_the_call(cluster: dsage.DSage, options: dict[str, object],
                                           error: type[Exception]) -> None:
    with pytest.raises(error, match="retr"):
        cluster("1", **options)  # type: ignore[arg-type]
