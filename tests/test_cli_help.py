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


@pytest.mark.parametrize("columns", [80, 100])
@pytest.mark.parametrize("path", [p for p in command_paths() if p], ids=" ".join)
def test_examples_never_fold_back_to_the_left_edge(path, columns):
    """typer folded each example line as a paragraph: at 80-100 columns a `# comment` wrapped to column 1, where
    the next example's command starts. Now every line either starts an example (at its margin) or is indented
    further in, under the example it belongs to."""
    from rich.text import Text

    from medvl.commands.help_format import example_rows

    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    if not command.epilog:
        return
    starts = [Text.from_markup(text).plain[:12] for _, text, _ in example_rows(command.epilog)[1:] if text]
    out = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(columns)}).output
    section = out[out.index(" Examples\n") + len(" Examples\n"):].splitlines()
    shown = [line.rstrip() for line in section if line.strip()]
    assert shown and all(len(line) <= columns for line in shown)
    margin = min(len(line) - len(line.lstrip()) for line in shown)
    for line in shown:
        indent = len(line) - len(line.lstrip())
        assert indent > margin or any(line.lstrip().startswith(s) for s in starts), line
    assert margin >= 1
