"""Every command's --help as a new user reads it: on/off flags read as flags (no `<bool>` type after them, as
if they took a value), at 100 columns as in the walkthrough."""

from __future__ import annotations

import re

import click
import pytest
import typer
from typer.testing import CliRunner

from medvl.commands.main import app


def command_paths() -> list[list[str]]:
    """[] for the root, then every command and group below it, walked in the built click tree."""
    paths = [[]]

    def walk(group: click.Group, prefix: list[str]) -> None:
        for name, cmd in group.commands.items():
            paths.append([*prefix, name])
            if isinstance(cmd, click.Group):
                walk(cmd, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "medvl")
def test_help_shows_flags_as_flags(path):
    res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.output and "BOOLEAN" not in res.output
    help_line = next(line for line in res.output.splitlines() if "--help" in line)
    assert re.search(r"--help\s+-h\s+Show this message", help_line), help_line  # nothing between name and text


def test_a_flag_and_a_valued_option_side_by_side():
    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "100"}).output
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ --")}
    assert re.search(r"--dry-run\s+Print the resolved recipe", lines["--dry-run"])
    assert re.search(r"--resume\s+<str>\s+'auto'", lines["--resume"])  # options that take a value keep theirs
