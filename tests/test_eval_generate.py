"""medvl.evaluate.generate: prompts, left-padded batched greedy generation, sharding, the answer cache, targets."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from medvl.errors import MedvlError
from medvl.evaluate.generate import (PARTIAL, AnswerCache, Generator, answer_items, make_decoding, merge_shards,
                                     plan_batches, resolve_target, shard)
from medvl.evaluate.suites import EvalItem, build_prompt, load_suites
from medvl.families import get_family

from .bench.eval_batching import SIZES, make_items
from .conftest import FAMILIES


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread for these tiny models: their 64-wide matmuls gain nothing from two, and on a shared
    2-core box OpenMP's spin-waiting made one-at-a-time generation of 16 items swing from 0.3 s to 7 s."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_eval_bundle(root: Path, *, dicom: bool = True) -> Path:
    """A bundle in the published shape: a JSON list, images/ next to it, several datasets and subsets, PNGs of
    different sizes, one 2-image item, an open question (skipped), and a DICOM item (pydicom's bundled CT)."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(SIZES):
        Image.new("RGB", (w, h), (30 * i % 256, 90, 200 - 20 * i)).save(images / f"img{i}.png")
    def rec(q, options, answer, dataset, image_ids, subset="", **extra):
        return {"question": q, "options": options, "answer": answer, "dataset": dataset, "subset": subset,
                "image": [f"images/img{i}.png" for i in image_ids], **extra}
    records = [
        rec("Is there a pleural effusion?", ["Yes", "No"], "No", "VQA-RAD_test", [0]),
        rec("Is the heart enlarged?", ["Yes", "No"], "Yes", "VQA-RAD_test", [1]),
        rec("What organ is shown?", [], "liver", "VQA-RAD_test", [2], question_type="open"),
        rec("Which lobe is abnormal in this image?", ["Left", "Right"], "Right", "SLAKE_test", [2]),
        rec("Is this a CT scan of the chest?", ["yes", "no"], "yes", "SLAKE_test", [3]),
        rec("What is the modality?", ["CT", "MRI", "X-ray", "Ultrasound"], "MRI", "PMC-VQA_test", [4]),
        rec("Which organ is abnormal?", "['liver', 'kidney', 'spleen', 'heart']", "kidney", "PMC-VQA_test", [5]),
        rec("Modality of this image?", ["CT", "MRI", "X-ray"], "CT", "OmniMedVQA", [6],
            subset="CT(Computed Tomography)"),
        rec("What is the finding?", ["Cyst", "Mass", "Normal"], "Normal", "OmniMedVQA", [7], subset="X-Ray"),
        rec("Is there a fracture?", ["Yes", "No"], "No", "OmniMedVQA", [0], subset="X-Ray"),
        rec("Compare the two images. Which drug?", ["Aspirin", "Heparin", "Warfarin"], "Heparin",
            "MMMU_Medical_Validation", [1, 3], subset="validation_Pharmacy"),
        rec("Is granulomatous inflammation present?", ["yes", "no"], "yes", "PathVQA_test", [4]),
        rec("Is this tissue malignant?", ["yes", "no"], "no", "PathVQA_test", [5]),
    ]
    if dicom:
        import pydicom.data

        shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), images / "ct_small.dcm")
        records.append({"question": "Is this an axial CT?", "options": ["Yes", "No"], "answer": "Yes",
                        "dataset": "VQA-RAD_test", "subset": "", "image": ["images/ct_small.dcm"]})
    path = root / "medical_multimodel_evaluation_data.json"
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def tiny_generator(tiny_dir, family: str, max_new_tokens: int = 8, decoding: str = "greedy") -> Generator:
    from medvl.models import load_model, load_processor

    path = tiny_dir(family)
    fam = get_family(family)
    model = load_model(path, fam, dtype="fp32").eval()
    return Generator(model, load_processor(path, fam), fam, make_decoding(decoding, max_new_tokens=max_new_tokens))


# ---------------------------------------------------------------------------------------------------------
# pure parts


@pytest.mark.parametrize("world", [2, 3])
def test_shards_cover_every_item_once_and_merge_back_in_order(world):
    ids = list(range(101, 112))  # 11 items: neither 2 nor 3 divides it, so the last shard is short
    parts = [shard(ids, rank, world) for rank in range(world)]
    assert sorted(t for part in parts for t in part) == ids
    assert [len(p) for p in parts] == ([6, 5] if world == 2 else [4, 4, 3])
    answers = [{t: f"out{t}" for t in part} for part in reversed(parts)]  # gathered in any order
    assert list(merge_shards(answers, ids).items()) == [(t, f"out{t}") for t in ids]
    with pytest.raises(RuntimeError, match=r"answered twice \[101\]"):
        merge_shards([*answers, {101: "again"}], ids)
    with pytest.raises(RuntimeError, match=r"lost \[111\]"):
        merge_shards([{t: "x" for t in ids[:-1]}], ids)
    with pytest.raises(ValueError):
        shard(ids, world, world)


def test_batches_are_grouped_by_length_longest_first():
    lengths = {1: 30, 2: 90, 3: 30, 4: 60, 5: 10, 6: 90, 7: 45}
    assert plan_batches(lengths, 3) == [[2, 6, 4], [7, 1, 3], [5]]
    assert plan_batches(lengths, 1) == [[2], [6], [4], [7], [1], [3], [5]]
    with pytest.raises(MedvlError, match="at least 1"):
        plan_batches(lengths, 0)


def test_decodings_spell_out_the_published_settings():
    greedy = make_decoding()
    assert greedy.generation_kwargs() == {"max_new_tokens": 256, "min_new_tokens": 1, "num_beams": 1,
                                          "do_sample": False, "repetition_penalty": 1.0}
    huatuo = make_decoding("huatuo", max_new_tokens=32, seed=7)
    kwargs = huatuo.generation_kwargs()
    assert (kwargs["do_sample"], kwargs["temperature"], kwargs["repetition_penalty"]) == (True, 0.2, 1.2)
    assert (kwargs["max_new_tokens"], huatuo.seed) == (32, 7)
    with pytest.raises(MedvlError, match="greedy, huatuo"):
        make_decoding("beam")


def test_cache_keeps_matching_keys_and_survives_a_line_cut_short(tmp_path):
    cache = AnswerCache(tmp_path)
    cache.append([(1, "k1", "A"), (2, "k2", "B. No")])
    cache.close()
    with open(tmp_path / PARTIAL, "a") as f:
        f.write('{"test_id": 3, "key": "k3", "out')  # a kill in the middle of a write
    assert AnswerCache(tmp_path).load({1: "k1", 2: "other", 3: "k3"}) == {1: "A"}
    again = AnswerCache(tmp_path)
    again.append([(3, "k3", "C")])
    again.close()
    assert AnswerCache(tmp_path).load({1: "k1", 2: "k2", 3: "k3"}) == {1: "A", 2: "B. No", 3: "C"}
    rank2 = AnswerCache(tmp_path, rank=2)
    rank2.append([(4, "k4", "D")])
    rank2.close()
    assert rank2.path.name == "predictions.partial.rank2.jsonl"
    assert AnswerCache(tmp_path).load({4: "k4"}) == {4: "D"}  # every rank's file is read


# ---------------------------------------------------------------------------------------------------------
# prompts


def test_prompt_is_images_first_then_the_published_text_in_the_chat_template(tiny_dir, tmp_path):
    gen = tiny_generator(tiny_dir, "qwen2.5-vl")
    item = EvalItem(5, "MMMU_Medical_Validation", "", "Which drug?", ("Aspirin", "Heparin"), "Heparin",
                    ("/x/a.png", "/x/b.png"))
    prompt = gen.prompt(item)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    assert prompt.text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           f"{image}{image}{build_prompt(item)}<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.images == item.images
    sneaky = EvalItem(6, "D", "", "What does <image> show?", ("A", "B"), "A", ("/x/a.png",))
    assert gen.prompt(sneaky).text.count("<|image_pad|>") == 1  # a literal <image> in a question is dropped
    text_only = tiny_generator(tiny_dir, "causal-lm").prompt(item)
    assert text_only.text == f"<|im_start|>user\n{build_prompt(item)}<|im_end|>\n<|im_start|>assistant\n"
    assert text_only.images == ()
    # The key changes with the prompt, the images and the decoding; never with the test_id alone.
    other = tiny_generator(tiny_dir, "qwen2.5-vl", max_new_tokens=9).prompt(item)
    assert len({prompt.key, other.key, gen.prompt(EvalItem(5, "D", "", "Which drug?", ("Aspirin", "Heparin"),
                                                           "Heparin", ("/x/a.png",))).key}) == 3


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl", "llava", "internvl"])
def test_measured_length_equals_the_encoded_length(tiny_dir, tmp_path, family):
    gen = tiny_generator(tiny_dir, family)
    prompts = [gen.prompt(it) for it in make_items(tmp_path, 8)]
    gen.measure(prompts)
    from medvl.data.images import load_image

    for p in prompts:
        enc = gen.processor(text=[p.text], images=[load_image(i) for i in p.images], return_tensors="pt",
                            add_special_tokens=False)
        assert p.length == enc["input_ids"].shape[1]
    if family == "qwen2.5-vl":  # dynamic resolution: the lengths differ, so batches really pad
        assert len({p.length for p in prompts}) >= 5


# ---------------------------------------------------------------------------------------------------------
# generation


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_left_padded_greedy_equals_one_at_a_time(tiny_dir, tmp_path, family):
    """The correctness check for left padding: with a batch of 8 prompts of different lengths, every answer is
    the one the model gives the prompt alone. fp32 on CPU; the tiny models' answers are not degenerate (most
    differ from each other), so equality is not the trivial kind."""
    gen = tiny_generator(tiny_dir, family)
    items = make_items(tmp_path / "img", 16)
    one = answer_items(gen, items, tmp_path / "one", batch_size=1)
    batched = answer_items(gen, items, tmp_path / "eight", batch_size=8)
    assert (one.batches, batched.batches) == (16, 2)
    assert batched.outputs == one.outputs
    assert len(set(one.outputs.values())) >= 8
    assert all(out == out.strip() and out for out in one.outputs.values())


def test_huatuo_sampling_is_seeded(tiny_dir, tmp_path):
    gen = tiny_generator(tiny_dir, "qwen2.5-vl", decoding="huatuo")
    assert gen.generation_config.do_sample and gen.generation_config.temperature == 0.2
    items = make_items(tmp_path / "img", 8)
    first = answer_items(gen, items, tmp_path / "a", batch_size=4).outputs
    assert answer_items(gen, items, tmp_path / "b", batch_size=4).outputs == first


def test_sharded_ranks_answer_everything_once_and_resume_single_process(tiny_dir, tmp_path):
    """Three ranks in threads sharing one output directory (a threading barrier stands in for accelerate's),
    each answering items[rank::3]; merged, they equal a one-process run, and a one-process rerun over their
    three partial files generates nothing."""
    items = make_items(tmp_path / "img", 11)
    reference = answer_items(tiny_generator(tiny_dir, "qwen2.5-vl"), items, tmp_path / "ref", batch_size=4)
    world, out = 3, tmp_path / "sharded"
    gens = [tiny_generator(tiny_dir, "qwen2.5-vl") for _ in range(world)]
    barrier = threading.Barrier(world)
    results: dict[int, object] = {}

    def rank_main(rank: int) -> None:
        results[rank] = answer_items(gens[rank], items, out, batch_size=2, rank=rank, world=world,
                                     barrier=barrier.wait)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(results[r].outputs) for r in range(world)) == [3, 4, 4]
    merged = merge_shards([results[r].outputs for r in range(world)], [it.test_id for it in items])
    assert merged == reference.outputs
    assert sorted(p.name for p in out.iterdir()) == [PARTIAL, "predictions.partial.rank1.jsonl",
                                                     "predictions.partial.rank2.jsonl"]
    rerun = answer_items(gens[0], items, out, batch_size=4)
    assert (rerun.outputs, rerun.cached) == ({}, reference.outputs)


# ---------------------------------------------------------------------------------------------------------
# what is evaluated


def test_targets_resolve_run_dirs_adapters_and_their_base(tiny_dir, tmp_path):
    base = tiny_dir("qwen2.5-vl")
    run = tmp_path / "run"
    shutil.copytree(base, run / "final")
    assert resolve_target(run).base == run / "final"
    lora = tmp_path / "lora" / "final"
    lora.mkdir(parents=True)
    (lora / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    as_model = resolve_target(tmp_path / "lora")  # a LoRA run passed as --model is an adapter on its base
    assert (as_model.base, as_model.adapter, as_model.processor_dir) == (base, lora, None)
    assert resolve_target(run, tmp_path / "lora").base == run / "final"  # --model overrides the named base
    (lora / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/not-here"}))
    with pytest.raises(MedvlError, match="not a local directory") as err:
        resolve_target(None, lora)
    assert "--model BASE_DIR" in err.value.fix
    with pytest.raises(MedvlError, match="holds no model"):
        resolve_target(tmp_path)


def test_bundle_helper_is_in_the_published_shape(tmp_path):
    eval_set = load_suites(write_eval_bundle(tmp_path), "all")
    assert eval_set.datasets == ("VQA-RAD_test", "SLAKE_test", "PMC-VQA_test", "OmniMedVQA",
                                 "MMMU_Medical_Validation", "PathVQA_test")
    assert (len(eval_set.items), eval_set.open_skipped) == (13, 1)
    assert eval_set.items[-1].images[0].endswith("ct_small.dcm")
