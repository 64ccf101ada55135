"""Attachments (issue "Many jobs"): ``files=`` copied into the job's working folder,
``user_vars=`` bound before its code runs, ``load_files=`` run first; clear errors
in the call; and every job call taking every option (priority, requires, ...).
Real processes throughout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import dsage
from dsage import attach

from .conftest import Procs, wait_for


def read_attached(name: str) -> str:
    """A function job: the text of a file in its working folder."""
    with open(name) as f:
        return f.read()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "data.txt").write_text("forty-two")
    (tmp_path / "helpers.py").write_text("def double(x):\n    return 2 * x * FACTOR\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.txt").write_text("another file of the same name")
    return tmp_path


def test_files_reach_every_kind_of_job_in_its_folder(cluster: dsage.DSage, data: Path) -> None:
    D = cluster
    files = [data / "data.txt", str(data / "helpers.py")]
    code = "import os\n(sorted(os.listdir('.')), open('data.txt').read())"
    listing = (["data.txt", "helpers.py"], "forty-two")
    assert D(code, files=files).result(60) == listing
    script = data / "job.py"
    script.write_text(code.replace("\n(", "\nDSAGE_RESULT = ("))
    assert D.eval_file(script, files=files).result(60) == listing
    assert D.eval_function(read_attached, args=("data.txt",),
                           files=[data / "data.txt"]).result(60) == "forty-two"
    # many jobs carrying one file; a job without it sees none (folders are per job)
    many = [D("open('data.txt').read()", files=[data / "data.txt"]) for _ in range(10)]
    assert [j.result(60) for j in many] == ["forty-two"] * 10
    assert D("import os; os.listdir('.')").result(60) == []


def test_user_vars_and_load_files_run_before_the_code(cluster: dsage.DSage, data: Path) -> None:
    D = cluster
    j = D("double(N) + len(rows)", user_vars={"N": 5, "FACTOR": 10, "rows": [1, 2, 3]},
          load_files=[data / "helpers.py"])
    assert j.result(60) == 103
    script = data / "uses.py"
    script.write_text("DSAGE_RESULT = double(N)\n")
    assert D.eval_file(script, user_vars={"N": 1, "FACTOR": 1},
                       load_files=[data / "helpers.py"]).result(60) == 2
    all_three = D("double(1) + len(open('data.txt').read())", load_files=[data / "helpers.py"],
                  user_vars={"FACTOR": 1}, files=[data / "data.txt"])
    assert all_three.result(60) == 2 + len("forty-two")
    broken = data / "broken.py"
    broken.write_text("raise RuntimeError('a load file failed')\n")
    with pytest.raises(dsage.JobError, match="a load file failed"):
        D("1", load_files=[broken]).result(60)


def test_attachment_errors_are_clear_and_in_the_call(procs: Procs, data: Path) -> None:
    procs.broker()
    D = procs.client(max_message_size=1 << 20)
    with pytest.raises(FileNotFoundError, match="files: no file .*missing.txt"):
        D("1", files=[data / "missing.txt"])
    with pytest.raises(FileNotFoundError, match="load_files: no file"):
        D("1", load_files=[data / "nope.py"])
    with pytest.raises(ValueError, match="both named 'data.txt'"):
        D("1", files=[data / "data.txt", data / "sub" / "data.txt"])
    with pytest.raises(IsADirectoryError, match="is a folder"):
        D("1", files=[data / "sub"])
    with pytest.raises(TypeError, match="give a list of paths"):
        D("1", files=str(data / "data.txt"))
    with pytest.raises(ValueError, match="'not a name' is not a Python name"):
        D("1", user_vars={"not a name": 1})
    with pytest.raises(TypeError, match="user_vars: cannot send 'gen' \\(generator\\)"):
        D("1", user_vars={"ok": 1, "gen": (x for x in [1])})
    with pytest.raises(TypeError, match="eval_function takes no user_vars"):
        D.eval_function(read_attached, args=("x",), user_vars={"a": 1})
    big = data / "big.bin"
    big.write_bytes(b"x" * (1 << 20))
    with pytest.raises(ValueError, match="with its attachments is .* bytes, more than"):
        D("1", files=[big])
    # what is not a regular file would block the call (a FIFO), or never end (a device)
    fifo = data / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="files: .*fifo is not a regular file"):
        D("1", files=[fifo])
    with pytest.raises(ValueError, match="load_files: /dev/zero is not a regular file"):
        D("1", load_files=["/dev/zero"])
    with pytest.raises(ValueError, match="eval_file: .*fifo is not a regular file"):
        D.eval_file(fifo)
    huge = data / "huge.bin"  # (sparse: refused by its size, before it is read)
    with open(huge, "wb") as f:
        f.truncate(2 << 20)
    with pytest.raises(ValueError, match=f"files: .*huge.bin is {2 << 20} bytes, more than"):
        D("1", files=[huge])
    # the same file twice is one file
    both = attach.collect([data / "data.txt", data / "data.txt"])
    assert list(both.files) == ["data.txt"]
    assert attach.wrap(b"1", attach.collect()) == (b"1", {})  # no attachments: no envelope
    assert D.get_my_jobs() == []  # nothing was sent


def test_every_job_call_takes_every_option(procs: Procs, data: Path) -> None:
    D = procs.up(1)
    script = data / "one.py"
    script.write_text("DSAGE_RESULT = 1\n")
    common: dict[str, Any] = {
        "priority": 2, "requires": ["gpu"], "timeout": 30, "memory": "1GB",
        "anonymous_ok": False, "isolate": True, "retries": 1, "retry_on": [KeyError],
        "files": [data / "data.txt"]}
    jobs = [D("1", name="eval", **common), D.eval_file(script, **common),
            D.eval_function(read_attached, args=("data.txt",), name="fn", **common)]
    for j in jobs:
        wait_for(lambda: j.reason is not None, 30, "the job to say why it waits")  # noqa: B023
        assert j.priority == 2 and "gpu" in (j.reason or "") and j.status == "new"
    assert [j.name for j in jobs] == ["eval", "one.py", "fn"]
    for j in jobs:
        assert j.cancel()


def test_a_file_many_calls_attach_is_read_once_until_it_changes(tmp_path: Path) -> None:
    f = tmp_path / "input.bin"
    f.write_bytes(b"x" * 10_000)
    first, second = attach.collect([f]), attach.collect([f])
    assert first.files["input.bin"] is second.files["input.bin"]  # one object for all jobs
    payload, shared = attach.wrap(b"1", first)
    assert list(shared.values())[0] is first.files["input.bin"]
    f.write_bytes(b"y" * 10_001)
    changed = attach.collect([f])
    assert changed.files["input.bin"] == b"y" * 10_001
    assert changed.digests != first.digests
