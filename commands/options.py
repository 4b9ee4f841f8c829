"""Argument and option types shared by the commands, with their shell completion.

Completion runs on every TAB press over SSH, so completers only list files: no pydantic, no torch.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

# Keep in step with medvl.families.FAMILIES (tests/test_families.py checks it); duplicated here so that
# completion never imports the families module.
FAMILY_NAMES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava", "internvl", "causal-lm", "glm4")


def shipped_recipe_names() -> list[str]:
    """Names of the recipes shipped inside the package (file stem), sorted."""
    root = resources.files("medvl.recipes")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def complete_recipe(incomplete: str) -> list[str]:
    names = [n for n in shipped_recipe_names() if n.startswith(incomplete)]
    # Local YAML files complete too, so `medvl train my<TAB>` finds my_recipe.yaml.
    base = Path(incomplete) if incomplete.endswith("/") else (Path(incomplete).parent if incomplete else Path("."))
    try:
        local = [str(p) if str(base) != "." else p.name for p in base.iterdir()
                 if p.suffix in (".yaml", ".yml") and str(p if str(base) != "." else p.name).startswith(incomplete)]
    except OSError:
        local = []
    return sorted(set(names) | set(local))


def complete_family(incomplete: str) -> list[str]:
    return [f for f in FAMILY_NAMES if f.startswith(incomplete)]


RecipeArg = Annotated[str, typer.Argument(
    help="A recipe: a YAML path, or the name of a shipped recipe (see `medvl recipes list`).",
    autocompletion=complete_recipe, show_default=False)]
OverridesArg = Annotated[list[str] | None, typer.Argument(
    help="Dotted overrides applied before validation, e.g. optim.lr=1e-5 data.max_seq_len=4096.",
    show_default=False)]
FamilyOpt = Annotated[str, typer.Option(
    "--family", help=f"Model family: {', '.join(FAMILY_NAMES)}.", autocompletion=complete_family)]
# Paths: click's Path type makes the shells complete file names.
PathArg = Annotated[Path, typer.Argument(show_default=False)]
OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout instead of tables.")]
