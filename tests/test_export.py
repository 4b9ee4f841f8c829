"""`medvl export` on tiny models of every family: LoRA runs merge and reload with the adapter model's logits and
greedy tokens, full models reload bit-identical, the output is self-contained, and a failure leaves nothing."""

from __future__ import annotations

import json

import pytest
import torch

from medvl.errors import MedvlError
from medvl.export import export

from .conftest import FAMILIES


def fake_lora_run(tiny, family_name, run, *, seed=0, scale=0.5):
    """RUN/ as medvl.engine.train leaves it for a LoRA run (recipe.yaml, metrics.jsonl, final/ = adapter +
    processor + medvl_run.json), with LoRA B weights set to seeded noise so the adapter changes the logits
    (peft starts B at zero), plus an eval results.json. Returns the PeftModel's fp32 logits on the export probe."""
    from peft import LoraConfig, get_peft_model

    from medvl.config import load_recipe, recipe_to_yaml
    from medvl.versions import library_versions
    from medvl.probe import probe_inputs
    from medvl.families import get_family
    from medvl.models import load_model, load_processor

    family = get_family(family_name)
    recipe = load_recipe("tiny_cpu", [f"model.base={tiny}", f"output.dir={run}", "data.train=[/data/pubmedvision]",
                                      "method=lora", "lora.r=4", "lora.alpha=8", "optim.lr=2e-4"])
    model = get_peft_model(load_model(tiny, family), LoraConfig(r=4, lora_alpha=8, target_modules=family.lora_regex(),
                                                                task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    processor = load_processor(tiny, family)
    final = run / "final"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    (final / "medvl_run.json").write_text(json.dumps({
        "recipe": json.loads(recipe.model_dump_json()), "versions": library_versions(), "trainability": [],
        "base_model": str(tiny), "method": "lora", "data_manifests": {"/data/pubmedvision": "sha256:5eed0123abcd"}}))
    (run / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    (run / "metrics.jsonl").write_text('{"kind": "end"}\n')
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps({"scorers": {"strict": {
        "overall": {"acc": 0.625, "n": 8, "correct": 5}, "datasets": {"VQA-RAD": {"acc": 0.625, "n": 8, "correct": 5}},
        "subsets": {}}}}))
    model.eval()
    with torch.no_grad():
        return model(**probe_inputs(processor, family)).logits[0]


def reload_logits(out, family_name, dtype=torch.float32):
    """Logits of the exported directory loaded by stock transformers, computed here (not by medvl.export)."""
    import transformers as T

    from medvl.probe import probe_inputs
    from medvl.families import get_family
    from medvl.models import load_processor

    family = get_family(family_name)
    cls = T.AutoModelForImageTextToText if family.is_vision else T.AutoModelForCausalLM
    model = cls.from_pretrained(out, dtype=dtype)
    inputs = probe_inputs(load_processor(out, family), family)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        return model(**inputs).logits[0].float(), type(model).__name__


def scan_for(path, needle: str) -> list[str]:
    return [f.name for f in path.rglob("*") if f.is_file() and needle.encode() in f.read_bytes()]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_run_merges_and_reloads_with_the_same_logits(family, tiny_dir, tmp_path):
    run = tmp_path / "run"
    adapter_logits = fake_lora_run(tiny_dir(family), family, run)
    res = export(run, tmp_path / "out", dtype="fp32", max_shard_size="150KB")
    out, p = tmp_path / "out", res.parity
    # the adapter matters (so a lost merge could not pass) and the merged export reproduces it
    base_logits, _ = reload_logits(tiny_dir(family), family)
    assert float((adapter_logits - base_logits).abs().max()) > 0.05
    got, cls = reload_logits(out, family)
    assert float((got - adapter_logits).abs().max()) < 1e-4
    assert p.logits_max_abs_diff < 1e-4 and p.merge_max_abs_diff < 1e-4 and p.generation_match
    assert p.pre_export_max_abs_diff < 1e-4 and p.generation_matches_pre_export
    assert len(p.generated_export) == 8 and p.tensors_different == [] and p.tensors_checked > 20
    assert p.image_tokens == {"causal-lm": 0, "glm4": 0, "llava": 16}.get(family, 4)  # LLaVA: 16 patches of 56 x 56
    assert res.kind == "lora" and res.model_class == cls and res.shards > 1
    # layout: sharded safetensors with an index, processor, chat template, generation config, card, no adapter
    files = set(res.files)
    assert {"model.safetensors.index.json", "config.json", "generation_config.json", "chat_template.jinja",
            "tokenizer.json", "README.md", "medvl_export.json"} <= files
    assert not {"adapter_config.json", "adapter_model.safetensors", "medvl_run.json"} & files
    assert ("processor_config.json" in files) == (family not in ("causal-lm", "glm4"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == res.shards
    assert not any("lora" in k for k in index["weight_map"])
    # self-contained: nothing names the run directory (the card names the run by its name only)
    assert scan_for(out, str(run.resolve())) == [] and scan_for(out, str(run)) == []


def test_model_card_carries_the_run(tiny_dir, tmp_path):
    import shutil

    base, run = tmp_path / "base", tmp_path / "run"
    shutil.copytree(tiny_dir("qwen2.5-vl"), base)
    video = '{"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 14}'
    (base / "video_preprocessor_config.json").write_text(video)  # as in the hub's Qwen2.5-VL snapshots
    fake_lora_run(base, "qwen2.5-vl", run)
    res = export(run / "final", tmp_path / "med-vl", dtype="bf16")
    assert (tmp_path / "med-vl" / "video_preprocessor_config.json").read_text() == video
    card = (tmp_path / "med-vl" / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "# med-vl" in card
    assert f"LoRA merged into `{base}`" in card and "| learning rate | 0.0002 |" in card
    assert "r 4, alpha 8.0" in card and "`pubmedvision`: `sha256:5eed0123abcd`" in card
    assert "(strict): overall 0.6250 (n = 8)" in card and "VQA-RAD: 0.6250" in card
    assert "vllm serve ./med-vl" in card and "AutoModelForImageTextToText.from_pretrained('./med-vl'" in card
    import transformers

    assert f"| transformers | {transformers.__version__} | {transformers.__version__} |" in card
    assert "are bit-identical, and its 8 greedy tokens are identical" in card
    assert f"rounding the weights to bf16 moves the logits by {res.parity.pre_export_max_abs_diff:.3g}" in card
    facts = json.loads((tmp_path / "med-vl" / "medvl_export.json").read_text())
    assert facts["training"]["recipe"]["output"]["dir"] == "<run>" and facts["run"] == "run"
    assert facts["parity"]["dtype"] == "bf16" and res.dtype == "bf16"
    assert json.loads((tmp_path / "med-vl" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("family,dtype", [("qwen2-vl", "bf16"), ("qwen3-vl", "fp16"), ("llava", "bf16"),
                                          ("internvl", "bf16"), ("causal-lm", "fp16"), ("qwen2.5-vl", "fp32")])
def test_full_model_exports_in_each_dtype(family, dtype, tiny_dir, tmp_path):
    res = export(tiny_dir(family), tmp_path / "out", dtype=dtype)
    p = res.parity
    assert res.kind == "full" and res.shards == 1 and p.tensors_different == [] and p.merge_max_abs_diff is None
    # the export is exactly the model with its weights in `dtype` ...
    assert p.logits_max_abs_diff < 1e-4 and p.generation_match and p.tolerance == 1e-4
    # ... and rounding to the dtype costs (measured on these models, largest logit ~0.65): bf16 4-6e-3, fp16
    # ~6e-4 (8 and 11 significant bits), fp32 nothing
    lo, hi = {"fp32": (0, 1e-6), "fp16": (1e-4, 2e-3), "bf16": (1e-3, 2e-2)}[dtype]
    assert lo <= p.pre_export_max_abs_diff < hi
    ref, _ = reload_logits(tiny_dir(family), family)
    got, _ = reload_logits(tmp_path / "out", family)  # half weights upcast exactly, fp32 compute
    assert float((got - ref).abs().max()) == pytest.approx(p.pre_export_max_abs_diff, abs=1e-6)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}


def test_engine_full_run_and_lora_checkpoint(tiny_dir, prepared_text, tmp_path):
    """Runs from the real training engine: a full run's RUN dir, and a LoRA run's step checkpoint (accelerate
    state: the PeftModel's whole state dict), rebuilt from RUN/recipe.yaml and merged."""
    from safetensors.torch import load_file

    from medvl.config import load_recipe
    from medvl.engine.train import train

    def recipe(tiny, out, *extra):
        return load_recipe("tiny_cpu", [f"model.base={tiny}", f"data.train=[{prepared_text}]", f"output.dir={out}",
                                        "train.max_steps=3", "train.eval_every=null", "data.val_fraction=null",
                                        "train.micro_batch_size=4", "optim.warmup_steps=1", "optim.lr=5e-3", *extra])

    train(recipe(tiny_dir("qwen2.5-vl"), tmp_path / "full", "train.save_every=null"))
    full = export(tmp_path / "full", tmp_path / "full-out", dtype="fp32")
    assert full.kind == "full" and full.parity.logits_max_abs_diff < 1e-4 and full.parity.generation_match
    trained, exported = load_file(tmp_path / "full" / "final" / "model.safetensors"), {}
    for f in (tmp_path / "full-out").glob("*.safetensors"):
        exported.update(load_file(f))
    assert trained.keys() == exported.keys() and all(torch.equal(trained[k], exported[k]) for k in trained)
    assert "| steps / epochs | 3 / 1.0 |" in (tmp_path / "full-out" / "README.md").read_text()
    assert scan_for(tmp_path / "full-out", str((tmp_path / "full").resolve())) == []

    train(recipe(tiny_dir("causal-lm"), tmp_path / "lora", "method=lora", "lora.r=8", "lora.alpha=16",
                 "train.save_every=3"))
    ckpt = tmp_path / "lora" / "checkpoints" / "step-000003"
    res = export(ckpt, tmp_path / "ckpt-out", dtype="fp32")
    assert res.kind == "checkpoint" and res.parity.merge_max_abs_diff < 1e-4 and res.parity.generation_match
    # the checkpoint and the run's final adapter are the same weights: their exports agree
    res2 = export(tmp_path / "lora", tmp_path / "final-out", dtype="fp32")
    a, _ = reload_logits(tmp_path / "ckpt-out", "causal-lm")
    b, _ = reload_logits(tmp_path / "final-out", "causal-lm")
    base, _ = reload_logits(tiny_dir("causal-lm"), "causal-lm")
    assert float((a - b).abs().max()) < 1e-5 and float((a - base).abs().max()) > 1e-3
    assert res2.parity.generated_pre_export == res.parity.generated_pre_export


@pytest.mark.slow
def test_deepspeed_zero3_checkpoint_is_consolidated(tiny_dir, prepared_text, tmp_path):
    """A 2-process ZeRO-3 run's step checkpoint holds only partitions (pytorch_model/zero_pp_rank_*); export
    consolidates them with deepspeed's zero_to_fp32 and gets the weights the run's final/ gathered. ~11 s."""
    from safetensors.torch import load_file

    from medvl.config import load_recipe
    from medvl.commands.worker import MODULE as worker
    from medvl.engine.launch import run_launched

    r = load_recipe("tiny_cpu", [f"model.base={tiny_dir('causal-lm')}", f"data.train=[{prepared_text}]",
                                 f"output.dir={tmp_path / 'run'}", "train.max_steps=2", "train.save_every=2",
                                 "train.eval_every=null", "data.val_fraction=null", "train.micro_batch_size=4",
                                 "distributed.nproc=2", "distributed.strategy=deepspeed-zero3"])
    assert run_launched(r, worker=worker, timeout=600) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    assert list((ckpt / "pytorch_model").glob("zero_pp_rank_1_*model_states.pt"))
    assert not (ckpt / "model.safetensors").exists()
    res = export(ckpt, tmp_path / "out", dtype="fp32")
    assert res.kind == "checkpoint" and res.parity.logits_max_abs_diff < 1e-4 and res.parity.generation_match
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert final.keys() == got.keys() and all(torch.equal(final[k], got[k]) for k in final)


def test_adapter_outside_a_run_takes_base_override(tiny_dir, tmp_path):
    import shutil

    adapter_logits = fake_lora_run(tiny_dir("qwen3-vl"), "qwen3-vl", tmp_path / "run")
    adapter = shutil.copytree(tmp_path / "run" / "final", tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/moved/away/base"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MedvlError, match="/moved/away/base is not a local directory"):
        export(adapter, tmp_path / "out")
    res = export(adapter, tmp_path / "out", base=str(tiny_dir("qwen3-vl")), dtype="fp32")
    got, _ = reload_logits(tmp_path / "out", "qwen3-vl")
    assert res.kind == "lora" and float((got - adapter_logits).abs().max()) < 1e-4


def test_failure_mid_export_leaves_no_directory(tiny_dir, tmp_path, monkeypatch):
    import medvl.export as ex

    run = tmp_path / "run"
    fake_lora_run(tiny_dir("qwen2.5-vl"), "qwen2.5-vl", run)
    written = []

    def crash(path, *args, **kwargs):  # shards, processor and parity are done by now
        written.extend(p.name for p in path.iterdir())
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "write_model_card", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export(run, tmp_path / "out", dtype="fp32")
    assert "model.safetensors" in written and "tokenizer.json" in written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_differing_export_fails_loudly(tiny_dir, tmp_path, monkeypatch):
    """A shard that does not hold what the model held (here: one decoder weight nudged by 0.01 after saving)
    fails the reload check; nothing is left behind."""
    from safetensors.torch import load_file, save_file
    from transformers import PreTrainedModel

    save = PreTrainedModel.save_pretrained

    def corrupting_save(self, path, *args, **kwargs):
        save(self, path, *args, **kwargs)
        state = load_file(path / "model.safetensors")
        state["model.layers.0.mlp.up_proj.weight"] += 0.01
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", corrupting_save)
    with pytest.raises(MedvlError) as err:
        export(tiny_dir("causal-lm"), tmp_path / "out", dtype="fp32")
    assert "1 of 27 tensors differ" in str(err.value) and "model.layers.0.mlp.up_proj.weight" in str(err.value)
    assert "logits differ by" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_lost_merge_is_caught(tiny_dir, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    run = tmp_path / "run"
    fake_lora_run(tiny_dir("causal-lm"), "causal-lm", run)
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())  # adapter dropped
    with pytest.raises(MedvlError, match="merging the LoRA adapter changed the logits by"):
        export(run, tmp_path / "out", dtype="bf16")
    assert not (tmp_path / "out").exists()


def test_output_rules_and_bad_sources(tiny_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(MedvlError, match="not empty"):
        export(tiny_dir("causal-lm"), tmp_path / "out")
    res = export(tiny_dir("causal-lm"), tmp_path / "out", overwrite=True, dtype="fp32")
    assert not (tmp_path / "out" / "old.txt").exists() and "config.json" in res.files
    with pytest.raises(MedvlError, match="holds no model"):
        export(tmp_path / "out" / "..", tmp_path / "x")
    with pytest.raises(MedvlError, match="cannot read the size"):
        export(tiny_dir("causal-lm"), tmp_path / "x", max_shard_size="5 gigs")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(MedvlError, match="does not name its base model"):
        export(tmp_path / "adapter", tmp_path / "x")


def test_cli_prints_parity(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from medvl.commands.main import app

    result = CliRunner().invoke(app, ["export", str(tiny_dir("qwen2.5-vl")), "--out", str(tmp_path / "out"),
                                      "--max-shard-size", "300KB"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "bf16" in result.output and "max |logit diff|" in result.output and "bit-identical" in result.output
    assert "rounding     bf16 weights vs the fp32 pre-export model" in result.output
    from medvl.commands.export import complete_dtype

    assert complete_dtype("f") == ["fp16", "fp32"] and complete_dtype("") == ["bf16", "fp16", "fp32"]
    assert "model.safetensors.index.json" in result.output
