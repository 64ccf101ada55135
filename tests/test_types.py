"""The package's type hints hold: mypy, configured in pyproject.toml, finds nothing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_the_package_type_checks(tmp_path: Path) -> None:
    if importlib.util.find_spec("mypy") is None:
        skip_or_fail("mypy is not installed: pip install -e '.[test]'")
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "mypy-cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
