"""`medvl chat` without a terminal: the line loop through a real subprocess with stdin (what a script over SSH
sees), the default-model rule, and bad input as exit 2 with a message, never a traceback."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MEDVL = str(Path(sys.executable).with_name("medvl"))


@pytest.fixture(scope="module")
def png():
    import easy_vqa

    return list(easy_vqa.get_train_image_paths().values())[0]


def run(args, stdin="", cwd=None, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400", **(env or {})}  # no wrapped error panels
    env.pop("MEDVL_MODEL", None) if "MEDVL_MODEL" not in (env or {}) else None
    return subprocess.run([MEDVL, "chat", *args], input=stdin, capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def test_piped_question_prints_exactly_one_answer(tiny_dir, png, tmp_path):
    out = run([str(tiny_dir("qwen2.5-vl")), "--image", png, "--max-new-tokens", "8"], "What shape is this?\n",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1 and out.stdout.strip()
    assert "Traceback" not in out.stderr and "Loading weights" not in out.stderr
    # the same answer the API gives: one generation path
    from medvl import Chatbot
    from medvl.inference import GenerationOptions

    bot = Chatbot(tiny_dir("qwen2.5-vl"), options=GenerationOptions(max_new_tokens=8))
    assert out.stdout.strip() == bot.chat("What shape is this?", images=[png])


def test_json_lines_default_model_and_a_bad_line_in_the_middle(tiny_dir, png, tmp_path):
    script = f"what shape?\n/image {tmp_path}/missing.png\nclear\nand now?\nquit\nnever asked\n"
    out = run(["--json", "--image", png, "--max-new-tokens", "6"], script, cwd=tmp_path,
              env={"MEDVL_MODEL": str(tiny_dir("llava"))})
    assert out.returncode == 2  # a line failed; the loop went on
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    # one object per input line that asked something: the failed /image line too, so a script stays paired
    assert [("error" in r) for r in rows] == [False, True, False]
    answers = [r for r in rows if "error" not in r]
    assert all(set(r) == {"answer", "tokens", "seconds"} for r in answers)
    assert all(0 < r["tokens"] <= 6 and r["seconds"] > 0 for r in answers)
    assert rows[1]["input"] == f"/image {tmp_path}/missing.png" and "image-missing" in rows[1]["error"]
    assert "from $MEDVL_MODEL" in out.stderr and "image-missing" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("case", ["missing-image", "text-only", "not-a-model", "no-model"])
def test_bad_input_exits_2_with_a_message(case, tiny_dir, png, tmp_path):
    (tmp_path / "empty").mkdir()
    args = {"missing-image": [str(tiny_dir("qwen2-vl")), "--image", "nope.png"],
            "text-only": [str(tiny_dir("causal-lm")), "--image", png],
            "not-a-model": [str(tmp_path / "empty")],
            "no-model": []}[case]
    out = run(args, "hello\n", cwd=tmp_path)
    expected = {"missing-image": "image-missing", "text-only": "text-only model", "not-a-model": "holds no model",
                "no-model": "MEDVL_MODEL"}[case]
    assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""


def test_newest_finished_run_is_the_default(tiny_dir, tmp_path, monkeypatch):
    import shutil
    import time

    from medvl.resolve import default_model

    monkeypatch.delenv("MEDVL_MODEL", raising=False)
    for name in ("old", "new"):
        shutil.copytree(tiny_dir("causal-lm"), tmp_path / "runs" / name / "final")
        (tmp_path / "runs" / name / "metrics.jsonl").write_text('{"kind": "end"}\n')
        time.sleep(0.01)
        os.utime(tmp_path / "runs" / name / "final")
    (tmp_path / "runs" / "unfinished").mkdir()
    assert default_model(tmp_path) == (str(tmp_path / "runs" / "new"), "the newest finished run under ./runs")
    monkeypatch.setenv("MEDVL_MODEL", "some/model")
    assert default_model(tmp_path)[0] == "some/model"


def test_plain_loop_in_process_compare_and_commands(tiny_dir, png, tmp_path):
    from medvl.commands.chat_plain import run_plain
    from medvl.inference import Chatbot, GenerationOptions
    from medvl.session import ChatSession

    opts = GenerationOptions(max_new_tokens=5)
    bots = [Chatbot(tiny_dir("qwen2.5-vl"), options=opts), Chatbot(tiny_dir("qwen3-vl"), options=opts)]
    out, err = io.StringIO(), io.StringIO()
    script = io.StringIO(f"/image {png}\nwhat shape?\n/bogus\n\n/save {tmp_path}/s.jsonl\n/quit\n")
    rc = run_plain(ChatSession(bots), stdin=script, stdout=out, stderr=err)
    lines = out.getvalue().splitlines()
    assert rc == 2 and "unknown command /bogus" in err.getvalue()
    # A / B as in the app's columns: the two models' folders are both called "model" here
    assert [ln.split("]")[0] for ln in lines] == [f"[A {bots[0].source.name}", f"[B {bots[1].source.name}"]
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 2  # one record per model


def test_ctrl_c_mid_answer_stops_it_and_the_loop_goes_on(tiny_dir):
    from medvl.commands.chat_plain import run_plain
    from medvl.inference import Chatbot, GenerationOptions
    from medvl.session import ChatSession

    bot = Chatbot(tiny_dir("causal-lm"), options=GenerationOptions(max_new_tokens=300))
    bot.eos = []  # only a stop ends it before 300 tokens

    class CtrlCAfter3(io.StringIO):  # Ctrl-C arrives while the third piece is being printed
        pieces = 0

        def write(self, text):
            self.pieces += 1
            if self.pieces == 3:
                raise KeyboardInterrupt
            return super().write(text)

    err = io.StringIO()
    rc = run_plain(ChatSession([bot]), stdin=io.StringIO("Tell me everything.\nAnd then?\n"), stdout=CtrlCAfter3(),
                   stderr=err)
    assert "(stopped)" in err.getvalue()
    assert [t["role"] for t in bot.history] == ["user", "assistant", "user", "assistant"]
    assert len(bot.turns[1].text) < len(bot.turns[3].text) and bot.last.tokens == 300 and rc == 0  # the second question was answered in full
