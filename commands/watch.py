"""`medvl watch RUN [RUN ...]`: the live training dashboard on run directories (going, finished, crashed, or not
started yet); several runs are overlaid. Read-only: quitting never touches a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

EXAMPLES = """[bold]Examples[/]
  medvl watch runs/sft                          [dim]# attach from a second SSH session while training runs[/]
  medvl watch runs/lora-r16 runs/lora-r64       [dim]# compare two runs, one colour each[/]
  medvl watch runs/next --metric eval           [dim]# waits until the run starts[/]
  [dim]Keys: m metric (1-9), l log scale, s smoothing, z zoom to the last N steps, p PNG next to the run, q quit.[/]"""

# Keep in step with medvl.engine.history.METRICS (tests/test_dashboard.py checks it); duplicated so that TAB
# completion never imports the library.
METRIC_KEYS = ("loss", "eval", "bench", "lr", "grad", "tokens", "samples", "memory", "gpu")


def complete_metric(incomplete: str) -> list[str]:
    return [m for m in METRIC_KEYS if m.startswith(incomplete)]


RunsArg = Annotated[list[Path], typer.Argument(help="Run directories (output.dir of a recipe).", show_default=False)]
MetricOpt = Annotated[str, typer.Option("--metric", help=f"Chart shown first: {', '.join(METRIC_KEYS)}.",
                                        autocompletion=complete_metric)]
SmoothingOpt = Annotated[float, typer.Option("--smoothing", min=0.0, max=0.999,
                                             help="Exponential smoothing of loss and grad norm, 0 (raw) to 0.999.")]


def check_runs(runs: list[Path]) -> None:
    """A run directory may not exist yet (the dashboard waits for it); a file where a run should be is a mistake."""
    from medvl.errors import MedvlError

    for run in runs:
        if run.exists() and not run.is_dir():
            raise MedvlError(f"{run} is a file, not a run directory", where=str(run),
                             fix="pass the run directory (output.dir, the folder holding metrics.jsonl)")


def watch(runs: RunsArg, metric: MetricOpt = "loss", smoothing: SmoothingOpt = 0.6) -> None:
    """Live dashboard of one or more training runs: loss, eval, benchmarks, lr, grad norm, throughput, memory."""
    from medvl.errors import MedvlError

    if metric not in METRIC_KEYS:
        raise MedvlError(f"--metric {metric} is not a dashboard metric", fix=f"one of: {', '.join(METRIC_KEYS)}")
    check_runs(runs)
    from medvl.tui.dashboard import Dashboard

    Dashboard(runs, metric=metric, smoothing=smoothing).run()
