"""A run's metrics history, read from `RUN/metrics.jsonl` (typed events of medvl.engine.metrics): what the
dashboard and `medvl plot` draw. Bounded memory and a fast open, whatever the run length.

- Each metric is a `Series` of at most 4,096 points in two float arrays; when full, neighbouring pairs are
  averaged (the stride doubles). A 500k-step run costs the same memory as a 5k-step one.
- Opening a big file does not parse every line (parsing and typing one event costs 8-30 us here, depending on
  the load of this shared 2-core box: 4-15 s for 500k lines). Every non-train line (start, eval, checkpoint,
  warning, stop, end) is found by one regex pass over the bytes, read in 8 MB chunks; train lines are sampled
  at 1,000 evenly spaced offsets, 2 consecutive lines each, and the last 512 KB (~1,700 lines) are read in
  full: about 4k parsed lines whatever the length. `sampled_before` says up to which step it is sampled.
  With `quick=True` the regex pass is skipped (train curves and progress only, ~0.1 s for 500k lines) and
  `incomplete` is set: the dashboard shows that at once and swaps in a complete history read in a thread.
- Tailing: `poll()` reads only the bytes added since the last call and keeps a half-written last line for
  the next poll; a file that shrinks or is replaced (a new run with overwrite) is read again from the start;
  a run directory that disappears keeps what was read and reports `gone`.
- Resumes: a `start` event with `start_step` > 0 drops the points above that step (they were re-run) and
  records the resume, so the curve is one line with a mark, not a zigzag.
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
from array import array
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from medvl.engine.metrics import (CheckpointEvent, EndEvent, EvalEvent, Event, StartEvent, StopEvent, TrainEvent,
                                  parse_line)

if TYPE_CHECKING:
    from medvl.engine.curves import Metric

SERIES_CAP = 4096
FULL_READ_BYTES = 2 << 20  # below this, parse every line (~6.5k train lines of 310 bytes)
TAIL_BYTES = 512 << 10
SAMPLES = 1000
CHUNK = 8 << 20
STALE_S = 600  # a run on another host with no event for 10 min is shown as "no update"
_NOT_TRAIN = re.compile(rb'"kind": "(?:[^t]|t(?!rain"))')  # any kind but train


class Series:
    """(step, value) points of one metric, at most `cap`; older resolution halves when full."""

    __slots__ = ("steps", "values", "stride", "cap", "_n", "_sum_s", "_sum_v")

    def __init__(self, cap: int = SERIES_CAP):
        self.steps, self.values = array("d"), array("d")
        self.stride, self.cap = 1, cap
        self._n, self._sum_s, self._sum_v = 0, 0.0, 0.0

    def add(self, step: float, value: float) -> None:
        if value is None or not math.isfinite(value):
            return  # NaN/inf: the event log says so; a chart cannot draw it
        self._n += 1
        self._sum_s += step
        self._sum_v += value
        if self._n < self.stride:
            return
        self.steps.append(self._sum_s / self._n)
        self.values.append(self._sum_v / self._n)
        self._n, self._sum_s, self._sum_v = 0, 0.0, 0.0
        if len(self.steps) >= self.cap:
            self.steps = array("d", [(a + b) / 2 for a, b in zip(self.steps[::2], self.steps[1::2])])
            self.values = array("d", [(a + b) / 2 for a, b in zip(self.values[::2], self.values[1::2])])
            self.stride *= 2

    def truncate_after(self, step: float) -> None:
        keep = len(self.steps)
        while keep and self.steps[keep - 1] > step:
            keep -= 1
        del self.steps[keep:], self.values[keep:]
        self._n, self._sum_s, self._sum_v = 0, 0.0, 0.0

    def points(self) -> tuple[list[float], list[float]]:
        steps, values = list(self.steps), list(self.values)
        if self._n:
            steps.append(self._sum_s / self._n)
            values.append(self._sum_v / self._n)
        return steps, values

    def __len__(self) -> int:
        return len(self.steps) + (1 if self._n else 0)


class RunHistory:
    """Everything a reader shows about one run directory, updated by `poll()`."""

    def __init__(self, run_dir: str | Path, *, ignore_existing: bool = False, exact: bool = False,
                 quick: bool = False):
        self.run_dir = Path(run_dir)
        self.quick = quick
        self.exact = exact  # parse every line even of a big file (`medvl plot`: slower, no sampled stretch)
        self.path = self.run_dir / "metrics.jsonl"
        self.ignore_ident = self._ident() if ignore_existing else None  # `train --tui`: the old run's file
        self._reset()

    def _reset(self) -> None:
        self.series: dict[str, Series] = {}
        self.start: StartEvent | None = None  # the first start
        self.current: StartEvent | None = None  # the latest (after a resume)
        self.last: TrainEvent | None = None
        self.end: EndEvent | None = None
        self.stop: StopEvent | None = None
        self.resumes: list[int] = []
        self.checkpoints: deque[CheckpointEvent] = deque(maxlen=100)
        self.events: deque[Event] = deque(maxlen=300)  # non-train events, newest last
        self.events_total = 0  # how many were ever appended (a reader shows the ones it has not seen)
        self.bad_lines = 0
        self.sampled_before: int | None = None
        self.incomplete = False  # a quick open skipped the rare events of the sampled stretch
        self.gone = False
        self.offset = 0
        self.ident = None
        self.last_time: float | None = None
        self._segment_start: float | None = None
        self._previous_segments = 0.0
        self.version = 0  # bumped on every change (readers redraw when it moves)

    # ------------------------------------------------------------------------------------------- reading
    def _ident(self):
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def poll(self) -> bool:
        """Read what was added since the last call; True when something changed."""
        ident = self._ident()
        if ident is None:
            changed = not self.gone and self.offset > 0 and not self.run_dir.exists()
            self.gone = self.gone or changed
            return changed
        if self.ignore_ident is not None:
            if ident == self.ignore_ident:
                return False
            self.ignore_ident = None
        try:
            size = self.path.stat().st_size
        except OSError:
            return False
        if ident != self.ident or size < self.offset:
            had = self.offset > 0
            self._reset()
            self.ident = ident
            if size > FULL_READ_BYTES and not self.exact:
                try:
                    self._open_large(size)
                except OSError:  # removed or replaced while being opened: the next poll starts again
                    self._reset()
                    return had
            changed = had
        else:
            changed = False
        self.gone = False
        if size == self.offset:
            return changed
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(size - self.offset)
        except OSError:
            return changed
        cut = data.rfind(b"\n") + 1  # a half-written last line waits for the next poll
        for line in data[:cut].splitlines():
            if line.strip():
                self._apply_line(line)
        self.offset += cut
        self.version += cut > 0
        return changed or cut > 0

    def _apply_line(self, line: bytes) -> None:
        event = parse_line(line)
        if event is None:
            self.bad_lines += 1
        else:
            self.apply(event)

    def _open_large(self, size: int) -> None:
        found: dict[int, bytes] = {}  # byte offset -> line, applied in file order
        with open(self.path, "rb") as f:
            f.seek(size - TAIL_BYTES)
            newline = f.read(1 << 16).find(b"\n")
            if newline < 0:
                return  # no line break near the tail (a huge line): read everything normally
            head_end = size - TAIL_BYTES + newline + 1
            f.seek(0)
            pos, carry = (head_end, b"") if self.quick else (0, b"")
            self.incomplete = self.quick
            while pos < head_end:  # every non-train event, chunk by chunk (bounded memory)
                chunk = f.read(min(CHUNK, head_end - pos))
                if not chunk:
                    break
                buf, base = carry + chunk, pos - len(carry)
                cut = buf.rfind(b"\n") + 1
                for m in _NOT_TRAIN.finditer(buf, 0, cut):
                    begin = buf.rfind(b"\n", 0, m.start()) + 1
                    found[base + begin] = buf[begin:buf.find(b"\n", m.start())]
                carry, pos = buf[cut:], pos + len(chunk)
            for target in range(0, head_end, max(1, head_end // SAMPLES)):  # sampled train lines
                f.seek(target)
                data = f.read(4096)
                start = 0 if target == 0 else data.find(b"\n") + 1
                if target and not start:
                    continue  # no line starts within 4 KB of here
                for _ in range(2):
                    end = data.find(b"\n", start)
                    if end < 0 or target + start >= head_end:
                        break
                    found.setdefault(target + start, data[start:end])
                    start = end + 1
        last_train_step = None
        for _, line in sorted(found.items()):
            event = parse_line(line)
            if event is None:
                self.bad_lines += 1
                continue
            self.apply(event)
            if isinstance(event, TrainEvent):
                last_train_step = event.step
        self.sampled_before = last_train_step
        self.offset = head_end

    # -------------------------------------------------------------------------------------------- events
    def _add(self, name: str, step, value) -> None:
        if step is None or value is None:
            return
        s = self.series.get(name)
        if s is None:
            s = self.series[name] = Series()
        s.add(float(step), float(value))

    def apply(self, e: Event) -> None:
        previous_time = self.last_time
        if e.time is not None:
            if self._segment_start is None:
                self._segment_start = e.time
            self.last_time = e.time
        if isinstance(e, TrainEvent):
            self.last = e
            for name in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "input_tokens_per_s"):
                self._add(name, e.step, getattr(e, name))
            mem = e.memory_gb_per_device or ([e.memory_gb] if e.memory_gb is not None else [])
            for i, v in enumerate(mem):
                self._add(f"memory_gb/{i}", e.step, v)
            for i, v in enumerate(e.gpu_util or []):
                self._add(f"gpu_util/{i}", e.step, v)
            return
        self.events.append(e)
        self.events_total += 1
        if isinstance(e, StartEvent):
            if self.current is not None and previous_time is not None and self._segment_start is not None:
                self._previous_segments += max(0.0, previous_time - self._segment_start)
            self._segment_start = e.time
            if self.start is None:
                self.start = e
            elif e.is_resume or self.current is not None:
                at = e.start_step or 0
                self.resumes.append(at)
                for s in self.series.values():
                    s.truncate_after(at)
                self.checkpoints = deque((c for c in self.checkpoints if (c.step or 0) <= at), maxlen=100)
            self.current, self.end, self.stop = e, None, None
        elif isinstance(e, EvalEvent):
            self._add("eval_loss", e.step, e.eval_loss)
            self._add("bench/overall", e.step, e.benchmark_accuracy)
            for suite, r in (e.benchmark or {}).items():
                if isinstance(r, dict) and isinstance(r.get("acc"), (int, float)):
                    self._add(f"bench/{suite}", e.step, r["acc"])
        elif isinstance(e, CheckpointEvent):
            self.checkpoints = deque((c for c in self.checkpoints if c.step != e.step), maxlen=100)
            self.checkpoints.append(e)
        elif isinstance(e, EndEvent):
            self.end = e
        elif isinstance(e, StopEvent):
            self.stop = e

    # ------------------------------------------------------------------------------------------- reading
    def series_for(self, metric: Metric) -> list[tuple[str, Series]]:
        return sorted(((name, s) for name, s in self.series.items()
                       if (name == metric.prefix or name.startswith(metric.prefix + "/")) and len(s)),
                      key=lambda kv: (kv[0] != f"{metric.prefix}/overall", kv[0]))

    @property
    def total_steps(self) -> int | None:
        return (self.last.total_steps if self.last else None) or (self.current.total_steps if self.current else None)

    @property
    def step(self) -> int:
        if self.end is not None and self.end.step is not None:
            return self.end.step
        return (self.last.step if self.last else None) or (self.current.start_step if self.current else 0) or 0

    def elapsed(self, now: float | None = None) -> float | None:
        """Training wall time over all segments (a crash-to-resume gap is not counted)."""
        if self._segment_start is None:
            return None
        end = self.last_time if self.status() != "running" else (now or time.time())
        return self._previous_segments + max(0.0, (end or self._segment_start) - self._segment_start)

    def eta(self, now: float | None = None) -> float | None:
        if self.last is None or self.last.eta_s is None or self.status() != "running":
            return None
        since = (now or time.time()) - (self.last.time or now or time.time())
        return max(0.0, self.last.eta_s - max(0.0, since))

    def kept_checkpoints(self) -> set[int]:
        """Steps of the checkpoints still on disk by the run's keep_last rule (newest keep_last)."""
        if not self.checkpoints:
            return set()
        keep = self.checkpoints[-1].keep_last or len(self.checkpoints)
        return {c.step for c in list(self.checkpoints)[-keep:]}

    def status(self) -> str:
        """waiting, running, finished, stopped, crashed, stale (no update from another host), gone."""
        if self.gone:
            return "gone"
        if self.current is None:
            return "waiting"
        if self.end is not None:
            return "finished"
        if self.stop is not None:
            return "crashed" if self.stop.reason == "crashed" else "stopped"
        alive = writer_alive(self.current)
        if alive is False:
            return "crashed"
        if alive is None and self.last_time is not None and time.time() - self.last_time > STALE_S:
            return "stale"
        return "running"


def writer_alive(start: StartEvent) -> bool | None:
    """True/False when the writer ran on this host (its pid is checked); None when that cannot be told."""
    if not start.pid or start.host != socket.gethostname():
        return None
    try:
        os.kill(start.pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True
