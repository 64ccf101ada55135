"""The documentation site: it builds with ``mkdocs build --strict`` (no broken link,
page or anchor), its CLI reference is made from the parsers, and the code blocks of
docs/coming-from.md that say they run on a dsage cluster do, against a real one."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import dsage

from .conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
RUN_MARK = "# runs on a dsage cluster"


def runnable_blocks(markdown: str) -> list[str]:
    """The ```python blocks of a page whose first line is RUN_MARK."""
    blocks = re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.S | re.M)
    return [b for b in blocks if b.startswith(RUN_MARK + "\n")]


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
    for command in ("dsage keys add", "dsage jobs", "dsage slurm submit", "dsage-broker",
                    "dsage-worker", "--max-message-size", "--run-as"):
        assert command in cli, command
    assert "Quick start" in (site / "index.html").read_text()  # the README's, included
    assert (site / "coming-from" / "index.html").is_file()


def test_runnable_blocks_are_found() -> None:
    page = "```python\n# runs on a dsage cluster\nx = 1\n```\n\n```python\ny = 2\n```\n"
    assert runnable_blocks(page) == ["# runs on a dsage cluster\nx = 1\n"]


def test_coming_from_examples_run(cluster: dsage.DSage) -> None:
    blocks = runnable_blocks((ROOT / "docs" / "coming-from.md").read_text())
    assert len(blocks) == 4  # one per library
    for block in blocks:
        namespace = {"D": cluster, "__name__": "docs_example"}
        exec(compile(block, "docs/coming-from.md", "exec"), namespace)
