"""An exported directory holds everything vLLM needs to serve it (`vllm serve DIR`), for every family.

vLLM picks its model implementation by `config.json` `architectures[0]`, looked up in its model registry
(vllm/model_executor/models/registry.py: `_TEXT_GENERATION_MODELS` and `_MULTIMODAL_MODELS`); it reads the
tokenizer and chat template through transformers' AutoTokenizer, the image settings through AutoProcessor /
AutoImageProcessor (preprocessor_config.json for transformers 4 based releases), the default sampling settings and
stop tokens from generation_config.json, and the context length from max_position_embeddings. The names below are
the registry's keys for the architectures medvl exports (read from the registry, late 2026).
"""

from __future__ import annotations

import json

import pytest

VLLM_ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
    "LlavaForConditionalGeneration", "InternVLForConditionalGeneration",
    "Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "GlmForCausalLM", "Glm4ForCausalLM",
}


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    from medvl.export import export

    done = {}

    def get(family):
        if family not in done:
            out = tmp_path_factory.mktemp(f"vllm-{family}") / "model"
            export(tiny_dir(family), out, dtype="bf16")
            done[family] = out
        return done[family]

    return get


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava", "internvl", "causal-lm"])
def test_export_has_what_vllm_reads(exported, family):
    from transformers import AutoConfig, AutoTokenizer

    path = exported(family)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"][0] in VLLM_ARCHITECTURES
    assert config["model_type"] and config.get("dtype") == "bfloat16"
    text = config.get("text_config", config)
    assert text["max_position_embeddings"] > 0 and text["vocab_size"] > 0
    weights = sorted(p.name for p in path.glob("*.safetensors"))
    assert weights and (len(weights) == 1 or (path / "model.safetensors.index.json").is_file())
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen.get("eos_token_id") is not None  # vLLM's stop tokens come from here
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template, "no chat template: vLLM's chat endpoint would refuse every request"
    assert (path / "tokenizer.json").is_file()
    AutoConfig.from_pretrained(path)
    if family != "causal-lm":
        pre = json.loads((path / "preprocessor_config.json").read_text())
        assert pre["image_processor_type"] and pre.get("image_mean") and pre.get("size")
        proc = json.loads((path / "processor_config.json").read_text())
        assert proc  # transformers 5 readers
        assert config.get("image_token_id") is not None or config.get("image_token_index") is not None
