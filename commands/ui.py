"""Terminal rendering shared by the commands: one console, error panels, a rich progress sink.

Only rich is imported here (cheap); commands import this, never the library's heavy modules at top level.
"""

from __future__ import annotations


from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def print_error(exc) -> None:
    """Render a medvl.errors.MedvlError: what / where / fix, no traceback."""
    from rich.panel import Panel
    from rich.text import Text

    body = Text(exc.what)
    if exc.where:
        body.append("\nwhere: ", style="bold").append(exc.where)
    if exc.fix:
        body.append("\nfix:   ", style="bold green").append(exc.fix)
    err_console.print(Panel(body, title="[bold red]error[/]", title_align="left", border_style="red", expand=False))


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
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.speed}/s"), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False)
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


class TrainConsole:
    """A metric sink that shows a training run: a live panel on a terminal, one plain line per log otherwise."""

    def __init__(self, console_: Console | None = None):
        self.console = console_ or console
        self.live = None
        self.losses: list[float] = []
        self.last: dict = {}
        self.start: dict = {}
        self.lines: list[str] = []

    def log(self, event: dict) -> None:
        kind = event.get("kind")
        if kind == "start":
            self.start = event
            self._print_table(event.get("table", []))
            self.console.print(f"[bold]run[/] {event['run_dir']}  family {event['family']}  "
                               f"{event['world_size']} process(es), {event['distributed']}, {event['device']}  "
                               f"global batch {event['global_batch']}  steps {event['start_step']}->{event['total_steps']}")
            if event.get("packing"):
                self.console.print(f"[dim]{event['packing']}[/]")
            if self.console.is_terminal:
                from rich.live import Live

                self.live = Live(self._panel(), console=self.console, refresh_per_second=4, transient=False)
                self.live.start()
            return
        if kind == "train":
            self.losses.append(event["loss"])
            self.last = event
            if self.live is None:
                self.console.print(self._line(event))
        elif kind == "eval":
            self._note(f"step {event['step']}: " + ", ".join(f"{k} {v}" for k, v in event.items()
                                                             if k not in ("kind", "step", "time", "benchmark")))
        elif kind == "warning":
            self._note(f"[yellow]warning[/] step {event['step']}: {event['message']}  ({event.get('hint', '')})")
        elif kind == "checkpoint":
            self._note(f"[dim]checkpoint {event['path']}[/]")
        elif kind == "end":
            self._note(f"[green]done[/] in {event['wall_s']} s -> {event['final_dir']}")
        if self.live is not None:
            self.live.update(self._panel())

    def _note(self, text: str) -> None:
        if self.live is not None:
            self.lines = (self.lines + [text])[-6:]
        else:
            self.console.print(text)

    @staticmethod
    def _line(e: dict) -> str:
        gn = "-" if e.get("grad_norm") is None else f"{e['grad_norm']:.3f}"
        return (f"step {e['step']}/{e['total_steps']}  loss {e['loss']:.4f}  lr {e['lr']:.2e}  grad {gn}  "
                f"{e['tokens_per_s']:.0f} tok/s  {e['samples_per_s']:.2f} samples/s  mem {e['memory_gb']:.2f} GB  "
                f"eta {e['eta_s']:.0f} s")

    def _panel(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.text import Text

        e = self.last
        total = self.start.get("total_steps", 1)
        step = e.get("step", self.start.get("start_step", 0))
        spark = _sparkline(self.losses[-60:])
        body = [ProgressBar(total=total, completed=step, width=60),
                Text(self._line(e) if e else "starting..."), Text(f"loss {spark}", style="cyan")]
        body += [Text.from_markup(line) for line in self.lines]
        return Panel(Group(*body), title=f"medvl train  {step}/{total}", border_style="blue")

    def _print_table(self, rows: list[dict]) -> None:
        from rich.table import Table

        table = Table(title="what trains", title_justify="left")
        for col in ("group", "params", "trainable", "mode", "lr"):
            table.add_column(col, justify="right" if col in ("params", "trainable", "lr") else "left")
        for r in rows:
            table.add_row(r["group"], f"{r['params']:,}", f"{r['trainable']:,}", r["mode"],
                          "-" if r["lr"] is None else f"{r['lr']:.2e}")
        self.console.print(table)

    def close(self) -> None:
        if self.live is not None:
            self.live.update(self._panel())
            self.live.stop()
            self.live = None


def _sparkline(values: list[float]) -> str:
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
        t.add_column("reason")
        t.add_column("n", justify="right")
        t.add_column("meaning")
        for code, n in m["rejected"].items():
            t.add_row(code, f"{n:,}", REJECTION_REASONS.get(code, ""))
        console.print(t)
        for r in result.rejections[:5]:
            console.print(f"  [dim]{r['location']}[/] {r['code']}: {r['message']}")
    src = Table(title="sources", title_justify="left")
    for col in ("source", "kept", "quarantined"):
        src.add_column(col, justify="left" if col == "source" else "right")
    for name, c in m["sources"].items():
        src.add_row(name, f"{c['accepted']:,}", f"{c['rejected']:,}")
    console.print(src)
    tl = m["token_lengths"]
    if tl["max"] is not None:
        hist = "  ".join(f"{k}: {v}" for k, v in tl["histogram"].items())
        console.print(f"tokens per sample: mean {tl['mean']}, max {tl['max']}   [dim]{hist}[/]")
        vt = m["visual_tokens_per_image"]
        if vt["max"] is not None:
            console.print(f"visual tokens per image: max {vt['max']}   "
                          f"[dim]{'  '.join(f'{k}: {v}' for k, v in vt['histogram'].items())}[/]")


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
        t.add_column(col, justify="left" if col == "data" else "right")
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
