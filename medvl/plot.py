"""Training curves as figures for reports and papers (`medvl plot RUN... --out curves.png|svg|pdf`, and the
dashboard's `p` key): matplotlib on its Agg canvas, no display, no pyplot state. Draws the same lines as the
dashboard (medvl.engine.history.lines_for): raw loss faint under its smoothed curve, one colour per run with a
legend, resumes as dashed vertical lines. matplotlib is imported here only, so only these callers pay for it.
"""

from __future__ import annotations

import os
from pathlib import Path

from medvl.engine.curves import METRICS, Metric, lines_for, run_labels
from medvl.engine.history import RunHistory
from medvl.errors import MedvlError

FORMATS = (".png", ".svg", ".pdf")


def load_runs(run_dirs: list[str | Path], *, exact: bool = True) -> list[RunHistory]:
    """The histories of finished or running runs; a path that is not a run is a clear error."""
    runs = []
    for d in map(Path, run_dirs):
        if not d.exists():
            raise MedvlError(f"no run directory at {d}", where=str(d), fix="pass the output.dir of a run")
        if not d.is_dir():
            raise MedvlError(f"{d} is a file, not a run directory", where=str(d),
                             fix="pass the run directory (the one holding metrics.jsonl), not a file in it")
        if not (d / "metrics.jsonl").is_file():
            raise MedvlError(f"{d} has no metrics.jsonl (not a run directory, or the run has not started)",
                             where=str(d), fix="pass the output.dir of a run; `medvl watch` waits for one to start")
        h = RunHistory(d, exact=exact)
        h.poll()
        if h.bad_lines and h.current is None and not h.series:
            raise MedvlError(f"{h.path} is corrupt: none of its lines is a metric event ({h.bad_lines} lines that "
                             "are not medvl's JSON events)", where=str(h.path),
                             fix="pass the output.dir of a medvl run; a metrics.jsonl cut or overwritten by "
                                 "something else cannot be plotted")
        runs.append(h)
    return runs


def check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise MedvlError(f"--out {out}: the file type is taken from the name and must be one of "
                         f"{', '.join(FORMATS)}", where=str(out), fix=f"for example --out {out.with_suffix('.png')}")
    if out.is_dir():
        raise MedvlError(f"--out {out} is a directory", where=str(out), fix=f"name a file, e.g. {out / 'curves.png'}")
    if not out.parent.is_dir():
        raise MedvlError(f"--out {out}: the folder {out.parent} does not exist", where=str(out),
                         fix=f"create it first (mkdir -p {out.parent}) or choose another path")
    return out


def figure(runs: list[RunHistory], *, metrics: list[str] | None = None, smoothing: float = 0.6,
           last: int | None = None, log: tuple[str, ...] = ()):
    from matplotlib.figure import Figure

    chosen = [m for m in METRICS if (metrics is None or m.key in metrics)]
    panels = [(m, lines) for m in chosen if (lines := lines_for(runs, m, smoothing=smoothing, last=last,
                                                                 log=m.key in log))]
    if not panels:
        raise MedvlError("nothing to plot: the runs have no logged " + (", ".join(metrics) if metrics else "metrics")
                         + " yet", where=", ".join(str(h.path) for h in runs),
                         fix="wait for the first log step (train.log_every), or choose other --metric")
    cols = 1 if len(panels) == 1 else 2
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(6.4 * cols, 3.4 * rows), layout="constrained")
    colours = [f"C{i % 10}" for i in range(len(runs))]
    labels = run_labels(runs)
    for k, (metric, lines) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        _draw(ax, metric, lines, runs, colours, log=metric.key in log)
    if len(runs) > 1:
        from matplotlib.lines import Line2D

        fig.legend([Line2D([], [], color=c, lw=2) for c in colours], labels, loc="outside lower center",
                   ncols=min(len(runs), 4), frameon=False)
    return fig


def _draw(ax, metric: Metric, lines, runs, colours, *, log: bool) -> None:
    per_run = {}
    for line in lines:
        per_run[line.run] = per_run.get(line.run, 0) + (not line.raw)
    styles = ["-", "--", ":", "-."]
    seen: dict[int, int] = {}
    for line in lines:
        if line.raw:
            ax.plot(line.steps, line.values, color=colours[line.run], alpha=0.25, lw=0.8)
            continue
        n = seen.get(line.run, 0)
        seen[line.run] = n + 1
        # several series of one run (suites, devices): one colour per run, one line style per series
        ax.plot(line.steps, line.values, color=colours[line.run] if len(runs) > 1 else f"C{n % 10}",
                ls=styles[n % 4] if len(runs) > 1 else "-", lw=1.6, label=line.label, marker="o" if len(line.steps) < 30 else None, ms=3)
    for i, h in enumerate(runs):
        for step in h.resumes:
            ax.axvline(step, color=colours[i], ls="--", lw=0.8, alpha=0.7)
            ax.annotate("resume", (step, 1), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                        fontsize=7, color=colours[i])
    ax.set_title(metric.title, fontsize=10)
    ax.set_xlabel("step")
    if log:
        ax.set_yscale("log")
    if metric.key == "bench":
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.grid(True, alpha=0.3)
    if len(runs) == 1 and sum(per_run.values()) > 1:
        ax.legend(fontsize=8, frameon=False)


def save_plot(runs: list[RunHistory], out: str | Path, **options) -> Path:
    """Write the figure to `out` (type from its suffix) atomically; returns the path."""
    out = check_out(out)
    fig = figure(runs, **options)
    tmp = out.with_name(f".{out.name}.partial{out.suffix}")
    try:
        fig.savefig(tmp, dpi=150, format=out.suffix[1:].lower())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
