"""Plain-text pieces shared by the console view (commands/ui.py) and the dashboard: rates, durations and one
line per metric event, as rich markup. No textual import here, so the console pays nothing for it."""

from __future__ import annotations


def rate(per_s: float | None, unit: str = "") -> str:
    """A rate as a person reads it: 20,531/s, 12.3/s, 0.412/s (never 20531.24880018749/s)."""
    if per_s is None:
        return "-"
    text = f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.1f}" if per_s >= 10 else f"{per_s:.3g}"
    return f"{text} {unit}/s" if unit else f"{text}/s"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def describe(event) -> str | None:
    """One line (rich markup) for a non-train event: the console's notes and the dashboard's event log."""
    from medvl.engine import metrics as m

    at = f"step {event.step}: " if event.step is not None else ""
    if isinstance(event, m.EvalEvent):
        parts = []
        if event.eval_loss is not None:
            parts.append(f"eval loss {event.eval_loss:.4f}")
        if event.benchmark_accuracy is not None:
            parts.append(f"benchmark {event.benchmark_accuracy:.1%} (n {event.benchmark_n})")
            parts += [f"{k} {v.get('acc', 0):.1%}" for k, v in (event.benchmark or {}).items() if isinstance(v, dict)]
        return at + ", ".join(parts)
    if isinstance(event, m.WarningEvent):
        return f"[yellow]warning[/] {at}{event.message}" + (f"  ({event.hint})" if event.hint else "")
    if isinstance(event, m.CheckpointEvent):
        size = f" ({event.size_bytes / 1e6:,.1f} MB)" if event.size_bytes is not None else ""
        return f"[dim]checkpoint {event.path}{size}[/]"
    if isinstance(event, m.EndEvent):
        return f"[green]done[/] in {duration(event.wall_s)} -> {event.final_dir}"
    if isinstance(event, m.StopEvent):
        # the reason once: "interrupted (Ctrl-C or SIGINT)" already starts with its reason "interrupted"
        message, reason = event.message or "", event.reason or ""
        head = "stopped:" if not reason or message.startswith(reason) else f"stopped ({reason})"
        return f"[red]{head}[/] {message}".rstrip() + (f"  fix: {event.fix}" if event.fix else "")
    if isinstance(event, m.StartEvent) and event.finished_at is not None:
        return (f"[cyan]extending[/] the finished run from step {event.finished_at} to {event.total_steps} steps "
                f"(resumed from {event.resumed_from or 'its last checkpoint'})")
    if isinstance(event, m.StartEvent):
        return (f"[cyan]resumed[/] at step {event.start_step} from {event.resumed_from or 'a checkpoint'}"
                if event.is_resume else f"started: {event.total_steps} steps, {event.world_size} process(es)")
    if isinstance(event, m.OtherEvent) and event.kind == "recipe_change":
        return at + recipe_change(event.extra)
    if isinstance(event, m.OtherEvent):
        return f"{event.kind} {at}" + ", ".join(f"{k} {v}" for k, v in event.extra.items())
    return None


def recipe_change(extra: dict) -> str:
    """A recipe_change line (medvl.engine.checkpoint.recipe_change_event) as words, not a dict's repr."""
    changes = extra.get("changes") if isinstance(extra.get("changes"), dict) else {}
    changed = ", ".join(f"{k} {v.get('checkpoint')} -> {v.get('now')}" if isinstance(v, dict) else str(k)
                        for k, v in changes.items())
    forced = extra.get("forced") if isinstance(extra.get("forced"), list) else []
    return f"recipe changed on resume: {changed}" + (f" [yellow](forced: {', '.join(forced)})[/]" if forced else "")
