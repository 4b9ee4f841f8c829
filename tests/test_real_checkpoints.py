"""The real files of each family's reference checkpoint (tests/fixtures/real, sources in SOURCES.md):
family detection, dry-run parameter counts against the published sizes, medvl's rendering against the real
chat template byte for byte, the trained spans under each real template, and a shrunk model built from each
real config through prepare-data -> train -> eval -> export -> reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from medvl.data.collate import IGNORE, encode_record
from medvl.data.turns import end_of_turn, render_with_spans, to_template_messages, turn_format
from medvl.engine.dryrun import config_from_dict, meta_model
from medvl.errors import MedvlError
from medvl.families import detect_family, read_config

REAL = Path(__file__).parent / "fixtures" / "real"

# checkpoint -> (family, published parameter count as its Hub page shows it)
CHECKPOINTS = {
    "Qwen2-VL-7B-Instruct": ("qwen2-vl", 8.29e9),
    "Qwen2.5-VL-7B-Instruct": ("qwen2.5-vl", 8.29e9),
    "Qwen3-VL-8B-Instruct": ("qwen3-vl", 8.77e9),
    "llava-1.5-7b-hf": ("llava", 7.06e9),
    "InternVL3-1B-hf": ("internvl", 938e6),
    "Qwen2.5-7B-Instruct": ("causal-lm", 7.62e9),
    "glm-4-9b-chat-hf": ("glm4", 9.40e9),
    # Qwen2-7B 7.62B + CLIP ViT-L/14-336 0.30B + the 2-layer projector 16.5M
    "HuatuoGPT-Vision-7B-hf": ("llava", 7.94e9),
}
NAMES = sorted(CHECKPOINTS)

# What each real template makes of the trained turns (content + its end of turn), after the generation prompt.
TRAINED = {
    "Qwen2-VL-7B-Instruct": "CT<|im_end|>yes, in the left lung<|im_end|>",
    "Qwen2.5-VL-7B-Instruct": "CT<|im_end|>yes, in the left lung<|im_end|>",
    "Qwen3-VL-8B-Instruct": "CT<|im_end|>yes, in the left lung<|im_end|>",
    "InternVL3-1B-hf": "CT<|im_end|>yes, in the left lung<|im_end|>",
    "Qwen2.5-7B-Instruct": "CT<|im_end|>yes, in the left lung<|im_end|>",
    # no end-of-turn token in the template: the eos is inserted, as LLaVA's own training separator did
    "llava-1.5-7b-hf": " CT</s> yes, in the left lung</s>",
    "HuatuoGPT-Vision-7B-hf": "CT<|endoftext|>yes, in the left lung<|endoftext|>",
    # GLM-4: the newline after <|assistant|> is the model's to produce; the next role token ends a turn, the
    # last turn gets the eos (as GLM-4's own fine-tuning script appends it)
    "glm-4-9b-chat-hf": "\nCT<|user|>\nyes, in the left lung<|endoftext|>",
}


def is_vision(name):
    return CHECKPOINTS[name][0] not in ("causal-lm", "glm4")


def conversation(name):
    first = "<image>\nWhat is the modality?" if is_vision(name) else "What is the modality?"
    return [{"role": "user", "content": first}, {"role": "assistant", "content": "CT"},
            {"role": "user", "content": "Is there a mass?"}, {"role": "assistant", "content": "yes, in the left lung"}]


# Templates whose image block is bare (`<|vision_start|><|image_pad|><|vision_end|>`): the data's newline after
# `<image>` stays, as HuatuoGPT-Vision's Qwen2.5-VL trainer renders it (`<image>\n` -> vision tokens + `\n`).
BARE_IMAGE_BLOCK = ("Qwen2-VL-7B-Instruct", "Qwen2.5-VL-7B-Instruct", "Qwen3-VL-8B-Instruct")


def official_messages(name):
    """The same conversation as a user of the checkpoint writes it (its model card's message form)."""
    q = [{"type": "image"}, {"type": "text", "text": ("\n" if name in BARE_IMAGE_BLOCK else "")
                                                     + "What is the modality?"}] if is_vision(name) else \
        "What is the modality?"

    def text(t):
        return [{"type": "text", "text": t}] if is_vision(name) else t
    return [{"role": "user", "content": q}, {"role": "assistant", "content": text("CT")},
            {"role": "user", "content": text("Is there a mass?")},
            {"role": "assistant", "content": text("yes, in the left lung")}]


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    """shrunk(name) -> a saved model shrunk from the real files, and its processor as medvl loads it."""
    from medvl.models import load_processor
    from medvl.shrink import build_shrunk

    built = {}

    def get(name):
        if name not in built:
            out = tmp_path_factory.mktemp(name) / "model"
            build_shrunk(REAL / name, out)
            built[name] = (out, load_processor(out))
        return built[name]
    return get


@pytest.mark.parametrize("name", NAMES)
def test_family_is_detected_from_the_real_config(name):
    assert detect_family(REAL / name).name == CHECKPOINTS[name][0]


@pytest.mark.parametrize("name", NAMES)
def test_dry_run_parameter_count_equals_the_published_size(name):
    from medvl.families import get_family

    family = get_family(CHECKPOINTS[name][0])
    model = meta_model(config_from_dict(read_config(REAL / name)), family)
    n = sum(p.numel() for p in model.parameters())
    published = CHECKPOINTS[name][1]
    assert abs(n - published) / published < 1e-3, (n, published)


def test_internvl_head_is_counted_untied_as_the_checkpoint_stores_it():
    """InternVL3-1B-hf's config has no tie flag: tying the head (transformers 5's default) loses 151,674 x 896."""
    from transformers import AutoConfig

    from medvl.families import get_family

    raw = read_config(REAL / "InternVL3-1B-hf")
    fam = get_family("internvl")
    untied = sum(p.numel() for p in meta_model(config_from_dict(raw), fam).parameters())
    tied = sum(p.numel() for p in meta_model(AutoConfig.for_model(**raw), fam).parameters())
    assert untied - tied == 151_674 * 896 and tied == 802_293_120


@pytest.mark.parametrize("name", NAMES)
def test_rendering_is_byte_identical_to_the_real_template(name, shrunk):
    """medvl's normalized conversation (`<image>\\nQ`) renders exactly as the model card's messages do."""
    _, proc = shrunk(name)
    fmt = turn_format(proc, is_vision(name))
    ours = proc.apply_chat_template(to_template_messages(conversation(name), is_vision(name), fmt), tokenize=False)
    theirs = proc.apply_chat_template(official_messages(name), tokenize=False)
    assert ours == theirs
    prompt = proc.apply_chat_template(to_template_messages(conversation(name)[:3], is_vision(name), fmt),
                                      tokenize=False, add_generation_prompt=True)
    assert prompt == proc.apply_chat_template(official_messages(name)[:3], tokenize=False, add_generation_prompt=True)
    if name in ("llava-1.5-7b-hf", "InternVL3-1B-hf", "HuatuoGPT-Vision-7B-hf"):
        assert "\n\nWhat" not in ours  # the template's own newline after the image, not a second one


@pytest.mark.parametrize("name", NAMES)
def test_training_text_is_the_template_plus_inserted_eos_only(name, shrunk):
    _, proc = shrunk(name)
    text, _ = render_with_spans(proc, conversation(name), is_vision(name))
    official = proc.apply_chat_template(official_messages(name), tokenize=False)
    eos = getattr(proc, "tokenizer", proc).eos_token
    # eos inserted after every assistant turn that no special token ends; GLM-4's middle turn ends on <|user|>
    inserted = {"llava-1.5-7b-hf": 2, "HuatuoGPT-Vision-7B-hf": 2, "glm-4-9b-chat-hf": 1}.get(name, 0)
    # llava-1.5's tokenizer puts <s> in front (add_bos_token), its template does not: training sees it as the
    # model's own processor call does
    bos = "<s>" if name == "llava-1.5-7b-hf" else ""
    assert text.startswith(bos) and text[len(bos):].replace(eos, "") == official.replace(eos, "")
    assert text.count(eos) - official.count(eos) == inserted


@pytest.mark.parametrize("name", NAMES)
def test_trained_tokens_under_the_real_template(name, shrunk):
    _, proc = shrunk(name)
    images = [Image.new("RGB", (64, 64), "gray")] if is_vision(name) else []
    enc = encode_record({"id": "x", "messages": conversation(name)}, images, proc, detect_family(REAL / name))
    tok = getattr(proc, "tokenizer", proc)
    assert tok.decode([t for t in enc.labels if t != IGNORE]) == TRAINED[name]


@pytest.mark.parametrize("name", NAMES)
def test_generation_stops_on_the_templates_end_of_turn(name, shrunk):
    _, proc = shrunk(name)
    expected = {"llava-1.5-7b-hf": "</s>", "HuatuoGPT-Vision-7B-hf": "<|endoftext|>", "glm-4-9b-chat-hf": "<|user|>"}
    assert end_of_turn(proc, is_vision(name)) == expected.get(name, "<|im_end|>")


def test_huatuo_processor_with_null_patch_size_expands_the_image(shrunk):
    """The 7B-hf processor_config.json says patch_size null: loaded through medvl, <image> still becomes the
    model's visual tokens (56 px / 14 = 4 x 4 patches here; 24 x 24 = 576 on the real 336 px tower)."""
    out, proc = shrunk("HuatuoGPT-Vision-7B-hf")
    assert json.loads((out / "processor_config.json").read_text())["patch_size"] is None
    text = proc.apply_chat_template(official_messages("HuatuoGPT-Vision-7B-hf")[:1], tokenize=False,
                                    add_generation_prompt=True)
    ids = proc(text=[text], images=[Image.new("RGB", (64, 64))], return_tensors="pt")["input_ids"][0].tolist()
    assert ids.count(proc.tokenizer.convert_tokens_to_ids("<image>")) == 16


def test_template_without_assistant_spans_is_refused_before_any_sample(shrunk, tmp_path):
    """A template that drops the assistant's words is a clear error at prepare time, never a loss-0 run."""
    from medvl.data.prepare import prepare

    out, _ = shrunk("Qwen2.5-7B-Instruct")
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(out, broken)
    (broken / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m.role == 'user' %}<|im_start|>user\n{{ m.content }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    cfg = json.loads((broken / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (broken / "tokenizer_config.json").write_text(json.dumps(cfg))
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps([{"id": i, "conversations": [{"from": "human", "value": "is it normal?"},
                                                           {"from": "gpt", "value": "yes"}]} for i in range(3)]))
    with pytest.raises(MedvlError, match="cannot find the assistant turns in the chat template"):
        prepare([raw], tmp_path / "prep", model=str(broken))


def test_run_with_no_supervised_token_stops_with_an_error(tiny_dir, prepared_text, tmp_path):
    """Every label masked (loss 0.0000 and a 'successful' run before): the run stops, no final model."""
    from medvl.config import load_recipe
    from medvl.data import collate
    from medvl.engine.train import train

    recipe = load_recipe("tiny_cpu", [f"model.base={tiny_dir('causal-lm')}", f"data.train=[{prepared_text}]",
                                      f"output.dir={tmp_path / 'run'}", "train.max_steps=6", "train.save_every=null",
                                      "train.eval_every=null", "data.val_fraction=null", "train.micro_batch_size=4"])
    original = collate.labels_from_spans
    try:
        collate.labels_from_spans = lambda offsets, ids, spans: [IGNORE] * len(ids)
        with pytest.raises(MedvlError, match="not one token was supervised"):
            train(recipe)
    finally:
        collate.labels_from_spans = original
    assert not (tmp_path / "run" / "final").exists()


def test_dry_run_without_the_model_plans_from_the_cached_reference_config(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    import huggingface_hub.constants as c

    # the help's own example, as a user runs it, on a machine without the model: a clear error, exit 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "COLUMNS": "200"}
    res = subprocess.run([str(Path(sys.executable).parent / "medvl"), "train", "huatuo_sft_qwen25vl_7b", "--dry-run"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 2 and "Traceback" not in out
    assert "hf download Qwen/Qwen2.5-VL-7B-Instruct config.json" in " ".join(out.replace("│", " ").split())

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)

    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-VL-7B-Instruct"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text(
        (REAL / "Qwen2.5-VL-7B-Instruct" / "config.json").read_text())
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from medvl.config import load_recipe
    from medvl.engine.dryrun import plan_run

    plan = plan_run(load_recipe("huatuo_sft_qwen25vl_7b", []), worker="medvl.commands.worker")
    assert sum(r["params"] for r in plan.table) == 8_292_166_656
    assert "planned from the config of Qwen/Qwen2.5-VL-7B-Instruct" in plan.notes[0]


# ---------------------------------------------------------------------------------------------------------
# the whole recipe on each real checkpoint's format


def write_raw(tmp_path, name, n=24):
    """A LLaVA/ShareGPT-shaped raw file: colour questions about small images (text questions for text models)."""
    colours = ["red", "green", "blue"]
    rows = []
    for i in range(n):
        colour = colours[i % 3]
        conv = [{"from": "human", "value": "What colour is this image?"}, {"from": "gpt", "value": colour}]
        row = {"id": f"s{i}", "conversations": conv}
        if is_vision(name):
            path = tmp_path / "images" / f"{colour}.png"
            if not path.exists():
                path.parent.mkdir(exist_ok=True)
                Image.new("RGB", (64, 64), colour).save(path)
            row["image"] = str(path)
            conv[0]["value"] = "<image>\n" + conv[0]["value"]
        else:
            conv[0]["value"] = f"Say the colour {colour}."
        rows.append(row)
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(rows))
    return raw


@pytest.mark.parametrize("name", NAMES)  # about 2 s each
def test_shrunk_real_checkpoint_prepare_train_eval_export_reload(name, shrunk, tmp_path):
    import torch

    from medvl.config import load_recipe
    from medvl.data.prepare import prepare
    from medvl.engine.train import train
    from medvl.evaluate.run import evaluate
    from medvl.export import export

    from .test_eval_generate import write_eval_bundle
    from medvl.families import get_family
    from medvl.models import load_model, load_processor

    model_dir, _ = shrunk(name)
    result = prepare([write_raw(tmp_path, name)], tmp_path / "prep", model=str(model_dir), max_seq_len=256)
    assert result.manifest["accepted"] == 24
    run = tmp_path / "run"
    res = train(load_recipe("tiny_cpu", [
        f"model.base={model_dir}", f"data.train=[{tmp_path / 'prep'}]", f"output.dir={run}", "train.max_steps=12",
        "train.save_every=null", "train.eval_every=null", "data.val_fraction=null", "train.micro_batch_size=4",
        "optim.warmup_steps=2", "optim.lr=5e-3"]))
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < first - 0.3, (first, last)

    family = get_family(CHECKPOINTS[name][0])
    final = run / "final"
    assert detect_family(final) is family
    ev = evaluate(final, write_eval_bundle(tmp_path / "bundle", dicom=False), "slake", tmp_path / "eval",
                  max_new_tokens=3, allow_text_only=not family.is_vision)
    assert json.loads(ev.results.read_text())["scorers"]["huatuo"]["overall"]["n"] == 2
    ex = export(run, tmp_path / "export", dtype="fp32")
    assert ex.parity.logits_max_abs_diff < 1e-4 and ex.parity.generation_match
    reloaded, proc = load_model(tmp_path / "export"), load_processor(tmp_path / "export")
    assert proc.chat_template == load_processor(model_dir).chat_template  # the real template travels along
    a = dict(reloaded.state_dict())
    b = dict(load_model(final, family).state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name, expected", [
    # upstream HuatuoGPT-Vision cli.py: one "<image>\n" per image before the question, then its role tags
    ("HuatuoGPT-Vision-7B-hf", "<|user|>\n<image>\n{q}\n<|assistant|>\n"),
    # llava-1.5-hf's model card prompt, with the <s> its tokenizer adds
    ("llava-1.5-7b-hf", "<s>USER: <image>\n{q} ASSISTANT:"),
    ("InternVL3-1B-hf", "<|im_start|>user\n<IMG_CONTEXT>\n{q}<|im_end|>\n<|im_start|>assistant\n"),
])
def test_eval_prompt_is_the_checkpoints_own(name, expected, shrunk):
    from medvl.evaluate.generate import Decoding, Generator
    from medvl.evaluate.suites import EvalItem, build_prompt
    from medvl.models import load_model

    out, proc = shrunk(name)
    family = detect_family(out)
    gen = Generator(load_model(out, family).eval(), proc, family, Decoding("greedy", max_new_tokens=2))
    item = EvalItem(1, "VQA-RAD_test", "", "Is there a mass?", ("yes", "no"), "yes", ("/x/a.png",))
    assert gen.prompt(item).text == expected.format(q=build_prompt(item))
