"""`medvl recipes list | show | validate`: the shipped training recipes, and checking your own before a run.

Cheap at import (typer + rich only): medvl.config (pydantic, PyYAML) is imported inside the command bodies.
"""

from __future__ import annotations

import typer

from medvl.commands.help_format import Command, Group
from medvl.commands.options import OverridesArg, RecipeArg
from medvl.commands.ui import console, print_table

EXAMPLES = """\
[bold]Examples[/]

  [cyan]medvl recipes list[/]                                    the shipped recipes and what each is for
  [cyan]medvl recipes show huatuo_sft_qwen25vl_7b[/]             print one, to copy and edit
  [cyan]medvl recipes validate my.yaml optim.lr=1e-5 train.grad_accum=16[/]   check a recipe + overrides, no GPU
"""

app = typer.Typer(help="List, show and validate training recipes (YAML).", no_args_is_help=True, cls=Group,
                  rich_markup_mode="rich", epilog=EXAMPLES)


@app.command("list", epilog=EXAMPLES, cls=Command)
def list_recipes() -> None:
    """List the recipes shipped with medvl (use a name wherever a recipe is asked for)."""
    from rich.table import Table

    from medvl.config import shipped_recipes

    table = Table(show_edge=False, pad_edge=False)
    table.add_column("recipe", style="cyan", no_wrap=True)
    table.add_column("purpose")
    for name, purpose in shipped_recipes():
        table.add_row(name, purpose)
    print_table(table)


@app.command("show", epilog=EXAMPLES, cls=Command)
def show(recipe: RecipeArg) -> None:
    """Print a recipe's YAML (a shipped name or a file): with line numbers (as error messages cite them) on a
    terminal, as plain YAML otherwise, so `medvl recipes show NAME > my.yaml` starts a recipe of your own."""
    import sys

    from rich.syntax import Syntax

    from medvl.config import resolve_recipe_path

    path = resolve_recipe_path(recipe)
    text = path.read_text(encoding="utf-8")
    if not console.is_terminal:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    console.print(f"[dim]# {path}[/]")
    console.print(Syntax(text, "yaml", line_numbers=True, word_wrap=True))


@app.command("validate", epilog=EXAMPLES, cls=Command)
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Load a recipe with overrides and check every field and cross-field rule; prints what the run would do."""
    from rich.table import Table

    from medvl.config import load_recipe, recipe_summary, recipe_warnings

    loaded = load_recipe(recipe, overrides or [])
    console.print(f"[bold green]ok[/] {loaded.source}")
    table = Table(show_header=False, show_edge=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for label, line in recipe_summary(loaded):
        table.add_row(label, line)
    print_table(table)
    for warning in recipe_warnings(loaded):
        console.print(f"[yellow]warning[/] {warning}")
