"""How `--help` reads: the classes every command and group is built with (commands/main.py, recipes.py).

- On/off flags show no value type. typer 0.29 writes one after every option, so flags read `--json <bool>`, as
  if they took a value (`--json true`, which fails).
- The examples under a command (its EXAMPLES epilog) keep each command and its `# comment` apart: typer folds the
  epilog as one paragraph per line, so at 80-100 columns a comment wrapped back to the left edge, where the next
  example's command starts. Here a comment stands in a column of its own when it fits there on one line, else on
  its own line under its command; whatever still wraps (a command longer than the terminal) continues further
  in than where its line began, as a shell continuation line would.
"""

from __future__ import annotations

import re

from typer.core import TyperCommand, TyperGroup

def _flags_as_flags(params: list) -> list:
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # typer shows a metavar, when set, instead of the type
    return params


def _with_examples(cls, self, ctx, formatter) -> None:
    epilog, self.epilog = self.epilog, None
    try:
        super(cls, self).format_help(ctx, formatter)
    finally:
        self.epilog = epilog
    if epilog:
        print_examples(epilog)


class Command(TyperCommand):
    def get_params(self, ctx) -> list:
        return _flags_as_flags(super().get_params(ctx))

    def format_help(self, ctx, formatter) -> None:
        _with_examples(Command, self, ctx, formatter)


class Group(TyperGroup):
    def get_params(self, ctx) -> list:
        return _flags_as_flags(super().get_params(ctx))

    def format_help(self, ctx, formatter) -> None:
        _with_examples(Group, self, ctx, formatter)


# "  medvl x   [dim]# why[/]"  or  "  [cyan]medvl x[/]   what it does"  (doctor, recipes)
_DIM_COMMENT = re.compile(r"^(?P<indent> *)(?P<cmd>.*?\S)\s+(?P<comment>\[dim\]#.*)$")
_CYAN_COMMAND = re.compile(r"^(?P<indent> *)(?P<cmd>\[cyan\].*?\[/\])\s+(?P<comment>\S.*)$")


def example_rows(epilog: str) -> list[tuple[int, str, str | None]]:
    """(indent, text, comment or None) per line of an EXAMPLES string; a markup span over several lines is one
    row (its tag must close on the line it opened on for rich)."""
    rows: list[tuple[int, str, str | None]] = []
    lines = epilog.strip("\n").split("\n")
    while lines:
        line = lines.pop(0)
        while line.count("[dim]") > line.count("[/]") and lines:  # "[dim]In the app: ...\n  Esc ...[/]"
            line = line + " " + lines.pop(0).strip()
        match = _DIM_COMMENT.match(line) or _CYAN_COMMAND.match(line)
        if match:
            rows.append((len(match["indent"]), match["cmd"], match["comment"]))
        else:
            rows.append((len(line) - len(line.lstrip(" ")), line.strip(), None))
    return rows


def print_examples(epilog: str, console=None) -> None:
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    width = console.width - 1  # typer's help keeps the last column free; so do these lines
    rows = [(1 + indent, Text.from_markup(text), Text.from_markup(comment) if comment else None)
            for indent, text, comment in example_rows(epilog)]  # 1: typer's left margin, as over the options
    column = max((indent + text.cell_len for indent, text, comment in rows if comment), default=0) + 2
    console.print()
    for indent, text, comment in rows:
        if comment is not None and column + comment.cell_len <= width:
            line = Text(" " * indent) + text
            line.pad_right(column - line.cell_len)
            _print(console, [line + comment])
            continue
        _print(console, _hanging(console, text, indent, width))
        if comment is not None:
            _print(console, _hanging(console, comment, indent + HANG, width))


HANG = 4  # a wrapped line continues this much further in than its first line, as a shell continuation would


def _hanging(console, text, indent: int, width: int) -> list:
    from rich.text import Text

    lines = text.wrap(console, max(20, width - indent - HANG))
    return [Text(" " * (indent + (HANG if i else 0))) + line for i, line in enumerate(lines)]


def _print(console, lines: list) -> None:
    for line in lines:
        console.print(line, soft_wrap=True)  # already fitted: no second wrapping by rich
