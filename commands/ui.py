"""Terminal rendering shared by the commands: one console, error panels, a rich progress sink.

Only rich is imported here (cheap); commands import this, never the library's heavy modules at top level.
"""

from __future__ import annotations

import sys

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def print_error(exc) -> None:
    """Render a medvl.errors.MedvlError: what / where / fix, no traceback."""
    from rich.panel import Panel
    from rich.text import Text

    body = Text(exc.what)
    if exc.where:
        body.append("\nwhere: ", style="bold").append(exc.where)
    if exc.fix:
        body.append("\nfix:   ", style="bold green").append(exc.fix)
    err_console.print(Panel(body, title="[bold red]error[/]", title_align="left", border_style="red", expand=False))


class RichProgress:
    """A ProgressSink that draws a bar with rate and ETA on a terminal and prints sparse lines otherwise."""

    def __init__(self, console_: Console | None = None, every: int = 1000):
        self.console = console_ or err_console
        self.every = every
        self._bar = None
        self._task = None
        self._name = ""
        self._done = 0
        self._total = None

    def start(self, task: str, total: int | None = None) -> None:
        self.finish()
        self._name, self._done, self._total = task, 0, total
        if self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.speed}/s"), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task(task, total=total)
        else:
            self.console.print(f"{task}: started" + (f" ({total} items)" if total else ""))

    def advance(self, n: int = 1) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)
        elif self.every and self._done % self.every < n:
            self.console.print(f"{self._name}: {self._done}" + (f"/{self._total}" if self._total else ""))

    def note(self, message: str) -> None:
        self.console.print(message)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self._name and not self.console.is_terminal:
            self.console.print(f"{self._name}: done ({self._done})")
        self._name = ""


def is_tty() -> bool:
    return sys.stdout.isatty()
