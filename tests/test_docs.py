"""The documentation site: it builds with ``mkdocs build --strict`` (no broken link,
page or anchor), its CLI reference is made from the parsers, and the code blocks of
every page are tested: the Python blocks run, page by page in one namespace, on a
real local cluster (``D``), except the few marked ``<!-- not run: REASON -->`` just
before the block (those that need SSH hosts, SLURM, a broker elsewhere, or minutes),
which are listed; and every ``dsage``, ``dsage-broker`` and ``dsage-worker`` command
in a shell block parses with the command line's own parsers."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

import dsage
import dsage.sage
from dsage import cli

from .conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
#: the pages whose code blocks are tested: the site's, and the README (the site's
#: home page includes it)
PAGES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")) \
    + ["README.md"]
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->")
#: a block that runs only where an optional part is installed (``sage``): elsewhere
#: the page's other blocks run, and the test then skips (fails in CI) naming it
NEEDS = re.compile(r"<!-- needs: (sage) -->")
#: the Python blocks each page does not run, by reason: a new one must be added here
#: too, so that the convention stays the exception it is
NOT_RUN_EXPECTED = {
    "docs/distributed.md": ["needs a broker at HOST",
                            "takes minutes on two slots (tests/test_distributed.py factors it)",
                            "needs POV-Ray (tests/test_distributed.py renders the scene)"],
    "docs/guide.md": ["needs a broker at HOST"],
    "docs/machines.md": ["needs SSH hosts (tests/test_ssh.py runs it against a real sshd)",
                         "needs SLURM (tests/test_slurm.py runs it on a real one)"],
    "docs/many-jobs.md": ["a signature", "needs a broker at HOST"],
}
#: the files the examples name, as a user would have them beside the script
EXAMPLE_FILES = {
    "dsage.py": "import random\nDSAGE_RESULT = sorted(random.sample(range(100), 5))\n",
    "dsage.sage": "DSAGE_RESULT = factor(randint(10^20, 10^30))\n",
    "urls.txt": "https://example.org\n",
    "fetch.py": "def fetch(url):\n    return f'the page at {url}'\n",
    "input/data.csv": "a,b\n1,2\n",
    "lib/summary.py": "def summarise(text, limit):\n    return text[:limit]\n",
}
COMMAND = re.compile(r"^(?:\$ )?(dsage|dsage-broker|dsage-worker)(?:\s|$)")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    not_run: str | None
    needs: str | None = None


def blocks(page: str, text: str | None = None) -> list[Block]:
    """The fenced code blocks of a page, each with the reason it is not run, if it
    is marked so (the HTML comment on the line before its fence)."""
    text = (ROOT / page).read_text() if text is None else text
    out = []
    for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```$", text, flags=re.S | re.M):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = NOT_RUN.fullmatch(before.strip())
        needs = NEEDS.fullmatch(before.strip())
        code = textwrap.dedent(m.group(3))  # a block in a list item is indented
        out.append(Block(page, text[:m.start()].count("\n") + 2, m.group(2), code,
                         mark.group(1) if mark else None, needs.group(1) if needs else None))
    return out


def commands(code: str) -> list[str]:
    """The ``dsage ...`` command lines of a shell block (continuations joined)."""
    joined = re.sub(r"\s*\\\n\s*", " ", code)
    return [line.removeprefix("$ ") for line in joined.splitlines() if COMMAND.match(line)]


def parse_command(line: str) -> argparse.Namespace:
    """Parse a documented command with the launchers' parsers (SystemExit if it does
    not); ``...`` stands for more arguments and is dropped."""
    args = [a for a in shlex.split(line, comments=True) if a != "..."]
    prog, args = args[0], args[1:]
    if prog == "dsage" and args and args[0] in ("broker", "worker"):
        prog, args = f"dsage-{args[0]}", args[1:]
    if prog == "dsage-broker":
        return cli.broker_parser().parse_args(args)
    if prog == "dsage-worker":
        return cli.worker_parser().parse_args(args)
    return cli.parser().parse_args(cli._protect_keys(args))


def test_site_builds_strict_with_the_cli_reference(tmp_path: Path) -> None:
    for module in ("mkdocs", "material"):
        if importlib.util.find_spec(module) is None:
            skip_or_fail(f"{module} is not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                        str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stdout + r.stderr
    cli = (site / "cli" / "index.html").read_text()
    for command in ("dsage keys add", "dsage jobs", "dsage slurm submit", "dsage stop",
                    "--shutdown-monitors", "dsage-broker",
                    "dsage-worker", "--max-message-size", "--run-as"):
        assert command in cli, command
    assert "Quick start" in (site / "index.html").read_text()  # the README's, included
    assert (site / "coming-from" / "index.html").is_file()


def test_blocks_and_their_marks_are_found() -> None:
    page = ("<!-- needs: sage -->\n```python\nx = 1\n```\n\n<!-- not run: needs HOST -->\n"
            "```python\ny = 2\n```\n"
            "- a list item:\n\n  ```python\n  z = 3\n  ```\n"
            "\n```sh\n$ dsage status --json\ndsage slurm submit --nodes 2 \\\n"
            "    --workers-per-node 4   # a comment\nbroker  localhost:1\n```\n")
    found = blocks("x.md", page)
    assert [(b.lang, b.code, b.not_run) for b in found] == [
        ("python", "x = 1\n", None), ("python", "y = 2\n", "needs HOST"),
        ("python", "z = 3\n", None), ("sh", found[3].code, None)]
    assert found[1].line == 8
    assert [b.needs for b in found] == ["sage", None, None, None]
    assert commands(found[3].code) == ["dsage status --json",
                                       "dsage slurm submit --nodes 2 --workers-per-node 4"
                                       "   # a comment"]
    assert parse_command(commands(found[3].code)[1]).workers_per_node == 4
    with pytest.raises(SystemExit):
        parse_command("dsage status --no-such-option")


def test_not_run_blocks_are_few_and_listed() -> None:
    marked = {page: [b.not_run for b in blocks(page) if b.not_run] for page in PAGES}
    marked = {page: reasons for page, reasons in marked.items() if reasons}
    print("\n".join(f"not run: {page}: {reason}" for page, reasons in marked.items()
                    for reason in reasons))
    assert marked == NOT_RUN_EXPECTED
    python = [b for page in PAGES for b in blocks(page) if b.lang == "python"]
    assert sum(1 for b in python if b.not_run) * 3 < len(python)
    assert all(b.lang == "python" for page in PAGES for b in blocks(page) if b.not_run)


@pytest.mark.parametrize("page", PAGES)
def test_shell_commands_parse(page: str) -> None:
    for block in blocks(page):
        if block.lang not in ("", "sh", "bash", "console"):
            continue
        for line in commands(block.code):
            try:
                parse_command(line)
            except SystemExit as e:
                raise AssertionError(f"{page}:{block.line}: {line!r} does not parse") from e


def test_every_page_has_its_commands_or_code_tested() -> None:
    tested = {page for page in PAGES for b in blocks(page)
              if (b.lang == "python" and not b.not_run) or commands(b.code)}
    untested = {page for page in PAGES if blocks(page)} - tested
    assert untested == {"docs/benchmarks.md"}  # its blocks run the benchmarks (minutes)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("page", [p for p in PAGES if any(
    b.lang == "python" and not b.not_run for b in blocks(p))])
def test_python_blocks_run(page: str, cluster: dsage.DSage, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A page's blocks run in order in one namespace, as a session would type them,
    beside the files they name; ``D`` is a running cluster (and ``dsage`` imported)
    until a block starts its own (``start_all``), which is closed at the end."""
    for name, content in EXAMPLE_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    monkeypatch.chdir(tmp_path)
    # the blocks are the session's __main__, as a script's or a notebook's code is
    # (what it defines goes to the workers by value; dataclasses look it up)
    module = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", module)
    namespace = module.__dict__
    namespace.update(D=cluster, dsage=dsage)  # what a session has by then
    lacking: list[str] = []
    try:
        for block in blocks(page):
            if block.lang != "python" or block.not_run:
                continue
            if block.needs == "sage" and (why := dsage.sage.missing()) is not None:
                lacking.append(f"{page}:{block.line} needs Sage ({why})")
                continue
            exec(compile(block.code, f"{page}:{block.line}", "exec"), namespace)
        # the jobs the page leaves in names ran through (a page that kills one says so)
        for name, job in list(namespace.items()):
            if isinstance(job, dsage.JobWrapper):
                job.wait(120)
                assert job.status in ("completed", "killed"), (page, name, job.error)
    finally:
        for value in list(namespace.values()):
            if isinstance(value, dsage.DSage) and value is not cluster:
                value.close()
    if lacking:
        skip_or_fail("the page's other blocks ran; " + "; ".join(lacking))
