"""Reading a run directory while it is written: partial lines, growth, replacement, removal, old files, NaN,
resumes, big files (sampled, bounded memory) and the run's status."""

import json
import math
import shutil
import subprocess
import sys

from medvl.engine.curves import METRICS, lines_for, smooth
from medvl.engine.history import SERIES_CAP, RunHistory, Series
from medvl.engine.metrics import (EndEvent, EvalEvent, Fanout, JsonlSink, StartEvent, StopEvent, TrainEvent,
                                  process_facts)


def _writer(run, **start):
    run.mkdir(parents=True, exist_ok=True)
    sink = Fanout([JsonlSink(run / "metrics.jsonl", append=True)])
    sink.log(StartEvent(total_steps=start.pop("total_steps", 100), **{**process_facts(), **start}))
    return sink


def test_partial_line_waits_and_growth_is_read_incrementally(tmp_path):
    run = tmp_path / "run"
    sink = _writer(run)
    sink.log(TrainEvent(step=1, loss=3.0))
    h = RunHistory(run)
    assert h.poll() and h.step == 1 and h.status() == "running"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 2, "lo')  # the writer is in the middle of a line
    assert not h.poll() and h.step == 1 and h.bad_lines == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('ss": 2.5}\n')
    assert h.poll() and h.step == 2 and h.series["loss"].points() == ([1.0, 2.0], [3.0, 2.5])
    assert not h.poll()  # nothing new


def test_replaced_file_is_read_again_and_removed_dir_keeps_the_data(tmp_path):
    run = tmp_path / "run"
    sink = _writer(run)
    for s in range(1, 6):
        sink.log(TrainEvent(step=s, loss=5.0 - s))
    h = RunHistory(run)
    h.poll()
    assert h.step == 5
    sink.close()
    (run / "metrics.jsonl").unlink()  # a new run with overwrite: true
    sink = _writer(run, total_steps=7)
    sink.log(TrainEvent(step=1, loss=9.0))
    assert h.poll() and h.step == 1 and h.total_steps == 7 and h.series["loss"].points()[1] == [9.0]
    sink.close()
    shutil.rmtree(run)
    assert h.poll() and h.status() == "gone" and h.series["loss"].points()[1] == [9.0]
    assert not h.poll()


def test_older_version_lines_nan_and_garbage_are_shown_as_far_as_possible(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = ['{"kind": "start", "run_dir": "x", "family": "qwen2.5-vl", "total_steps": 10, "start_step": 0}',
             '{"kind": "train", "step": 1, "loss": 2.0, "memory_gb": 0.4, "tokens_per_s": 10}',
             '{"kind": "train", "step": 2, "loss": NaN, "grad_norm": Infinity}',
             'this line is not json',
             '{"kind": "train", "step": 3, "loss": 1.5, "brand_new_metric": 7}',
             '{"kind": "eval", "step": 3, "eval_loss": 1.7}',
             '{"kind": "mystery", "step": 3, "detail": "from a newer medvl"}']
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    h = RunHistory(run)
    h.poll()
    assert h.series["loss"].points() == ([1.0, 3.0], [2.0, 1.5])  # NaN skipped on the chart
    assert h.series["memory_gb/0"].points()[1] == [0.4] and h.series["eval_loss"].points()[1] == [1.7]
    assert h.bad_lines == 1 and h.last.step == 3 and h.last.extra == {"brand_new_metric": 7}
    assert [e.kind for e in h.events] == ["start", "eval", "mystery"]
    assert h.status() == "running" or h.status() == "stale"  # no pid in an old start event: cannot tell


def test_resume_draws_one_curve_with_the_mark_and_old_two_start_files_too(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # what medvl wrote before resumes were marked: a second start whose start_step says where it resumed
    events = [{"kind": "start", "total_steps": 8, "start_step": 0}] + \
             [{"kind": "train", "step": s, "loss": 10 - s} for s in range(1, 7)] + \
             [{"kind": "start", "total_steps": 8, "start_step": 4}] + \
             [{"kind": "train", "step": s, "loss": 20 - s} for s in range(5, 9)] + [{"kind": "end", "step": 8}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    h = RunHistory(run)
    h.poll()
    steps, values = h.series["loss"].points()
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8] and values[4:] == [15, 14, 13, 12] and h.resumes == [4]
    assert h.status() == "finished"


def test_crashed_and_stopped_are_told_apart(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = tmp_path / "crashed"
    sink = _writer(run, pid=int(dead.stdout))
    sink.log(TrainEvent(step=3, loss=1.0))
    h = RunHistory(run)
    h.poll()
    assert h.status() == "crashed" and h.eta() is None
    run2 = tmp_path / "stopped"
    sink = _writer(run2)
    sink.log(StopEvent(reason="error", message="the loss became nan at step 3", fix="lower optim.lr"))
    h2 = RunHistory(run2)
    h2.poll()
    assert h2.status() == "stopped" and h2.stop.fix == "lower optim.lr"
    assert RunHistory(tmp_path / "not-yet").status() == "waiting"


def test_series_memory_is_bounded_and_keeps_the_mean():
    s = Series(cap=64)
    for i in range(10_000):
        s.add(i, 1.0 if i % 2 else 3.0)
    steps, values = s.points()
    assert len(steps) <= 64 and s.stride >= 128 and all(abs(v - 2.0) < 1e-9 for v in values)
    s.add(10_001, math.nan)  # ignored
    s.truncate_after(5_000)
    assert max(s.points()[0]) <= 5_000


def test_big_file_opens_sampled_with_every_rare_event_and_an_exact_tail(tmp_path, monkeypatch):
    from medvl.engine import history

    # the same code path as a 500k-step file, at a size a test writes in a second (bench: dashboard_open.py)
    monkeypatch.setattr(history, "FULL_READ_BYTES", 512 << 10)
    monkeypatch.setattr(history, "TAIL_BYTES", 128 << 10)
    run = tmp_path / "big"
    run.mkdir()
    n = 40_000
    with open(run / "metrics.jsonl", "w") as f:
        f.write(StartEvent(total_steps=n, time=1.0).to_json() + "\n")
        for s in range(1, n + 1):
            f.write(TrainEvent(step=s, total_steps=n, loss=1000.0 / s, lr=1e-4, tokens_per_s=1000.5, time=1.0 + s,
                               memory_gb_per_device=[1.5, 2.5]).to_json() + "\n")
            if s % 5_000 == 0:
                f.write(EvalEvent(step=s, eval_loss=2.0, time=1.0 + s).to_json() + "\n")
            if s == 15_000:  # a resume from step 10,000: steps 10,001..15,000 were re-run
                f.write(StartEvent(total_steps=n, start_step=10_000, resumed_from="ck", time=1.0 + s).to_json() + "\n")
                for r in range(10_001, 15_001):
                    f.write(TrainEvent(step=r, total_steps=n, loss=1000.0 / r, time=1.0 + s).to_json() + "\n")
        f.write(EndEvent(step=n, time=2.0 + n).to_json() + "\n")
    assert (run / "metrics.jsonl").stat().st_size > 4 * history.FULL_READ_BYTES
    h = RunHistory(run)
    h.poll()
    assert h.sampled_before is not None and h.status() == "finished" and h.resumes == [10_000]
    # the eval at 15,000 came before the resume to 10,000: superseded like the train points
    assert h.series["eval_loss"].points()[0] == [5_000.0 * k for k in (1, 2, 4, 5, 6, 7, 8)]
    steps, _ = h.series["loss"].points()
    stride = h.series["loss"].stride
    assert steps == sorted(steps) and n - stride <= steps[-1] <= n and len(steps) <= SERIES_CAP and h.step == n
    assert len(h.series["memory_gb/1"]) > 100
    exact = RunHistory(run, exact=True)
    exact.poll()
    assert exact.sampled_before is None and exact.last.step == n and len(exact.series["loss"]) <= SERIES_CAP


def test_smoothing_and_lines_for_zoom_and_log(tmp_path):
    assert smooth([1.0, 1.0, 1.0], 0.9) == [1.0, 1.0, 1.0]  # debiased: no ramp from zero
    assert smooth([0.0, 10.0], 0.0) == [0.0, 10.0]
    run = tmp_path / "run"
    sink = _writer(run)
    for s in range(1, 201):
        sink.log(TrainEvent(step=s, loss=-1.0 if s == 150 else 1.0 / s, lr=1e-3))
    h = RunHistory(run)
    h.poll()
    loss = next(m for m in METRICS if m.key == "loss")
    lines = lines_for([h], loss, smoothing=0.6, last=50, log=True)
    assert [ln.raw for ln in lines] == [True, False] and min(lines[0].steps) >= 150
    assert all(v > 0 for v in lines[0].values) and 150.0 not in lines[0].steps
