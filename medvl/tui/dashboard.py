"""The live training dashboard: `medvl watch RUN [RUN ...]` and `medvl train RECIPE --tui`.

It reads run directories only (RUN/metrics.jsonl through medvl.engine.history), twice a second, so it attaches
to a run that is going, finished, crashed or not started yet, from any terminal, and quitting it never touches
the run. With `medvl train --tui` it also holds the background training process (medvl.engine.background):
closing then asks whether to stop training or leave it running, and says how to re-attach.

Keys: m / M next / previous metric (or 1-9), l log scale, s / S more / less smoothing (0 to 0.99), z zoom to the last N
steps, p save the charts as a PNG next to the run, ctrl+s save this screen as an SVG next to the run, q quit.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Label

from medvl.engine.curves import METRICS
from medvl.engine.history import RunHistory
from medvl.engine.curves import run_labels
from medvl.tui.dashboard_widgets import (ChartLegend, CheckpointTable, EventLog, MetricChart, RunHeader,
                                         RunProgress, ValuesPanel)

SMOOTHING = (0.0, 0.6, 0.8, 0.9, 0.95, 0.99)
ZOOM = (None, 100, 1_000, 10_000, 100_000)
POLL_S = 0.5


class QuitScreen(ModalScreen[str]):
    """Asked when training started by this dashboard is still running."""

    BINDINGS = [Binding("s", "choose('stop')", "stop training"), Binding("l", "choose('leave')", "leave it running"),
                Binding("escape,c", "choose('cancel')", "cancel")]

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = run_dir

    def compose(self) -> ComposeResult:
        with Vertical(id="quit-dialog"):
            yield Label("Training is still running.", id="quit-title")
            yield Label(f"Leave it running and re-attach later with:  medvl watch {self.run_dir}")
            with Horizontal(id="quit-buttons"):
                yield Button("Stop training (s)", variant="error", id="stop")
                yield Button("Leave it running (l)", variant="primary", id="leave")
                yield Button("Cancel (esc)", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id)

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)


class Dashboard(App[str]):
    CSS_PATH = "dashboard.tcss"
    TITLE = "medvl"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("m", "metric(1)", "metric"), Binding("M", "metric(-1)", "prev metric", show=False),
        Binding("l", "toggle_log", "log scale"), Binding("s", "smoothing(1)", "smoothing"),
        Binding("S", "smoothing(-1)", "less smoothing", show=False), Binding("z", "zoom", "zoom last N"),
        Binding("p", "save_png", "save PNG"), Binding("q", "quit_dashboard", "quit"),
        Binding("ctrl+q,ctrl+c", "quit_dashboard", show=False, priority=True),
        Binding("ctrl+s", "save_svg", show=False),
        *[Binding(str(i + 1), f"pick({i})", show=False) for i in range(len(METRICS))],
    ]

    def __init__(self, run_dirs: list[str | Path], *, trainer=None, ignore_existing: bool = False,
                 metric: str = "loss", smoothing: float = 0.6, poll_s: float = POLL_S):
        super().__init__()
        # quick: a long file opens with its train curves at once; the complete history (evals, checkpoints,
        # resumes of the sampled stretch) is read in a thread and swapped in (a 500k-step file: ~0.1 s vs ~0.7 s)
        self.runs = [RunHistory(d, ignore_existing=ignore_existing, quick=True) for d in run_dirs]
        self.trainer = trainer  # a medvl.engine.background.BackgroundRun for `train --tui`, else None
        self.metric_index = next((i for i, m in enumerate(METRICS) if m.key == metric), 0)
        self.smoothing = smoothing
        self.zoom_index = 0
        self.log_scale = False
        self.poll_s = poll_s
        self._versions: list[tuple] = []
        self._trainer_code: int | None = None
        self.saved: list[Path] = []

    @property
    def metric(self):
        return METRICS[self.metric_index]

    def compose(self) -> ComposeResult:
        # kept as attributes: the poll timer must reach them while the quit dialog is the active screen
        self.header = RunHeader(id="header")
        self.bars = [RunProgress(i, classes="run-progress") for i in range(len(self.runs))]
        self.chart = MetricChart(id="chart")
        self.legend = ChartLegend(id="legend")
        self.values = ValuesPanel(id="values")
        self.checkpoints = CheckpointTable(id="checkpoints")
        self.event_log = EventLog(id="events")
        yield self.header
        with Vertical(id="progress"):
            yield from self.bars
        with Horizontal(id="main"):
            with Vertical(id="chart-box"):
                yield self.chart
                yield self.legend
            with Vertical(id="side"):
                yield self.values
                yield self.checkpoints
        yield self.event_log
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_all(force=True)
        self.call_after_refresh(self.refresh_all, True)  # once every child is mounted
        self.set_interval(self.poll_s, self.refresh_all)

    # ---------------------------------------------------------------------------------------------- redraw
    def refresh_all(self, force: bool = False) -> None:
        for i, h in enumerate(self.runs):
            h.poll()
            if h.incomplete:
                h.incomplete = False
                # after the first frame is on screen: the reading thread competes with it for the GIL
                self.set_timer(0.3, lambda i=i: self._complete_history(i))
        if self.trainer is not None and self._trainer_code is None:
            self._trainer_code = self.trainer.poll()
            if self._trainer_code is not None:
                self._trainer_ended(self._trainer_code)
        now = time.time()
        versions = [(h.version, h.status(), h.events_total) for h in self.runs]
        names = run_labels(self.runs) if len(self.runs) > 1 else [""] * len(self.runs)
        names = [n.ljust(min(max(map(len, names)), 15)) for n in names]  # bars start in one column
        for bar, h, name in zip(self.bars, self.runs, names):
            bar.show(h, now, name)  # elapsed and ETA move on every poll
        self.header.show(self.runs, self._trainer_line())
        if not force and versions == self._versions:
            return
        self._versions = versions
        self.redraw_chart()
        self.values.show(self.runs, now)
        self.checkpoints.show(self.runs)
        self.event_log.show(self.runs)

    @work(thread=True, exit_on_error=False)
    def _complete_history(self, index: int) -> None:
        full = RunHistory(self.runs[index].run_dir)
        full.poll()
        self.call_from_thread(self._swap_history, index, full)

    def _swap_history(self, index: int, full: RunHistory) -> None:
        full.poll()  # catch up with what was written meanwhile
        self.runs[index] = full
        self.event_log.clear()
        self.event_log.reset()
        self.refresh_all(force=True)

    def redraw_chart(self) -> None:
        self.chart.draw(self.runs, self.metric, smoothing=self.smoothing, last=ZOOM[self.zoom_index],
                        log=self.log_scale)
        self.legend.show(self.chart.legend)

    def _trainer_line(self) -> str:
        if self.trainer is None:
            return ""
        # short: the header cuts its lines at the terminal's width, and the log's path is what must show
        log = Path(self.trainer.log_path)
        try:
            log = log.resolve().relative_to(Path.cwd())
        except ValueError:  # outside the working directory: the full path
            pass
        if self._trainer_code is None:
            return f"training in the background (pid {self.trainer.pid}); its output: {log}"
        return f"training ended (exit code {self._trainer_code}); its output: {log}"

    def _trainer_ended(self, code: int) -> None:
        if isinstance(self.screen, QuitScreen):  # the user was leaving anyway; the question is moot now
            self.exit(self._exit_message("ended"))
            return
        log = self.event_log
        if code == 0:
            log.write("[green]training process finished[/]")
            return
        log.write(f"[red]training process exited with code {code}[/]; its last lines:")
        for line in self.trainer.tail(12):
            log.write(Text("  " + line, style="dim"))

    # --------------------------------------------------------------------------------------------- actions
    def action_metric(self, delta: int) -> None:
        """Next metric that some run has logged (all of them in turn while nothing is logged yet)."""
        for _ in METRICS:
            self.metric_index = (self.metric_index + delta) % len(METRICS)
            if any(h.series_for(self.metric) for h in self.runs) or not any(h.series for h in self.runs):
                break
        self.redraw_chart()

    def action_pick(self, index: int) -> None:
        self.metric_index = index
        self.redraw_chart()

    def action_toggle_log(self) -> None:
        self.log_scale = not self.log_scale
        self.redraw_chart()

    def action_smoothing(self, delta: int) -> None:
        """s / S: one step more / less, stopping at 0.99 and at 0 (a wrap from heaviest to raw reads as a bug)."""
        i = min(range(len(SMOOTHING)), key=lambda k: abs(SMOOTHING[k] - self.smoothing))
        j = max(0, min(len(SMOOTHING) - 1, i + delta))
        self.smoothing = SMOOTHING[j]
        end = "  (the most)" if j == len(SMOOTHING) - 1 else "  (none: raw values)" if j == 0 else ""
        applies = "" if self.metric.smoothed else f"; {self.metric.title} is drawn unsmoothed"
        self.notify(f"smoothing {self.smoothing:g}{end}{applies}", timeout=2)
        self.redraw_chart()

    def action_zoom(self) -> None:
        self.zoom_index = (self.zoom_index + 1) % len(ZOOM)
        self.redraw_chart()

    def action_save_png(self) -> None:
        self.notify("saving the charts as PNG ...", timeout=2)
        self._save_png()

    @work(thread=True, exclusive=True, exit_on_error=False)
    def _save_png(self) -> None:
        from medvl.errors import MedvlError
        from medvl.plot import save_plot

        run_dir = self.runs[0].run_dir
        out = run_dir / f"curves-{time.strftime('%Y%m%d-%H%M%S')}.png"
        try:
            if not run_dir.is_dir():
                raise MedvlError(f"{run_dir} does not exist (yet)")
            save_plot(self.runs, out, smoothing=self.smoothing, last=ZOOM[self.zoom_index],
                      log=(self.metric.key,) if self.log_scale else ())
        except Exception as exc:  # the dashboard stays up whatever the figure does; the user sees why
            self.call_from_thread(self.notify, f"PNG not saved: {getattr(exc, 'what', exc)}", severity="error")
            return
        self.saved.append(out)
        self.call_from_thread(self.notify, f"saved {out}", timeout=6)

    def action_save_svg(self) -> None:
        run_dir = self.runs[0].run_dir
        folder = run_dir if run_dir.is_dir() else Path.cwd()
        name = self.save_screenshot(f"dashboard-{time.strftime('%Y%m%d-%H%M%S')}.svg", str(folder))
        self.notify(f"saved {name}", timeout=6)

    def action_quit_dashboard(self) -> None:
        if self.trainer is None or self.trainer.poll() is not None:
            self.exit(self._exit_message("left"))
            return
        self.push_screen(QuitScreen(self.runs[0].run_dir), self._quit_choice)

    def _quit_choice(self, choice: str | None) -> None:
        if choice == "leave":
            self.exit(self._exit_message("left running"))
        elif choice == "stop":
            self.notify("stopping training (as Ctrl-C would) ...", timeout=30)
            self._stop_and_exit()

    @work(thread=True, exclusive=True)
    def _stop_and_exit(self) -> None:
        code = self.trainer.stop()
        self.call_from_thread(self.exit, self._exit_message(f"stopped (exit code {code})"))

    def _exit_message(self, what: str) -> str:
        run_dir = self.runs[0].run_dir
        if self.trainer is None:
            return ""
        if what == "left running":
            return (f"training continues in the background (pid {self.trainer.pid}); output: {self.trainer.log_path}\n"
                    f"re-attach with:  medvl watch {run_dir}")
        if what.startswith("stopped"):
            return (f"training {what}; output: {self.trainer.log_path}\n"
                    f"continue it with:  medvl train ... --resume auto   (recipe saved in {run_dir / 'recipe.yaml'})")
        code = self.trainer.poll()
        return f"training ended (exit code {code}); output: {self.trainer.log_path}; run: {run_dir}"


def dashboard_for_training(recipe: str, overrides: list[str], resume: str | None, run_dir: str | Path,
                           **kwargs) -> Dashboard:
    """Start `medvl train RECIPE k=v ...` as a background process and return the dashboard on its run directory."""
    from medvl.engine.background import BackgroundRun

    # Without --resume the directory may still hold the previous run's metrics.jsonl until the new run
    # replaces it: the dashboard notes that file before training starts and shows "waiting" until it changes.
    app = Dashboard([run_dir], ignore_existing=not resume, **kwargs)
    app.trainer = BackgroundRun(recipe, overrides, resume, run_dir=run_dir)
    return app


def train_with_dashboard(recipe: str, overrides: list[str], resume: str | None, run_dir: str | Path) -> str:
    """`medvl train --tui`: returns what to tell the user once the dashboard closes (training stopped, or left
    running and how to re-attach)."""
    app = dashboard_for_training(recipe, overrides, resume, run_dir)
    message = app.run()
    if message is None:  # closed some other way: say where training is
        message = app._exit_message("left running" if app.trainer.poll() is None else "ended")
    return message
