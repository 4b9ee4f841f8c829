"""Every shipped recipe loads clean; the HuatuoGPT-Vision ones carry the published numbers; the CLI group works."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest
from typer.testing import CliRunner

from medvl.config import load_recipe, recipe_warnings

ROOT = resources.files("medvl.recipes")
# Listed from the package folder, not through medvl.config, so a new file is covered even if the loader misses it.
SHIPPED = sorted(p.name for p in ROOT.iterdir() if p.name.endswith((".yaml", ".yml")))
# Warnings a shipped recipe may carry on purpose (explicit, so a new one fails the test).
EXPECTED_WARNINGS = {
    "tiny_cpu.yaml": ["optim.lr"],  # a random tiny model wants 1e-3, which would be too high for a real one
}


def test_the_package_ships_recipes():
    assert len(SHIPPED) >= 5 and all(name.endswith(".yaml") for name in SHIPPED)  # .yml is not package data


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.source.endswith(name)
    assert [w.split(":")[0] for w in recipe_warnings(recipe)] == EXPECTED_WARNINGS.get(name, [])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_header_says_purpose_hardware_and_command(name):
    text = (ROOT / name).read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header and len(header[0]) > 20, "first line: what the recipe is for"
    assert any("Hardware:" in line for line in header)
    stem = name[: -len(".yaml")]
    assert any(re.search(rf"medvl train {stem}\b", line) for line in header), "the exact command"


def test_huatuo_recipes_carry_the_published_hyper_parameters():
    # upstreams.md 1.6: train_vl.py + README (both stages).
    for name in ("huatuo_align_qwen25vl_7b", "huatuo_sft_qwen25vl_7b"):
        r = load_recipe(name)
        assert r.model.family == "qwen2.5-vl" and r.model.dtype == "bf16" and r.train.precision == "bf16"
        assert r.method == "full"
        assert (r.freeze.vision_tower, r.freeze.projector, r.freeze.language_model) == (False, False, False)
        assert r.optim.lr == 5e-6
        assert r.optim.warmup_ratio == 0.05 and r.optim.warmup_steps is None
        assert r.optim.scheduler == "cosine" and r.optim.min_lr_ratio == 0.15
        assert r.optim.weight_decay == 0.1 and r.optim.max_grad_norm == 1.0
        assert r.data.pixel_range[1] == 420 * 360 == 151_200
        assert r.data.max_images_per_sample == 8 and r.data.max_seq_len == 4096
        assert r.data.loss_mask == "last"
        assert r.train.epochs == 1 and r.train.seed == 42
        assert (r.train.micro_batch_size, r.train.grad_accum, r.world_size) == (2, 8, 8)
        assert r.global_batch == 128
        assert r.distributed.strategy.startswith("deepspeed-")
    assert load_recipe("huatuo_align_qwen25vl_7b").model.base == "./Qwen2.5-VL-7B-Base"
    sft = load_recipe("huatuo_sft_qwen25vl_7b")
    assert sft.model.base.startswith(load_recipe("huatuo_align_qwen25vl_7b").output.dir)  # stage 2 follows stage 1
    assert len(sft.eval.suites) == 6


def test_disc_recipe_is_text_only_zero3():
    r = load_recipe("disc_med_dialogue_sft")
    assert r.model.family == "causal-lm" and r.distributed.strategy == "deepspeed-zero3"
    assert (r.optim.lr, r.optim.warmup_steps, r.optim.weight_decay) == (1e-5, 800, 0.0)  # DISC sft.json
    assert r.data.loss_mask == "all"


def test_one_gpu_lora_recipe():
    r = load_recipe("qwen25vl_7b_lora_1gpu")
    assert r.method == "lora" and r.world_size == 1 and r.train.gradient_checkpointing
    assert r.lora.target == "language" and not r.lora.include_vision


def test_tiny_cpu_is_small_and_cpu_only():
    r = load_recipe("tiny_cpu")
    assert r.train.device == "cpu" and r.model.dtype == "fp32" and r.method == "full"
    assert r.train.max_steps <= 500 and r.world_size == 1


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_leave_batch_and_precision_to_accelerate(stage):
    cfg = json.loads((ROOT / "deepspeed" / f"zero{stage}.json").read_text())
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert cfg[key] == "auto"
    assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto"
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage
    # accelerate fills hidden-size-based "auto" buckets from model.config.hidden_size, which Qwen2.5-VL's
    # top-level config lacks in transformers 5: these must stay numbers.
    assert all(not isinstance(v, str) for v in zero.values())
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert "optimizer" not in cfg and "scheduler" not in cfg  # medvl builds AdamW and the schedule itself


# ---------------------------------------------------------------------------------------------------------
# The `medvl recipes` command group


@pytest.fixture()
def run():
    from medvl.commands.recipes import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), env={"COLUMNS": "200"})


def test_cli_list_names_every_recipe(run):
    result = run("list")
    assert result.exit_code == 0, result.output
    for name in SHIPPED:
        assert name[: -len(".yaml")] in result.output
    assert not [line for line in result.output.splitlines() if line.endswith(" ")]  # no padding in a pipe


def test_cli_show_prints_the_yaml(run, tmp_path):
    result = run("show", "tiny_cpu")
    assert result.exit_code == 0 and "demo-out/tiny-qwen2.5-vl" in result.output
    # off a terminal: the file itself, so `medvl recipes show NAME > my.yaml` is a recipe of one's own
    from medvl.config import load_recipe, resolve_recipe_path

    assert result.output == resolve_recipe_path("tiny_cpu").read_text(encoding="utf-8")
    (tmp_path / "my.yaml").write_text(result.output)
    assert load_recipe(tmp_path / "my.yaml", []).model.base == "demo-out/tiny-qwen2.5-vl"


def test_cli_validate_prints_ok_and_the_batch(run):
    result = run("validate", "huatuo_sft_qwen25vl_7b", "train.grad_accum=16", "distributed.nproc=4")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok ")
    assert "2 micro x 16 accum x 4 proc x 1 node = 128 samples/step" in result.output


def test_cli_validate_raises_the_recipe_error(run):
    from medvl.config import RecipeError

    result = run("validate", "tiny_cpu", "train.grad_accum=0")
    assert isinstance(result.exception, RecipeError)  # main() turns it into a panel and exit status 2
    assert result.exception.problems[0].path == "train.grad_accum"
