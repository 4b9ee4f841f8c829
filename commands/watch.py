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


MODEL_FILES = ("config.json", "adapter_config.json", "trainer_state.json")  # a model or checkpoint, not a run


def check_runs(runs: list[Path]) -> None:
    """A run directory may not exist yet (the dashboard waits for it). A path that can never become one is a
    mistake: a file, a path under a file, or a model / checkpoint folder (RUN/final, RUN/checkpoints/step-N)."""
    from medvl.errors import MedvlError

    for run in runs:
        if run.exists() and not run.is_dir():
            raise MedvlError(f"{run} is a file, not a run directory", where=str(run),
                             fix="pass the run directory (output.dir, the folder holding metrics.jsonl)")
        blocker = next((p for p in run.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise MedvlError(f"{run} can never be a run directory: {blocker} is a file", where=str(run),
                             fix="pass the run directory (output.dir, the folder holding metrics.jsonl)")
        model = next((m for m in MODEL_FILES if (run / m).is_file()), None)
        if model is not None and not (run / "metrics.jsonl").exists():
            raise MedvlError(f"{run} is a model or checkpoint folder ({model}), not a run directory",
                             where=str(run), fix="pass the run directory that holds metrics.jsonl (output.dir: the "
                             "folder above final/ and checkpoints/)")


def check_terminal(runs: list[Path]) -> None:
    """The dashboard draws a full screen: into a pipe or a log file it would write escape codes forever."""
    from medvl.commands.ui import console
    from medvl.errors import MedvlError

    if not console.is_terminal:
        raise MedvlError("medvl watch draws a live dashboard and needs a terminal; its output here is not one",
                         where=", ".join(map(str, runs)),
                         fix=f"run it in a terminal (tmux, SSH), or write a figure: medvl plot {runs[0]} --out "
                             "curves.png")


def watch(runs: RunsArg, metric: MetricOpt = "loss", smoothing: SmoothingOpt = 0.6) -> None:
    """Live dashboard of one or more training runs: loss, eval, benchmarks, lr, grad norm, throughput, memory."""
    from medvl.errors import MedvlError

    if metric not in METRIC_KEYS:
        raise MedvlError(f"--metric {metric} is not a dashboard metric", fix=f"one of: {', '.join(METRIC_KEYS)}")
    check_runs(runs)
    check_terminal(runs)
    from medvl.tui.dashboard import Dashboard

    Dashboard(runs, metric=metric, smoothing=smoothing).run()
