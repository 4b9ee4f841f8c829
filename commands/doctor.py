"""`medvl doctor`: one screen saying what this box has and what it enables (medvl.doctor does the checking)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medvl.commands.options import JsonOpt
from medvl.commands.ui import console, err_console, print_table

EXAMPLES = """[bold]Examples[/]
  [cyan]medvl doctor[/]                             what this box has and what it enables
  [cyan]medvl doctor --out-dir /scratch/runs[/]     also check free space where runs will go
  [cyan]medvl doctor --json | jq -r .verdict[/]     for scripts (exit 1 if torch or transformers fail)
"""

_STYLE = {"ok": "green", "warn": "yellow", "missing": "dim", "fail": "bold red"}


class _Spinner:
    """A ProgressSink that shows which check is running (torch + transformers + deepspeed imports take ~4 s),
    then vanishes, so the table is all that stays on screen."""

    def __init__(self) -> None:
        self._status = None

    def start(self, task: str, total: int | None = None) -> None:
        self._status = err_console.status("checking ...")
        self._status.start()

    def advance(self, n: int = 1) -> None:
        pass

    def note(self, message: str) -> None:
        if self._status is not None:
            self._status.update(f"checking {message} ...")

    def finish(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def doctor(
    out_dir: Annotated[Path, typer.Option(
        "--out-dir", help="Where runs and checkpoints will be written: its free space is checked.")] = Path("."),
    json_out: JsonOpt = False,
) -> None:
    """Say what this box has (Python, torch, GPUs, libraries, disk, HF cache) and what it is ready for.

    Run it first on a new machine. Exit status 1 only when torch or transformers is missing or broken.
    """
    from medvl.doctor import run_checks

    spinner = _Spinner() if err_console.is_terminal else None
    try:
        report = run_checks(out_dir, progress=spinner)
    finally:
        if spinner is not None:
            spinner.finish()
    if json_out:
        import json

        print(json.dumps(report.to_dict(), indent=2))
    else:
        from rich.table import Table
        from rich.text import Text

        from medvl import __version__

        # Advice runs longer than what was found: 2:3 keeps most rows to one line at 120 columns.
        table = Table(title=f"medvl {__version__} doctor", title_justify="left", show_edge=False, pad_edge=False,
                      expand=True)
        table.add_column("check", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("found", overflow="fold", ratio=2)
        table.add_column("enables / to do", ratio=3)
        for c in report.checks:
            table.add_row(c.name, Text(c.status, style=_STYLE[c.status]), c.detail, c.advice)
        print_table(table)
        console.print(Text.assemble(("overall: ", "bold"), (report.verdict, "green" if report.ok else "bold red")))
    raise typer.Exit(0 if report.ok else 1)
