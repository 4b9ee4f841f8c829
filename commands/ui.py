"""Terminal rendering shared by the commands: one console, error panels, a rich progress sink.

Only rich is imported here (cheap); commands import this, never the library's heavy modules at top level.
"""

from __future__ import annotations

import sys

from rich.console import Console

from medvl.tui.text import describe, duration, rate


def _console(stderr: bool = False) -> Console:
    """A terminal gets rich's usual console; a log file or a scheduler's pipe gets lines that are never wrapped
    (rich would fold them at 80 columns) and tables wide enough that no name is cut."""
    c = Console(stderr=stderr, highlight=False)
    if c.is_terminal:
        return c
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=max(c.width, 200))


console = _console()
err_console = _console(stderr=True)
# What a command knows that the Ctrl-C message needs (train: its run directory and save interval).
interrupt_context: dict = {}


def print_table(table) -> None:
    """A table on stdout; off a terminal at the width of its content, without rich's trailing padding (a log
    file or `| grep` gets lines as long as they need, no more)."""
    if console.is_terminal:
        console.print(table)
        return
    table.expand = False
    with console.capture() as cap:
        console.print(table)
    sys.stdout.write("\n".join(line.rstrip() for line in cap.get().splitlines()) + "\n")


def print_error(exc) -> None:
    """Render a medvl.errors.MedvlError: what / where / fix, no traceback."""
    from rich.panel import Panel
    from rich.text import Text

    if not err_console.is_terminal:  # a log file or a script: plain lines, never cut at the panel's edge
        lines = [f"error: {exc.what}"] + ([f"where: {exc.where}"] if exc.where else []) + \
                ([f"fix:   {exc.fix}"] if exc.fix else [])
        err_console.print(Text("\n".join(lines)))
        return
    body = Text(exc.what)
    if exc.where:
        body.append("\nwhere: ", style="bold").append(exc.where)
    if exc.fix:
        body.append("\nfix:   ", style="bold green").append(exc.fix)
    err_console.print(Panel(body, title="[bold red]error[/]", title_align="left", border_style="red", expand=False),
                      soft_wrap=False)


class RichProgress:
    """A ProgressSink that draws a bar with rate and ETA on a terminal and prints sparse lines otherwise."""

    def __init__(self, console_: Console | None = None, every: int = 1000):
        self.console = console_ or err_console
        self.every = every
        self._bar = None
        self._task = None
        self._name = ""
        self._done = 0
        self._total = None

    def start(self, task: str, total: int | None = None) -> None:
        self.finish()
        self._name, self._done, self._total = task, 0, total
        if self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            from rich.text import Text

            class RateColumn(ProgressColumn):
                def render(self, task):
                    return Text(rate(task.speed))

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
                                 transient=False)
            self._bar.start()
            self._task = self._bar.add_task(task, total=total)
        else:
            self.console.print(f"{task}: started" + (f" ({total} items)" if total else ""))

    def advance(self, n: int = 1) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)
        elif self.every and self._done % self.every < n:
            self.console.print(f"{self._name}: {self._done}" + (f"/{self._total}" if self._total else ""))

    def note(self, message: str) -> None:
        self.console.print(message)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self._name and not self.console.is_terminal:
            self.console.print(f"{self._name}: done ({self._done})")
        self._name = ""


def quiet_library_progress_bars() -> None:
    """transformers' and the hub's own tqdm bars ("Loading weights", "Writing model shards") draw through the
    live panel on a terminal and fill log files with carriage returns; medvl shows its own progress."""
    import os
    import sys

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub / transformers are imported
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class TrainConsole:
    """A metric sink that shows a training run: a live panel on a terminal, one plain line per log step
    otherwise. Reads the typed events of medvl.engine.metrics."""

    def __init__(self, console_: Console | None = None):
        self.console = console_ or console
        self.live = None
        self.losses: list[float] = []
        self.last = None
        self.start = None
        self.lines: list[str] = []
        quiet_library_progress_bars()

    def log(self, event) -> None:
        from medvl.engine import metrics as m

        if isinstance(event, m.StartEvent):
            self.start = event
            if event.finished_at is not None:
                self.console.print(f"[bold]extending[/] the finished run from step {event.finished_at} to "
                                   f"{event.total_steps} steps: resumed from {event.resumed_from}; final/ is "
                                   "replaced when it ends")
            elif event.is_resume:
                self.console.print(f"[bold]resumed[/] at step {event.start_step} from {event.resumed_from}")
            else:
                self._print_table(event.table)
            procs = ("1 process" if event.distributed in (None, "NO") and event.world_size == 1
                     else f"{event.world_size} processes ({event.distributed})")  # NO: accelerate's "not distributed"
            self.console.print(f"[bold]run[/] {event.run_dir}  family {event.family}  {procs}, {event.device}  "
                               f"global batch {event.global_batch}  steps {event.start_step}->{event.total_steps}")
            for note in (event.packing, event.text_tokens):
                if note:
                    self.console.print(f"[dim]{note}[/]")
            if self.console.is_terminal and self.live is None:
                from rich.live import Live

                self.live = Live(self._panel(), console=self.console, refresh_per_second=4, transient=False,
                                 redirect_stderr=True)
                self.live.start()
            return
        if isinstance(event, m.TrainEvent):
            if event.loss is not None:
                self.losses = (self.losses + [event.loss])[-200:]
            self.last = event
            if self.live is None:
                self.console.print("  ".join(self._chunks(event, progress=True)), soft_wrap=True)
        else:
            self._note(describe(event))
        if self.live is not None:
            self.live.update(self._panel())

    def _note(self, text: str | None) -> None:
        if not text:
            return
        if self.live is not None:
            self.lines = (self.lines + [text])[-6:]
        else:
            self.console.print(text, soft_wrap=True)

    @staticmethod
    def _chunks(e, *, progress: bool) -> list[str]:
        """The metrics of a train event as short 'name value' pieces (wrapped only between pieces)."""
        out = [f"step {e.step}/{e.total_steps}"] if progress else []
        out.append("loss -" if e.loss is None else f"loss {e.loss:.4f}")
        out.append("lr -" if e.lr is None else f"lr {e.lr:.2e}")
        out.append("grad -" if e.grad_norm is None else f"grad {e.grad_norm:.3f}")
        out += [rate(e.tokens_per_s, "tok"), rate(e.samples_per_s, "samples")]
        mem = e.memory_gb_per_device or ([e.memory_gb] if e.memory_gb is not None else [])
        if mem:
            out.append("mem " + "/".join(f"{v:.2f}" for v in mem) + " GB")
        if e.gpu_util:
            out.append("gpu " + "/".join(f"{v:.0f}" for v in e.gpu_util) + " %")
        out.append(f"eta {duration(e.eta_s)}")
        return out

    def _panel(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        e, s = self.last, self.start
        total = (e.total_steps if e else None) or (s.total_steps if s else None) or 1
        step = e.step if e else (s.start_step if s else 0)
        inner = max(20, self.console.width - 4)  # panel border and padding
        bar = Table.grid(expand=True, padding=(0, 1))
        bar.add_column(ratio=1)
        bar.add_column(no_wrap=True, justify="right")
        epoch = f"  epoch {e.epoch:.2f}" if e and e.epoch is not None else ""
        bar.add_row(ProgressBar(total=total, completed=step), f"{step / total:.0%}  step {step}/{total}{epoch}")
        body = [bar, Text("\n".join(_wrap(self._chunks(e, progress=False), inner)) if e else "starting...")]
        spark = _sparkline(self.losses[-(inner - 16):])
        if spark:
            body.append(Text(f"loss {spark}", style="cyan", no_wrap=True, overflow="ellipsis"))
        for line in self.lines:
            note = Text.from_markup(line, overflow="ellipsis")
            note.no_wrap = True
            body.append(note)
        title = f"medvl train  {s.recipe or ''}" if s else "medvl train"
        return Panel(Group(*body), title=title, title_align="left", border_style="blue")

    def _print_table(self, rows: list[dict]) -> None:
        from rich.table import Table

        table = Table(title="what trains", title_justify="left")
        for col in ("group", "params", "trainable", "mode", "lr"):
            table.add_column(col, justify="right" if col in ("params", "trainable", "lr") else "left",
                             overflow="fold")
        for r in rows:
            table.add_row(r["group"], f"{r['params']:,}", f"{r['trainable']:,}", r["mode"],
                          "-" if r["lr"] is None else f"{r['lr']:.2e}")
        self.console.print(table)

    def close(self) -> None:
        if self.live is not None:
            self.live.update(self._panel())
            self.live.stop()
            self.live = None


def _wrap(chunks: list[str], width: int) -> list[str]:
    lines, cur = [], ""
    for c in chunks:
        if cur and len(cur) + 2 + len(c) > width:
            lines.append(cur)
            cur = c
        else:
            cur = f"{cur}  {c}" if cur else c
    return lines + ([cur] if cur else [])


def _sparkline(values: list[float]) -> str:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return ""
    bars = "▁▂▃▄▅▆▇█"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(bars[int((v - lo) / span * (len(bars) - 1))] for v in values) + f"  {values[-1]:.4f}"


def render_dry_run(plan) -> None:
    from rich.syntax import Syntax
    from rich.table import Table

    console.print(Syntax(plan.resolved_yaml, "yaml", theme="ansi_dark", background_color="default"))
    for note in plan.notes:
        console.print(f"[yellow]note[/] {note}")
    TrainConsole(console)._print_table(plan.table)
    if plan.launch:
        from medvl.engine.launch import format_command

        console.print(f"[bold]launch[/] {format_command(plan.launch)}")
    else:
        console.print("[bold]launch[/] in this process (one process)")
    mem = Table(title="memory per GPU (estimate)", title_justify="left")
    mem.add_column("part")
    mem.add_column("GiB", justify="right")
    for k, v in plan.memory.items():
        mem.add_row(k, f"{v:.2f}")
    console.print(mem)


def render_prepare(result) -> None:
    from rich.table import Table

    from medvl.data.schema import REJECTION_REASONS

    m = result.manifest
    console.print(f"[bold]{m['accepted']:,}[/] of {m['inputs']:,} samples kept -> {result.out_dir}  "
                  f"({m['images']:,} images, {m['repaired']:,} repaired, {m['shards']} shard(s)"
                  + (f", {result.skipped_shards} already done" if result.skipped_shards else "") + ")")
    if m["rejected"]:
        t = Table(title=f"quarantined: {m['rejected_total']:,} (details: {result.out_dir}/quarantine.jsonl)",
                  title_justify="left")
        t.add_column("reason", overflow="fold")
        t.add_column("n", justify="right")
        t.add_column("meaning", overflow="fold")
        for code, n in m["rejected"].items():
            t.add_row(code, f"{n:,}", REJECTION_REASONS.get(code, ""))
        console.print(t)
        for r in result.rejections[:5]:
            console.print(f"  [dim]{r['location']}[/] {r['code']}: {r['message']}")
    src = Table(title="sources", title_justify="left")
    for col in ("source", "kept", "quarantined"):
        src.add_column(col, justify="left" if col == "source" else "right", overflow="fold")
    for name, c in m["sources"].items():
        src.add_row(name, f"{c['accepted']:,}", f"{c['rejected']:,}")
    console.print(src)
    _render_files(result)
    tl = m["token_lengths"]
    if tl["max"] is not None:
        hist = "  ".join(f"{k}: {v}" for k, v in tl["histogram"].items())
        console.print(f"tokens per sample: mean {tl['mean']}, max {tl['max']}   [dim]{hist}[/]")
        vt = m["visual_tokens_per_image"]
        if vt["max"] is not None:
            console.print(f"visual tokens per image: max {vt['max']}   "
                          f"[dim]{'  '.join(f'{k}: {v}' for k, v in vt['histogram'].items())}[/]")


def _render_files(result) -> None:
    """Folder entries not read (grouped by reason), file warnings, every file-level failure, then the verdict."""
    from collections import Counter

    reasons = Counter(s["reason"] for s in result.skipped_files)
    for reason, n in reasons.items():
        first = next(s["path"] for s in result.skipped_files if s["reason"] == reason)
        console.print(f"[dim]skipped {n} file(s) ({first}{', ...' if n > 1 else ''}): {reason}[/]")
    for warning in result.manifest.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}")
    for f in result.failed_files:
        console.print(f"[red]file failed:[/] {f['error']}")
    if result.failed_files:
        console.print(f"[red]{len(result.failed_files)} of {len(result.files)} input file(s) failed[/]; the others "
                      f"were prepared. Fix them and run the command again: this output is then replaced.")
    elif result.manifest["accepted"] == 0:
        console.print("[red]nothing was kept[/]: every sample was quarantined (reasons above).")


def render_inspection(ins) -> None:
    from rich.text import Text

    console.print(f"[bold]{ins.sample_id}[/]  [dim]{ins.location}[/]")
    if ins.rejected:
        console.print(f"[red]would be skipped in training:[/] {ins.rejected}")
        return
    text = Text()
    styles = {"context": "dim", "trained": "bold green", "image": "magenta"}
    for chunk, kind in ins.spans:
        text.append(chunk, style=styles[kind])
    console.print(text)
    console.print(f"\n{ins.n_tokens} tokens, [bold green]{ins.n_trained} trained[/], "
                  f"[magenta]{len(ins.image_tokens)} image(s): {', '.join(map(str, ins.image_tokens)) or '-'} "
                  "visual tokens[/]  (legend: [dim]context[/] [bold green]trained[/] [magenta]▒ image[/])")
    for r in ins.repairs:
        console.print(f"[yellow]repaired:[/] {r}")


def render_demo(result) -> None:
    from rich.table import Table

    t = Table(title=f"held-out accuracy after {result.steps} steps ({result.train_seconds} s of training)",
              title_justify="left")
    for col in ("data", "n", "medvl tiny model", f"majority answer ('{result.majority_answer}')"):
        t.add_column(col, justify="left" if col == "data" else "right", overflow="fold")
    for name, (acc, n) in result.accuracy.items():
        base = result.baseline.get(name)
        style = "bold" if name == "overall" else ""
        t.add_row(name, str(n), f"[{style or 'default'}]{acc:.1%}[/]", "-" if base is None else f"{base:.1%}",
                  style=style)
    console.print(t)
    acc, base = result.accuracy["overall"][0], result.baseline["overall"]
    verdict = "[green]learned[/]" if acc > base + 0.15 else "[yellow]did not clearly beat the baseline[/]"
    console.print(f"{verdict}: {acc:.1%} vs {base:.1%} for the majority answer; training loss "
                  f"{result.loss_first:.2f} -> {result.loss_last:.2f}.  Files: {result.out_dir}/ "
                  "(raw, data, run/final, eval/predictions.jsonl)")
    if result.chat_command:
        from rich.markup import escape

        console.print(f"Talk to it:  [bold]{escape(result.chat_command)}[/]")
