"""The family table against real (tiny) models: groups, layouts, LoRA targets, detection."""

import json
import re

import pytest

from medvl.commands.options import FAMILY_NAMES
from medvl.errors import MedvlError
from medvl.families import FAMILIES, detect_family, detect_layout, family_for_model_type, get_family

from .conftest import FAMILIES as ALL


def test_completion_names_match_table():
    # commands/options.py keeps its own copy so TAB never imports this module.
    assert tuple(FAMILIES) == FAMILY_NAMES == ALL


@pytest.mark.parametrize("family", ALL)
def test_every_parameter_has_a_group(family):
    from medvl.tiny import build_tiny

    fam = get_family(family)
    model, _ = build_tiny(family)
    groups = {}
    for name, p in model.named_parameters():
        groups.setdefault(fam.layout.group_of(name), 0)
        groups[fam.layout.group_of(name)] += p.numel()
    assert "other" not in groups
    assert groups["language"] > 0 and groups["head"] > 0
    if fam.is_vision:
        assert groups["vision"] > 0 and groups["projector"] > 0


@pytest.mark.parametrize("family", ALL)
def test_lora_regex_stays_in_language_model(family):
    from medvl.tiny import build_tiny

    fam = get_family(family)
    model, _ = build_tiny(family)
    modules = [n for n, _ in model.named_modules()]
    lm_only = [n for n in modules if re.match(fam.lora_regex(), n)]
    # 2 layers x 7 projections (q, k, v, o, gate, up, down); GLM fuses gate and up: 2 x 6
    assert len(lm_only) == (12 if family == "glm4" else 14)
    assert all(fam.layout.group_of(n + ".weight") == "language" for n in lm_only)
    if fam.is_vision:
        wider = [n for n in modules if re.match(fam.lora_regex(vision=True, projector=True), n)]
        groups = {fam.layout.group_of(n + ".weight") for n in wider}
        assert groups == {"language", "vision", "projector"}
        # Only linear layers: peft cannot wrap the Qwen Conv3d patch embedding.
        import torch

        assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in wider)


def test_detect_family_from_config(tmp_path):
    for fam in FAMILIES.values():
        for model_type in fam.model_types:
            (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
            assert detect_family(tmp_path) is fam


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    with pytest.raises(MedvlError) as err:
        detect_family(tmp_path)
    assert "blip-2" in str(err.value) and "qwen2_5_vl (qwen2.5-vl)" in str(err.value)
    assert "glm4 (glm4)" in str(err.value)


@pytest.mark.parametrize("model_type, names", [
    ("llava_qwen2", "FreedomIntelligence/HuatuoGPT-Vision-7B-hf"),
    ("llava_llama", "FreedomIntelligence/HuatuoGPT-Vision-34B-hf"),
    ("internvl_chat", "OpenGVLab/InternVL3-1B-hf"),
    ("chatglm", "THUDM/glm-4-9b-chat-hf"),
])
def test_original_remote_code_forms_name_the_transformers_form(tmp_path, model_type, names):
    # HuatuoGPT-Vision-7B's own config.json says llava_qwen2 (LlavaQwen2ForCausalLM from its training repo)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type,
                                                      "architectures": ["LlavaQwen2ForCausalLM"]}))
    with pytest.raises(MedvlError) as err:
        detect_family(tmp_path)
    assert model_type in str(err.value) and names in err.value.fix


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(MedvlError, match="no config.json"):
        detect_family(tmp_path)


def test_unknown_family_name_suggests():
    with pytest.raises(MedvlError, match="did you mean 'qwen2.5-vl'"):
        get_family("qwen25-vl")


def test_legacy_layout_detection():
    fam = family_for_model_type("qwen2_5_vl")
    old = ["visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.0.weight", "model.layers.0.mlp.up_proj.weight",
           "model.embed_tokens.weight", "lm_head.weight"]
    layout = detect_layout(old, fam)
    assert layout is fam.legacy_layout
    assert [layout.group_of(n) for n in old] == ["vision", "projector", "language", "language", "head"]
    new = ["model.visual.blocks.0.attn.qkv.weight", "model.language_model.layers.0.mlp.up_proj.weight"]
    assert detect_layout(new, fam) is fam.layout
    llava_old = ["language_model.model.layers.0.self_attn.q_proj.weight", "language_model.lm_head.weight",
                 "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "multi_modal_projector.linear_1.weight"]
    lay = detect_layout(llava_old, get_family("llava"))
    assert [lay.group_of(n) for n in llava_old] == ["language", "head", "vision", "projector"]


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "llava", "internvl"])
def test_layout_of_a_real_model_in_both_namings(family):
    """The in-memory names (current layout) and the names transformers 5 writes on save (the old ones for these
    families) are both recognised, although vision tensors outnumber language ones."""

    from medvl.tiny import build_tiny

    fam = get_family(family)
    model, _ = build_tiny(family)
    names = [n for n, _ in model.named_parameters()]
    assert detect_layout(names, fam) is fam.layout
    import tempfile
    from pathlib import Path

    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        with safe_open(str(Path(d) / "model.safetensors"), "pt") as f:
            saved = list(f.keys())
    assert detect_layout(saved, fam) in (fam.layout, fam.legacy_layout)
    layout = detect_layout(saved, fam)
    assert all(layout.group_of(n) != "other" for n in saved), [n for n in saved if layout.group_of(n) == "other"][:3]


def test_hub_id_resolves_through_the_cache(tmp_path, monkeypatch):
    """A hub id is read from the Hugging Face cache (offline); a missing one says how to get it."""
    import shutil

    from medvl.tiny import build_tiny

    # lay out a cache entry the way huggingface_hub does: models--org--name/snapshots/<rev>/config.json
    cache = tmp_path / "hub"
    snap = cache / "models--medvl-test--tiny-vl" / "snapshots" / ("0" * 40)
    build_tiny("qwen2.5-vl", tmp_path / "m")
    snap.mkdir(parents=True)
    shutil.copy(tmp_path / "m" / "config.json", snap / "config.json")
    (cache / "models--medvl-test--tiny-vl" / "refs").mkdir()
    (cache / "models--medvl-test--tiny-vl" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert detect_family("medvl-test/tiny-vl").name == "qwen2.5-vl"
    with pytest.raises(MedvlError, match="hf download medvl-test/absent"):
        detect_family("medvl-test/absent")


def test_recipe_family_literal_matches_the_table():
    """A recipe may name every family of the table (model.family: glm4), and only those."""
    import typing

    from medvl.config import TEXT_FAMILIES, FamilyName

    assert typing.get_args(FamilyName) == tuple(FAMILIES)
    assert TEXT_FAMILIES == tuple(n for n, f in FAMILIES.items() if not f.is_vision)
