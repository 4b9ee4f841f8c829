"""`medvl tiny`: build a random tiny model of any family, offline, for tests, demos and trying commands."""

from __future__ import annotations

from pathlib import Path

import typer

from medvl.commands.options import FamilyOpt, OutDirOpt
from medvl.commands.ui import console

EXAMPLES = """[bold]Examples[/]
  medvl tiny --family qwen2.5-vl --out tiny-qwen25vl
  medvl tiny --family causal-lm --out tiny-lm --overwrite"""


def tiny(
    out: OutDirOpt,
    family: FamilyOpt = "qwen2.5-vl",
    seed: int = typer.Option(0, help="Seed for the random weights (same seed, same weights)."),
    size: str = typer.Option("tiny", help="tiny (~0.2 M parameters, for tests) or small (~2 M, for demos)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
) -> None:
    """Build a random tiny model (real BPE tokenizer, chat template, processor) in save_pretrained layout."""
    from medvl.commands.ui import quiet_library_progress_bars

    quiet_library_progress_bars()  # transformers' "Writing model shards" bar: noise above the one line below
    from medvl.tiny import build_tiny

    model, _ = build_tiny(family, out, seed=seed, overwrite=overwrite, size=size)
    params = sum(p.numel() for p in model.parameters())
    files = ", ".join(sorted(p.name for p in Path(out).iterdir()))
    console.print(f"[green]built[/] tiny {family} model: {params:,} parameters -> {out}\n  files: {files}")
