"""Metric events (typed records) and where they go.

`RUN/metrics.jsonl` is the contract between the engine and every reader (the rich console, the Textual
dashboard, `medvl plot`, TensorBoard/W&B/SwanLab sinks, a user's script): one JSON object per line, flushed per
line, written by rank 0 only. Each line is one event below, `{"time": ..., "kind": ..., fields...}`; the README
("Watching a run") documents the fields. Writers build these dataclasses; readers get them back with
`event_from_dict`, which never raises: a missing field is None, a field of the wrong type is None, a field this
version does not know is kept in `extra`, an unknown kind becomes an `OtherEvent`. So a file from an older or
newer medvl still reads.

Resumes: a resumed run appends to the same file, starting with a `start` event whose `start_step` > 0 and
`resumed_from` names the checkpoint. Train points written before it with a step above `start_step` were re-run
and are superseded: readers drop them and draw one curve with a resume mark at `start_step`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Protocol


@dataclass(kw_only=True)
class Event:
    KIND: ClassVar[str] = ""
    time: float | None = None
    step: int | None = None
    extra: dict = field(default_factory=dict)
    """Fields this version of medvl does not know (written by a newer one), kept as read."""

    @property
    def kind(self) -> str:
        return self.KIND

    def to_dict(self) -> dict:
        out: dict = {} if self.time is None else {"time": self.time}
        out["kind"] = self.kind
        for f in fields(self):
            if f.name not in ("time", "extra", "name") and (value := getattr(self, f.name)) is not None:
                out[f.name] = value
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)  # NaN/inf as JSON's NaN/Infinity (json reads them)


@dataclass(kw_only=True)
class StartEvent(Event):
    """Run facts; written once per process start (again, with `start_step` > 0, after each resume)."""

    KIND: ClassVar[str] = "start"
    run_dir: str | None = None
    recipe: str | None = None
    model: str | None = None
    family: str | None = None
    method: str | None = None
    total_steps: int | None = None
    start_step: int = 0
    resumed_from: str | None = None
    world_size: int = 1
    global_batch: int | None = None
    steps_per_epoch: int | None = None
    samples: int | None = None
    dropped_per_epoch: int | None = None
    trainable_params: int | None = None
    table: list = field(default_factory=list)
    distributed: str | None = None
    device: str | None = None
    keep_last: int | None = None
    packing: str | None = None
    """How data.packing resolved on this machine ("packed rows, attention per sample (sdpa)" / "padded ...")."""
    text_tokens: str | None = None
    """Where the samples' text tokens come from: stored by prepare-data, or encoded in the loader (and why)."""
    pid: int | None = None
    host: str | None = None
    finished_at: int | None = None
    """Set when this start extends a run that had finished: the step it had ended at (total_steps is the new end)."""

    @property
    def is_resume(self) -> bool:
        return bool(self.resumed_from) or (self.start_step or 0) > 0


@dataclass(kw_only=True)
class TrainEvent(Event):
    KIND: ClassVar[str] = "train"
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    samples_per_s: float | None = None
    input_tokens_per_s: float | None = None
    memory_gb: float | None = None
    """The largest of memory_gb_per_device (CUDA: peak allocated; CPU: resident set of the process)."""
    memory_gb_per_device: list | None = None
    gpu_util: list | None = None
    """Per device, percent, where the machine can tell (NVML); else absent."""
    mfu: float | None = None
    """Model FLOPs utilisation, 0-1: 16-bit runs on a GPU whose peak is known (medvl/engine/throughput.py)."""
    eta_s: float | None = None
    rejected: int | None = None


@dataclass(kw_only=True)
class EvalEvent(Event):
    """Eval loss on the validation split, or benchmark accuracy (overall and per suite) with the step's weights."""

    KIND: ClassVar[str] = "eval"
    eval_loss: float | None = None
    benchmark_accuracy: float | None = None
    benchmark_n: int | None = None
    benchmark: dict | None = None
    """{suite: {"acc": float, "n": int}}"""


@dataclass(kw_only=True)
class WarningEvent(Event):
    KIND: ClassVar[str] = "warning"
    code: str | None = None
    message: str | None = None
    hint: str | None = None


@dataclass(kw_only=True)
class CheckpointEvent(Event):
    KIND: ClassVar[str] = "checkpoint"
    path: str | None = None
    size_bytes: int | None = None
    keep_last: int | None = None
    """The run keeps the newest keep_last checkpoints; older ones are deleted when a newer one is written."""


@dataclass(kw_only=True)
class EndEvent(Event):
    KIND: ClassVar[str] = "end"
    final_dir: str | None = None
    wall_s: float | None = None


@dataclass(kw_only=True)
class StopEvent(Event):
    """The run stopped before its end: `reason` error (a diagnosed stop, e.g. NaN), interrupted, or crashed."""

    KIND: ClassVar[str] = "stop"
    reason: str | None = None
    message: str | None = None
    fix: str | None = None


@dataclass(kw_only=True)
class OtherEvent(Event):
    """A kind this version does not know; shown as text by readers."""

    name: str = "?"

    @property
    def kind(self) -> str:
        return self.name


EVENT_TYPES: dict[str, type[Event]] = {c.KIND: c for c in (StartEvent, TrainEvent, EvalEvent, WarningEvent,
                                                              CheckpointEvent, EndEvent, StopEvent)}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# One converter per field type: the value if it fits (ints read as floats where a float is expected), else None.
_CONVERT = {
    "float": lambda v: float(v) if _number(v) else None,
    "int": lambda v: int(v) if _number(v) and math.isfinite(v) else None,
    "str": lambda v: v if isinstance(v, str) else str(v) if _number(v) else None,
    "list": lambda v: v if isinstance(v, list) else None,
    "dict": lambda v: v if isinstance(v, dict) else None,
}
_FIELDS: dict[type, dict] = {}


def _converters(cls: type[Event]) -> dict:
    conv = _FIELDS.get(cls)
    if conv is None:  # annotations are strings ("float | None"): the first word names the type
        conv = _FIELDS[cls] = {f.name: _CONVERT[str(f.type).split(" ")[0]] for f in fields(cls) if f.name != "extra"}
    return conv


def event_from_dict(raw: dict) -> Event:
    """The typed event of one parsed line; never raises (see the module docstring)."""
    if not isinstance(raw, dict):
        return OtherEvent(name="invalid", extra={"value": raw})
    kind = raw.get("kind")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        return OtherEvent(name=str(kind), time=_CONVERT["float"](raw.get("time")),
                          step=_CONVERT["int"](raw.get("step")),
                          extra={k: v for k, v in raw.items() if k not in ("kind", "time", "step")})
    conv = _converters(cls)
    kwargs, extra = {}, {}
    for k, v in raw.items():
        c = conv.get(k)
        if c is not None:
            if v is not None and (value := c(v)) is not None:
                kwargs[k] = value
        elif k != "kind":
            extra[k] = v
    return cls(extra=extra, **kwargs)


def as_event(event: Event | dict) -> Event:
    return event if isinstance(event, Event) else event_from_dict(event)


def parse_line(line: str | bytes) -> Event | None:
    """One metrics.jsonl line -> event; None for a blank or unparsable (e.g. half-written) line."""
    try:
        raw = json.loads(line)
    except ValueError:
        return None
    return event_from_dict(raw)


# ---------------------------------------------------------------------------------------------------- sinks
class MetricSink(Protocol):
    def log(self, event: Event) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    _open: ClassVar[dict[Path, JsonlSink]] = {}  # metrics files this process is writing (see record_stop)

    def __init__(self, path: str | Path, *, append: bool = False):
        self.path = Path(path)
        self._f = open(self.path, "a" if append else "w", encoding="utf-8")
        JsonlSink._open[self.path.resolve()] = self

    def log(self, event: Event) -> None:
        self._f.write(event.to_json() + "\n")
        self._f.flush()

    def close(self) -> None:
        JsonlSink._open.pop(self.path.resolve(), None)
        self._f.close()


class ListSink:
    """Keeps events in memory as the dicts metrics.jsonl would hold (tests, an in-process caller)."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def log(self, event: Event) -> None:
        self.events.append(event.to_dict())

    def close(self) -> None:
        pass


def scalars(event: Event | dict) -> dict[str, float] | None:
    """`train/loss`-style scalars of a train or eval event (None for other events): what the trackers
    (medvl/engine/trackers.py) plot."""
    event = as_event(event)
    if not isinstance(event, (TrainEvent, EvalEvent)) or event.step is None:
        return None
    out = {}
    for f in fields(event):
        v = getattr(event, f.name)
        if f.name not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{event.kind}/{f.name}"] = v
    if isinstance(event, EvalEvent) and event.benchmark:
        for suite, r in event.benchmark.items():
            if isinstance(r, dict) and isinstance(r.get("acc"), (int, float)):
                out[f"eval/benchmark/{suite}"] = r["acc"]
    if isinstance(event, TrainEvent) and event.memory_gb_per_device:
        for i, v in enumerate(event.memory_gb_per_device):
            out[f"train/memory_gb/{i}"] = v
    return out


class Fanout:
    """One sink that forwards to several; takes typed events (or their dicts), stamps the wall-clock time."""

    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks

    def log(self, event: Event | dict) -> None:
        event = as_event(event)
        if event.time is None:
            event.time = round(time.time(), 3)
        for s in self.sinks:
            s.log(event)

    def close(self) -> None:
        """Closes each sink once (the loop closes before its last barrier, and again on its way out)."""
        sinks, self.sinks = self.sinks, []
        for s in sinks:
            s.close()


# ------------------------------------------------------------------------------------ readers and run facts
def read_metrics(path: str | Path) -> list[dict]:
    """All complete lines of a metrics.jsonl as dicts (a line being written right now is skipped)."""
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                events.append(json.loads(line))
            except ValueError:
                break
    return events


def read_events(path: str | Path) -> list[Event]:
    """All complete lines as typed events; unparsable lines (a half-written last one) are skipped."""
    with open(path, "rb") as f:
        return [e for line in f if (e := parse_line(line)) is not None]


def process_facts() -> dict:
    """pid and host of the writer: a reader on the same host tells a running run from a crashed one."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def trainable_params(table: list[dict]) -> int:
    return sum(int(r.get("trainable") or 0) for r in table)


def dir_size(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def device_stats(accelerator) -> tuple[list[float], list[float] | None]:
    """(memory GB per device, GPU utilisation % per device or None). A collective: every rank calls it.
    CUDA: peak allocated memory of the device; CPU: resident set of each process."""
    import torch

    if accelerator.device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
        try:
            util = float(torch.cuda.utilization(accelerator.device))  # needs NVML (pynvml)
        except Exception:
            util = -1.0
    else:
        import psutil

        mem, util = psutil.Process().memory_info().rss / 2**30, -1.0
    local = torch.tensor([[mem, util]], device=accelerator.device, dtype=torch.float64)
    both = accelerator.gather(local) if accelerator.num_processes > 1 else local
    mems = [round(float(m), 3) for m in both[:, 0]]
    utils = [round(float(u), 1) for u in both[:, 1]]
    return mems, (utils if all(u >= 0 for u in utils) else None)


def record_stop(run_dir: str | Path, exc: BaseException) -> None:
    """Append a `stop` event for a run that ends by an exception, so a dashboard shows why. Only into a metrics
    file this process is writing (rank 0 of a run that got as far as its start event): a run refused before
    that must not touch the file of the run that was there before."""
    from medvl.errors import MedvlError

    sink = JsonlSink._open.get((Path(run_dir) / "metrics.jsonl").resolve())
    if sink is None:
        return
    if isinstance(exc, MedvlError):
        event = StopEvent(reason="error", message=exc.what, fix=exc.fix)
    elif isinstance(exc, KeyboardInterrupt):
        event = StopEvent(reason="interrupted", message="interrupted (Ctrl-C or SIGINT)",
                          fix="continue with: medvl train RECIPE --resume auto")
    else:
        event = StopEvent(reason="crashed", message=f"{type(exc).__name__}: {exc}"[:2000])
    try:
        Fanout([sink]).log(event)
        sink.close()
    except OSError:  # a full disk or a removed directory: the exception itself still reaches the user
        pass

