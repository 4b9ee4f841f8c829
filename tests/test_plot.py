"""`medvl plot`: figures of one or more runs in PNG, SVG and PDF, and clear errors for bad input."""

import subprocess
import sys

import pytest

from medvl.engine.metrics import EvalEvent, Fanout, JsonlSink, StartEvent, TrainEvent
from medvl.errors import MedvlError
from medvl.plot import figure, load_runs, save_plot


def make_run(path, loss0=5.0, resume_at=None, steps=40):
    path.mkdir(parents=True)
    sink = Fanout([JsonlSink(path / "metrics.jsonl")])
    sink.log(StartEvent(total_steps=steps))
    for s in range(1, steps + 1):
        sink.log(TrainEvent(step=s, loss=loss0 / s, lr=1e-3, grad_norm=1.0, memory_gb_per_device=[1.0, 2.0]))
        if s % 10 == 0:
            sink.log(EvalEvent(step=s, eval_loss=loss0 / s + 0.1, benchmark_accuracy=0.5,
                               benchmark={"vqa-rad": {"acc": 0.4, "n": 5}, "slake": {"acc": 0.6, "n": 5}}))
        if s == resume_at:
            sink.log(StartEvent(total_steps=steps, start_step=s - 5, resumed_from="ck"))
            for r in range(s - 4, s + 1):
                sink.log(TrainEvent(step=r, loss=loss0 / r))
    sink.close()
    return path


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_every_format_is_a_real_file_of_that_type(tmp_path, suffix, magic):
    run = make_run(tmp_path / "run")
    out = save_plot(load_runs([run]), tmp_path / f"curves{suffix}")
    assert out.read_bytes()[:len(magic)] == magic and out.stat().st_size > 5_000
    assert not list(tmp_path.glob(".*partial*"))


def test_panels_runs_and_resume_marks(tmp_path):
    runs = load_runs([make_run(tmp_path / "a"), make_run(tmp_path / "b", loss0=8.0, resume_at=20)])
    fig = figure(runs, metrics=["loss", "bench", "memory"])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["training loss", "benchmark accuracy", "memory per device (GB)"]
    loss_ax = fig.axes[0]
    drawn = [ln for ln in loss_ax.get_lines() if ln.get_linestyle() != "--"]
    assert len(drawn) == 4  # raw + smoothed per run
    assert [ln.get_xdata()[0] for ln in loss_ax.get_lines() if ln.get_linestyle() == "--"] == [15]  # the resume
    raw_b = [ln for ln in drawn if ln.get_alpha() == 0.25][1]
    assert list(raw_b.get_xdata()) == list(range(1, 41))  # one curve: re-run steps replaced, no zigzag
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]
    bench_labels = sorted(ln.get_label() for ln in fig.axes[1].get_lines() if not ln.get_label().startswith("_"))
    assert bench_labels == ["a overall", "a slake", "a vqa-rad", "b overall", "b slake", "b vqa-rad"]


def test_last_n_and_log_scale(tmp_path):
    runs = load_runs([make_run(tmp_path / "a")])
    fig = figure(runs, metrics=["loss"], last=10, log=("loss",))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and min(min(ln.get_xdata()) for ln in ax.get_lines()) >= 30


def test_bad_input_is_a_clear_error(tmp_path):
    run = make_run(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedvlError, match="no metrics.jsonl"):
        load_runs([tmp_path / "empty"])
    with pytest.raises(MedvlError, match="is a file"):
        load_runs([run / "metrics.jsonl"])
    with pytest.raises(MedvlError, match="nothing to plot"):
        figure(load_runs([run]), metrics=["gpu"])
    with pytest.raises(MedvlError, match="does not exist"):
        save_plot(load_runs([run]), tmp_path / "no" / "such" / "dir" / "x.png")


@pytest.mark.parametrize("args, says", [
    (["{run}", "--out", "{tmp}/x.jpg"], "must be one of .png, .svg, .pdf"),
    (["{tmp}/missing", "--out", "{tmp}/x.png"], "no run directory at"),
    (["{run}", "--out", "{tmp}/run"], "must be one of"),
    (["{run}", "--out", "{run}/checkpoints.png"], "is a directory"),
    (["{run}", "--out", "{tmp}/x.png", "--metric", "losss"], "'losss' is not a metric"),
])
def test_cli_bad_input_exits_2_without_traceback_or_output(tmp_path, args, says):
    run = make_run(tmp_path / "run")
    (run / "checkpoints.png").mkdir()  # a directory where the figure should go
    argv = [a.format(run=run, tmp=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, "-m", "medvl.commands.main", "plot", *argv], capture_output=True,
                          text=True, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert not list(tmp_path.glob("x.*"))


def test_cli_writes_the_figure(tmp_path):
    run = make_run(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "medvl.commands.main", "plot", str(run), "--out",
                           str(tmp_path / "c.svg"), "--metric", "loss,eval"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and (tmp_path / "c.svg").read_text().count("<svg") == 1


def test_watch_refuses_a_file_but_waits_for_a_missing_dir(tmp_path):
    from medvl.commands.watch import check_runs

    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(MedvlError, match="is a file, not a run directory"):
        check_runs([tmp_path / "f.txt"])
    check_runs([tmp_path / "not-started-yet"])  # no error: the dashboard waits for it
