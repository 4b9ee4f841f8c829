"""The metrics.jsonl contract and the dashboard scalars."""

import pytest

from medvl.engine.metrics import Fanout, JsonlSink, ListSink, read_metrics, reporting_sinks, scalars
from medvl.errors import MedvlError


def test_jsonl_round_trip_and_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = Fanout([JsonlSink(path), ListSink()])
    sink.log({"kind": "train", "step": 1, "loss": 2.5})
    sink.log({"kind": "warning", "step": 1, "message": "x"})
    with open(path, "a") as f:
        f.write('{"kind": "train", "ste')  # a line being written right now
    events = read_metrics(path)
    assert [e["kind"] for e in events] == ["train", "warning"] and events[0]["loss"] == 2.5 and "time" in events[0]


def test_scalars_keep_numbers_only():
    assert scalars({"kind": "train", "step": 3, "loss": 1.5, "lr": 1e-4, "grad_norm": None, "time": 9.0}) == \
        {"train/loss": 1.5, "train/lr": 1e-4}
    assert scalars({"kind": "checkpoint", "step": 3, "path": "x"}) is None


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
