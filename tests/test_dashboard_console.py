"""The plain console view of `medvl train`: off a terminal one unwrapped line per log step, readable rates."""

import io

from rich.console import Console

from medvl.commands.ui import TrainConsole, _console
from medvl.tui.text import rate
from medvl.engine.metrics import CheckpointEvent, EndEvent, EvalEvent, StartEvent, TrainEvent


def _log_to_pipe(events, width=80):
    buf = io.StringIO()
    c = Console(file=buf, width=width, soft_wrap=True, highlight=False, force_terminal=False)
    tc = TrainConsole(c)
    for e in events:
        tc.log(e)
    tc.close()
    return buf.getvalue().splitlines()


def test_off_a_terminal_each_log_step_is_one_line_even_at_80_columns():
    start = StartEvent(run_dir="/a/very/long/run/directory/name/that/goes/past/eighty/columns", family="qwen2.5-vl",
                       total_steps=1000, world_size=8, distributed="DEEPSPEED", device="cuda:0", global_batch=256,
                       table=[{"group": "language", "params": 7_000_000_000, "trainable": 7_000_000_000,
                               "mode": "full", "lr": 1e-5}])
    steps = [TrainEvent(step=s, total_steps=1000, loss=2.0 - s / 1000, lr=1e-5, grad_norm=1.25,
                        tokens_per_s=20531.24880018749, samples_per_s=12.345678, memory_gb=71.2,
                        memory_gb_per_device=[71.2] * 8, eta_s=3725.0) for s in (10, 20, 30)]
    lines = _log_to_pipe([start, *steps, EvalEvent(step=30, eval_loss=1.5), CheckpointEvent(step=30, path="c"),
                          EndEvent(step=1000, final_dir="f", wall_s=10)])
    step_lines = [ln for ln in lines if ln.startswith("step ") and "/1000" in ln]
    assert len(step_lines) == 3, lines
    assert all("eta 1h02m" in ln and "20,531 tok/s" in ln and "12.3 samples/s" in ln for ln in step_lines)
    assert not any("20531.2488" in ln for ln in lines)
    assert any(ln.startswith("run /a/very/long/run") and ln.endswith("steps 0->1000") for ln in lines)
    assert any("eval loss 1.5000" in ln for ln in lines) and any("done in 10s" in ln for ln in lines)


def test_rates_read_like_a_person_writes_them():
    assert rate(20531.24880018749) == "20,531/s" and rate(12.345, "samples") == "12.3 samples/s"
    assert rate(0.41234) == "0.412/s" and rate(None) == "-"


def test_a_pipe_console_does_not_cut_table_names(monkeypatch):
    c = _console()  # under pytest stdout is not a terminal
    assert not c.is_terminal and c.width >= 200 and c.soft_wrap


def test_a_stop_event_says_its_reason_once():
    from rich.text import Text

    from medvl.engine.metrics import StopEvent
    from medvl.tui.text import describe

    def plain(e):
        return Text.from_markup(describe(e)).plain

    ctrl_c = StopEvent(reason="interrupted", message="interrupted (Ctrl-C or SIGINT)", fix="resume")
    assert plain(ctrl_c) == "stopped: interrupted (Ctrl-C or SIGINT)  fix: resume"
    assert plain(StopEvent(reason="error", message="loss is NaN")) == "stopped (error) loss is NaN"
    assert plain(StopEvent(reason="crashed")) == "stopped (crashed)"
