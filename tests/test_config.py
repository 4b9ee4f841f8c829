"""medvl.config: loading, overrides, every class of validation error, and the resolved-YAML round trip."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml

from medvl.config import (RESOLUTION_PRESETS, Recipe, RecipeError, ResolutionPreset, load_recipe,
                          recipe_summary, recipe_to_yaml, recipe_warnings, resolve_recipe_path, shipped_recipes)
from medvl.errors import MedvlError

MINIMAL = """\
model:
  base: some/model
data:
  train: [prepared/a]
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(path: Path, overrides=()) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return info.value


# ---------------------------------------------------------------------------------------------------------
# The happy path


def test_minimal_recipe_fills_defaults_and_resolves(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert r.model.base == "some/model"
    assert r.data.train[0].path == "prepared/a" and r.data.train[0].weight == 1.0
    assert r.train.precision == "bf16"  # null precision resolves to model.dtype
    assert r.method == "full" and r.lora is None
    assert r.optim.warmup_ratio == 0.03 and r.optim.warmup_steps is None
    assert r.source == str(tmp_path / "r.yaml")


def test_lora_method_fills_default_adapter_settings(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), ["method=lora"])
    assert r.lora is not None and (r.lora.r, r.lora.alpha, r.lora.target) == (16, 32, "language")


def test_global_batch_multiplies_all_four_factors(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), ["train.micro_batch_size=2", "train.grad_accum=8",
                                               "distributed.nproc=4", "distributed.nnodes=2",
                                               "distributed.master_addr=10.0.0.1"])
    assert r.global_batch == 128 and r.world_size == 8
    assert r.batch_arithmetic() == "2 micro x 8 accum x 4 proc x 2 nodes = 128 samples/step"


def test_single_string_train_path_and_weighted_sources(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), ["data.train=a"])
    assert [s.path for s in r.data.train] == ["a"]
    r = load_recipe(write(tmp_path, MINIMAL), ["data.train=[a, {path: b, weight: 2.5}]"])
    assert [(s.path, s.weight) for s in r.data.train] == [("a", 1.0), ("b", 2.5)]


def test_empty_section_means_defaults(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL + "optim:\n  # lr: 1e-5\ntrain:\n"))
    assert r.optim.lr == 1e-5 and r.train.grad_accum == 1


def test_warmup_steps_alone_clears_the_default_ratio(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), ["optim.warmup_steps=100"])
    assert r.optim.warmup_ratio is None and r.optim.warmup_for(10_000) == 100
    r = load_recipe(write(tmp_path, MINIMAL), ["optim.warmup_ratio=0.05"])
    assert r.optim.warmup_for(10_000) == 500


def test_resolution_preset_gives_pixel_range(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), ["data.resolution=huatuo"])
    assert r.data.pixel_range == (3136, 151200)


def test_presets_literal_matches_table():
    assert set(typing.get_args(ResolutionPreset)) == set(RESOLUTION_PRESETS)


def test_every_field_is_documented():
    seen = set()

    def walk(cls):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no docstring"
            for arg in typing.get_args(field.annotation) + (field.annotation,):
                if isinstance(arg, type) and hasattr(arg, "model_fields") and arg not in seen:
                    seen.add(arg)
                    walk(arg)

    walk(Recipe)
    assert len(seen) >= 10  # all sections plus DataSource were visited


def test_direct_construction_runs_the_cross_checks():
    with pytest.raises(ValueError, match="optim.warmup_steps"):
        Recipe(model={"base": "m"}, data={"train": "a"}, optim={"warmup_ratio": 0.1, "warmup_steps": 5})


def test_deepspeed_config_path_defaults_to_shipped_file(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), ["distributed.strategy=deepspeed-zero3", "distributed.nproc=2"])
    path = r.distributed.deepspeed_config_path()
    assert path.name == "zero3.json" and path.is_file()
    r = load_recipe(write(tmp_path, MINIMAL), ["distributed.strategy=deepspeed-zero2",
                                               "distributed.deepspeed_config=my.json"])
    assert r.distributed.deepspeed_config_path() == Path("my.json")
    r = load_recipe(write(tmp_path, MINIMAL), ["distributed.strategy=deepspeed-zero2",
                                               "distributed.deepspeed_config=zero3.json"])
    assert r.distributed.deepspeed_config_path().parent.name == "deepspeed"  # a shipped name
    assert load_recipe(write(tmp_path, MINIMAL)).distributed.deepspeed_config_path() is None


# ---------------------------------------------------------------------------------------------------------
# One test per class of mistake: (overrides on MINIMAL, dotted path reported, words in the message)

MISTAKES = [
    (["train.grad_accum=0"], "train.grad_accum", "must be >= 1, got 0"),
    (["train.keep_last=0"], "train.keep_last", ">= 1"),
    (["train.save_every=0"], "train.save_every", ">= 1"),
    (["data.val_fraction=1.5"], "data.val_fraction", "must be < 1"),
    (["data.val_fraction=0"], "data.val_fraction", "must be > 0"),
    (["model.dtype=bfloat16"], "model.dtype", "did you mean 'bf16'"),
    (["distributed.strategy=deepspeed_zero3"], "distributed.strategy", "did you mean 'deepspeed-zero3'"),
    (["eval.suites=[vqa-rad, slak]"], "eval.suites[1]", "did you mean 'slake'"),
    (["optim.betas=[0.9, 1.5]"], "optim.betas", "each beta must be in [0, 1)"),
    (["train.micro_batch_size=two"], "train.micro_batch_size", "valid integer"),
    (["model.base=null"], "model.base", "valid string"),
    (["optim.warmup_ratio=0.1", "optim.warmup_steps=10"], "optim.warmup_steps", "set together with"),
    (["data.val=v", "data.val_fraction=0.1"], "data.val_fraction", "set together with data.val"),
    (["data.resolution=huatuo", "data.max_pixels=1000"], "data.max_pixels", "remove one"),
    (["data.min_pixels=5000", "data.max_pixels=1000"], "data.min_pixels", "larger than data.max_pixels"),
    (["data.train=[a, a]"], "data.train[1].path", "weight: 2"),
    (["lora.r=8"], "lora", "method is full"),
    (["freeze.vision_tower=true", "freeze.projector=true", "freeze.language_model=true"], "freeze",
     "nothing would train"),
    (["model.family=causal-lm", "freeze.language_model=true"], "freeze", "nothing would train"),
    (["method=lora", "freeze.language_model=true"], "freeze.language_model", "puts the adapters there"),
    (["method=lora", "lora.include_vision=true", "freeze.vision_tower=true"], "freeze.vision_tower", "adapters"),
    (["method=lora", "lora.target=(q_proj"], "lora.target", "not a valid regex"),
    (["method=lora", "lora.target=.*q_proj", "lora.include_projector=true"], "lora.include_projector",
     "regex target"),
    (["model.family=causal-lm", "method=lora", "lora.include_vision=true"], "lora.include_vision", "no vision"),
    (["method=qlora", "model.dtype=fp32"], "model.dtype", "qlora"),
    (["method=qlora", "train.device=cpu"], "method", "need CUDA"),
    (["model.dtype=fp16"], "model.dtype", "cannot be fully fine-tuned"),
    (["train.precision=fp16"], "train.precision", "mixes the two 16-bit formats"),
    (["train.precision=fp32"], "train.precision", "still computes in bf16"),
    (["model.attn_implementation=flash_attention_2", "model.dtype=fp32"], "model.attn_implementation",
     "only in bf16/fp16"),
    (["model.attn_implementation=flash_attention_2", "train.device=cpu"], "model.attn_implementation", "CUDA"),
    (["train.eval_every=100"], "train.eval_every", "data.val or data.val_fraction"),
    (["eval.every=100", "eval.suites=[slake]"], "eval.data", "benchmark bundle"),
    (["eval.every=100", "eval.data=b.json"], "eval.suites", "at least one suite"),
    (["eval.suites=[slake, slake]"], "eval.suites[1]", "listed twice"),
    (["distributed.nnodes=2", "distributed.node_rank=2", "distributed.master_addr=10.0.0.1"],
     "distributed.node_rank", "ranks 0..1"),
    (["distributed.nnodes=2"], "distributed.master_addr", "not reachable"),
    (["distributed.deepspeed_config=ds.json"], "distributed.deepspeed_config", "strategy is ddp"),
    (["distributed.master_port=80"], "distributed.master_port", ">= 1024"),
    (["output.report_to=[tensorbord]"], "output.report_to[0]", "did you mean 'tensorboard'"),
]


@pytest.mark.parametrize("overrides,path,words", MISTAKES, ids=[m[1] + ":" + m[2][:20] for m in MISTAKES])
def test_each_mistake_is_reported_with_path_and_file(tmp_path, overrides, path, words):
    recipe = write(tmp_path, MINIMAL)
    err = problems_of(recipe, overrides)
    assert [p.path for p in err.problems] == [path], err.problems  # exactly this problem, no collateral
    assert words in err.problems[0].message
    text = str(err)
    assert f"{path}: " in text and str(recipe) in text
    assert isinstance(err, MedvlError)


def test_problem_in_file_carries_its_yaml_line(tmp_path):
    recipe = write(tmp_path, MINIMAL + "train:\n  epochs: 1\n  grad_accum: 0\n")
    err = problems_of(recipe)
    assert err.problems[0].line == 7
    assert "train.grad_accum: must be >= 1, got 0  (line 7)" in str(err)


def test_missing_required_key_points_at_its_section(tmp_path):
    err = problems_of(write(tmp_path, "model:\n  dtype: bf16\ndata:\n  train: [a]\n"))
    assert [(p.path, p.line) for p in err.problems] == [("model.base", 1)]
    assert "required" in err.problems[0].message


def test_unknown_key_suggests_the_close_name(tmp_path):
    err = problems_of(write(tmp_path, MINIMAL + "optim:\n  lrr: 1e-5\n"))
    assert [(p.path, p.line) for p in err.problems] == [("optim.lrr", 6)]
    assert "did you mean 'lr'?" in err.problems[0].message


def test_unknown_key_in_the_wrong_section_names_the_right_one(tmp_path):
    err = problems_of(write(tmp_path, MINIMAL + "train:\n  lr: 1e-5\n"))
    assert err.problems[0].path == "train.lr"
    assert "did you mean optim.lr?" in err.problems[0].message


def test_unknown_section_lists_the_sections(tmp_path):
    err = problems_of(write(tmp_path, MINIMAL + "trainer:\n  epochs: 1\n"))
    assert err.problems[0].path == "trainer" and "did you mean 'train'?" in err.problems[0].message


def test_duplicate_yaml_key_is_an_error(tmp_path):
    err = problems_of(write(tmp_path, MINIMAL + "optim:\n  lr: 1e-5\noptim:\n  lr: 2e-5\n"))
    assert [(p.path, p.line) for p in err.problems] == [("optim", 7)]
    assert "first on line 5" in err.problems[0].message


def test_yaml_syntax_error_has_a_line(tmp_path):
    err = problems_of(write(tmp_path, MINIMAL + "train:\n  epochs: [1\n  grad_accum: 2\n"))
    assert "not valid YAML" in err.problems[0].message and err.problems[0].line is not None


def test_non_mapping_recipe_is_an_error(tmp_path):
    err = problems_of(write(tmp_path, "- a\n- b\n"))
    assert "YAML mapping" in err.problems[0].message


def test_all_problems_are_reported_together(tmp_path):
    text = MINIMAL + """\
optim:
  lrr: 1e-5
  warmup_ratio: 0.1
  warmup_steps: 10
train:
  grad_accum: 0
distributed:
  nnodes: 2
"""
    err = problems_of(write(tmp_path, text), ["eval.every=5"])
    got = {(p.path, p.line, p.override) for p in err.problems}
    assert got == {
        ("optim.lrr", 6, None),              # unknown key (optim fails, so its warmup check cannot run)
        ("train.grad_accum", 10, None),      # field constraint
        ("distributed.master_addr", 11, None),  # cross-field, in a section that validated
        ("eval.data", None, "eval.every=5"),  # cross-field caused by an override
        ("eval.suites", None, "eval.every=5"),
    }
    assert str(err).startswith(f"recipe {tmp_path / 'r.yaml'}: 5 problems")
    # File order first, then override problems.
    assert [p.line for p in err.problems][:3] == [6, 10, 11]


# ---------------------------------------------------------------------------------------------------------
# Overrides


@pytest.mark.parametrize("override,getter,expected", [
    ("optim.lr=1e-5", lambda r: r.optim.lr, 1e-5),            # PyYAML alone reads 1e-5 as a string
    ("optim.lr=2.5E-4", lambda r: r.optim.lr, 2.5e-4),
    ("train.grad_accum=16", lambda r: r.train.grad_accum, 16),
    ("data.packing=true", lambda r: r.data.packing, True),
    ("train.max_steps=null", lambda r: r.train.max_steps, None),
    ("train.max_steps=", lambda r: r.train.max_steps, None),   # empty value = null
    ("eval.suites=[slake, pathvqa]", lambda r: r.eval.suites, ["slake", "pathvqa"]),
    ("output.dir=runs/x y", lambda r: r.output.dir, "runs/x y"),
    ("model.base=C:/models/q", lambda r: r.model.base, "C:/models/q"),
])
def test_override_value_types(tmp_path, override, getter, expected):
    r = load_recipe(write(tmp_path, MINIMAL + "train:\n  max_steps: 50\n"), [override])
    assert getter(r) == expected and type(getter(r)) is type(expected)
    assert r.overrides == (override,)


def test_override_replaces_a_value_from_the_file(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL + "optim:\n  lr: 3.0e-4\n"), ["optim.lr=1e-6"])
    assert r.optim.lr == 1e-6


def test_override_of_unknown_key_is_reported_like_a_yaml_key(tmp_path):
    err = problems_of(write(tmp_path, MINIMAL), ["optim.lrr=1e-5", "train.lr=1"])
    assert [(p.path, p.override) for p in err.problems] == [("optim.lrr", "optim.lrr=1e-5"),
                                                            ("train.lr", "train.lr=1")]
    assert "did you mean 'lr'?" in err.problems[0].message
    assert "did you mean optim.lr?" in err.problems[1].message
    assert "[override optim.lrr=1e-5]" in str(err)


def test_fix_names_the_overrides_when_they_are_the_mistakes(tmp_path):
    path = write(tmp_path, MINIMAL)
    err = problems_of(path, ["optim.lr=abc", "trian.max_steps=3"])
    assert err.fix == (f"fix the overrides above (command line), then check again: "
                       f"medvl recipes validate {path} optim.lr=abc trian.max_steps=3")
    both = problems_of(write(tmp_path, MINIMAL + "train:\n  max_stepz: 3\n", "both.yaml"), ["optim.lr=abc"])
    assert both.fix.startswith(f"edit the keys above in {tmp_path / 'both.yaml'} and fix the overrides")
    assert both.fix.endswith("optim.lr=abc")
    only_file = problems_of(write(tmp_path, MINIMAL + "train:\n  max_stepz: 3\n", "file.yaml"))
    assert only_file.fix == (f"edit the keys above in {tmp_path / 'file.yaml'}, then check again: "
                             f"medvl recipes validate {tmp_path / 'file.yaml'}")


def test_malformed_overrides(tmp_path):
    err = problems_of(write(tmp_path, MINIMAL), ["optim.lr", "model.base.x=1", "a..b=1"])
    messages = [str(p) for p in err.problems]
    assert len(messages) == 3
    assert "'optim.lr' is not key.sub=value" in messages[0]
    assert messages[1].startswith("model.base: is a str, not a section")
    assert "'a..b=1' is not key.sub=value" in messages[2]


# ---------------------------------------------------------------------------------------------------------
# Finding recipes


def test_bare_name_resolves_to_the_shipped_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("tiny_cpu", "tiny_cpu.yaml"):
        path = resolve_recipe_path(name)
        assert path.name == "tiny_cpu.yaml" and path.parent.name == "recipes"
    assert load_recipe("tiny_cpu").source.endswith("tiny_cpu.yaml")


def test_local_file_wins_over_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, MINIMAL, "tiny_cpu.yaml")
    assert resolve_recipe_path("tiny_cpu.yaml") == Path("tiny_cpu.yaml")
    assert load_recipe("tiny_cpu.yaml").model.base == "some/model"
    assert load_recipe("tiny_cpu").model.base != "some/model"  # no suffix: not that file, the shipped one


def test_unknown_name_suggests_a_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MedvlError) as info:
        load_recipe("tiny_cp")
    assert "did you mean tiny_cpu?" in info.value.fix
    with pytest.raises(MedvlError, match="no recipe file"):
        load_recipe("somewhere/tiny_cpu.yaml")  # a path with a folder never falls back to a shipped name
    with pytest.raises(MedvlError, match="is a directory"):
        load_recipe(tmp_path)


def test_shipped_recipes_have_a_purpose_line():
    listed = dict(shipped_recipes())
    assert {"tiny_cpu", "huatuo_align_qwen25vl_7b", "huatuo_sft_qwen25vl_7b"} <= set(listed)
    assert listed["tiny_cpu"].startswith("Demo and test recipe")


# ---------------------------------------------------------------------------------------------------------
# Resolved YAML


def test_resolved_yaml_round_trips(tmp_path):
    original = load_recipe("huatuo_sft_qwen25vl_7b", ["optim.warmup_steps=100", "optim.warmup_ratio=null",
                                                       "method=lora", "data.train=[a, {path: b, weight: 2}]"])
    text = recipe_to_yaml(original)
    assert text.startswith("# medvl resolved recipe (from ")
    assert "# overrides: optim.warmup_steps=100" in text
    assert "betas: [0.9, 0.999]" in text
    again = load_recipe(write(tmp_path, text, "resolved.yaml"))
    assert again.model_dump() == original.model_dump()
    assert again.lora.r == 16 and again.train.precision == "bf16"  # resolved values are spelled out


def test_summary_and_warnings(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), ["freeze.vision_tower=true", "optim.vision_lr=1e-6",
                                               "distributed.strategy=deepspeed-zero3", "optim.lr=3e-4"])
    warnings = recipe_warnings(r)
    assert [w.split(":")[0] for w in warnings] == ["distributed.strategy", "optim.vision_lr", "optim.lr"]
    summary = dict(recipe_summary(r))
    assert summary["batch"] == "1 micro x 1 accum x 1 proc x 1 node = 1 samples/step"
    assert summary["method"] == "full: trains projector, language model"


def test_seq_len_too_short_for_the_images_warns(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), ["model.family=qwen2.5-vl", "data.resolution=huatuo",
                                               "data.max_seq_len=1024"])
    # 151,200 px // 784 px per token = 192 tokens x 8 images = 1,536 > 1,024
    assert any("8 images x 192 tokens = 1,536" in w for w in recipe_warnings(r))


def test_raw_yaml_floats_without_dot_load_as_floats():
    from medvl.config_yaml import Loader as _Loader

    assert yaml.load("a: 5e-6\nb: 1e5\nc: 1.0e-3\nd: e5", Loader=_Loader) == {"a": 5e-6, "b": 1e5, "c": 1e-3,
                                                                                 "d": "e5"}
