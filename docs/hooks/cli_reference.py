"""mkdocs hook: the CLI reference page (cli.md), made from the argparse parsers at
build time, so that it always says what ``--help`` says."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PAGE = "cli.md"
WIDTH = "88"


def _subcommands(p: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """The subcommands of ``p`` that have their own help, in the order they were added."""
    out: list[tuple[str, argparse.ArgumentParser]] = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if sub.add_help:
                    out.append((name, sub))
    return out


def _section(p: argparse.ArgumentParser, level: int) -> list[str]:
    lines = [f"{'#' * level} `{p.prog}`", "", "```text", p.format_help().rstrip(), "```", ""]
    for _, sub in _subcommands(p):
        lines += _section(sub, level + 1)
    return lines


def markdown() -> str:
    """The CLI reference page: ``dsage`` with every subcommand, ``dsage-broker``,
    ``dsage-worker``."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from dsage import cli

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH  # the same wrapping on every machine
    try:
        lines = [
            "# Command line reference", "",
            "Every command and option, as `--help` prints them (this page is made from",
            "the parsers when the site is built). `dsage broker` and `dsage worker` are",
            "`dsage-broker` and `dsage-worker`.", "",
        ]
        lines += _section(cli.parser(), 2)
        lines += _section(cli.broker_parser(), 2)
        lines += _section(cli.worker_parser(), 2)
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(lines)


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=markdown()))
    return files
