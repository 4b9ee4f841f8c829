"""`medvl train --tui`: training runs in a background process that the dashboard only reads; the run directory
is the same as without --tui, and stopping it from the dashboard is a clean Ctrl-C with a recorded stop."""

import asyncio
import os
import subprocess
import sys
import time

import pytest

from medvl.engine.metrics import StopEvent, TrainEvent, read_events


def _args(tiny, data, out, steps=8):
    return [f"model.base={tiny}", f"data.train=[{data}]", f"output.dir={out}", f"train.max_steps={steps}",
            "train.save_every=4", "train.eval_every=4", "train.log_every=1", "train.micro_batch_size=4",
            "optim.warmup_steps=2"]


def _files(run):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


@pytest.mark.slow
def test_train_tui_finishes_and_leaves_the_same_run_directory(tiny_dir, prepared_vqa, tmp_path):
    from safetensors.torch import load_file

    from medvl.tui.dashboard import dashboard_for_training
    from medvl.tui.dashboard_widgets import MetricChart

    tiny = tiny_dir("qwen2.5-vl")
    plain = subprocess.run([sys.executable, "-m", "medvl.commands.main", "train", "tiny_cpu",
                            *_args(tiny, prepared_vqa, tmp_path / "plain")], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": "80"})
    assert plain.returncode == 0, plain.stdout + plain.stderr
    # a log file gets one whole line per log step, even where the terminal would be 80 columns wide
    steps = [ln for ln in plain.stdout.splitlines() if ln.startswith("step ") and "/8 " in ln]
    assert len(steps) == 8 and all(len(ln) > 80 and ln.rstrip().split()[-2] == "eta" for ln in steps), steps
    assert not any(ln.startswith(("mem ", "eta ")) for ln in plain.stdout.splitlines())

    async def scenario():
        app = dashboard_for_training("tiny_cpu", _args(tiny, prepared_vqa, tmp_path / "tui"), None, tmp_path / "tui",
                                     poll_s=0.1)
        async with app.run_test(size=(100, 30)) as pilot:
            deadline = time.monotonic() + 240
            while app.trainer.poll() is None and time.monotonic() < deadline:
                await pilot.pause(0.2)
            await pilot.pause(0.5)
            assert app.trainer.poll() == 0, "\n".join(app.trainer.tail(30))
            assert app.runs[0].status() == "finished" and app.runs[0].step == 8
            assert app.query_one(MetricChart).drawn[-1].steps[-1] == 8
            await pilot.press("q")  # finished: no question asked
        return app

    app = asyncio.run(scenario())
    assert "exit code 0" in app.return_value
    # the same run directory, plus the background process's console output
    assert app.trainer.log_path == tmp_path / "tui" / "train.log"
    assert _files(tmp_path / "tui") == sorted(_files(tmp_path / "plain") + ["train.log"])
    a = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    b = load_file(tmp_path / "tui" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    kinds = [[e.kind for e in read_events(tmp_path / r / "metrics.jsonl")] for r in ("plain", "tui")]
    assert kinds[0] == kinds[1]
    assert "step 8/8" in app.trainer.log_path.read_text()  # the child's plain one-line-per-step output


@pytest.mark.slow
def test_stopping_background_training_is_a_clean_interrupt_with_a_stop_event(tiny_dir, prepared_vqa, tmp_path):
    from medvl.engine.background import BackgroundRun

    run = tmp_path / "run"
    bg = BackgroundRun("tiny_cpu", _args(tiny_dir("qwen2.5-vl"), prepared_vqa, run, steps=100_000), run_dir=run)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not ((run / "metrics.jsonl").is_file() and any(
                isinstance(e, TrainEvent) for e in read_events(run / "metrics.jsonl"))):
            assert bg.poll() is None, "\n".join(bg.tail(30))
            time.sleep(0.2)
        code = bg.stop(timeout=60)
    finally:
        if bg.poll() is None:
            os.killpg(bg.pid, 9)
    assert code == 130, "\n".join(bg.tail(30))
    last = read_events(run / "metrics.jsonl")[-1]
    assert isinstance(last, StopEvent) and last.reason == "interrupted" and "--resume auto" in last.fix


def test_the_background_log_is_written_inside_a_new_run_directory(tmp_path):
    from medvl.engine.background import BackgroundRun

    run = tmp_path / "not" / "made" / "yet" / "run"
    bg = BackgroundRun("no-such-recipe", [f"output.dir={run}"], run_dir=run)
    try:
        assert bg.log_path == run / "train.log"
        assert bg.poll() is not None or bg._proc.wait(timeout=120) is not None
    finally:
        if bg.poll() is None:
            os.killpg(bg.pid, 9)
    assert bg.poll() == 2 and "no-such-recipe" in bg.log_path.read_text()


def test_a_train_log_alone_does_not_count_as_a_run_already_there(tiny_dir, tmp_path):
    from medvl.engine.setup import prepare_run_dir
    from medvl.errors import MedvlError
    from medvl.config import load_recipe

    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("the --tui dashboard's log of this run\n")
    r = load_recipe("tiny_cpu", [f"model.base={tiny_dir('causal-lm')}", f"output.dir={run}"])
    assert prepare_run_dir(r, None) == run  # a fresh --tui run: train.log was written just before it started
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(MedvlError, match="already holds a run"):
        prepare_run_dir(r, None)
