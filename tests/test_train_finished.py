"""`medvl train RECIPE --resume auto` on a run that already finished: the same steps is "nothing to do" (the run
untouched, exit 0), more steps an announced extension (console header, metrics.jsonl, `medvl watch`'s log), and
a finished run without checkpoints is refused instead of silently started over."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medvl.commands.main import app
from medvl.engine.train import train
from medvl.errors import MedvlError


def overrides(tiny, data, out, *extra):
    return [f"model.base={tiny}", f"data.train=[{data}]", f"output.dir={out}", "train.save_every=2",
            "train.max_steps=4", "train.eval_every=null", "data.val_fraction=null", "train.log_every=1",
            "train.micro_batch_size=4", *extra]


def snapshot(run_dir):
    """Every file of the run with its bytes and modification time: any rewrite shows."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(tiny_dir, prepared_text, tmp_path):
    out = tmp_path / "run"
    from medvl.config import load_recipe

    train(load_recipe("tiny_cpu", overrides(tiny_dir("causal-lm"), prepared_text, out)))
    return lambda *extra: overrides(tiny_dir("causal-lm"), prepared_text, out, *extra)


def test_same_steps_is_nothing_to_do_and_leaves_the_run_alone(finished, tmp_path):
    from medvl.config import load_recipe

    out = tmp_path / "run"
    before = snapshot(out)
    res = CliRunner().invoke(app, ["train", "tiny_cpu", *finished(), "--resume", "auto"], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert (f"already finished at step 4 (final model: {out / 'final'}); nothing to do — raise train.max_steps "
            "above 4 to train further") in res.output
    assert "step 1/" not in res.output and snapshot(out) == before
    # the library says the same to a caller that skips the command (and fewer steps is nothing to do too)
    for steps in (4, 3):
        result = train(load_recipe("tiny_cpu", finished(f"train.max_steps={steps}")), resume="auto")
        assert result.already_finished and result.steps == 4 and result.final_dir == out / "final"
    assert snapshot(out) == before


def test_more_steps_extends_the_run_and_says_so(finished, tmp_path):
    from medvl.engine.metrics import parse_line
    from medvl.tui.text import describe

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "tiny_cpu", *finished("train.max_steps=6"), "--resume", "auto"],
                             env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert "extending the finished run from step 4 to 6 steps" in res.output
    assert f"resumed from {out / 'checkpoints' / 'step-000004'}" in res.output
    events = [parse_line(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    starts = [e for e in events if e.kind == "start"]
    assert [(s.start_step, s.total_steps, s.finished_at) for s in starts] == [(0, 4, None), (4, 6, 4)]
    assert [e.step for e in events if e.kind == "train"] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events if e.kind == "end"] == [4, 6]
    # what `medvl watch` shows in its event log for that line
    assert describe(starts[1]).startswith("[cyan]extending[/] the finished run from step 4 to 6 steps")
    (change,) = [e for e in events if e.kind == "recipe_change"]
    assert describe(change) == "step 4: recipe changed on resume: train.max_steps 4 -> 6"  # not a dict's repr
    # finished again, now at 6: the same command has nothing to do
    again = CliRunner().invoke(app, ["train", "tiny_cpu", *finished("train.max_steps=6"), "--resume", "auto"],
                               env={"COLUMNS": "300"})
    assert again.exit_code == 0 and "already finished at step 6" in again.output


def test_a_finished_run_without_checkpoints_is_not_started_over(tiny_dir, prepared_text, tmp_path):
    from medvl.config import load_recipe

    out = tmp_path / "run"
    args = overrides(tiny_dir("causal-lm"), prepared_text, out, "train.save_every=null")
    train(load_recipe("tiny_cpu", args))
    before = snapshot(out)
    res = CliRunner().invoke(app, ["train", "tiny_cpu", *args, "train.max_steps=6", "--resume", "auto"],
                             env={"COLUMNS": "300"})
    # a MedvlError: main() prints it as a clean message with exit 2 (CliRunner on `app` hands it back raw)
    assert isinstance(res.exception, MedvlError), res.output
    assert "finished at step 4 but kept no checkpoint" in str(res.exception)
    assert f"model.base={out / 'final'}" in str(res.exception)
    assert snapshot(out) == before


def test_a_moved_run_is_still_known_as_finished(tiny_dir, prepared_text, tmp_path):
    """metrics.jsonl records final/ where the run was written; after `mv` that path is gone, and reading it made
    the guard skip a finished run without checkpoints, which --resume auto then started over."""
    from medvl.config import load_recipe
    from medvl.engine.checkpoint import finished_run

    first = tmp_path / "first"
    train(load_recipe("tiny_cpu", overrides(tiny_dir("causal-lm"), prepared_text, first, "train.save_every=null")))
    moved = first.rename(tmp_path / "moved")
    before = snapshot(moved)
    with pytest.raises(MedvlError, match="finished at step 4 but kept no checkpoint") as err:
        finished_run(moved, "auto")
    assert f"model.base={moved / 'final'}" in err.value.fix
    args = overrides(tiny_dir("causal-lm"), prepared_text, moved, "train.save_every=null", "train.max_steps=6")
    with pytest.raises(MedvlError, match="kept no checkpoint"):
        train(load_recipe("tiny_cpu", args), resume="auto")
    assert snapshot(moved) == before
