"""`medvl plot RUN [RUN ...] --out curves.png`: training curves as a figure (PNG, SVG or PDF) for a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medvl.commands.ui import console
from medvl.commands.watch import METRIC_KEYS, RunsArg, SmoothingOpt, complete_metric

EXAMPLES = """[bold]Examples[/]
  medvl plot runs/sft --out sft-curves.png
  medvl plot runs/lora-r16 runs/lora-r64 --out compare.pdf --metric loss,eval,bench
  medvl plot runs/sft --out loss.svg --metric loss --last 5000 --log loss"""


def plot(
    runs: RunsArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Figure file; .png, .svg or .pdf.", show_default=False)],
    metric: Annotated[str, typer.Option("--metric", help=f"Comma list of panels: {', '.join(METRIC_KEYS)} "
                                        "(default: every metric the runs logged).", autocompletion=complete_metric,
                                        show_default=False)] = None,
    smoothing: SmoothingOpt = 0.6,
    last: Annotated[int, typer.Option("--last", min=1, help="Only the last N steps.", show_default=False)] = None,
    log: Annotated[str, typer.Option("--log", help="Comma list of panels drawn on a log scale.",
                                     show_default=False)] = "",
) -> None:
    """Publication-quality figure of the training curves of one or more runs (one colour each, resumes marked)."""
    from medvl.errors import MedvlError

    chosen = [m for m in (metric or "").split(",") if m] or None
    logs = tuple(m for m in log.split(",") if m)
    for m in (chosen or []) + list(logs):
        if m not in METRIC_KEYS:
            raise MedvlError(f"{m!r} is not a metric", fix=f"use names from: {', '.join(METRIC_KEYS)}")
    from medvl.plot import check_out, load_runs, save_plot

    check_out(out)
    path = save_plot(load_runs(runs), out, metrics=chosen, smoothing=smoothing, last=last, log=logs)
    console.print(f"[green]wrote[/] {path}")
