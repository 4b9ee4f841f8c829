"""Every command, run as a user runs it (the `medvl` console script in a subprocess), against a catalogue of bad
inputs: each must exit 2 with a message naming the path, print no traceback, and leave nothing half-written.

The catalogue is one table, CASES: a new command joins by adding rows. A row builds its argv from the `world`
(good and broken inputs made once per module) and names the path its message must contain (for a bad option
value with no path, the option or value) and the paths that must not exist afterwards; it may pipe text to stdin
(chat's plain mode) and run in another folder (relative paths). Rows run in parallel subprocesses (most fail
before a model loads, in ~1-3 s); `test_catalogue_counts` prints tried / clear / traceback and fails on any
traceback. Commands that would otherwise keep running (watch, serve, chat) must fail fast: a row that does not
times out after TIMEOUT and counts as a failure.
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

# ~120 console-script runs in parallel (1.5-2.5 min on the 2-core machine): part of `make test`, not of the
# edit loop's `make test-fast`.
pytestmark = pytest.mark.slow

MEDVL = str(Path(sys.executable).parent / "medvl")
ENV = dict({k: v for k, v in os.environ.items() if k not in ("MEDVL_MODEL", "MEDVL_API_KEY")},  # chat, serve
           HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="400", TOKENIZERS_PARALLELISM="false")
TIMEOUT = 240


@dataclass
class Case:
    id: str
    argv: object  # world -> list[str] (after `medvl`)
    names: object  # world -> the path (str) the message must name
    absent: object = lambda w: []  # world -> paths that must not exist afterwards
    as_user: bool = False  # permission cases: root reads everything, so they are skipped when run as root
    stdin: object = ""  # piped to the command, or world -> text (chat's plain mode reads its questions here)
    cwd: object = None  # world -> the folder it runs in (None: the test's own)


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
    _new_command_inputs(w)
    yield w
    w.p["port_holder"].close()


def _new_command_inputs(w: World) -> None:
    """Inputs for watch, plot, score, chat and serve."""
    import socket

    root = w.root
    # images: one that decodes, one that does not; an adapter trained on the VL model (it cannot fit the LM)
    w.p["png"] = root / "outside" / "secret.png"
    (root / "garbage.png").write_bytes(os.urandom(2048))
    w.p["garbage_png"] = root / "garbage.png"
    from peft import LoraConfig, get_peft_model

    from medvl.families import get_family
    from medvl.models import load_model

    family = get_family("qwen2.5-vl")
    lora = get_peft_model(load_model(w.p["vl"], family), LoraConfig(r=4, target_modules=family.lora_regex(),
                                                                    task_type="CAUSAL_LM"))
    lora.save_pretrained(root / "vl-adapter")
    w.p["vl_adapter"] = root / "vl-adapter"
    # run directories for watch / plot: a metrics.jsonl of garbage, an empty one
    for name, text in (("corrupt-run", "not json\n{\"kind\": \"tr\n\x00\x01garbage\n"), ("empty-run", "")):
        (root / name).mkdir()
        (root / name / "metrics.jsonl").write_text(text)
        w.p[name] = root / name
    (root / "figure.png").mkdir()  # a folder named like a figure
    w.p["png_dir"] = root / "figure.png"
    # predictions for score: the published eval.py output, cut in half, and a scored output directory
    from medvl.evaluate import rescore

    from .test_eval_rescore import published_file

    (root / "published").mkdir()
    pred = published_file(root / "published")
    w.p["pred"] = pred
    (root / "cut.json").write_bytes(pred.read_bytes()[: pred.stat().st_size // 2])
    w.p["pred_cut"] = root / "cut.json"
    rescore(pred, root / "scored")
    w.p["scored"] = root / "scored"
    (root / "blocked" / "predictions.jsonl").mkdir(parents=True)  # a folder where the file must go
    w.p["blocked"] = root / "blocked"
    # serve: a port some other program listens on, and one nobody does (for rows that get as far as binding)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    w.p.update(port_holder=holder, busy_port=str(holder.getsockname()[1]))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        w.p["free_port"] = str(probe.getsockname()[1])


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
    Case("eval-out-under-file", lambda w: ["eval", "--model", w["lm"], "--data", w["empty_json"], "--out",
                                           w["file"] + "/eval"], lambda w: w["file"]),
    # ---- watch (every row fails before the dashboard starts; one that did not would hang until TIMEOUT)
    Case("watch-run-is-file", lambda w: ["watch", w["file"]], lambda w: w["file"]),
    Case("watch-run-under-file", lambda w: ["watch", w["file"] + "/run"], lambda w: w["file"] + "/run"),
    Case("watch-model-dir", lambda w: ["watch", w["lm"]], lambda w: w["lm"]),
    Case("watch-checkpoint-dir", lambda w: ["watch", w["run"] + "/checkpoints/step-000002"],
         lambda w: w["run"] + "/checkpoints/step-000002"),
    Case("watch-not-a-terminal", lambda w: ["watch", w["run"]], lambda w: w["run"]),
    Case("watch-unknown-metric", lambda w: ["watch", w["run"], "--metric", "accuracy"], lambda w: "--metric accuracy"),
    # ---- plot
    Case("plot-run-missing", lambda w: ["plot", w["missing"], "--out", w.out("plot-m.png")], lambda w: w["missing"],
         lambda w: [w.out("plot-m.png")]),
    Case("plot-run-is-file", lambda w: ["plot", w["file"], "--out", w.out("plot-f.png")], lambda w: w["file"],
         lambda w: [w.out("plot-f.png")]),
    Case("plot-not-a-run", lambda w: ["plot", w["empty_dir"], "--out", w.out("plot-e.png")],
         lambda w: w["empty_dir"], lambda w: [w.out("plot-e.png")]),
    Case("plot-metrics-corrupt", lambda w: ["plot", w["corrupt-run"], "--out", w.out("plot-c.png")],
         lambda w: w["corrupt-run"] + "/metrics.jsonl", lambda w: [w.out("plot-c.png")]),
    Case("plot-metrics-empty", lambda w: ["plot", w["empty-run"], "--out", w.out("plot-0.png")],
         lambda w: w["empty-run"] + "/metrics.jsonl", lambda w: [w.out("plot-0.png")]),
    Case("plot-second-run-corrupt", lambda w: ["plot", w["run"], w["corrupt-run"], "--out", w.out("plot-2.png")],
         lambda w: w["corrupt-run"] + "/metrics.jsonl", lambda w: [w.out("plot-2.png")]),
    Case("plot-unknown-metric", lambda w: ["plot", w["run"], "--metric", "loss,accuracy", "--out",
                                           w.out("plot-u.png")], lambda w: "accuracy", lambda w: [w.out("plot-u.png")]),
    Case("plot-out-is-dir", lambda w: ["plot", w["run"], "--out", w["png_dir"]], lambda w: w["png_dir"]),
    Case("plot-out-is-dir-no-suffix", lambda w: ["plot", w["run"], "--out", w["dir"]], lambda w: w["dir"]),
    Case("plot-out-unknown-suffix", lambda w: ["plot", w["run"], "--out", w.out("plot.jpg")],
         lambda w: w.out("plot.jpg"), lambda w: [w.out("plot.jpg")]),
    Case("plot-out-folder-missing", lambda w: ["plot", w["run"], "--out", w["missing"] + "/curves.png"],
         lambda w: w["missing"] + "/curves.png", lambda w: [w["missing"]]),
    Case("plot-out-under-file", lambda w: ["plot", w["run"], "--out", w["file"] + "/curves.png"],
         lambda w: w["file"] + "/curves.png"),
    # ---- score (no model: every row takes ~1 s)
    Case("score-missing", lambda w: ["score", w["missing"]], lambda w: w["missing"]),
    Case("score-dir-without-predictions", lambda w: ["score", w["empty_dir"]], lambda w: w["empty_dir"]),
    Case("score-empty", lambda w: ["score", w["empty_json"]], lambda w: w["empty_json"]),
    Case("score-not-json", lambda w: ["score", w["file"]], lambda w: w["file"]),
    Case("score-binary", lambda w: ["score", w["binary_yaml"]], lambda w: w["binary_yaml"]),
    Case("score-truncated", lambda w: ["score", w["pred_cut"], "--out", w.out("score-cut")], lambda w: w["pred_cut"],
         _out("score-cut")),
    Case("score-an-eval-bundle", lambda w: ["score", w["bundle"]], lambda w: w["bundle"]),
    Case("score-out-is-file", lambda w: ["score", w["pred"], "--out", w["file"]], lambda w: w["file"]),
    Case("score-out-under-file", lambda w: ["score", w["pred"], "--out", w["file"] + "/scored"],
         lambda w: w["file"]),
    Case("score-out-file-is-a-folder", lambda w: ["score", w["pred"], "--out", w["blocked"]],
         lambda w: w["blocked"] + "/predictions.jsonl",
         lambda w: [w["blocked"] + "/results.json", w["blocked"] + "/predictions.jsonl.tmp"]),
    Case("score-out-overwrites-its-input", lambda w: ["score", w["scored"], "--out", w["scored"]],
         lambda w: w["scored"] + "/predictions.jsonl", lambda w: [w["scored"] + "/predictions.jsonl.tmp"]),
    # ---- chat, plain mode (stdin piped): image and model checks come before loading, except where noted
    Case("chat-image-missing", lambda w: ["chat", w["vl"], "--image", w["missing"] + ".png"],
         lambda w: w["missing"] + ".png", stdin="What is this?\n"),
    Case("chat-image-undecodable", lambda w: ["chat", w["vl"], "--image", w["garbage_png"]],
         lambda w: w["garbage_png"], stdin="What is this?\n"),
    Case("chat-image-is-dir", lambda w: ["chat", w["vl"], "--image", w["dir"]], lambda w: w["dir"],
         stdin="What is this?\n"),
    Case("chat-image-escapes", lambda w: ["chat", w["vl"], "--image", "../outside/secret.png"],
         lambda w: "../outside/secret.png", stdin="What is this?\n", cwd=lambda w: w["dir"]),
    Case("chat-model-missing", lambda w: ["chat", w["missing"]], lambda w: w["missing"], stdin="hi\n"),
    Case("chat-model-is-file", lambda w: ["chat", w["file"]], lambda w: w["file"], stdin="hi\n"),
    Case("chat-model-not-a-model", lambda w: ["chat", w["empty_dir"]], lambda w: w["empty_dir"], stdin="hi\n"),
    Case("chat-model-no-weights", lambda w: ["chat", w["lm-no-weights"]], lambda w: w["lm-no-weights"],
         stdin="hi\n"),  # found when loading
    Case("chat-model-truncated", lambda w: ["chat", w["vl-truncated"]], lambda w: w["vl-truncated"],
         stdin="hi\n"),  # found when loading
    Case("chat-text-only-model-given-image", lambda w: ["chat", w["lm"], "--image", w["png"]], lambda w: w["png"],
         stdin="What is this?\n"),
    Case("chat-adapter-does-not-fit", lambda w: ["chat", w["lm"], "--adapter", w["vl_adapter"]],
         lambda w: w["vl_adapter"], stdin="hi\n"),  # found when the adapter is applied
    Case("chat-adapter-missing", lambda w: ["chat", w["lm"], "--adapter", w["missing"]], lambda w: w["missing"],
         stdin="hi\n"),
    Case("chat-adapter-not-an-adapter", lambda w: ["chat", w["vl"], "--adapter", w["lm"]], lambda w: w["lm"],
         stdin="hi\n"),
    Case("chat-compare-is-file", lambda w: ["chat", w["lm"], "--compare", w["file"]], lambda w: w["file"],
         stdin="hi\n"),
    Case("chat-empty-stdin", lambda w: ["chat", w["lm"]], lambda w: "stdin"),
    Case("chat-blank-stdin", lambda w: ["chat", w["lm"], "--json"], lambda w: "stdin",
         stdin="\n  \n"),  # found after loading: only blank lines
    Case("chat-image-missing-mid-session", lambda w: ["chat", w["vl"], "--max-new-tokens", "2"],
         lambda w: w["missing"] + ".png", stdin=lambda w: f"/image {w['missing']}.png\nWhat is this?\n"),
    Case("chat-save-under-file", lambda w: ["chat", w["lm"], "--max-new-tokens", "2"],
         lambda w: w["file"] + "/chat.jsonl", stdin=lambda w: f"hi\n/save {w['file']}/chat.jsonl\n"),
    Case("chat-save-to-folder", lambda w: ["chat", w["lm"], "--max-new-tokens", "2"], lambda w: w["dir"],
         stdin=lambda w: f"hi\n/save {w['dir']}\n"),
    Case("chat-export-under-file", lambda w: ["chat", w["lm"], "--max-new-tokens", "2"],
         lambda w: w["file"] + "/chat.md", stdin=lambda w: f"hi\n/export {w['file']}/chat.md\n"),
    Case("chat-unknown-device", lambda w: ["chat", w["lm"], "--device", "gpu0"], lambda w: "--device",
         stdin="hi\n"),
    Case("chat-unknown-dtype", lambda w: ["chat", w["lm"], "--dtype", "float16"], lambda w: "--dtype",
         stdin="hi\n"),
    # ---- serve (every row fails before the model loads, except where noted)
    Case("serve-model-missing", lambda w: ["serve", w["missing"]], lambda w: w["missing"]),
    Case("serve-model-is-file", lambda w: ["serve", w["file"]], lambda w: w["file"]),
    Case("serve-model-not-a-model", lambda w: ["serve", w["empty_dir"]], lambda w: w["empty_dir"]),
    Case("serve-public-without-key", lambda w: ["serve", w["lm"], "--host", "0.0.0.0"], lambda w: "0.0.0.0"),
    Case("serve-port-in-use", lambda w: ["serve", w["lm"], "--port", w["busy_port"]],
         lambda w: f"127.0.0.1:{w['busy_port']}"),
    Case("serve-port-out-of-range", lambda w: ["serve", w["lm"], "--port", "70000"], lambda w: "70000"),
    Case("serve-image-root-missing", lambda w: ["serve", w["lm"], "--image-root", w["missing"]],
         lambda w: w["missing"]),
    Case("serve-image-root-is-file", lambda w: ["serve", w["lm"], "--image-root", w["file"]], lambda w: w["file"]),
    Case("serve-max-batch-zero", lambda w: ["serve", w["lm"], "--max-batch", "0"], lambda w: "--max-batch"),
    Case("serve-max-tokens-zero", lambda w: ["serve", w["lm"], "--max-tokens", "0"], lambda w: "--max-tokens"),
    Case("serve-max-images-negative", lambda w: ["serve", w["lm"], "--max-images", "-1"],
         lambda w: "--max-images"),
    Case("serve-timeout-zero", lambda w: ["serve", w["lm"], "--timeout", "0"], lambda w: "--timeout"),
    Case("serve-max-body-zero", lambda w: ["serve", w["lm"], "--max-body-mb", "0"], lambda w: "--max-body-mb"),
    Case("serve-max-image-pixels-zero", lambda w: ["serve", w["lm"], "--max-image-pixels", "0"],
         lambda w: "--max-image-pixels"),
    Case("serve-unknown-device", lambda w: ["serve", w["lm"], "--device", "gpu0"], lambda w: "--device"),
    Case("serve-adapter-does-not-fit", lambda w: ["serve", w["lm"], "--adapter", w["vl_adapter"], "--port",
                                                  w["free_port"]], lambda w: w["vl_adapter"]),  # when applied
]


def _run(argv: list[str], stdin: str = "", cwd=None) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([MEDVL, *argv], input=stdin, capture_output=True, text=True, env=ENV, timeout=TIMEOUT,
                              cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        proc = subprocess.CompletedProcess(exc.cmd, -9, exc.stdout or "", f"timed out after {TIMEOUT} s")
    proc.seconds = time.perf_counter() - t0
    return proc


@pytest.fixture(scope="module")
def results(world):
    before = (world.root / "a-file").read_text()
    cases = [c for c in CASES if not (c.as_user and AS_ROOT)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = dict(zip([c.id for c in cases], pool.map(
            lambda c: _run([str(a) for a in c.argv(world)], c.stdin(world) if callable(c.stdin) else c.stdin,
                           c.cwd(world) if c.cwd else None), cases)))
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
    code, text = _interrupt_after(argv, "step 7/", tmp_path)  # after the step-5 checkpoint
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


def test_interrupt_hint_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, monkeypatch):
    from medvl.commands import ui
    from medvl.commands.main import interrupt_hint

    monkeypatch.setattr(ui, "interrupt_context", {"run_dir": str(tmp_path / "run"), "save_every": 100})
    hint = interrupt_hint(["train", "tiny_cpu", f"output.dir={tmp_path / 'run'}"])
    assert "no checkpoint was saved yet (train.save_every=100)" in hint and "--resume auto" not in hint
    assert hint.endswith("output.overwrite=true")
