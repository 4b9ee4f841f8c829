"""The metrics.jsonl contract: typed events, tolerant reading, resume marking, the scalars trackers plot."""

import json
import math

import pytest

from medvl.engine.metrics import (CheckpointEvent, EvalEvent, Fanout, JsonlSink, ListSink, OtherEvent, StartEvent,
                                  StopEvent, TrainEvent, event_from_dict, parse_line, read_events, read_metrics,
                                  record_stop, scalars)
from medvl.engine.trackers import reporting_sinks
from medvl.errors import MedvlError


def test_jsonl_round_trip_and_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = Fanout([JsonlSink(path), ListSink()])
    sink.log(TrainEvent(step=1, loss=2.5, memory_gb_per_device=[0.5, 0.75]))
    sink.log({"kind": "warning", "step": 1, "message": "x"})  # dicts still accepted (typed on the way in)
    with open(path, "a") as f:
        f.write('{"kind": "train", "ste')  # a line being written right now
    events = read_events(path)
    assert [e.kind for e in events] == ["train", "warning"]
    assert isinstance(events[0], TrainEvent) and events[0].loss == 2.5 and events[0].memory_gb_per_device == [0.5, 0.75]
    assert events[0].time is not None and events[1].message == "x"
    assert [e["kind"] for e in read_metrics(path)] == ["train", "warning"]
    assert sink.sinks[1].events[0]["loss"] == 2.5 and "time" in sink.sinks[1].events[0]


def test_every_kind_round_trips_through_json():
    for event in (StartEvent(total_steps=9, start_step=3, resumed_from="ck", table=[{"group": "x"}]),
                  TrainEvent(step=4, loss=1.0, lr=1e-4, grad_norm=None), EvalEvent(step=4, benchmark={"a": {"acc": 0.5}}),
                  CheckpointEvent(step=4, path="p", size_bytes=10, keep_last=2),
                  StopEvent(reason="error", message="nan", fix="lower lr")):
        back = parse_line(event.to_json())
        assert type(back) is type(event) and back == event, (event, back)


def test_old_new_and_broken_lines_read_without_raising():
    # an older medvl: no time, no memory_gb_per_device; a newer one: an unknown field and an unknown kind
    old = event_from_dict({"kind": "train", "step": 3, "loss": 2, "memory_gb": 0.4})
    assert isinstance(old, TrainEvent) and old.loss == 2.0 and isinstance(old.loss, float) and old.time is None
    newer = event_from_dict({"kind": "train", "step": 3, "loss": 1.5, "entropy": 0.3})
    assert newer.extra == {"entropy": 0.3} and newer.to_dict()["entropy"] == 0.3
    other = event_from_dict({"kind": "profile", "step": 7, "flops": 1e12})
    assert isinstance(other, OtherEvent) and other.kind == "profile" and other.extra == {"flops": 1e12}
    wrong = event_from_dict({"kind": "train", "step": "seven", "loss": "NaN", "lr": [1]})
    assert wrong.step is None and wrong.loss is None and wrong.lr is None
    nan = parse_line('{"kind": "train", "step": 5, "loss": NaN, "grad_norm": Infinity}')
    assert math.isnan(nan.loss) and nan.grad_norm == math.inf
    assert parse_line("not json") is None and parse_line("") is None
    assert isinstance(event_from_dict([1, 2]), OtherEvent)


def test_scalars_keep_numbers_only():
    assert scalars({"kind": "train", "step": 3, "loss": 1.5, "lr": 1e-4, "grad_norm": None, "time": 9.0}) == \
        {"train/loss": 1.5, "train/lr": 1e-4}
    assert scalars(EvalEvent(step=2, benchmark_accuracy=0.5, benchmark={"slake": {"acc": 0.25, "n": 4}})) == \
        {"eval/benchmark_accuracy": 0.5, "eval/benchmark/slake": 0.25}
    assert scalars(CheckpointEvent(step=3, path="x")) is None


def test_stop_is_recorded_only_into_a_file_this_process_writes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "end", "step": 5}\n')  # a previous, finished run
    record_stop(tmp_path, MedvlError("refused", fix="x"))
    assert path.read_text() == '{"kind": "end", "step": 5}\n'
    sink = Fanout([JsonlSink(path)])
    sink.log(StartEvent(total_steps=3))
    record_stop(tmp_path, MedvlError("the loss became nan at step 2", fix="lower optim.lr"))
    stop = read_events(path)[-1]
    assert isinstance(stop, StopEvent) and stop.reason == "error" and "nan" in stop.message and stop.fix


def test_missing_reporting_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(MedvlError, match="pip install wandb"):
        reporting_sinks(["wandb"], tmp_path, "run", {})


def test_trackers_get_the_init_calls_and_scalars_medvl_always_sent(tmp_path, monkeypatch):
    """TensorBoard, W&B and SwanLab through accelerate's trackers: the same init arguments medvl passed itself,
    `scalars(event)` at the event's step for train/eval events only, and finish/close at the end."""
    import sys
    import types

    from accelerate import PartialState

    PartialState(cpu=True)  # accelerate's trackers log through its state; in training the Accelerator made it
    calls = []

    class Run:
        def __init__(self, pkg, **kwargs):
            calls.append((pkg, "init", kwargs))
            self.pkg = pkg

        def log(self, values, step=None):
            calls.append((self.pkg, "log", step, dict(values)))

        def finish(self):
            calls.append((self.pkg, "finish"))

    class Writer:
        def __init__(self, logdir, **kwargs):
            calls.append(("tensorboard", "init", {"logdir": logdir}))

        def add_scalar(self, key, value, global_step=None):
            calls.append(("tensorboard", "scalar", global_step, key, value))

        def flush(self):
            pass

        def close(self):
            calls.append(("tensorboard", "finish"))

    wandb = types.SimpleNamespace(init=lambda **kw: Run("wandb", **kw))
    swanlab = types.SimpleNamespace(init=lambda **kw: Run("swanlab", **kw), config={})
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "swanlab", swanlab)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    sinks = reporting_sinks(["tensorboard", "wandb", "swanlab"], tmp_path, "run-a", {"lr": 0.1})
    train = TrainEvent(step=3, loss=2.0, lr=0.1, memory_gb_per_device=[0.5])
    for sink in sinks:
        sink.log(StartEvent(total_steps=9))  # not a scalar event: nothing reaches the trackers
        sink.log(train)
        sink.close()
    want = scalars(train)
    assert want == {"train/loss": 2.0, "train/lr": 0.1, "train/memory_gb/0": 0.5}
    assert [c for c in calls if c[0] == "tensorboard"] == [
        ("tensorboard", "init", {"logdir": str(tmp_path / "tensorboard")}),
        *[("tensorboard", "scalar", 3, k, v) for k, v in want.items()], ("tensorboard", "finish")]
    assert [c for c in calls if c[0] == "wandb"] == [
        ("wandb", "init", {"project": "medvl", "name": "run-a", "dir": str(tmp_path), "config": {"lr": 0.1}}),
        ("wandb", "log", 3, want), ("wandb", "finish")]
    assert [c for c in calls if c[0] == "swanlab"] == [
        ("swanlab", "init", {"project": "medvl", "experiment_name": "run-a", "logdir": str(tmp_path),
                             "config": {"lr": 0.1}}),
        ("swanlab", "log", 3, want), ("swanlab", "finish")]


def test_resume_is_marked_and_reads_as_one_curve(tiny_dir, prepared_vqa, tmp_path):
    from medvl.config import load_recipe
    from medvl.engine.history import RunHistory
    from medvl.engine.train import train

    args = [f"model.base={tiny_dir('qwen2.5-vl')}", f"data.train=[{prepared_vqa}]", f"output.dir={tmp_path / 'run'}",
            "train.max_steps=6", "train.save_every=3", "train.eval_every=null", "data.val_fraction=null",
            "train.log_every=1", "train.micro_batch_size=4"]
    train(load_recipe("tiny_cpu", args), stop_after_step=5)  # "killed" after step 5: steps 4, 5 are re-run
    train(load_recipe("tiny_cpu", args), resume="auto")
    events = read_events(tmp_path / "run" / "metrics.jsonl")
    starts = [e for e in events if isinstance(e, StartEvent)]
    assert [s.start_step for s in starts] == [0, 3] and starts[0].resumed_from is None
    assert starts[1].resumed_from.endswith("step-000003") and starts[1].is_resume
    assert [e.step for e in events if isinstance(e, TrainEvent)] == [1, 2, 3, 4, 5, 4, 5, 6]
    ck = [e for e in events if isinstance(e, CheckpointEvent)]
    assert ck and all(c.size_bytes > 0 and c.keep_last == 2 for c in ck)
    h = RunHistory(tmp_path / "run")
    h.poll()
    steps, _ = h.series["loss"].points()
    assert steps == [1, 2, 3, 4, 5, 6] and h.resumes == [3] and h.status() == "finished"
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["kind"] == "end"


def test_a_nan_stop_leaves_its_diagnosis_for_the_dashboard(tiny_dir, prepared_text, tmp_path, monkeypatch):
    import medvl.engine.train as engine
    from medvl.config import load_recipe
    from medvl.engine.history import RunHistory

    real = engine.token_loss_sum
    calls = {"n": 0}

    def poisoned(model, family, batch):
        calls["n"] += 1
        return real(model, family, batch) * (float("nan") if calls["n"] >= 3 else 1.0)

    monkeypatch.setattr(engine, "token_loss_sum", poisoned)
    r = load_recipe("tiny_cpu", [f"model.base={tiny_dir('causal-lm')}", f"data.train=[{prepared_text}]",
                                 f"output.dir={tmp_path / 'run'}", "train.max_steps=6", "train.save_every=null",
                                 "train.eval_every=null", "data.val_fraction=null", "train.log_every=1"])
    with pytest.raises(MedvlError):
        engine.train(r)
    h = RunHistory(tmp_path / "run")
    h.poll()
    assert h.status() == "stopped" and "nan at step 3" in h.stop.message and h.stop.fix
    assert h.step == 2 and [e.kind for e in h.events][-1] == "stop"


def test_a_run_that_stops_by_an_exception_closes_its_trackers(tiny_dir, prepared_text, tmp_path, monkeypatch):
    """A NaN stop at step 3: the TensorBoard writer still gets close() (accelerate's finish()) after the `stop`
    event went into metrics.jsonl; before, only the JSONL sink was closed and W&B/TensorBoard runs were left open."""
    import sys
    import types

    import medvl.engine.train as engine
    from medvl.config import load_recipe

    calls = []

    class Writer:
        def __init__(self, logdir, **kwargs):
            calls.append("init")

        def add_scalar(self, key, value, global_step=None):
            calls.append(("scalar", global_step))

        def flush(self):
            pass

        def close(self):
            calls.append("close")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    real = engine.token_loss_sum
    n = {"calls": 0}

    def poisoned(model, family, batch):
        n["calls"] += 1
        return real(model, family, batch) * (float("nan") if n["calls"] >= 3 else 1.0)

    monkeypatch.setattr(engine, "token_loss_sum", poisoned)
    r = load_recipe("tiny_cpu", [f"model.base={tiny_dir('causal-lm')}", f"data.train=[{prepared_text}]",
                                 f"output.dir={tmp_path / 'run'}", "train.max_steps=6", "train.save_every=null",
                                 "train.eval_every=null", "data.val_fraction=null", "train.log_every=1",
                                 "output.report_to=[tensorboard]"])
    with pytest.raises(MedvlError, match="nan"):
        engine.train(r)
    assert calls[0] == "init" and ("scalar", 2) in calls and calls.count("close") == 1 and calls[-1] == "close"
    assert [e.kind for e in read_events(tmp_path / "run" / "metrics.jsonl")][-1] == "stop"
