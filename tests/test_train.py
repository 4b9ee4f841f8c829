"""The training engine on tiny models: learns, freezes what it says, resumes exactly, scales to processes."""

import json

import pytest
import torch

from medvl.config import load_recipe
from medvl.engine.metrics import ListSink
from medvl.engine.train import train
from medvl.errors import MedvlError

from .conftest import FAMILIES


def recipe(tiny, data, out, *extra):
    return load_recipe("tiny_cpu", [f"model.base={tiny}", f"data.train=[{data}]", f"output.dir={out}",
                                    "train.max_steps=12", "train.save_every=null", "train.eval_every=null",
                                    "data.val_fraction=null", "train.log_every=1", "optim.warmup_steps=2",
                                    "train.micro_batch_size=4", *extra])


def weights(path):
    """Parameters as the loaded model names them (transformers 5 saves Qwen-VL under the pre-4.52 key names)."""
    from medvl.models import load_model

    return {k: v.detach().clone() for k, v in load_model(path).state_dict().items()}


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_learns(family, method, tiny_dir, data_for, tmp_path):
    extra = ["method=lora", "lora.r=8", "lora.alpha=16", "optim.lr=5e-3"] if method == "lora" else []
    res = train(recipe(tiny_dir(family), data_for(family), tmp_path / "run", *extra))
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < first - 0.3, (first, last)
    final = tmp_path / "run" / "final"
    assert (final / ("adapter_model.safetensors" if method == "lora" else "model.safetensors")).is_file()
    assert (final / "chat_template.jinja").is_file() and (final / "medvl_run.json").is_file()
    events = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train_events = [e for e in events if e["kind"] == "train"]
    assert len(train_events) == 12 and all(e["tokens"] > 0 for e in train_events)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "input_tokens_per_s", "memory_gb",
            "eta_s"} <= train_events[-1].keys()


def test_frozen_groups_stay_bit_identical(tiny_dir, prepared_vqa, tmp_path):
    tiny = tiny_dir("qwen2.5-vl")
    res = train(recipe(tiny, prepared_vqa, tmp_path / "run", "freeze.vision_tower=true", "freeze.projector=true"))
    before, after = weights(tiny), weights(tmp_path / "run" / "final")
    vision = [k for k in before if k.startswith("model.visual.")]
    language = [k for k in before if k.startswith("model.language_model.layers.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in language)
    table = {r["group"]: r for r in res.table}
    assert table["vision"]["trainable"] == 0 and table["projector"]["trainable"] == 0
    assert table["language"]["trainable"] == table["language"]["params"]


def test_freeze_language_model_freezes_its_head_too(tiny_dir, prepared_vqa, tmp_path):
    tiny = tiny_dir("qwen2.5-vl")
    train(recipe(tiny, prepared_vqa, tmp_path / "run", "freeze.language_model=true", "train.max_steps=3"))
    before, after = weights(tiny), weights(tmp_path / "run" / "final")
    assert torch.equal(before["lm_head.weight"], after["lm_head.weight"])  # upstream left lm_head trainable
    assert not torch.equal(before["model.visual.merger.mlp.0.weight"], after["model.visual.merger.mlp.0.weight"])


def test_per_module_learning_rates_reach_the_optimizer(tiny_dir, prepared_vqa, tmp_path, monkeypatch):
    import medvl.engine.train as engine

    built = []
    real = engine.build_optimizer
    monkeypatch.setattr(engine, "build_optimizer", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    res = train(recipe(tiny_dir("qwen2.5-vl"), prepared_vqa, tmp_path / "run", "optim.vision_lr=1e-5",
                       "optim.projector_lr=2e-4", "train.max_steps=2"))
    expected = {"vision": 1e-5, "projector": 2e-4, "language": 1e-3, "head": 1e-3}
    # The optimizer itself: LambdaLR keeps each group's peak lr in initial_lr (group["lr"] is the scheduled one).
    (optimizer,) = built
    got: dict[str, set] = {}
    for group in optimizer.param_groups:
        got.setdefault(group["name"], set()).add(group["initial_lr"])
    assert got == {g: {lr} for g, lr in expected.items()}
    # Every trainable parameter is in exactly one group.
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len({id(p) for p in params}) == len(params)
    assert sum(p.numel() for p in params) == sum(r["trainable"] for r in res.table)
    assert {r["group"]: r["lr"] for r in res.table} == expected


def test_cli_dry_run_prints_the_plan_and_trains_nothing(tiny_dir, prepared_vqa, tmp_path):
    from typer.testing import CliRunner

    from medvl.commands.main import app

    out = tmp_path / "run"
    args = ["train", "tiny_cpu", f"model.base={tiny_dir('qwen2.5-vl')}", f"data.train=[{prepared_vqa}]",
            f"output.dir={out}", "optim.vision_lr=1e-5", "--dry-run"]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "# medvl resolved recipe" in res.output and "vision_lr: 1.0e-05" in res.output
    assert "launch in this process (one process)" in res.output
    assert "memory per GPU (estimate)" in res.output and "total per GPU (est.)" in res.output
    assert all(group in res.output for group in ("vision", "projector", "language"))
    assert "the run would stop here" not in res.output
    assert not out.exists()  # a dry run writes nothing
    typo = CliRunner().invoke(app, [a if not a.startswith("data.train=") else f"data.train=[{tmp_path / 'dta'}]"
                                    for a in args], env={"COLUMNS": "400"})
    assert typo.exit_code == 0 and "the run would stop here: prepared data" in typo.output  # a typo shows now
    res = CliRunner().invoke(app, [*args, "distributed.nproc=2", "distributed.strategy=ddp"],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "--nproc_per_node=2" in res.output and "-m medvl.commands.worker" in res.output
    # A bad key is a MedvlError (main() prints it as a panel, exit 2) before anything is loaded.
    bad = CliRunner().invoke(app, [*args, "optim.lrr=1"], env={"COLUMNS": "200"})
    assert isinstance(bad.exception, MedvlError) and "did you mean 'lr'" in str(bad.exception)


def test_kill_and_resume_gives_identical_weights(tiny_dir, prepared_vqa, tmp_path):
    tiny = tiny_dir("qwen2.5-vl")
    common = ["train.max_steps=10", "train.save_every=4", "data.val_fraction=0.1", "train.eval_every=5"]
    train(recipe(tiny, prepared_vqa, tmp_path / "a", *common))
    train(recipe(tiny, prepared_vqa, tmp_path / "b", *common), stop_after_step=6)  # "killed" after step 6
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000004"]
    res = train(recipe(tiny, prepared_vqa, tmp_path / "b", *common), resume="auto")
    a, b = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res.steps == 10


def test_run_dir_is_not_overwritten_by_accident(tiny_dir, prepared_text, tmp_path):
    r = recipe(tiny_dir("causal-lm"), prepared_text, tmp_path / "run", "train.max_steps=1", "output.overwrite=false")
    train(r)
    with pytest.raises(MedvlError, match="already holds a run"):
        train(r)


def test_nan_loss_stops_with_a_diagnosis(tiny_dir, prepared_text, tmp_path, monkeypatch):
    import medvl.engine.train as engine

    real = engine.token_loss_sum
    calls = {"n": 0}

    def poisoned(model, family, batch):
        calls["n"] += 1
        out = real(model, family, batch)
        return out * float("nan") if calls["n"] >= 3 else out

    monkeypatch.setattr(engine, "token_loss_sum", poisoned)
    with pytest.raises(MedvlError, match="became nan at step 3") as err:
        train(recipe(tiny_dir("causal-lm"), prepared_text, tmp_path / "run"))
    assert "lower optim.lr" in str(err.value)


def test_text_only_and_image_samples_mix_in_batches(tiny_dir, prepared_vqa, tmp_path):
    sink = ListSink()
    train(recipe(tiny_dir("qwen2.5-vl"), prepared_vqa, tmp_path / "run", "train.max_steps=4",
                 "train.micro_batch_size=8"), sinks=[sink])
    assert not [e for e in sink.events if e["kind"] == "warning"]


def test_packing_trains(tiny_dir, prepared_vqa, tmp_path):
    res = train(recipe(tiny_dir("qwen2.5-vl"), prepared_vqa, tmp_path / "run", "data.packing=true",
                       "data.max_seq_len=128"))
    assert res.losses[-1] < res.losses[0]


def _launched(tiny, data, out, strategy):
    from medvl.commands.worker import MODULE as worker
    from medvl.engine.launch import run_launched

    r = recipe(tiny, data, out, "train.max_steps=6", "train.save_every=3", "distributed.nproc=2",
               f"distributed.strategy={strategy}")
    assert run_launched(r, worker=worker, timeout=600) == 0
    events = [json.loads(line) for line in open(out / "metrics.jsonl")]
    start = next(e for e in events if e["kind"] == "start")
    return start, [e["loss"] for e in events if e["kind"] == "train"]


@pytest.fixture(scope="module")
def single_process_reference(tiny_dir, prepared_text, tmp_path_factory):
    """One process, micro 4 x accum 2 = global batch 8: what 2 processes x micro 4 must reproduce."""
    out = tmp_path_factory.mktemp("single") / "run"
    res = train(recipe(tiny_dir("causal-lm"), prepared_text, out, "train.max_steps=6", "train.grad_accum=2"))
    return res.losses, weights(out / "final")


@pytest.mark.slow
@pytest.mark.parametrize("strategy,kind,tol", [("ddp", "MULTI_CPU", 0.0), ("deepspeed-zero2", "DEEPSPEED", 1e-5),
                                               ("deepspeed-zero3", "DEEPSPEED", 1e-5)])
def test_two_processes_match_one(strategy, kind, tol, tiny_dir, prepared_text, tmp_path, single_process_reference):
    ref_losses, ref_weights = single_process_reference
    start, losses = _launched(tiny_dir("causal-lm"), prepared_text, tmp_path / "run", strategy)
    # a launcher that silently ran one process, or DeepSpeed silently off, fails here
    assert start["world_size"] == 2 and start["distributed"] == kind
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    got = weights(tmp_path / "run" / "final")  # ZeRO-3 shards gathered into one loadable model
    assert max(float((got[k] - ref_weights[k]).abs().max()) for k in ref_weights) <= tol
    from medvl.models import load_model

    assert load_model(tmp_path / "run" / "final") is not None


def test_benchmark_accuracy_is_logged_during_training(tiny_dir, prepared_vqa, tmp_path):
    import easy_vqa

    from medvl.engine.metrics import read_metrics

    q, a, ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    import shutil

    (tmp_path / "images").mkdir()
    bundle = []
    for i in [i for i in range(40) if a[i] in ("yes", "no")][:12]:  # the published shape: images/ beside the JSON
        shutil.copy(paths[ids[i]], tmp_path / "images" / f"{ids[i]}.png")
        bundle.append({"question": q[i], "options": ["yes", "no"], "answer": a[i], "image": [f"images/{ids[i]}.png"],
                       "dataset": "VQA-RAD_test", "subset": ""})
    (tmp_path / "bundle.json").write_text(json.dumps(bundle))
    train(recipe(tiny_dir("qwen2.5-vl"), prepared_vqa, tmp_path / "run", "train.max_steps=4",
                 f"eval.data={tmp_path / 'bundle.json'}", "eval.suites=[vqa-rad]", "eval.every=2",
                 "eval.max_new_tokens=4"))
    evals = [e for e in read_metrics(tmp_path / "run" / "metrics.jsonl") if "benchmark_accuracy" in e]
    assert [e["step"] for e in evals] == [2, 4]
    assert all(e["benchmark_n"] == 12 and e["benchmark"]["VQA-RAD_test"]["n"] == 12 for e in evals)
    assert all(0.0 <= e["benchmark_accuracy"] <= 1.0 for e in evals)
    assert (tmp_path / "run" / "eval" / "step-000002").is_dir()


def test_benchmark_eval_refused_under_zero3(tiny_dir, prepared_vqa, tmp_path):
    (tmp_path / "b.json").write_text("[]")
    with pytest.raises(MedvlError, match="not supported with deepspeed-zero3"):
        train(recipe(tiny_dir("qwen2.5-vl"), prepared_vqa, tmp_path / "run", "distributed.nproc=2",
                     "distributed.strategy=deepspeed-zero3", f"eval.data={tmp_path / 'b.json'}",
                     "eval.suites=[vqa-rad]", "eval.every=2"))


def test_fsdp_on_cpu_is_refused_clearly(tiny_dir, prepared_text, tmp_path):
    with pytest.raises(MedvlError, match="fsdp needs CUDA GPUs"):
        train(recipe(tiny_dir("causal-lm"), prepared_text, tmp_path / "run", "distributed.nproc=2",
                     "distributed.strategy=fsdp"))


def test_lora_checkpoints_hold_only_the_adapter_and_resume_exactly(tiny_dir, prepared_vqa, tmp_path):
    from safetensors import safe_open

    tiny = tiny_dir("qwen2.5-vl")
    common = ["method=lora", "lora.r=4", "lora.alpha=8", "optim.lr=5e-3", "train.max_steps=8", "train.save_every=3"]
    train(recipe(tiny, prepared_vqa, tmp_path / "a", *common))
    train(recipe(tiny, prepared_vqa, tmp_path / "b", *common), stop_after_step=5)
    with safe_open(str(tmp_path / "b" / "checkpoints" / "step-000003" / "model.safetensors"), "pt") as f:
        saved = list(f.keys())
    assert saved and all("lora_" in k for k in saved)  # 28 adapter tensors, not the 200k-parameter base
    train(recipe(tiny, prepared_vqa, tmp_path / "b", *common), resume="auto")
    a = load_file_pairs(tmp_path / "a" / "final" / "adapter_model.safetensors")
    b = load_file_pairs(tmp_path / "b" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def load_file_pairs(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def half_text(tmp_path_factory):
    from .conftest import write_prepared

    return write_prepared(tmp_path_factory.mktemp("half") / "data", 48, text_only_every=2)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed-zero3"])
def test_text_only_micro_batches_under_ddp_and_zero3(strategy, tiny_dir, half_text, tmp_path):
    """Micro-batch 1 over half text-only data: some ranks see no image at some steps. DDP must find no unused
    vision parameter and ZeRO-3 ranks must gather the same modules in the same order (both crashed before the
    keepalive row existed). Losses follow the single-process run: equal while every step saw an image, then
    within 1e-2, because a step whose window holds no image leaves vision gradients None in one process (AdamW
    skips them) but zero under DDP (AdamW still applies momentum)."""
    from medvl.commands.worker import MODULE as worker
    from medvl.engine.launch import run_launched

    tiny = tiny_dir("qwen2.5-vl")
    common = ["train.max_steps=4", "train.micro_batch_size=1"]
    ref = train(recipe(tiny, half_text, tmp_path / "single", *common, "train.grad_accum=2"))
    r = recipe(tiny, half_text, tmp_path / "run", *common, "distributed.nproc=2", f"distributed.strategy={strategy}")
    assert run_launched(r, worker=worker, timeout=600) == 0
    events = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert next(e for e in events if e["kind"] == "start")["world_size"] == 2
    losses = [e["loss"] for e in events if e["kind"] == "train"]
    assert losses[:2] == pytest.approx(ref.losses[:2], abs=1e-4)
    assert losses == pytest.approx(ref.losses, abs=1e-2) and losses[-1] < losses[0]


@pytest.mark.slow
def test_rank_whose_micro_batch_lost_every_sample_stays_in_step_under_ddp(tiny_dir, half_text, tmp_path):
    """A text model on half image data: every image sample is rejected at load time, so with micro-batch 1 a
    rank often has no usable sample while the other has one. That rank must still run the DDP forward (an
    ignored one-token row) or its gradient all-reduce pairs with the other rank's next one (wrong gradients,
    then a crash). Losses then follow the single process with the same global batch."""
    from medvl.commands.worker import MODULE as worker
    from medvl.engine.launch import run_launched

    tiny = tiny_dir("causal-lm")
    common = ["train.max_steps=6", "train.micro_batch_size=1"]
    ref = train(recipe(tiny, half_text, tmp_path / "single", *common, "train.grad_accum=2"))
    r = recipe(tiny, half_text, tmp_path / "run", *common, "distributed.nproc=2", "distributed.strategy=ddp")
    assert run_launched(r, worker=worker, timeout=600) == 0
    events = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    start = next(e for e in events if e["kind"] == "start")
    assert start["world_size"] == 2 and start["distributed"] == "MULTI_CPU"
    train_events = [e for e in events if e["kind"] == "train"]
    assert sum(e["rejected"] for e in train_events) > 0  # the case under test happened
    assert [e["loss"] for e in train_events] == pytest.approx(ref.losses, abs=1e-5)


@pytest.mark.slow
def test_eval_loss_over_an_uneven_val_split_finishes_under_zero3(tiny_dir, prepared_text, tmp_path):
    """9 validation samples, micro-batch 4, 2 ranks: rank 0 has 5 (2 batches), rank 1 has 4 (1 batch). Under
    ZeRO-3 every forward gathers parameters on all ranks, so rank 1 must run a second (ignored) forward or rank 0
    waits for ever. The loss is the single-process eval loss over the same 9 samples."""
    from medvl.commands.worker import MODULE as worker
    from medvl.engine.launch import run_launched

    from importlib import resources

    # The shipped zero3.json keeps parameters under 100,000 elements whole on every rank (all of the tiny
    # model's) and gathered ones live on for 1e9 elements: partition and release every one, so each forward
    # really gathers.
    ds = json.loads((resources.files("medvl.recipes") / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0,
                                   stage3_max_live_parameters=0, stage3_prefetch_bucket_size=0)
    (tmp_path / "zero3-all.json").write_text(json.dumps(ds))
    tiny = tiny_dir("causal-lm")
    common = ["train.max_steps=2", "data.val_fraction=0.15"]  # int(64 x 0.15) = 9 held out
    ref = train(recipe(tiny, prepared_text, tmp_path / "single", *common, "train.grad_accum=2"))
    r = recipe(tiny, prepared_text, tmp_path / "run", *common, "distributed.nproc=2",
               "distributed.strategy=deepspeed-zero3", f"distributed.deepspeed_config={tmp_path / 'zero3-all.json'}")
    assert run_launched(r, worker=worker, timeout=600) == 0
    events = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    start = next(e for e in events if e["kind"] == "start")
    assert start["world_size"] == 2 and start["distributed"] == "DEEPSPEED"
    evals = [e for e in events if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [2] and ref.eval_losses[0][0] == 2
    assert evals[0]["eval_loss"] == pytest.approx(ref.eval_losses[0][1], abs=1e-4)


def test_a_relative_local_base_is_recorded_absolute_so_the_run_loads_from_anywhere(tiny_dir, prepared_text, tmp_path,
                                                                                     monkeypatch):
    """A LoRA run trained with `model.base=models/x` (relative) used to write that relative path into
    adapter_config.json and recipe.yaml: chat, eval, export and serve then failed from any other folder."""
    import shutil

    from medvl.engine.train import train
    from medvl.resolve import resolve_model

    shutil.copytree(tiny_dir("causal-lm"), tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    r = recipe("models/base", prepared_text, "runs/lora", "method=lora", "train.max_steps=2")
    train(r)
    adapter = json.loads((tmp_path / "runs/lora/final/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path / "models" / "base")
    assert f"base: {tmp_path / 'models' / 'base'}" in (tmp_path / "runs/lora/recipe.yaml").read_text()
    monkeypatch.chdir(tmp_path.parent)
    src = resolve_model(tmp_path / "runs/lora")
    assert src.kind == "lora" and src.base_dir == tmp_path / "models" / "base"
