"""Functions as scripts write them (issue "Many jobs"): a function defined in a
script run as ``python script.py`` or typed into a REPL runs on a worker with what
it uses (imported modules, module-level constants, helpers, classes and
dataclasses beside it, lambdas, closures), and failures to pickle or to load name
what failed, on the side where it failed."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest

import dsage
from dsage.codec import dump_trusted, load_trusted
from dsage.functions import LoadError, dump_call, load

from .conftest import Procs

#: the code a user writes: everything the functions use is beside them
USER_CODE = textwrap.dedent('''
    import math
    from collections import Counter
    from dataclasses import dataclass

    SCALE = 3

    def helper(x):
        return x * SCALE

    def even(n):
        return n == 0 or odd(n - 1)

    def odd(n):
        return n != 0 and even(n - 1)

    @dataclass
    class Point:
        x: float
        y: float

        def norm(self):
            return math.hypot(self.x, self.y)

    def uses_everything(n):
        return [math.sqrt(n), helper(n), even(n), Point(3, 4).norm(), Counter("aab")["a"]]

    def make_point(x):
        return Point(x, -x)

    add_scale = lambda x: x + SCALE

    def outer(k):
        def middle(a):
            def inner(b):
                return a + b + k + SCALE
            return inner
        return middle(10)

    inner = outer(5)
''')

#: what the worker's results should be, as JSON
EXPECTED = {"everything": [2.0, 12, True, 5.0, 2], "point": [7, -7, True],
            "lambda": 4, "closure": 19, "map": [[3.0, 27, 1], [1.0, 3, 2], [1.41, 6, 3]]}

SCRIPT_MAIN = textwrap.dedent('''
    import json, os, sys
    import dsage

    if __name__ == "__main__":
        D = dsage.DSage("127.0.0.1", int(sys.argv[1]), home=os.environ["DSAGE_HOME"])
        p = D.eval_function(make_point, (7,)).result()
        out = {
            "everything": D.eval_function(uses_everything, (4,)).result(),
            "point": [p.x, p.y, isinstance(p, Point)],
            "lambda": D.eval_function(add_scale, (1,)).result(),
            "closure": D.eval_function(inner, (1,)).result(),
            "map": D.map(lambda x, y: [round(math.sqrt(x), 2), helper(x), y], [9, 1, 2], "abc"),
        }
        out["map"] = [[a, b, "abc".index(c) + 1] for a, b, c in out["map"]]
        print("RESULT " + json.dumps(out))
        D.close()
''')


def test_functions_from_a_script_run_with_what_they_use(cluster: dsage.DSage, procs: Procs,
                                                        tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()  # not beside the home folder 'dsage', which would shadow
    script = tmp_path / "scripts" / "script.py"  # the package on the script's sys.path
    script.write_text(USER_CODE + SCRIPT_MAIN)
    run = subprocess.run([sys.executable, str(script), str(procs.port)], capture_output=True,
                         text=True, timeout=90, cwd=tmp_path / "scripts")
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, run.stdout + run.stderr
    assert json.loads(lines[0][7:]) == EXPECTED


class Repl:
    """An interactive ``python`` on a pseudo-terminal, as a user would type into it."""

    def __init__(self, cwd: Path) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-q", "-i"], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=cwd, close_fds=True,
                                     env={**os.environ, "PYTHONSTARTUP": "", "TERM": "dumb"})
        os.close(slave)
        self.seen = b""

    def type(self, text: str) -> None:
        for line in text.splitlines():
            os.write(self.master, line.encode() + b"\n")
            self.read_until(b"", 0.02)  # let the REPL take the line, as a typist would

    def read_until(self, marker: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.seen or not marker:
            left = deadline - time.monotonic()
            if left <= 0:
                if not marker:
                    return self.seen
                raise AssertionError(f"no {marker!r} from the REPL within {timeout} s:\n"
                                     + self.seen.decode(errors="replace"))
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:  # the REPL exited
                    if marker:
                        raise AssertionError("the REPL exited:\n"
                                             + self.seen.decode(errors="replace")) from None
                    return self.seen
        return self.seen

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


def test_functions_typed_into_a_repl_run_with_what_they_use(cluster: dsage.DSage, procs: Procs,
                                                            tmp_path: Path) -> None:
    (tmp_path / "repl").mkdir()  # its cwd is on its sys.path: not beside the home 'dsage'
    repl = Repl(tmp_path / "repl")
    try:
        repl.type(_interactive(USER_CODE))
        repl.type(textwrap.dedent(f'''
            import dsage, json, os
            D = dsage.DSage("127.0.0.1", {procs.port}, home=os.environ["DSAGE_HOME"])
            p = D.eval_function(make_point, (7,)).result()
            m = D.map(lambda x, y: [round(math.sqrt(x), 2), helper(x), y], [9, 1, 2], "abc")
            out = {{"everything": D.eval_function(uses_everything, (4,)).result(), "point": [p.x, p.y, isinstance(p, Point)], "lambda": D.eval_function(add_scale, (1,)).result(), "closure": D.eval_function(inner, (1,)).result(), "map": [[a, b, "abc".index(c) + 1] for a, b, c in m]}}
            print("RESULT", json.dumps(out), "END")
        '''))
        seen = repl.read_until(b"END\r\n", 90).decode(errors="replace")
        line = [ln for ln in seen.splitlines() if ln.startswith("RESULT ")][-1]
        assert json.loads(line[len("RESULT "):-len(" END")]) == EXPECTED
        repl.type("D.close()\nexit()\n")
        repl.read_until(b"", 5)
    finally:
        repl.close()


def _interactive(code: str) -> str:
    """``code`` as typed at a prompt: no blank lines inside a block, one after it."""
    out: list[str] = []
    for line in code.splitlines():
        if not line.strip():
            continue
        if out and not line.startswith(" ") and out[-1].startswith(" "):
            out.append("")  # end the block above
        out.append(line)
    return "\n".join(out) + "\n\n"


def _main_function(source: str, name: str, **env: object) -> types.FunctionType:
    """A function as a script's ``__main__`` would define it, with globals ``env``."""
    namespace: dict[str, object] = {"__name__": "__main__", **env}
    exec(textwrap.dedent(source), namespace)  # noqa: S102 - the test's own code
    func = namespace[name]
    assert isinstance(func, types.FunctionType)
    return func


def test_a_call_that_cannot_be_pickled_names_the_part_that_failed() -> None:
    lock = threading.Lock()
    uses_lock = _main_function("""
        def helper():
            return LOCK.locked()
        def f():
            return helper()
    """, "f", LOCK=lock)
    with pytest.raises(TypeError) as e:
        dump_call(uses_lock, (), {})
    message = str(e.value)
    assert message.startswith("cannot send the function f: its global 'helper' (function) "
                              "-> its global 'LOCK' (lock) cannot be pickled"), message
    assert "lock" in message and "\n" not in message

    closure = _main_function("""
        def make(x):
            def g():
                return x
            return g
    """, "make")(lock)
    with pytest.raises(TypeError, match=r"its closure variable 'x' \(lock\) cannot be pickled"):
        dump_call(closure, (), {})
    with pytest.raises(TypeError, match=r"cannot send argument 1: it \(lock\) cannot be pickled"):
        dump_call(pow, (2, lock), {})
    with pytest.raises(TypeError, match=r"cannot send keyword argument 'k': it \(generator\)"):
        dump_call(dict, (), {"k": (i for i in range(3))})


def test_main_functions_go_by_value_with_their_file_names_and_others_by_reference(
        tmp_path: Path) -> None:
    """Importable calls keep the standard pickler's fast path; ``__main__`` code goes
    by value (its globals only as used) and keeps its file name for tracebacks."""
    import pickle

    assert dump_trusted((os.path.join, ("a", "b"), {})) == pickle.dumps(
        (os.path.join, ("a", "b"), {}), protocol=pickle.HIGHEST_PROTOCOL)
    unused = bytes(100_000)
    f = _main_function("""
        import math
        def f(x):
            return math.floor(x) * K
    """, "f", K=3, UNUSED=unused)
    f.__code__ = f.__code__.replace(co_filename="/somewhere/script.py")
    blob = dump_trusted(f)
    assert len(blob) < 5000  # not the unused global, nor the math module by value
    g = load_trusted(blob)
    assert g(2.5) == 6 and g.__code__.co_filename == "/somewhere/script.py"


def test_a_call_that_cannot_be_loaded_says_what_is_missing(cluster: dsage.DSage,
                                                           tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """A function of a module only the client has (not installed on the worker) fails
    on the worker with one line naming it, without a traceback through the unpickler."""
    (tmp_path / "only_here_mod.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_here_mod  # type: ignore[import-not-found]

    j = cluster.eval_function(only_here_mod.triple, (2,))
    with pytest.raises(dsage.JobError) as e:
        j.result(timeout=60)
    assert j.error is not None
    assert j.error.startswith("cannot load the call on this worker: ModuleNotFoundError: "
                              "No module named 'only_here_mod' (only_here_mod.triple is not "
                              "importable here"), j.error
    assert "Traceback" not in j.output and "only_here_mod" in str(e.value)
    # the same, unit-sized: a LoadError in one line
    with pytest.raises(LoadError, match=r"cannot load the items on this worker: "
                                        r"AttributeError: .*os\.no_such_name"):
        load(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x0cno_such_name"
             b"\x93.", "the items")
