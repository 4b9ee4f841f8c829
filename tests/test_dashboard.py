"""The Textual dashboard, headless (Pilot), while a thread appends to metrics.jsonl as a trainer would."""

import asyncio
import threading
import time

import pytest

from medvl.engine.curves import METRICS
from medvl.engine.metrics import (CheckpointEvent, EvalEvent, Fanout, JsonlSink, StartEvent, TrainEvent, WarningEvent,
                                  process_facts)
from medvl.tui.dashboard import Dashboard, QuitScreen
from medvl.tui.dashboard_widgets import EventLog, MetricChart, RunProgress


class Trainer:
    """Writes a run like medvl.engine.train does: start, a train event per step, eval, checkpoints, a warning.
    `write` runs in a test thread while the app runs; it waits for `go` before each step."""

    def __init__(self, run, steps=60, delay=0.01, loss0=5.0):
        self.run, self.steps, self.delay, self.loss0 = run, steps, delay, loss0
        self.go = threading.Event()
        self.done = threading.Event()

    def write(self):
        self.run.mkdir(parents=True, exist_ok=True)
        sink = Fanout([JsonlSink(self.run / "metrics.jsonl")])
        sink.log(StartEvent(recipe="tiny_cpu", model="tiny", method="lora", total_steps=self.steps, world_size=2,
                            trainable_params=16_384, **process_facts()))
        for s in range(1, self.steps + 1):
            self.go.wait()
            sink.log(TrainEvent(step=s, total_steps=self.steps, epoch=s / 20, loss=self.loss0 / s ** 0.5, lr=1e-3,
                                grad_norm=1.0, tokens_per_s=1234.5, samples_per_s=12.5, eta_s=self.steps - s,
                                memory_gb_per_device=[1.0, 1.25]))
            if s % 20 == 0:
                sink.log(EvalEvent(step=s, eval_loss=2.0, benchmark_accuracy=0.5, benchmark_n=8,
                                   benchmark={"vqa-rad": {"acc": 0.5, "n": 8}}))
                sink.log(CheckpointEvent(step=s, path=str(self.run / f"checkpoints/step-{s:06d}"), size_bytes=2_900_000,
                                         keep_last=2))
            if s == 30:
                sink.log(WarningEvent(step=s, code="loss_zero", message="a warning the log must show"))
            time.sleep(self.delay)
        sink.close()
        self.done.set()


async def _until(pilot, check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the dashboard")
        await pilot.pause(0.05)


def test_metric_keys_of_the_cli_match_the_dashboard():
    from medvl.commands.watch import METRIC_KEYS

    assert METRIC_KEYS == tuple(m.key for m in METRICS)


def test_live_run_updates_charts_progress_and_keys_work(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(run)

    async def scenario():
        app = Dashboard([run], poll_s=0.05)
        async with app.run_test(size=(120, 40)) as pilot:
            chart = app.query_one(MetricChart)
            assert "nothing logged yet" in chart.title_text  # waiting: the run directory does not exist yet
            assert app.runs[0].status() == "waiting"
            threading.Thread(target=trainer.write, daemon=True).start()
            trainer.go.set()
            await _until(pilot, lambda: app.runs[0].step >= 25)
            await pilot.pause(0.2)
            bar = app.query_one(RunProgress).query_one("ProgressBar")
            assert bar.total == 60 and 25 <= bar.progress <= 60
            assert [ln.raw for ln in chart.drawn] == [True, False] and chart.drawn[1].steps[-1] >= 25
            await _until(pilot, trainer.done.is_set)
            await pilot.pause(0.3)
            assert bar.progress == 60 and chart.drawn[0].steps[-1] == 60
            log_text = "\n".join(str(line.text) for line in app.query_one(EventLog).lines)
            assert "a warning the log must show" in log_text and "eval loss 2.0000" in log_text

            await pilot.press("l")
            assert app.log_scale and "log scale" in chart.title_text
            await pilot.press("s")
            assert app.smoothing == 0.8 and "smoothing 0.8" in chart.title_text
            await pilot.press("z")
            assert "last 100 steps" in chart.title_text
            await pilot.press("m")
            assert app.metric.key == "eval" and chart.drawn and chart.drawn[0].values == [2.0, 2.0, 2.0]
            await pilot.press("8")
            assert app.metric.key == "memory" and [ln.label for ln in chart.drawn] == ["device 0", "device 1"]

            await pilot.press("p")
            await _until(pilot, lambda: app.saved, timeout=30)
            png = app.saved[0]
            from PIL import Image

            assert png.parent == run and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(png) as im:
                assert im.size[0] > 500 and im.size[1] > 300
            await pilot.press("q")
        assert app.return_value == ""  # watching: quitting leaves the run alone

    asyncio.run(scenario())


def test_two_runs_are_overlaid_with_a_legend(tmp_path):
    runs = []
    for name, loss0 in (("a", 5.0), ("b", 8.0)):
        t = Trainer(tmp_path / name, steps=40, delay=0, loss0=loss0)
        t.go.set()
        t.write()
        runs.append(tmp_path / name)

    async def scenario():
        app = Dashboard(runs, poll_s=0.05)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.3)
            chart = app.query_one(MetricChart)
            smoothed = [ln for ln in chart.drawn if not ln.raw]
            assert [ln.label for ln in smoothed] == ["a", "b"] and [ln.run for ln in smoothed] == [0, 1]
            assert smoothed[1].values[0] > smoothed[0].values[0]
            assert len(app.query(RunProgress)) == 2

    asyncio.run(scenario())


class FakeTrainer:
    """Stands in for medvl.engine.background.BackgroundRun (the real one is tested in test_dashboard_train.py)."""

    pid, log_path = 4242, "/runs/x/train.log"

    def __init__(self):
        self.code, self.stopped = None, False

    def poll(self):
        return self.code

    def stop(self, timeout=60.0):
        self.stopped, self.code = True, 130
        return 130

    def tail(self, n=12):
        return ["error: the recipe is wrong"]


@pytest.mark.parametrize("choice", ["leave", "stop"])
def test_closing_while_training_asks_and_says_how_to_reattach(tmp_path, choice):
    async def scenario():
        app = Dashboard([tmp_path / "run"], trainer=FakeTrainer(), poll_s=0.05)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.1)
            assert "its output: /runs/x/train.log" in str(app.header.render())  # where to read the trainer
            await pilot.press("q")
            await pilot.pause(0.1)
            assert isinstance(app.screen, QuitScreen)
            await pilot.press("escape")  # cancel: still here
            await pilot.pause(0.1)
            assert not isinstance(app.screen, QuitScreen) and app.is_running
            await pilot.press("q")
            await pilot.pause(0.1)
            await pilot.press("l" if choice == "leave" else "s")
            await _until(pilot, lambda: not app.is_running)
        return app

    app = asyncio.run(scenario())
    if choice == "leave":
        assert not app.trainer.stopped and f"medvl watch {tmp_path / 'run'}" in app.return_value
    else:
        assert app.trainer.stopped and "stopped (exit code 130)" in app.return_value and "--resume auto" in app.return_value


def test_a_failed_training_process_shows_its_last_lines(tmp_path):
    async def scenario():
        trainer = FakeTrainer()
        app = Dashboard([tmp_path / "run"], trainer=trainer, poll_s=0.05)
        async with app.run_test(size=(100, 30)) as pilot:
            trainer.code = 2
            await pilot.pause(0.3)
            text = "\n".join(str(line.text) for line in app.query_one(EventLog).lines)
            assert "exited with code 2" in text and "error: the recipe is wrong" in text
            await pilot.press("q")  # ended: no question
        return app

    assert "exit code 2" in asyncio.run(scenario()).return_value


def test_a_long_run_opens_quickly_then_gets_its_complete_history(tmp_path, monkeypatch):
    from medvl.engine import history

    monkeypatch.setattr(history, "FULL_READ_BYTES", 64 << 10)
    monkeypatch.setattr(history, "TAIL_BYTES", 16 << 10)
    t = Trainer(tmp_path / "long", steps=6000, delay=0)
    t.go.set()
    t.write()

    async def scenario():
        app = Dashboard([tmp_path / "long"], poll_s=0.05)
        async with app.run_test(size=(100, 30)) as pilot:
            await _until(pilot, lambda: app.runs[0].step == 6000)
            first = app.runs[0]
            # quick: evals only where a sampled line or the tail happened to hold one
            assert first.sampled_before and len(first.series["eval_loss"]) < 250
            await _until(pilot, lambda: app.runs[0] is not first)
            full = app.runs[0]
            assert len(full.series["eval_loss"]) == 300 and len(full.checkpoints) == 100 and full.step == 6000
            await pilot.pause(0.2)
            log_text = "\n".join(str(line.text) for line in app.event_log.lines)
            assert log_text.count("step-006000") == 1  # the swap re-wrote the log, no duplicates

    asyncio.run(scenario())


def test_smoothing_keys_stop_at_the_ends_and_say_the_value(tmp_path):
    t = Trainer(tmp_path / "run", steps=10, delay=0)
    t.go.set()
    t.write()

    async def scenario():
        app = Dashboard([tmp_path / "run"], poll_s=0.05, smoothing=0.95)
        async with app.run_test(size=(100, 30)) as pilot:
            chart = app.query_one(MetricChart)
            await pilot.press("s")
            assert app.smoothing == 0.99 and "smoothing 0.99" in chart.title_text
            await pilot.press("s")  # already the most: stays (it used to wrap to 0)
            assert app.smoothing == 0.99
            messages = [n.message for n in app._notifications]
            assert messages[-1] == "smoothing 0.99  (the most)"
            for _ in range(8):
                await pilot.press("S")
            assert app.smoothing == 0.0  # stops at none (it used to wrap to 0.99)
            assert [n.message for n in app._notifications][-1] == "smoothing 0  (none: raw values)"

    asyncio.run(scenario())


def _jsonl(run, lines):
    import json

    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_the_event_log_merges_runs_in_time_order(tmp_path):
    t0 = 1_700_000_000.0
    for name, offset in (("a", 0.0), ("b", 5.0)):  # b's events fall between a's
        _jsonl(tmp_path / name, [
            {"time": t0 + offset, "kind": "start", "total_steps": 20, "world_size": 1},
            *[{"time": t0 + offset + s, "kind": "train", "step": s, "loss": 1.0} for s in range(1, 21)],
            {"time": t0 + offset + 10, "kind": "eval", "step": 10, "eval_loss": 1.5},
            {"time": t0 + offset + 20, "kind": "eval", "step": 20, "eval_loss": 1.25},
        ])

    async def scenario():
        app = Dashboard([tmp_path / "a", tmp_path / "b"], poll_s=0.05)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.5)
            lines = [str(line.text) for line in app.query_one(EventLog).lines]
            tagged = [(ln.split()[1], "start" if "started" in ln else ln.split("eval loss ")[-1])
                      for ln in lines if "started" in ln or "eval loss" in ln]
            assert tagged == [("a", "start"), ("b", "start"), ("a", "1.5000"), ("b", "1.5000"),
                              ("a", "1.2500"), ("b", "1.2500")], lines

    asyncio.run(scenario())


def test_three_runs_fit_80_columns(tmp_path):
    from medvl.tui.dashboard_widgets import ChartLegend

    names = ["lr1e-3", "lr3e-3", "lr1e-4-with-a-long-name"]
    for k, name in enumerate(names):
        _jsonl(tmp_path / name, [
            {"time": 1.0e9 + k, "kind": "start", "total_steps": 200, "world_size": 1, "recipe": "tiny_cpu",
             "model": "qwen2.5-vl-tiny", "method": "lora", "trainable_params": 16384},
            *[{"time": 1.0e9 + k + s, "kind": "train", "step": s, "total_steps": 200, "loss": 5.0 / s,
               "epoch": s / 50} for s in range(1, 121)]])

    async def scenario():
        app = Dashboard([tmp_path / n for n in names], poll_s=0.05)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.5)
            assert app.header.size.height == 3  # one line per run, cut rather than wrapped
            header = [str(app.header.render_line(y).text) for y in range(3)]
            assert [ln.split()[1] for ln in header] == names and all(ln.rstrip().endswith("…") for ln in header)
            bars = [str(b.query_one(".progress-run").render()).strip() for b in app.query(RunProgress)]
            assert bars == [f"● {n}" for n in names[:2]] + ["● lr1e-4-with-a-long-name"]
            assert all(b.region.height == 1 for b in app.query(RunProgress))
            legend = app.query_one(ChartLegend)
            assert legend.display and all(n in str(legend.render()) for n in names)
            assert legend.region.y > app.chart.region.y + app.chart.region.height - 1  # under the plot, not on it
            assert app.chart.region.height >= 8 and "training loss" in app.chart.title_text

    asyncio.run(scenario())
