"""The normalized record: JSONL round trip, the shape validator, rejections."""

import json

import pytest

from medvl.data.schema import REJECTION_REASONS, Message, Record, Rejection, shape_problems
from medvl.errors import MedvlError


def _record() -> Record:
    return Record(
        id="pmv:3",
        source="pmv",
        images=["images/a.jpg", "images/b.jpg"],
        messages=[
            Message("system", "你是一名放射科医生。"),
            Message("user", "<image>\n<image>\n比较这两张图。"),
            Message("assistant", "左肺有积液。", True),
            Message("user", "确定吗？"),
            Message("assistant", "是的。", False),
        ],
        image_root="/data/pmv",
        meta={"format": "sharegpt", "location": "/data/pmv/a.json[3]", "modality": "CT"},
    )


def test_round_trip_is_one_readable_line_in_documented_key_order():
    line = _record().to_json()
    assert "\n" not in line
    assert "放射科" in line  # ensure_ascii=False: Chinese stays readable
    obj = json.loads(line)
    assert list(obj) == ["id", "source", "images", "image_root", "messages", "meta"]
    assert obj["messages"][0] == {"role": "system", "content": "你是一名放射科医生。"}  # no train key off assistant
    assert obj["messages"][2]["train"] is True and obj["messages"][4]["train"] is False
    back = Record.from_dict(json.loads(line))
    assert back == _record()
    assert back.placeholder_count() == 2
    assert back.location == "/data/pmv/a.json[3]"


def test_assistant_without_train_key_defaults_to_trained():
    obj = json.loads(_record().to_json())
    del obj["messages"][2]["train"]
    assert Record.from_dict(obj).messages[2].train is True


def test_validator_reports_every_problem_at_once():
    obj = json.loads(_record().to_json())
    obj["id"] = ""
    obj["images"] = ["ok.png", 7]
    obj["messages"][1]["train"] = True
    obj["messages"][3]["role"] = "doctor"
    obj["messages"][4]["extra"] = 1
    del obj["image_root"]
    problems = shape_problems(obj)
    assert len(problems) == 6
    joined = "; ".join(problems)
    for fragment in ("`id` must be", "`images` must be", "messages[1] is a user turn and cannot be trained",
                     "messages[3].role is 'doctor'", "messages[4] has unknown keys ['extra']", "`image_root`"):
        assert fragment in joined
    assert shape_problems(json.loads(_record().to_json())) == []


def test_from_dict_raises_medvl_error_with_location():
    with pytest.raises(MedvlError, match="`messages` must be a non-empty list") as e:
        Record.from_dict({"id": "a", "source": "s", "images": [], "image_root": None, "meta": {}, "messages": []},
                         where="shard-0.jsonl:12")
    assert e.value.where == "shard-0.jsonl:12"


def test_rejection_codes_are_an_explicit_list():
    r = Rejection("extra-placeholders", "3 placeholders but 2 images", "a.jsonl:4", "a:4")
    assert r.render() == "a.jsonl:4: extra-placeholders: 3 placeholders but 2 images"
    assert json.loads(r.to_json()) == {"code": "extra-placeholders", "message": "3 placeholders but 2 images",
                                       "location": "a.jsonl:4", "id": "a:4"}
    assert "image-escapes-root" in REJECTION_REASONS
    with pytest.raises(ValueError, match="unknown rejection code"):
        Rejection("made-up", "x", "y")
