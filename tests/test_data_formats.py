"""Every source format, written as a small real-shaped file, read into normalized records."""

import base64
import io
import json
import tracemalloc

import pytest
from PIL import Image

from medvl.data.containers import iter_json_array, iter_jsonl
from medvl.data.formats import FORMATS, MCQ_SUFFIX, ReadOptions, read_file
from medvl.data.schema import Record, Rejection
from medvl.errors import MedvlError


def _json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _png(path, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def _read(path, fmt=None, **options):
    return list(read_file(path, fmt, options=ReadOptions(**options)))


def detect_format(path):
    """The format read_file picks on its own: the one named format whose output it equals, exactly."""
    auto = _read(path)
    found = [fmt for fmt in FORMATS if _read_or_none(path, fmt) == auto]
    assert len(found) == 1, found
    return found[0]


def _read_or_none(path, fmt):
    try:
        return _read(path, fmt)
    except MedvlError:
        return None


# ------------------------------------------------------------------------------------------ sharegpt family


def test_pubmedvision_alignment_list_images_no_tags(tmp_path):
    _png(tmp_path / "images/pmc_1_1.jpg")
    path = _json(tmp_path / "PubMedVision_Alignment_VQA.json", [
        {"image": ["images/pmc_1_1.jpg", "images/pmc_1_2.jpg"], "modality": "Computed Tomography",
         "body_part": "Abdomen", "conversations": [
             {"from": "human", "value": "Please describe these pictures."},
             {"from": "gpt", "value": "The first image is an axial CT ..."}]},
        {"image": [], "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ])
    assert detect_format(path) == "sharegpt"
    first, second = _read(path)
    assert first.id == "PubMedVision_Alignment_VQA:0" and second.id == "PubMedVision_Alignment_VQA:1"
    assert first.images == ["images/pmc_1_1.jpg", "images/pmc_1_2.jpg"]
    assert first.image_root == str(tmp_path.resolve())
    assert first.messages[0].content == "Please describe these pictures."  # tags are inserted by checks.py
    assert first.messages[1].role == "assistant" and first.messages[1].train is True
    assert first.meta == {"format": "sharegpt", "location": f"{path}[0]", "modality": "Computed Tomography",
                          "body_part": "Abdomen"}
    assert second.images == [] and second.location == f"{path}[1]"


def test_huatuo_role_content_variant_with_system(tmp_path):
    path = _json(tmp_path / "sft.json", [{"image": ["a.png"], "conversations": [
        {"role": "system", "content": "You are a radiologist."},
        {"role": "user", "content": "<image>\nWhat is shown?"},
        {"role": "assistant", "content": "A chest X-ray."}]}])
    (rec,) = _read(path, "huatuo")
    assert [(m.role, m.train) for m in rec.messages] == [("system", False), ("user", False), ("assistant", True)]
    assert rec.placeholder_count() == 1


def test_llava_jsonl_with_ids_and_line_numbers(tmp_path):
    path = tmp_path / "llava.jsonl"
    path.write_text(
        json.dumps({"id": "000000033471", "image": "coco/33471.jpg", "conversations": [
            {"from": "human", "value": "What are the colors of the bus?\n<image>"},
            {"from": "gpt", "value": "White and red."}]}) + "\n\n"
        + '{"id": "broken", "image": \n'
        + json.dumps({"id": 7, "conversations": [{"from": "Human", "value": "2+2?"},
                                                 {"from": "GPT", "value": "4"}]}) + "\n")
    good, bad, text = _read(path)
    assert good.id == "llava:000000033471" and good.images == ["coco/33471.jpg"]
    assert good.messages[0].content.endswith("<image>")  # placeholder kept where the source put it
    assert good.location == f"{path}:1"
    assert isinstance(bad, Rejection) and bad.code == "bad-json" and bad.location == f"{path}:3"
    assert text.id == "llava:7" and text.location == f"{path}:4" and text.messages[1].role == "assistant"


def test_ovis_ignored_gpt_and_string_image(tmp_path):
    path = _json(tmp_path / "ovis.json", [
        {"id": 1354, "image": "1354.png", "conversations": [
            {"from": "human", "value": "<image>\nFind the ratio."}, {"from": "ignored_gpt", "value": "Let me think"},
            {"from": "human", "value": "Answer only."}, {"from": "gpt", "value": "5:9"}]},
        {"id": 2, "video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                                         {"from": "gpt", "value": "A scan."}]},
    ])
    rec, video = _read(path, "ovis")
    assert rec.images == ["1354.png"]
    assert [(m.role, m.train) for m in rec.messages] == [
        ("user", False), ("assistant", False), ("user", False), ("assistant", True)]
    assert video.code == "unsupported-media" and "video" in video.message and video.id == "ovis:2"


def test_qwen_vl_images_key_and_unknown_role_is_a_sample_problem(tmp_path):
    path = _jsonl(tmp_path / "qwen.jsonl", [
        {"images": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Same."}]},
        {"image": "a.png", "conversations": [{"from": "doctor", "value": "hi"}, {"from": "gpt", "value": "x"}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nok?"},
                                             {"from": "gpt", "value": "ok"}]},
    ])
    multi, unknown, good = _read(path)
    assert multi.images == ["a.png", "b.png"]
    assert unknown.code == "unknown-role" and "'doctor'" in unknown.message
    assert isinstance(good, Record)


def test_internvl_meta_repeat_time_root_and_sizes(tmp_path):
    ann = tmp_path / "ann"
    rows = [{"id": i, "image": f"img/{i}.jpg", "width": 897, "height": 1152, "conversations": [
        {"from": "human", "value": "<image>\nWhat does the image show?"}, {"from": "gpt", "value": f"case {i}"}]}
        for i in range(4)]
    ann.mkdir()
    _jsonl(ann / "a.jsonl", rows)
    _jsonl(ann / "b.jsonl", rows)
    _jsonl(ann / "c.jsonl", rows[:2] + [{"id": 9, "image": "x.jpg", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "y"}], "width_list": [1, 2]}])
    meta = _json(tmp_path / "meta.json", {
        "half": {"root": "data/half", "annotation": "ann/a.jsonl", "data_augment": False, "repeat_time": 0.5,
                 "length": 4},
        "more": {"root": "/abs/root", "annotation": "ann/b.jsonl", "repeat_time": 2.5, "length": 4},
        "once": {"root": "data/once", "annotation": "ann/c.jsonl", "repeat_time": 1, "length": 3},
    })
    assert detect_format(meta) == "internvl-meta"
    recs = _read(meta)
    half = [r for r in recs if r.source == "half"]
    more = [r for r in recs if r.source == "more"]
    assert [r.id for r in half] == ["half:0", "half:1"]  # first floor(4 * 0.5), as InternVL's loader keeps
    assert half[0].image_root == str(tmp_path.resolve() / "data/half")
    assert half[0].meta["width"] == 897 and half[0].meta["height"] == 1152
    assert len(more) == 4 * 2 + 2  # floor(2.5) copies each, one more for the first floor(4 * 0.5)
    assert [r.id for r in more[:3]] == ["more:0", "more:0#r1", "more:0#r2"]
    assert [r.id for r in more[-2:]] == ["more:3", "more:3#r1"]
    assert more[0].image_root == "/abs/root" and more[0].location == f"{ann / 'b.jsonl'}:1"
    assert len({r.id for r in recs}) == len(recs)
    once = [r for r in recs if r.source == "once"]
    assert len(once) == 3 and once[2].meta["widths"] == [1, 2]


def test_internvl_meta_problems_raise(tmp_path):
    meta = _json(tmp_path / "meta.json", {"x": {"root": "", "annotation": "missing.jsonl"}})
    with pytest.raises(MedvlError, match="annotation file .* not found"):
        _read(meta)
    _jsonl(tmp_path / "a.jsonl", [])
    meta = _json(tmp_path / "meta.json", {"x": {"root": "", "annotation": "a.jsonl", "repeat_time": 0}})
    with pytest.raises(MedvlError, match="repeat_time must be a number above 0"):
        _read(meta)


# ------------------------------------------------------------------------------------------ other formats


def test_disc_medllm_text_only(tmp_path):
    path = _jsonl(tmp_path / "disc.jsonl", [{"_id": "01-94236", "source": "meddial", "conversation": [
        {"role": "user", "content": "我最近总是头痛。"}, {"role": "assistant", "content": "头痛持续多久了？"},
        {"role": "user", "content": "一周。"}, {"role": "assistant", "content": "建议就医。"}]}])
    assert detect_format(path) == "disc"
    (rec,) = _read(path)
    assert rec.id == "disc:01-94236" and rec.images == [] and rec.meta["origin"] == "meddial"
    assert [m.train for m in rec.messages if m.role == "assistant"] == [True, True]


def test_llm_finetune_json_path_between_vision_tokens(tmp_path):
    img = _png(tmp_path / "coco/123.jpg")
    path = _json(tmp_path / "data_vl.json", [{"id": "identity_1", "conversations": [
        {"from": "user", "value": f"COCO Yes: <|vision_start|>{img}<|vision_end|>"},
        {"from": "assistant", "value": "A man riding a bike."}]}])
    assert detect_format(path) == "llm-finetune"
    (rec,) = _read(path)
    assert rec.images == [str(img)] and rec.messages[0].content == "COCO Yes: <image>"
    assert rec.id == "data_vl:identity_1" and rec.meta["format"] == "llm-finetune"


def test_llm_finetune_csv_rows(tmp_path):
    a, b = _png(tmp_path / "imgs/a.jpg"), _png(tmp_path / "imgs/b.jpg")
    path = tmp_path / "coco-2024-dataset.csv"
    path.write_text(f'image_path,caption\n{a},A cat.\n{b},"Two dogs,\nplaying."\n,no image\n', encoding="utf-8")
    first, second, bad = _read(path)
    assert first.images == [str(a)] and first.messages[0].content == "COCO Yes: <image>"
    assert first.messages[1].content == "A cat." and first.location == f"{path}:2"
    assert second.messages[1].content == "Two dogs,\nplaying." and second.location == f"{path}:4"
    assert bad.code == "bad-shape" and "image_path" in bad.message
    one = tmp_path / "one.csv"
    one.write_text(f"image_path,caption\n{a},x\n", encoding="utf-8")
    (plain,) = _read(one, csv_prompt="")
    assert plain.messages[0].content == "<image>"


def test_auto_detected_csv_with_an_image_column_it_does_not_read_is_refused(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer,path\nWhat is shown?,A lung,a.png\n", encoding="utf-8")
    with pytest.raises(MedvlError, match="'path' looks like image paths") as info:
        list(read_file(path))  # detected as medeval, which would keep the question and drop its image
    assert info.value.fix == "read the file by column: --columns user=question,assistant=answer,image=path"
    by_value = tmp_path / "by_value.csv"  # the column name says nothing; its values are image files
    by_value.write_text("question,answer,x\nWhat is shown?,A lung,scans/a.DCM\n", encoding="utf-8")
    with pytest.raises(MedvlError, match="'x' looks like image paths"):
        list(read_file(by_value))
    (rec,) = read_file(path, options=ReadOptions(columns=(("user", "question"), ("assistant", "answer"),
                                                          ("image", "path"))))
    assert rec.images == ["a.png"]  # the fix the error gives reads the images


def test_auto_detected_csv_notes_other_unused_columns(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer,note,id\nWhat is shown?,A lung,hello,7\n", encoding="utf-8")
    notes = []
    (rec,) = read_file(path, notes=notes)
    assert rec.id == "qa:7" and rec.images == []
    assert notes == [f"{path}: column(s) 'note' are not read (the file was detected as the medeval format) and "
                     "are ignored; to use them, read the file by column: --columns user=question,assistant=answer"]
    notes = []
    list(read_file(path, "medeval", notes=notes))  # a format given by name is what the user asked for
    assert notes == []


def _data_url(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_openai_messages_with_content_blocks(tmp_path):
    local = _png(tmp_path / "scans/x.png")
    url = _data_url((1, 2, 3))
    path = _jsonl(tmp_path / "chat.jsonl", [
        {"messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image_url", "image_url": {"url": f"file://{local}"}},
                {"type": "image", "image": "scans/y.png"},
                {"type": "text", "text": "Which is worse?"}]},
            {"role": "assistant", "content": "Draft", "weight": 0},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The second."}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
                      {"role": "assistant", "content": "same bytes"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                   "image_url": {"url": "https://x.org/a.png"}}]},
                      {"role": "assistant", "content": "r"}]},
        {"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "r"}]},
    ])
    assert detect_format(path) == "openai"
    side = tmp_path / "inline"
    rec, same, remote, tool = _read(path, inline_image_dir=str(side))
    assert rec.messages[0].role == "system"
    assert rec.messages[1].content == "Compare\n<image>\n<image>\nWhich is worse?"
    assert rec.images[:2] == [str(local), "scans/y.png"]
    assert rec.messages[2].train is False and rec.messages[4].train is True
    inline = side / rec.images[2].split("/")[-1]
    assert inline.exists() and Image.open(inline).getpixel((0, 0)) == (1, 2, 3)
    assert same.images == [rec.images[2]] and len(list(side.iterdir())) == 1  # content-addressed, written once
    assert remote.code == "unsupported-media" and "download it" in remote.message
    assert tool.code == "unknown-role"
    rejected = _read(path)[0]
    assert rejected.code == "unsupported-media" and "inline data: image" in rejected.message


def test_alpaca_classification_and_ner(tmp_path):
    path = _jsonl(tmp_path / "ner.jsonl", [
        {"instruction": "Extract the drug names.", "input": "Take aspirin and metformin.",
         "output": "aspirin; metformin"},
        {"instruction": "Classify: 'chest pain on exertion'", "input": "", "output": "cardiology",
         "system": "You label medical text.", "history": [["Classify: 'rash'", "dermatology"]]},
    ])
    assert detect_format(path) == "alpaca"
    ner, cls = _read(path)
    assert [m.content for m in ner.messages] == ["Extract the drug names.\nTake aspirin and metformin.",
                                                 "aspirin; metformin"]
    assert [(m.role, m.content) for m in cls.messages] == [
        ("system", "You label medical text."), ("user", "Classify: 'rash'"), ("assistant", "dermatology"),
        ("user", "Classify: 'chest pain on exertion'"), ("assistant", "cardiology")]


def test_medical_evaluation_items_become_supervised_mcq(tmp_path):
    path = _json(tmp_path / "medical_multimodel_evaluation_data.json", [
        {"question": "Is there a pleural effusion?", "options": ["Yes", "No"], "answer": "No",
         "image": ["images/xxxx.jpg"], "dataset": "VQA-RAD_test", "subset": ""},
        {"question": "Which modality?", "options": "['CT', 'MRI', 'X-ray']", "answer": "MRI", "image": [],
         "dataset": "OmniMedVQA", "subset": "MR (Mag-netic Resonance Imaging)"},
        {"question": "Q?", "options": ["a", "b"], "answer": "c", "image": [], "dataset": "PMC-VQA_test"},
        {"question": "Describe the lesion.", "options": [], "answer": "A 2 cm mass.", "image": ["i.png"],
         "dataset": "x", "question_type": "open"},
    ])
    assert detect_format(path) == "medeval"
    mcq, literal, bad, open_ = _read(path)
    assert mcq.messages[0].content == ("<image>\nIs there a pleural effusion?\nA. Yes\nB. No\n" + MCQ_SUFFIX)
    assert MCQ_SUFFIX == "Answer with the option's letter from the given choices directly."
    assert mcq.messages[1].content == "B. No" and mcq.meta["dataset"] == "VQA-RAD_test"
    assert "subset" not in mcq.meta  # empty values are left out
    assert literal.messages[0].content.endswith("A. CT\nB. MRI\nC. X-ray\n" + MCQ_SUFFIX)
    assert literal.messages[1].content == "B. MRI" and literal.meta["subset"].startswith("MR (")
    assert bad.code == "bad-answer" and "'c'" in bad.message
    assert open_.messages[0].content == "<image>\nDescribe the lesion." and open_.messages[1].content == "A 2 cm mass."
    letter_only = _read(path, mcq_answer="letter")
    assert letter_only[0].messages[1].content == "B"


# ------------------------------------------------------------------------------------------ containers


TRICKY = [
    {"s": "], {\"a\": [1, 2]}, [", "u": "肺部 CT ✓ \U0001f600", "e": "tab\tquote\"back\\slash\u0000"},
    12345678901234567890, -1.5e-7, True, None, "plain",
    [[], {}, [[[]]]],
    {"n": 3.14159, "deep": {"x": [{"y": "z" * 300}]}},
]


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 1 << 16])
def test_streaming_array_matches_json_load_at_any_chunk_size(tmp_path, chunk):
    path = tmp_path / "tricky.json"
    path.write_text("\ufeff [\n" + " ,\n ".join(json.dumps(x, ensure_ascii=c % 2 == 0)
                                                 for c, x in enumerate(TRICKY)) + "\n]  \n", encoding="utf-8")
    assert [x for _, x in iter_json_array(path, chunk_chars=chunk)] == TRICKY
    assert [i for i, _ in iter_json_array(path, chunk_chars=chunk)] == list(range(len(TRICKY)))


def test_streaming_array_memory_does_not_grow_with_the_file(tmp_path):
    path = tmp_path / "big.json"
    item = {"image": ["images/pmc_1_1.jpg"], "conversations": [
        {"from": "human", "value": "Please describe this picture."}, {"from": "gpt", "value": "x" * 400}]}
    with open(path, "w") as f:
        f.write("[" + ",".join([json.dumps(item)] * 12000) + "]")
    assert path.stat().st_size > 5_000_000
    tracemalloc.start()
    n = sum(1 for _ in iter_json_array(path, chunk_chars=1 << 14))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 12000
    assert peak < 400_000  # ~2 chunks and one element, not the 5 MB file
    # A syntax error early on is reported at once, without buffering the rest of the file looking for more.
    text = path.read_text()
    path.write_text(text.replace("\"conversations\":", "\"conversations\"?", 1))
    tracemalloc.start()
    with pytest.raises(MedvlError, match="element 0"):
        list(iter_json_array(path, chunk_chars=1 << 14))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 400_000


def test_streaming_array_errors_name_the_element(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"a": 1}, {"a": 2}, {"a": tru}, {"a": 4}]')
    seen = []
    with pytest.raises(MedvlError) as e:
        for i, x in iter_json_array(path, chunk_chars=4):
            seen.append(x)
    assert seen == [{"a": 1}, {"a": 2}] and e.value.where == f"{path}[2]"
    path.write_text('[{"a": 1}] {"b": 2}')
    with pytest.raises(MedvlError, match="unexpected data after the closing"):
        list(iter_json_array(path))
    path.write_text('[{"a": 1}, {"a": 2}')
    with pytest.raises(MedvlError, match="element 2|after element 1"):
        list(iter_json_array(path, chunk_chars=3))
    path.write_text("  [ ] ")
    assert list(iter_json_array(path, chunk_chars=1)) == []


def test_jsonl_reader_survives_bad_lines_and_bom(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": \n\xff\xfe\n{"a": 2}\n')
    got = list(iter_jsonl(path))
    assert got[0] == (1, {"a": 1}) and got[3] == (5, {"a": 2})
    assert got[1][0] == 3 and "Expecting value" in got[1][1]
    assert got[2][0] == 4 and "not UTF-8" in got[2][1]


def test_detection_of_json_that_is_really_jsonl_and_forced_formats(tmp_path):
    path = tmp_path / "really_lines.json"
    _jsonl(path, [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}])
    assert detect_format(path) == "alpaca" and len(_read(path)) == 2
    weird = _jsonl(tmp_path / "weird.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(MedvlError, match="cannot tell the data format") as e:
        _read(weird)
    assert "pass the format by name" in e.value.fix
    with pytest.raises(MedvlError, match="unknown data format 'nope'"):
        _read(weird, "nope")
    (forced,) = _read(weird, "sharegpt")
    assert forced.code == "bad-shape" and "conversations" in forced.message


def test_normalize_one_raw_sample_for_sharded_callers():
    from medvl.data.formats import normalize

    raw = {"id": 5, "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                       {"from": "gpt", "value": "a"}]}
    rec = normalize(raw, "llava", location="x.json[5]", index=5, source="x", image_root="/data")
    assert (rec.id, rec.location, rec.image_root, rec.meta["format"]) == ("x:5", "x.json[5]", "/data", "sharegpt")
    with pytest.raises(MedvlError, match="read them with read_file"):
        normalize({}, "internvl", location="m.json", index=0, source="m", image_root="/")
