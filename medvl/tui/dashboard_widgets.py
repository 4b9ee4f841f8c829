"""The training dashboard's widgets. Each one draws from RunHistory objects (medvl.engine.history) and nothing
else; the app decides when to redraw (a history's `version` moved, or a key changed the view)."""

from __future__ import annotations

import time

from rich.table import Table
from rich.text import Text
from textual.containers import Horizontal
from textual.widgets import DataTable, ProgressBar, RichLog, Static
from textual_plotext import PlotextPlot

from medvl.tui.text import describe, duration, rate
from medvl.engine.curves import Metric, lines_for, run_labels
from medvl.engine.history import RunHistory

# plotext colour names, one per run; the header's legend uses the same order (rich understands these names)
RUN_COLOURS = ("cyan", "orange", "green", "magenta", "blue", "red")
RICH_COLOURS = ("cyan", "dark_orange", "green", "magenta", "blue", "red")
STATUS_STYLE = {"running": "bold green", "finished": "bold blue", "waiting": "yellow", "stopped": "bold red",
                "crashed": "bold red", "stale": "yellow", "gone": "bold red"}


def colour(i: int, rich: bool = False) -> str:
    return (RICH_COLOURS if rich else RUN_COLOURS)[i % len(RUN_COLOURS)]


class RunHeader(Static):
    """One line per run: colour key, name, status, recipe, model, method, trainable parameters, world size."""

    def show(self, runs: list[RunHistory], extra: str = "") -> None:
        # one line per run, cut with "…" rather than wrapped: three runs plus the trainer line fit 4 rows at 80 columns
        text = Text(no_wrap=True, overflow="ellipsis")
        for i, (h, label) in enumerate(zip(runs, run_labels(runs))):
            status = h.status()
            text.append("● " if len(runs) > 1 else "", style=colour(i, rich=True))
            text.append(label, style="bold")
            text.append(f"  {status}", style=STATUS_STYLE.get(status, ""))
            s = h.current or h.start
            if s is None:
                where = h.path if h.run_dir.exists() else h.run_dir
                text.append(f"  waiting for {where} (the run has not started)", style="dim")
            else:
                facts = [s.recipe, s.model, s.method,
                         f"{s.trainable_params:,} trainable" if s.trainable_params is not None else None,
                         f"{s.world_size} process{'es' if s.world_size != 1 else ''}"]
                text.append("  " + " · ".join(str(f) for f in facts if f), style="dim")
            if i < len(runs) - 1:
                text.append("\n")
        if extra:
            text.append("\n" + extra, style="dim")
        self.update(text)


class RunProgress(Horizontal):
    """Progress bar with step, epoch, elapsed and ETA for one run."""

    def __init__(self, index: int, **kwargs):
        super().__init__(**kwargs)
        self.index = index

    def compose(self):
        # the run's colour and name, shown only when several runs share the screen (bars alone are anonymous)
        yield Static("", classes="progress-run", id=f"progress-run-{self.index}")
        yield ProgressBar(total=None, show_eta=False, show_percentage=True, id=f"bar-{self.index}")
        yield Static("", classes="progress-label", id=f"progress-{self.index}")

    def show(self, h: RunHistory, now: float | None = None, name: str = "") -> None:
        if not self.query(".progress-label"):
            return  # not composed yet (the app's first refresh can come before its children mount)
        run = self.query_one(".progress-run", Static)
        run.display = bool(name)
        if name:
            run.update(Text.assemble(("● ", colour(self.index, rich=True)), name, no_wrap=True, overflow="ellipsis"))
        total, step = h.total_steps, h.step
        self.query_one(ProgressBar).update(total=total, progress=step)
        # several runs: the name takes the epoch's room (80 columns hold name, bar, step, elapsed and ETA)
        epoch = (f"  epoch {h.last.epoch:.2f}" if not name and h.last is not None and h.last.epoch is not None
                 else "")
        label = f"step {step:,}/{total:,}{epoch}" if total else "waiting"
        label += f"  elapsed {duration(h.elapsed(now))}"
        eta = h.eta(now)
        if eta is not None:
            label += f"  ETA {duration(eta)}"
        self.query_one(".progress-label", Static).update(label)


class MetricChart(PlotextPlot):
    """The selected metric for every run: raw (grey) under smoothed, resumes as vertical lines."""

    def draw(self, runs: list[RunHistory], metric: Metric, *, smoothing: float, last: int | None,
             log: bool) -> int:
        plt = self.plt
        plt.clear_figure()
        lines = lines_for(runs, metric, smoothing=smoothing, last=last, log=log)
        n, legend = 0, []
        for line in lines:
            if line.raw:
                plt.plot(line.steps, line.values, color="gray", marker="braille")
                continue
            # several runs: one colour each; one run with several series (suites, devices): one colour each
            # no plotext label: its legend is drawn inside the plot, over the curves; ChartLegend shows it below
            plt.plot(line.steps, line.values, color=colour(line.run if len(runs) > 1 else n), marker="braille")
            if len(runs) > 1 or sum(not ln.raw for ln in lines) > 1:
                legend.append((line.label, colour(line.run if len(runs) > 1 else n, rich=True)))
            n += 1
        first = min((ln.steps[0] for ln in lines), default=None)
        for i, h in enumerate(runs):
            for step in h.resumes:
                if first is not None and step >= first:
                    plt.vline(step, colour(i))
        title = metric.title
        if metric.smoothed:
            title += f"  (smoothing {smoothing:g})"
        if last:
            title += f"  last {last:,} steps"
        if log:
            title += "  log scale"
        if any(h.resumes for h in runs):
            title += "  | resume " + ", ".join(str(s) for h in runs for s in h.resumes)
        if not lines:
            title += ": nothing logged yet"
        plt.title(title)
        self.drawn, self.title_text = lines, title  # what is on screen (tests read it)
        self.legend = legend  # (label, rich colour) per coloured line, for ChartLegend
        plt.xlabel("step")
        if lines:
            ticks = step_ticks(min(ln.steps[0] for ln in lines), max(ln.steps[-1] for ln in lines))
            plt.xticks(ticks, [f"{t / 1000:g}k" if t >= 10_000 else f"{t:,}" for t in ticks])
        if log and lines:
            plt.yscale("log")
        self.refresh()
        return len(lines)


class ChartLegend(Static):
    """The chart's legend on one line under the plot (plotext's own legend covers the curves at 80 columns)."""

    def show(self, legend: list[tuple[str, str]]) -> None:
        self.display = bool(legend)
        text = Text(no_wrap=True, overflow="ellipsis")
        for k, (label, style) in enumerate(legend):
            text.append(("   " if k else "") + "● ", style=style)
            text.append(label)
        self.update(text)


def step_ticks(lo: float, hi: float, n: int = 5) -> list[int]:
    """About n round step numbers across [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    span = max(hi - lo, 1.0)
    raw = span / max(n - 1, 1)
    power = 10 ** max(0, len(str(int(raw))) - 1)
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = int(-(-lo // step) * step)
    return list(range(first, int(hi) + 1, step)) or [int(lo)]


class ValuesPanel(Static):
    """Latest value of every metric, per run."""

    def show(self, runs: list[RunHistory], now: float | None = None) -> None:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(no_wrap=True, overflow="ellipsis")
        for i, (h, label) in enumerate(zip(runs, run_labels(runs))):
            if len(runs) > 1:
                grid.add_row(Text("●", style=colour(i, rich=True)), Text(label, style="bold"))
            e = h.last
            if e is None:
                grid.add_row("", "no train step yet")
                continue
            grid.add_row("loss", "-" if e.loss is None else f"{e.loss:.4f}")
            ev = h.series.get("eval_loss")
            if ev is not None and len(ev):
                grid.add_row("eval loss", f"{ev.points()[1][-1]:.4f}")
            for name, s in sorted(h.series.items()):
                if name.startswith("bench/"):
                    grid.add_row(name[6:], f"{s.points()[1][-1]:.1%}")
            grid.add_row("lr", "-" if e.lr is None else f"{e.lr:.2e}")
            grid.add_row("grad norm", "-" if e.grad_norm is None else f"{e.grad_norm:.3f}")
            grid.add_row("tokens/s", rate(e.tokens_per_s).removesuffix("/s"))
            grid.add_row("samples/s", rate(e.samples_per_s).removesuffix("/s"))
            mem = e.memory_gb_per_device or ([e.memory_gb] if e.memory_gb is not None else [])
            for d, v in enumerate(mem):
                util = f"  {e.gpu_util[d]:.0f}%" if e.gpu_util and d < len(e.gpu_util) else ""
                grid.add_row(f"mem {d}" if len(mem) > 1 else "memory", f"{v:.2f} GB{util}")
            if h.sampled_before:
                grid.add_row("", Text(f"curve sampled before step {h.sampled_before:,}", style="dim"))
            if h.bad_lines:
                grid.add_row("", Text(f"{h.bad_lines} unreadable line(s) skipped", style="yellow"))
        self.update(grid)


class CheckpointTable(DataTable):
    def on_mount(self) -> None:
        self.cursor_type = "none"
        self._runs = 0

    def show(self, runs: list[RunHistory]) -> None:
        if self._runs != len(runs) or not self.columns:
            self.clear(columns=True)
            self.add_columns(*([""] if len(runs) > 1 else []), "checkpoint", "size", "kept")
            self._runs = len(runs)
        self.clear()
        for i, h in enumerate(runs):
            kept = h.kept_checkpoints()
            for c in reversed(h.checkpoints):
                size = "-" if c.size_bytes is None else f"{c.size_bytes / 1e6:,.1f} MB"
                row = [f"step {c.step:,}" if c.step is not None else "-", size, "yes" if c.step in kept else "no"]
                self.add_row(*([Text("●", style=colour(i, rich=True))] if len(runs) > 1 else []), *row)


class EventLog(RichLog):
    """Warnings, stops with their diagnosis, resumes, evaluation results, checkpoints: newest at the bottom."""

    def __init__(self, **kwargs):
        super().__init__(markup=True, wrap=True, max_lines=500, **kwargs)
        self._shown: dict[int, int] = {}  # per run: events_total already written

    def reset(self) -> None:
        self._shown = {}

    def show(self, runs: list[RunHistory]) -> None:
        """Write what is new since the last call, all runs merged in time order (a log is read as one timeline;
        lines already written stay, so a late event of a slow-polled run lands at the bottom, not back in time)."""
        new_events = []  # (time, run, position, event)
        labels = run_labels(runs)
        for i, h in enumerate(runs):
            seen = self._shown.get(i, 0)
            if seen > h.events_total:
                seen = 0  # the history was reset (a new run in the same directory)
            new = min(h.events_total - seen, len(h.events))
            last_time = 0.0  # an event without a time keeps its place after its run's previous one
            for k, e in enumerate(list(h.events)[len(h.events) - new:]):
                last_time = e.time or last_time
                new_events.append((last_time, i, k, e))
            self._shown[i] = h.events_total
        for _, i, _, e in sorted(new_events, key=lambda t: t[:3]):
            line = describe(e)
            if line:
                stamp = time.strftime("%H:%M:%S", time.localtime(e.time)) if e.time else "--:--:--"
                tag = f"[{colour(i, rich=True)}]{labels[i]}[/] " if len(runs) > 1 else ""
                self.write(Text.from_markup(f"[dim]{stamp}[/] {tag}{line}"))
