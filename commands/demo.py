"""`medvl demo`: the whole recipe on CPU in a few minutes, offline, ending with proof that the model learned."""

from __future__ import annotations

from pathlib import Path

import typer

from medvl.commands.ui import console

EXAMPLES = """[bold]Examples[/]
  medvl demo                      [dim]# what `make demo` runs[/]
  medvl demo --steps 600 --out /tmp/medvl-demo"""


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Working directory for everything the demo makes."),
    steps: int = typer.Option(300, help="Optimizer steps (global batch 8)."),
    train_samples: int = typer.Option(2400, help="easy-vqa training questions (plus the DICOM modality set)."),
    test_samples: int = typer.Option(400, help="Held-out easy-vqa questions (plus held-out DICOM files)."),
) -> None:
    """Build a tiny Qwen2.5-VL, prepare easy-vqa + DICOM data, train it on CPU, and score it on held-out data."""
    from medvl.commands.ui import RichProgress, TrainConsole, render_demo
    from medvl.demo import run_demo

    console.print(f"[bold]medvl demo[/]: tiny Qwen2.5-VL, {train_samples} easy-vqa questions + pydicom CT/MR/US "
                  f"images, {steps} steps on CPU -> {out}")
    render_demo(run_demo(out, train_samples=train_samples, test_samples=test_samples, steps=steps,
                         sinks=[TrainConsole()], progress=RichProgress()))
