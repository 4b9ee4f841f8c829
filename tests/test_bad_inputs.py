"""Every command, run as a user runs it (the `medvl` console script in a subprocess), against a catalogue of bad
inputs: each must exit 2 with a message naming the path, print no traceback, and leave nothing half-written.

The catalogue is one table, CASES: a new command (chat, watch) joins by adding rows. A row builds its argv from
the `world` (good and broken inputs made once per module) and names the path its message must contain and the
paths that must not exist afterwards. Rows run in parallel subprocesses (most fail before torch is imported,
in ~1 s); `test_catalogue_counts` prints tried / clear / traceback and fails on any traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MEDVL = str(Path(sys.executable).parent / "medvl")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="400", TOKENIZERS_PARALLELISM="false")
TIMEOUT = 240


@dataclass
class Case:
    id: str
    argv: object  # world -> list[str] (after `medvl`)
    names: object  # world -> the path (str) the message must name
    absent: object = lambda w: []  # world -> paths that must not exist afterwards
    as_user: bool = False  # permission cases: root reads everything, so they are skipped when run as root


@dataclass
class World:
    root: Path
    p: dict = field(default_factory=dict)

    def __getitem__(self, key):
        return str(self.p[key])

    def out(self, case_id: str) -> str:
        return str(self.root / "out" / case_id)


def _payload_pickle(path: Path, marker: Path) -> None:
    """A torch file whose unpickling would run `touch marker`."""
    import torch

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"state": Payload()}, path)


def _broken_model(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    if how == "no-weights":
        weights.unlink()
    elif how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "random":
        weights.write_bytes(os.urandom(weights.stat().st_size))
    elif how == "empty":
        weights.write_bytes(b"")
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dir, prepared_text):
    from medvl.config import load_recipe
    from medvl.engine.train import train

    root = tmp_path_factory.mktemp("bad")
    w = World(root)
    (root / "out").mkdir()
    lm, vl = tiny_dir("causal-lm"), tiny_dir("qwen2.5-vl")
    w.p.update(lm=lm, vl=vl, data=prepared_text, marker=root / "pwned")
    for how in ("no-weights", "truncated", "random", "empty"):
        w.p[f"lm-{how}"] = _broken_model(lm, root / f"lm-{how}", how)
        w.p[f"vl-{how}"] = _broken_model(vl, root / f"vl-{how}", how)
    (root / "empty.yaml").write_text("")
    (root / "empty.json").write_text("")
    (root / "a-file").write_text("not a directory\n")
    (root / "a-dir").mkdir()
    (root / "empty-dir").mkdir()
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "unreadable.yaml").write_text("model: {base: x}\n")
    (root / "unreadable.yaml").chmod(0)
    w.p["lm-unreadable"] = _broken_model(lm, root / "lm-unreadable", "keep")
    (w.p["lm-unreadable"] / "model.safetensors").chmod(0)
    w.p.update(binary_yaml=root / "binary.yaml", unreadable_yaml=root / "unreadable.yaml")
    w.p.update(empty_yaml=root / "empty.yaml", empty_json=root / "empty.json", file=root / "a-file",
               dir=root / "a-dir", empty_dir=root / "empty-dir", missing=root / "does-not-exist")
    # a real run with one checkpoint, and crafted copies of it
    run = root / "run"
    train(load_recipe("tiny_cpu", [f"model.base={lm}", f"data.train=[{prepared_text}]", f"output.dir={run}",
                                   "train.max_steps=2", "train.save_every=1", "train.eval_every=null",
                                   "data.val_fraction=null", "train.micro_batch_size=4"]))
    w.p["run"] = run
    ckpt = run / "checkpoints" / "step-000002"
    for name, plant in (("pickled-optimizer", "optimizer.bin"), ("pickled-custom", "custom_checkpoint_0.pkl")):
        c = shutil.copytree(ckpt, root / "foreign" / name / "checkpoints" / "step-000002")
        shutil.copy(run / "recipe.yaml", c.parent.parent / "recipe.yaml")
        _payload_pickle(c / plant, w.p["marker"])
        w.p[name] = c
    bad_state = shutil.copytree(ckpt, root / "foreign" / "bad-state" / "checkpoints" / "step-000002")
    (bad_state / "trainer_state.json").write_text("{not json")
    w.p["bad-state"] = bad_state
    ds = root / "foreign" / "zero" / "checkpoints" / "step-000002"  # a ZeRO checkpoint carrying the payload
    (ds / "pytorch_model").mkdir(parents=True)
    (ds / "trainer_state.json").write_text(json.dumps({"step": 2}))
    (ds / "latest").write_text("pytorch_model")
    shutil.copy(run / "recipe.yaml", ds.parent.parent / "recipe.yaml")
    for f in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        _payload_pickle(ds / "pytorch_model" / f, w.p["marker"])
    w.p["zero"] = ds
    cut = shutil.copytree(ckpt, root / "foreign" / "cut" / "checkpoints" / "step-000002")
    shutil.copy(run / "recipe.yaml", cut.parent.parent / "recipe.yaml")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    w.p["cut"] = cut
    # convert needs a text LLM shaped like the VL model's language model
    from .test_convert import make_llm

    llm = make_llm(root / "llm")
    w.p["llm"] = llm
    w.p["llm-truncated"] = _broken_model(llm, root / "llm-truncated", "truncated")
    w.p["llm-no-weights"] = _broken_model(llm, root / "llm-no-weights", "no-weights")
    from .test_eval_generate import write_eval_bundle

    w.p["bundle"] = write_eval_bundle(root / "bundle")
    # prepared data cut short: a shard that ends mid-line
    cut_data = shutil.copytree(prepared_text, root / "cut-data")
    shard = cut_data / "data-00000.jsonl"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # ends mid-line
    w.p.update(cut_data=cut_data, cut_shard=shard)
    bad_manifest = shutil.copytree(prepared_text, root / "bad-manifest")
    (bad_manifest / "manifest.json").write_text("{")
    w.p.update(bad_manifest=bad_manifest)
    (root / "outside").mkdir()
    (root / "outside" / "secret.png").write_bytes((w.p["bundle"].parent / "images" / "img0.png").read_bytes())
    escaping = shutil.copytree(w.p["bundle"].parent, root / "escaping")
    items = json.loads((escaping / w.p["bundle"].name).read_text())
    for item in items:
        item["image"] = ["../outside/secret.png" for _ in item["image"]]
    (escaping / w.p["bundle"].name).write_text(json.dumps(items))
    w.p["escaping"] = escaping / w.p["bundle"].name
    return w


def _train(w, case, *extra, resume=None):
    argv = ["train", "tiny_cpu", f"model.base={w['lm']}", f"data.train=[{w['data']}]",
            f"output.dir={w.out(case)}", "train.max_steps=2", "train.eval_every=null", "data.val_fraction=null",
            *extra]
    return argv + (["--resume", resume] if resume else [])


def _out(case):
    return lambda w: [w.out(case)]


CASES = [
    # ---- train
    Case("train-recipe-missing", lambda w: ["train", w["missing"] + ".yaml"], lambda w: w["missing"] + ".yaml"),
    Case("train-recipe-empty", lambda w: ["train", w["empty_yaml"]], lambda w: w["empty_yaml"]),
    Case("train-recipe-is-dir", lambda w: ["train", w["dir"] + "/"], lambda w: w["dir"]),
    Case("train-recipe-binary", lambda w: ["train", w["binary_yaml"]], lambda w: w["binary_yaml"]),
    Case("train-recipe-unreadable", lambda w: ["train", w["unreadable_yaml"]], lambda w: w["unreadable_yaml"],
         as_user=True),
    Case("train-model-unreadable", lambda w: _train(w, "train-model-unreadable", f"model.base={w['lm-unreadable']}"),
         lambda w: w["lm-unreadable"], _out("train-model-unreadable"), as_user=True),
    Case("train-model-missing", lambda w: _train(w, "train-model-missing", f"model.base={w['missing']}"),
         lambda w: w["missing"], _out("train-model-missing")),
    Case("train-model-is-file", lambda w: _train(w, "train-model-is-file", f"model.base={w['file']}"),
         lambda w: w["file"], _out("train-model-is-file")),
    Case("train-model-no-weights", lambda w: _train(w, "train-model-no-weights", f"model.base={w['lm-no-weights']}"),
         lambda w: w["lm-no-weights"], _out("train-model-no-weights")),
    Case("train-model-truncated", lambda w: _train(w, "train-model-truncated", f"model.base={w['lm-truncated']}"),
         lambda w: w["lm-truncated"], _out("train-model-truncated")),
    Case("train-model-random", lambda w: _train(w, "train-model-random", f"model.base={w['lm-random']}"),
         lambda w: w["lm-random"], _out("train-model-random")),
    Case("train-model-empty-weights", lambda w: _train(w, "train-model-empty-weights", f"model.base={w['lm-empty']}"),
         lambda w: w["lm-empty"], _out("train-model-empty-weights")),
    Case("train-launched-model-truncated", lambda w: _train(w, "train-launched", "distributed.nproc=2",
                                                            f"model.base={w['lm-truncated']}"),
         lambda w: w["lm-truncated"], _out("train-launched")),
    Case("train-data-missing", lambda w: _train(w, "train-data-missing", f"data.train=[{w['missing']}]"),
         lambda w: w["missing"], _out("train-data-missing")),
    Case("train-data-is-file", lambda w: _train(w, "train-data-is-file", f"data.train=[{w['file']}]"),
         lambda w: w["file"], _out("train-data-is-file")),
    Case("train-out-is-file", lambda w: _train(w, "x", f"output.dir={w['file']}"), lambda w: w["file"]),
    Case("train-out-under-file", lambda w: _train(w, "x", f"output.dir={w['file']}/run"), lambda w: w["file"]),
    Case("train-resume-missing", lambda w: _train(w, "train-resume-missing", resume=w["missing"]),
         lambda w: w["missing"], _out("train-resume-missing")),
    Case("train-resume-not-a-checkpoint", lambda w: _train(w, "train-resume-nac", resume=w["empty_dir"]),
         lambda w: w["empty_dir"], _out("train-resume-nac")),
    Case("train-resume-pickled-optimizer", lambda w: _train(w, "train-resume-po", "train.save_every=1",
                                                            resume=w["pickled-optimizer"]),
         lambda w: w["pickled-optimizer"], lambda w: [w["marker"]]),
    Case("train-resume-pickled-custom-state", lambda w: _train(w, "train-resume-pc", "train.save_every=1",
                                                               resume=w["pickled-custom"]),
         lambda w: w["pickled-custom"], lambda w: [w["marker"]]),
    Case("train-resume-corrupt-state", lambda w: _train(w, "train-resume-cs", resume=w["bad-state"]),
         lambda w: w["bad-state"]),
    # ---- export
    Case("export-missing", lambda w: ["export", w["missing"], "--out", w.out("export-missing")],
         lambda w: w["missing"], _out("export-missing")),
    Case("export-file", lambda w: ["export", w["file"], "--out", w.out("export-file")], lambda w: w["file"],
         _out("export-file")),
    Case("export-empty-dir", lambda w: ["export", w["empty_dir"], "--out", w.out("export-empty-dir")],
         lambda w: w["empty_dir"], _out("export-empty-dir")),
    Case("export-no-weights", lambda w: ["export", w["lm-no-weights"], "--out", w.out("export-nw")],
         lambda w: w["lm-no-weights"], _out("export-nw")),
    Case("export-truncated", lambda w: ["export", w["lm-truncated"], "--out", w.out("export-tr")],
         lambda w: w["lm-truncated"], _out("export-tr")),
    Case("export-random", lambda w: ["export", w["vl-random"], "--out", w.out("export-rnd")],
         lambda w: w["vl-random"], _out("export-rnd")),
    Case("export-out-is-file", lambda w: ["export", w["lm"], "--out", w["file"]], lambda w: w["file"]),
    Case("export-pickled-zero-checkpoint", lambda w: ["export", w["zero"], "--out", w.out("export-zero")],
         lambda w: w["zero"], lambda w: [w["marker"], w.out("export-zero")]),
    Case("export-truncated-checkpoint", lambda w: ["export", w["cut"], "--out", w.out("export-cut")],
         lambda w: w["cut"], _out("export-cut")),
    # ---- convert
    Case("convert-vl-missing", lambda w: ["convert", "--vl", w["missing"], "--llm", w["llm"], "--out",
                                          w.out("convert-vm")], lambda w: w["missing"], _out("convert-vm")),
    Case("convert-vl-truncated", lambda w: ["convert", "--vl", w["vl-truncated"], "--llm", w["llm"], "--out",
                                            w.out("convert-vt")], lambda w: w["vl-truncated"], _out("convert-vt")),
    Case("convert-llm-truncated", lambda w: ["convert", "--vl", w["vl"], "--llm", w["llm-truncated"], "--out",
                                             w.out("convert-lt")], lambda w: w["llm-truncated"], _out("convert-lt")),
    Case("convert-llm-no-weights", lambda w: ["convert", "--vl", w["vl"], "--llm", w["llm-no-weights"], "--out",
                                              w.out("convert-ln")], lambda w: w["llm-no-weights"],
         _out("convert-ln")),
    Case("convert-out-is-file", lambda w: ["convert", "--vl", w["vl"], "--llm", w["llm"], "--out", w["file"]],
         lambda w: w["file"]),
    # ---- eval
    Case("eval-data-missing", lambda w: ["eval", "--model", w["lm"], "--data", w["missing"], "--out",
                                         w.out("eval-dm")], lambda w: w["missing"], _out("eval-dm")),
    Case("eval-data-empty", lambda w: ["eval", "--model", w["lm"], "--data", w["empty_json"], "--out",
                                       w.out("eval-de")], lambda w: w["empty_json"], _out("eval-de")),
    Case("eval-model-missing", lambda w: ["eval", "--model", w["missing"], "--data", w["empty_json"], "--out",
                                          w.out("eval-mm")], lambda w: w["missing"], _out("eval-mm")),
    Case("eval-model-no-weights", lambda w: ["eval", "--model", w["vl-no-weights"], "--data", w["bundle"],
                                             "--suite", "slake", "--out", w.out("eval-nw")],
         lambda w: w["vl-no-weights"], _out("eval-nw")),
    Case("eval-model-truncated", lambda w: ["eval", "--model", w["vl-truncated"], "--data", w["bundle"],
                                            "--suite", "slake", "--out", w.out("eval-tr")],
         lambda w: w["vl-truncated"], _out("eval-tr")),
    Case("eval-model-random", lambda w: ["eval", "--model", w["vl-random"], "--data", w["bundle"],
                                         "--suite", "slake", "--out", w.out("eval-rnd")],
         lambda w: w["vl-random"], _out("eval-rnd")),
    Case("eval-out-is-file", lambda w: ["eval", "--model", w["lm"], "--data", w["empty_json"], "--out", w["file"]],
         lambda w: w["file"]),
    # ---- prepare-data / inspect-data
    Case("prepare-input-missing", lambda w: ["prepare-data", w["missing"], "--out", w.out("prep-m")],
         lambda w: w["missing"], _out("prep-m")),
    Case("prepare-input-is-dir", lambda w: ["prepare-data", w["dir"], "--out", w.out("prep-d")],
         lambda w: w["dir"], _out("prep-d")),
    Case("prepare-input-wrong-type", lambda w: ["prepare-data", w["binary_yaml"], "--out", w.out("prep-bin")],
         lambda w: w["binary_yaml"], _out("prep-bin")),
    Case("prepare-out-is-file", lambda w: ["prepare-data", w["empty_json"], "--out", w["file"]],
         lambda w: w["file"]),
    Case("inspect-missing", lambda w: ["inspect-data", w["missing"], "--model", w["lm"]], lambda w: w["missing"]),
    Case("inspect-file", lambda w: ["inspect-data", w["file"], "--model", w["lm"]], lambda w: w["file"]),
    # ---- rows whose fix lives on another branch (issue 9 items 2 and 11)
    Case("train-shard-truncated", lambda w: _train(w, "train-cut", f"data.train=[{w['cut_data']}]"),
         lambda w: w["cut_shard"], _out("train-cut")),
    Case("inspect-shard-truncated", lambda w: ["inspect-data", w["cut_data"], "--index", "40", "--model", w["lm"]],
         lambda w: w["cut_shard"]),
    Case("train-manifest-corrupt", lambda w: _train(w, "train-manifest", f"data.train=[{w['bad_manifest']}]"),
         lambda w: w["bad_manifest"], _out("train-manifest")),
    Case("eval-image-escapes-bundle", lambda w: ["eval", "--model", w["vl"], "--data", w["escaping"], "--suite",
                                                 "slake", "--out", w.out("eval-esc")],
         lambda w: "../outside/secret.png", _out("eval-esc")),
    # ---- tiny
    Case("tiny-out-is-file", lambda w: ["tiny", "--family", "causal-lm", "--out", w["file"]], lambda w: w["file"]),
]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([MEDVL, *argv], capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        proc = subprocess.CompletedProcess(exc.cmd, -9, exc.stdout or "", f"timed out after {TIMEOUT} s")
    proc.seconds = time.perf_counter() - t0
    return proc


@pytest.fixture(scope="module")
def results(world):
    before = (world.root / "a-file").read_text()
    cases = [c for c in CASES if not (c.as_user and AS_ROOT)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = dict(zip([c.id for c in cases], pool.map(lambda c: _run([str(a) for a in c.argv(world)]), cases)))
    assert (world.root / "a-file").read_text() == before  # no case wrote over the file it was handed
    return done


def _flat(text: str) -> str:
    """A rich panel's text with borders and line breaks removed, so a long path reads whole."""
    return "".join(line.strip().strip("│").strip() for line in text.splitlines())


def _verdict(case: Case, proc, world) -> list[str]:
    out = proc.stdout + proc.stderr
    problems = []
    if proc.returncode != 2:
        problems.append(f"exit {proc.returncode}, not 2")
    if "Traceback" in out:
        problems.append("traceback")
    if _flat(case.names(world)) not in _flat(out):
        problems.append(f"message does not name {case.names(world)}")
    problems += [f"left behind {p}" for p in case.absent(world) if Path(p).exists()]
    return problems


AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _marks(c: Case) -> list:
    marks = []
    if c.as_user and AS_ROOT:
        marks.append(pytest.mark.skip(reason="root reads unreadable files"))
    return marks


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=_marks(c)) for c in CASES])
def test_bad_input_is_a_clear_error(case, results, world):
    proc = results[case.id]
    problems = _verdict(case, proc, world)
    assert not problems, f"{case.id}: {problems}\n--- output ---\n{proc.stdout}\n{proc.stderr}"


def test_catalogue_counts(results, world, capsys):
    verdicts = {c.id: _verdict(c, results[c.id], world) for c in CASES if not (c.as_user and AS_ROOT)}
    clear = sum(not v for v in verdicts.values())
    tracebacks = sum("traceback" in v for v in verdicts.values())
    with capsys.disabled():
        print(f"\nbad-input catalogue: tried {len(verdicts)}, clear {clear}, traceback {tracebacks}, "
              f"other {len(verdicts) - clear - tracebacks}")
        for k, v in verdicts.items():
            if v:
                print(f"  {k}: {'; '.join(v)}")
        slow = sorted(results, key=lambda k: -results[k].seconds)[:8]
        print("slowest: " + ", ".join(f"{k} {results[k].seconds:.1f} s" for k in slow))
    assert tracebacks == 0 and clear == len(verdicts)


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C, as a terminal sends it


def _interrupt_after(argv: list[str], ready: str, cwd: Path, limit: float = 120, delay: float = 0.0
                     ) -> tuple[int, str]:
    """Start `medvl argv` in its own process group, wait until `ready` appears on stdout (or the limit) and
    `delay` more seconds, send SIGINT to the whole group as a terminal does, and return (exit code, output)."""
    proc = subprocess.Popen([MEDVL, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            cwd=cwd, start_new_session=True)
    seen, t0 = [], time.monotonic()
    while time.monotonic() - t0 < limit:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if ready in line:
            break
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    return proc.returncode, "".join(seen) + rest


@pytest.mark.slow
def test_ctrl_c_in_train_says_interrupted_and_how_to_resume(world, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "tiny_cpu", f"model.base={world['lm']}", f"data.train=[{world['data']}]", f"output.dir={out}",
            "train.max_steps=100000", "train.save_every=5", "train.eval_every=null", "data.val_fraction=null",
            "train.log_every=1"]
    code, text = _interrupt_after(argv, "step 3/", tmp_path)
    assert code == 130 and "Traceback" not in text
    assert "interrupted" in text and "--resume auto" in text and f"output.dir={out}" in _flat(text)


@pytest.mark.slow
def test_early_ctrl_c_in_parallel_prepare_data_prints_no_worker_tracebacks(world, tmp_path):
    from .conftest import write_prepared

    raw = write_prepared(tmp_path / "raw", 64) / "data-00000.jsonl"
    argv = ["prepare-data", str(raw), "--out", str(tmp_path / "prepared"), "--workers", "2", "--shard-size", "16",
            "--model", world["vl"]]
    # 2 s after the start line the workers are spawned and still importing torch/transformers (~9 s here)
    code, text = _interrupt_after(argv, "prepare: started", tmp_path, delay=2.0)
    assert "Traceback" not in text, text
    assert code == 130 and "interrupted" in text and "run the same command again" in text


def test_interrupt_hint_keeps_the_command_and_asks_for_auto():
    from medvl.commands.main import interrupt_hint

    hint = interrupt_hint(["train", "my run.yaml", "optim.lr=1e-5", "--resume", "runs/x/checkpoints/step-000004"])
    assert hint.endswith("medvl train 'my run.yaml' optim.lr=1e-5 --resume auto")
    assert interrupt_hint(["doctor"]) is None
