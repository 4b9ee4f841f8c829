"""The Python API (`from medvl import Chatbot`) on every family: multi-turn chat with images, streaming, history,
exact KV-cache reuse across turns, stop, the seed's single-turn `inference`, and every bad input as a clear
MedvlError that leaves the conversation usable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from medvl.errors import MedvlError

from .conftest import FAMILIES


@pytest.fixture(scope="module")
def png():
    import easy_vqa

    return list(easy_vqa.get_train_image_paths().values())[0]


@pytest.fixture(scope="module")
def dcm():
    from pydicom.data import get_testdata_file

    return get_testdata_file("CT_small.dcm", download=False)


def bot_for(tiny_dir, family, **kwargs):
    from medvl import Chatbot
    from medvl.inference import GenerationOptions

    kwargs.setdefault("options", GenerationOptions(max_new_tokens=10))
    return Chatbot(tiny_dir(family), **kwargs)


def test_import_medvl_stays_light_and_exposes_chatbot():
    code = ("import sys, medvl; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "from medvl import Chatbot; print(Chatbot.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "medvl.inference"


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_turn_chat_streams_keeps_history_and_reuses_the_cache_exactly(family, tiny_dir, png):
    bot = bot_for(tiny_dir, family)
    images = [png] if bot.family.is_vision else []
    first = bot.chat("What is the shape?", images=images)
    assert first and bot.last.tokens > 0 and bot.last.reused_tokens == 0
    pieces = list(bot.stream("And the colour?"))
    assert len(pieces) >= 1 and "".join(pieces).strip() == bot.last.text
    assert bot.last.reused_tokens > 0  # turn 2 prefilled only the new question
    assert [t["role"] for t in bot.history] == ["user", "assistant", "user", "assistant"]
    assert bot.history[0]["images"] == [str(png)] * len(images) and bot.history[2]["images"] == []
    # the same conversation prefilled from scratch gives the same answer: the reuse is exact
    fresh = bot_for(tiny_dir, family)
    fresh.turns = [t for t in bot.turns[:3]]
    again = "".join(fresh._answer()).strip()
    assert fresh.last.reused_tokens == 0 and again == bot.last.text
    bot.reset()
    assert bot.history == [] and bot.context_used == 0


def test_new_image_in_a_later_turn_prefills_from_scratch_and_matches(tiny_dir, png):
    import easy_vqa

    other = list(easy_vqa.get_train_image_paths().values())[1]
    bot = bot_for(tiny_dir, "qwen2.5-vl")
    bot.chat("What is the shape?", images=[png])
    answer = bot.chat("And this one?", images=[other])
    assert bot.last.reused_tokens == 0
    fresh = bot_for(tiny_dir, "qwen2.5-vl")
    fresh.turns = list(bot.turns[:3])
    assert "".join(fresh._answer()).strip() == answer


def test_inference_is_single_turn_and_leaves_the_conversation(tiny_dir, png):
    bot = bot_for(tiny_dir, "qwen2-vl")
    bot.chat("first question", images=[png])
    before = bot.history
    one = bot.inference("What modality is this?", [png])
    assert bot.history == before
    fresh = bot_for(tiny_dir, "qwen2-vl")
    assert fresh.chat("What modality is this?", images=[png]) == one


def test_undo_of_an_image_turn_never_reuses_stale_rope_offsets(tiny_dir, png):
    """Qwen-VL keeps the rope offsets of its last full prefill; after /undo of a turn with a second image, the
    cache's kept part no longer holds that image, so reusing it would place the next tokens at wrong positions."""
    import easy_vqa

    other = list(easy_vqa.get_train_image_paths().values())[1]
    bot = bot_for(tiny_dir, "qwen2-vl")
    bot.chat("What is the shape?", images=[png])
    bot.chat("And this one?", images=[other])
    assert bot.undo()
    answer = bot.chat("And the colour?")
    fresh = bot_for(tiny_dir, "qwen2-vl")
    fresh.chat("What is the shape?", images=[png])
    assert "".join(fresh.stream("And the colour?")).strip() == answer
    kb, kf = bot._cache.layers[-1].keys[0], fresh._cache.layers[-1].keys[0]
    n = min(kb.shape[-2], kf.shape[-2])
    assert float((kb[:, :n] - kf[:, :n]).abs().max()) < 1e-4  # the same keys, position by position


def test_undo_and_retry(tiny_dir):
    bot = bot_for(tiny_dir, "causal-lm")
    a1 = bot.chat("What is a pleural effusion?")
    bot.chat("And a pneumothorax?")
    assert bot.undo() and len(bot.turns) == 2
    pending = bot.retry()
    assert len(bot.turns) == 2  # an unread retry changes nothing
    assert "".join(pending).strip() == a1 and len(bot.turns) == 2  # greedy: the same answer again
    assert bot.undo() and not bot.undo()


def test_stop_ends_the_answer_early_and_keeps_it(tiny_dir):
    from medvl.inference import GenerationOptions

    bot = bot_for(tiny_dir, "causal-lm", options=GenerationOptions(max_new_tokens=1500))
    bot.eos = []  # never ends by itself: only stop() can end it before 1500 tokens
    got = []
    for piece in bot.stream("Tell me everything."):
        got.append(piece)
        if len(got) == 3:
            bot.stop()
    assert bot.last.stopped and 3 <= bot.last.tokens < 1500
    assert bot.history[-1]["role"] == "assistant" and bot.history[-1]["content"] == bot.last.text
    assert bot.chat("Go on.")  # the session lives


def test_closing_the_stream_early_stops_generation(tiny_dir):
    from medvl.inference import GenerationOptions

    bot = bot_for(tiny_dir, "causal-lm", options=GenerationOptions(max_new_tokens=1500))
    bot.eos = []
    stream = bot.stream("Tell me everything.")
    next(stream)
    stream.close()
    assert bot.last.tokens < 1500 and bot.last.stopped


def test_huatuo_preset_is_evals_and_options_override_it():
    from medvl.evaluate.generate import make_decoding
    from medvl.inference import GenerationOptions

    published = make_decoding("huatuo", max_new_tokens=512).generation_kwargs()
    assert GenerationOptions("huatuo").kwargs() == published
    assert GenerationOptions("huatuo", temperature=0.7).kwargs()["temperature"] == 0.7
    greedy = GenerationOptions().kwargs()
    assert greedy["do_sample"] is False and greedy["temperature"] is None
    assert GenerationOptions(temperature=0.5, top_p=0.9).kwargs()["do_sample"] is True
    with pytest.raises(MedvlError, match="top_p"):
        GenerationOptions(top_p=1.5).kwargs()
    with pytest.raises(MedvlError, match="unknown decoding"):
        GenerationOptions("beam").kwargs()


def test_sampling_with_a_seed_is_reproducible(tiny_dir):
    from medvl.inference import GenerationOptions

    opts = GenerationOptions(temperature=1.0, max_new_tokens=12, seed=7)
    assert bot_for(tiny_dir, "causal-lm", options=opts).chat("hello") == \
        bot_for(tiny_dir, "causal-lm", options=opts).chat("hello")


# ---------------------------------------------------------------------------------------------------------
# bad input: a clear error, the session survives


def test_bad_images_are_clear_errors_and_the_session_survives(tiny_dir, png, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bot = bot_for(tiny_dir, "qwen2.5-vl", image_root=tmp_path)
    with pytest.raises(MedvlError, match="image-missing"):
        bot.chat("what?", images=["nope.png"])
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(MedvlError, match="cannot|decode|identify") as err:
        bot.chat("what?", images=["broken.png"])
    assert "broken.png" in str(err.value)
    (tmp_path / "sub").mkdir()
    shutil.copy(png, tmp_path.parent / "outside.png")
    with pytest.raises(MedvlError, match="image-escapes-root"):
        bot.chat("what?", images=["sub/../../outside.png"])
    with pytest.raises(MedvlError, match="empty message"):
        bot.chat("   ")
    with pytest.raises(MedvlError, match="needs a question"):
        bot.chat("", images=[png])
    assert bot.history == []
    assert bot.chat("what shape?", images=[png])  # still works


def test_text_only_model_refuses_an_image(tiny_dir, png):
    bot = bot_for(tiny_dir, "causal-lm")
    with pytest.raises(MedvlError, match="text-only model") as err:
        bot.chat("what is this?", images=[png])
    assert "vision-language model" in err.value.fix and bot.history == []


def test_context_overflow_says_so_and_offers_clear(tiny_dir, png, tmp_path):
    small = shutil.copytree(tiny_dir("qwen2.5-vl"), tmp_path / "short-context")
    cfg = json.loads((small / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 60
    (small / "config.json").write_text(json.dumps(cfg))
    from medvl import Chatbot
    from medvl.inference import GenerationOptions

    bot = Chatbot(small, options=GenerationOptions(max_new_tokens=40))
    bot.eos = []
    bot.chat("shape?", images=[png])
    assert bot.last.context_full and bot.context_used == 60  # the answer ran into the limit, and says so
    with pytest.raises(MedvlError, match="model's context is 60") as err:
        bot.chat("and the colour of the shape in this image?")
    assert "/clear" in err.value.fix and bot.turns[-1].role == "assistant"
    bot.reset()
    assert bot.chat("shape?", images=[png])


def test_not_a_model_and_an_adapter_that_does_not_fit(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from medvl import Chatbot
    from medvl.families import get_family
    from medvl.models import load_model
    from medvl.tiny import build_tiny

    (tmp_path / "empty").mkdir()
    with pytest.raises(MedvlError, match="holds no model"):
        Chatbot(tmp_path / "empty")
    family = get_family("qwen2.5-vl")
    lora = get_peft_model(load_model(tiny_dir("qwen2.5-vl"), family),
                          LoraConfig(r=4, target_modules=family.lora_regex(), task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "adapter")
    assert Chatbot(tiny_dir("qwen2.5-vl"), adapter=tmp_path / "adapter").source.kind == "lora"
    build_tiny("qwen2.5-vl", tmp_path / "bigger", size="small")
    with pytest.raises(MedvlError, match="does not fit the base model") as err:
        Chatbot(tmp_path / "bigger", adapter=tmp_path / "adapter")
    assert "base checkpoint the adapter was trained on" in err.value.fix


def test_dicom_window_presets_change_what_the_model_sees(tiny_dir, dcm):
    import numpy as np

    from medvl.conversation import parse_window
    from medvl.data.images import WINDOW_PRESETS, load_image

    own = np.asarray(load_image(dcm))
    lung = np.asarray(load_image(dcm, window=WINDOW_PRESETS["lung"]))
    bone = np.asarray(load_image(dcm, window=parse_window("400/1800")))
    assert parse_window("bone") == WINDOW_PRESETS["bone"] and parse_window("file") is None
    assert not np.array_equal(own, lung) and not np.array_equal(lung, bone)
    with pytest.raises(MedvlError, match="unknown window"):
        parse_window("liver-ish")
    bot = bot_for(tiny_dir, "qwen2.5-vl")
    bot.chat("what modality?", images=[dcm])
    assert bot.set_window(WINDOW_PRESETS["lung"]) == 1
    assert np.array_equal(np.asarray(bot.turns[0].images[0].load()), lung)
    assert bot.chat("and now?") and bot.last.reused_tokens == 0  # new pixels: prefilled again
