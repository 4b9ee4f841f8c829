"""`medvl convert` on tiny pairs: the decoder really comes from the LLM (weights, config maths, logits), the
vision tower and the VL-only token rows from the VL model; mismatches are refused with what differs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medvl.convert import convert
from medvl.errors import MedvlError

# The tiny VL models' language model (medvl/tiny.py): hidden 64, 2 layers, 4 heads of 16, 2 KV heads, MLP 128,
# RMS-norm eps 1e-6, rope theta 1e6 (Qwen3-VL 5e6). The LLMs below differ in eps and theta on purpose: the
# result must carry the LLM's values or its logits would not match (0.0047 apart otherwise, environment.md 4).
LLM_EPS, LLM_THETA = 1e-5, 1e4
QWEN_VL = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


def make_llm(path, *, model_type="qwen2", tokenizer_from=None, tie=False, seed=1, max_shard_size=None, **cfg):
    """A tiny text LLM shaped like the tiny VL models' language model, with the tiny causal-lm tokenizer (the
    VL tokenizer minus its 11 vision/grounding specials: 602 vs 613 ids) or another model's tokenizer."""
    import transformers as T

    from medvl.families import get_family
    from medvl.tiny import build_tokenizer

    if tokenizer_from:
        tok = T.AutoTokenizer.from_pretrained(tokenizer_from)
    else:
        tok = build_tokenizer(get_family("causal-lm"))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    values = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=LLM_EPS, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": LLM_THETA}, tie_word_embeddings=tie,
                  pad_token_id=tok.pad_token_id, eos_token_id=eos, bos_token_id=None)
    values.update(cfg)
    config = T.Qwen3Config(head_dim=16, **values) if model_type == "qwen3" else T.Qwen2Config(**values)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tok.save_pretrained(path)
    return path


def tensors(path):
    """All tensors of a save_pretrained directory (one file or shards)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def llm_logits(path, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(input_ids=ids).logits[0]


@pytest.fixture(scope="module")
def llm2(tmp_path_factory):
    return make_llm(tmp_path_factory.mktemp("llm") / "qwen2")


@pytest.fixture(scope="module")
def llm3(tmp_path_factory):
    return make_llm(tmp_path_factory.mktemp("llm") / "qwen3", model_type="qwen3")


@pytest.mark.parametrize("family", QWEN_VL)
def test_decoder_and_maths_come_from_the_llm(family, tiny_dir, llm2, llm3, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from medvl.families import get_family
    from medvl.models import model_class

    vl, llm = tiny_dir(family), (llm3 if family == "qwen3-vl" else llm2)
    res = convert(vl, llm, tmp_path / "out")
    out = tmp_path / "out"
    # counts: the whole language model from the LLM, nothing of it left from the VL model: 2 layers x 12 tensors
    # for Qwen2 (q/k/v biases) or 11 for Qwen3 (q/k norms, no biases), + embeddings, final norm, head
    per_layer = 12 if family != "qwen3-vl" else 11
    assert res.decoder_replaced == 2 * per_layer and res.from_llm == 2 * per_layer + 3 == res.replaced
    src_vl, src_llm, got = tensors(vl), tensors(llm), tensors(out)
    assert len(got) == res.from_llm + res.from_vl == len(src_vl)
    # weights: names as stock transformers 5.23 writes them for the family
    lang = "model.language_model." if family == "qwen3-vl" else "model."
    for name, t in src_llm.items():
        target = name if name == "lm_head.weight" else lang + name[len("model."):]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(got[target][:602], t)  # the LLM's 602 rows ...
            assert torch.equal(got[target][602:], src_vl[target][602:])  # ... + the VL's 11 vision specials
        else:
            assert torch.equal(got[target], t), name
    vision = [k for k in src_vl if "visual." in k]
    assert vision and all(torch.equal(got[k], src_vl[k]) for k in vision)
    # vocabulary: resized to the VL tokenizer with the VL model's special-token rows
    assert (res.vocab.rows, res.vocab.llm_rows, len(res.vocab.from_vl)) == (613, 602, 11)
    assert "<|image_pad|>" in res.vocab.vl_tokens and "<|vision_start|>" in res.vocab.vl_tokens
    # config: the LLM's maths, the VL model's mRoPE split
    text = AutoConfig.from_pretrained(out).get_text_config()
    vl_rope = AutoConfig.from_pretrained(vl).get_text_config().rope_parameters
    assert text.rope_parameters["rope_theta"] == LLM_THETA and text.rms_norm_eps == LLM_EPS
    assert text.max_position_embeddings == 4096 and text.vocab_size == 613
    assert text.rope_parameters["mrope_section"] == vl_rope["mrope_section"] == [4, 2, 2]
    assert {c[0] for c in res.config_from_llm} >= {"rope_parameters", "rms_norm_eps", "max_position_embeddings"}
    # logits, checked here independently of the command's own check
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Is the lesion in the left lung? The right kidney is enlarged.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        conv = model_class(get_family(family)).from_pretrained(out, dtype=torch.float32)(input_ids=ids).logits[0]
    assert float((conv[:, :602] - llm_logits(llm, ids)).abs().max()) < 1e-5
    assert res.logits_max_abs_diff < 1e-4 and res.logits_columns == 602 and res.image_tokens == 4
    # processor and chat template copied from the VL model
    for name in ("chat_template.jinja", "tokenizer.json", "processor_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (vl / name).read_bytes()


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_hf_vlm_layouts_convert_too(family, tiny_dir, tmp_path):
    """LLaVA and InternVL keep the language model under language_model.*: the same explicit mapping works."""
    vl = tiny_dir(family)
    llm = make_llm(tmp_path / "llm", tokenizer_from=vl)  # same tokenizer: nothing to resize
    res = convert(vl, llm, tmp_path / "out")
    assert res.decoder_replaced == 24 and res.vocab.identical and res.logits_max_abs_diff < 1e-4
    got, src = tensors(tmp_path / "out"), tensors(llm)
    assert torch.equal(got["language_model.model.layers.1.mlp.down_proj.weight"],
                       src["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(got["language_model.lm_head.weight"], src["lm_head.weight"])


def test_mismatched_pair_is_refused_with_every_difference(tiny_dir, tmp_path):
    llm = make_llm(tmp_path / "small", hidden_size=32, intermediate_size=96)
    with pytest.raises(MedvlError) as err:
        convert(tiny_dir("qwen2.5-vl"), llm, tmp_path / "out")
    msg = str(err.value)
    assert "hidden_size: VL 64, LLM 32" in msg and "intermediate_size: VL 128, LLM 96" in msg
    assert "head_dim: VL 16, LLM 8" in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_wrong_generation_is_refused(tiny_dir, llm3, tmp_path):
    with pytest.raises(MedvlError, match="needs an LLM of type qwen2\\), the LLM is qwen3"):
        convert(tiny_dir("qwen2.5-vl"), llm3, tmp_path / "out")


def test_vocab_refuse_says_what_differs(tiny_dir, llm2, tmp_path):
    with pytest.raises(MedvlError) as err:
        convert(tiny_dir("qwen2.5-vl"), llm2, tmp_path / "out", vocab="refuse")
    msg = str(err.value)
    assert "LLM 602 embedding rows, VL 613" in msg and "11 tokens the LLM's lacks" in msg
    assert "<|object_ref_start|>" in msg and "--vocab resize" in msg


def _to_current_layout(src, dst, shards=2):
    """Re-save a tiny Qwen2.5-VL checkpoint with the names transformers 4.52-4.57 wrote
    (model.language_model.*, model.visual.*), in `shards` files with an index."""
    import shutil

    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    renamed = {}
    for k, t in tensors(src).items():
        k = ("model." + k) if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1) \
            if k.startswith("model.") else k
        renamed[k] = t
    names = sorted(renamed)
    weight_map = {}
    for i in range(shards):
        part = {k: renamed[k].contiguous() for k in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(dst / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_current_layout_and_sharded_inputs_give_the_same_model(tiny_dir, llm2, tmp_path):
    vl = tiny_dir("qwen2.5-vl")
    current = _to_current_layout(vl, tmp_path / "vl-current")
    sharded_llm = make_llm(tmp_path / "llm-sharded", max_shard_size="100KB")  # same seed: same weights as llm2
    assert len(list(sharded_llm.glob("*.safetensors"))) > 1
    a = convert(vl, llm2, tmp_path / "a")
    b = convert(current, sharded_llm, tmp_path / "b", max_shard_size="200KB")
    assert (a.vl_layout, b.vl_layout, b.out_layout) == ("legacy", "current", "legacy")
    assert b.decoder_replaced == a.decoder_replaced == 24 and b.shards > 1 and a.shards == 1
    ta, tb = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tb) and index["metadata"]["total_size"] == b.bytes


def _tie_vl(src, dst):
    """The tiny VL model with tied embeddings: no lm_head on disk, both config flags set."""
    import shutil

    shutil.copytree(src, dst)
    state = {k: v for k, v in tensors(dst).items() if k != "lm_head.weight"}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["tie_word_embeddings"] = cfg["text_config"]["tie_word_embeddings"] = True
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("tied", ["llm", "vl"])
def test_tied_embeddings_follow_the_llm(tied, tiny_dir, llm2, tmp_path):
    from medvl.models import load_model

    vl = tiny_dir("qwen2.5-vl")
    if tied == "llm":
        llm = make_llm(tmp_path / "llm-tied", tie=True)
        assert "lm_head.weight" not in tensors(llm)
    else:
        vl, llm = _tie_vl(vl, tmp_path / "vl-tied"), llm2
    res = convert(vl, llm, tmp_path / "out")
    got, cfg = tensors(tmp_path / "out"), json.loads((tmp_path / "out" / "config.json").read_text())
    model = load_model(tmp_path / "out")
    shared = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert res.logits_max_abs_diff < 1e-4
    if tied == "llm":  # tied like the LLM: no head written, the VL model's head dropped
        assert res.tied and shared and "lm_head.weight" not in got
        assert cfg["tie_word_embeddings"] is True and cfg["text_config"]["tie_word_embeddings"] is True
        assert any("lm_head.weight" in d for d in res.dropped)
    else:  # untied like the LLM: the LLM's head, plus the tied VL model's vision-special rows from its embedding
        assert not res.tied and not shared and cfg["tie_word_embeddings"] is False
        assert torch.equal(got["lm_head.weight"][:602], tensors(llm)["lm_head.weight"])
        assert torch.equal(got["lm_head.weight"][602:], tensors(vl)["model.embed_tokens.weight"][602:])


def test_failed_verification_writes_nothing(tiny_dir, llm2, tmp_path, monkeypatch):
    """Keeping the VL model's rope theta and eps (what a name-matching converter does) is caught."""
    import medvl.convert as conv

    def vl_maths(vl_cfg, llm_cfg, vocab, tied):
        vl_cfg.get_text_config().vocab_size = vocab.rows
        return []

    monkeypatch.setattr(conv, "config_from_llm", vl_maths)
    with pytest.raises(MedvlError, match="text logits differ from the LLM's by"):
        convert(tiny_dir("qwen2.5-vl"), llm2, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_refuses_a_non_empty_output(tiny_dir, llm2, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(MedvlError, match="not empty"):
        convert(tiny_dir("qwen2.5-vl"), llm2, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_prints_the_figures(tiny_dir, llm2, tmp_path):
    from typer.testing import CliRunner

    from medvl.commands.main import app

    result = CliRunner().invoke(app, ["convert", "--vl", str(tiny_dir("qwen3-vl")), "--llm", str(llm2),
                                      "--out", str(tmp_path / "out")], terminal_width=200)
    assert isinstance(result.exception, MedvlError) and "qwen3" in str(result.exception)
    result = CliRunner().invoke(app, ["convert", "--vl", str(tiny_dir("qwen2.5-vl")), "--llm", str(llm2),
                                      "--out", str(tmp_path / "out")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "24 decoder" in result.output and "max |diff|" in result.output and "rope_parameters" in result.output
    from medvl.commands.convert import complete_vocab

    assert complete_vocab("re") == ["resize", "refuse"] and complete_vocab("ref") == ["refuse"]
