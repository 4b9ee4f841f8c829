"""Each validation rule: a bad sample is rejected with its reason and location, good samples still come out."""

import json
import os

import pytest
from PIL import Image

from medvl.data.checks import CheckPolicy, check_record, rejection_counts, resolve_image
from medvl.data.images import ResolutionPolicy
from medvl.data.schema import Message, Record, Rejection


@pytest.fixture
def root(tmp_path):
    data = tmp_path / "dataset"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (64, 48), (10, 200, 10)).save(data / "images/a.png")
    Image.new("RGB", (30, 30), (200, 10, 10)).save(data / "images/b.jpg")
    return data


def _rec(root, images, *turns, rid="s:0"):
    messages = [Message(role, text, role == "assistant") for role, text in turns]
    return Record(rid, "s", list(images), messages, str(root), {"format": "sharegpt", "location": f"s.json[{rid}]"})


def _good(root):
    return _rec(root, ["images/a.png"], ("user", "<image>\nWhat is this?"), ("assistant", "A green square."))


def _check(record, **policy):
    return check_record(record, CheckPolicy(**policy))


def _rejected(result, code, fragment):
    assert isinstance(result, Rejection), result
    assert result.code == code and fragment in result.message, result.render()
    assert result.location.startswith("s.json[") and result.id.startswith("s:")


def test_good_sample_passes_and_gets_image_sizes(root):
    out = _check(_good(root))
    assert isinstance(out, Record) and out.meta["image_sizes"] == [[64, 48]]
    assert "repairs" not in out.meta
    assert resolve_image(out, 0) == root / "images/a.png"


def test_missing_placeholders_are_inserted_into_the_first_user_turn_not_the_system_turn(root):
    rec = _rec(root, ["images/a.png", "images/b.jpg"], ("system", "You are a radiologist."),
               ("user", "Compare these."), ("assistant", "They differ."), ("user", "More?"), ("assistant", "No."))
    out = _check(rec)
    assert out.messages[0].content == "You are a radiologist."
    assert out.messages[1].content == "<image>\n<image>\nCompare these."
    assert out.messages[3].content == "More?"
    assert out.meta["repairs"] == ["inserted 2 <image> at the start of turn 1 (first user turn)"]
    assert rec.messages[1].content == "Compare these." and "repairs" not in rec.meta  # input left alone


def test_placeholder_rules(root):
    extra = _rec(root, ["images/a.png"], ("user", "<image><image>\nTwo?"), ("assistant", "One."))
    _rejected(_check(extra), "extra-placeholders", "2 <image> placeholders but 1 images")
    text_only_tag = _rec(root, [], ("user", "<image>\nWhat?"), ("assistant", "x"))
    _rejected(_check(text_only_tag), "extra-placeholders", "1 <image> placeholders but 0 images")
    partial = _rec(root, ["images/a.png", "images/b.jpg"], ("user", "First <image>, second?"), ("assistant", "x"))
    _rejected(_check(partial), "missing-placeholders", "1 <image> placeholders for 2 images")
    in_answer = _rec(root, ["images/a.png"], ("user", "<image>\nDraw it"), ("assistant", "Here: <image>"))
    _rejected(_check(in_answer), "placeholder-outside-user", "turn 1 (assistant)")
    in_system = _rec(root, ["images/a.png"], ("system", "<image>"), ("user", "?"), ("assistant", "x"))
    _rejected(_check(in_system), "placeholder-outside-user", "turn 0 (system)")
    no_user = _rec(root, ["images/a.png"], ("system", "s"), ("assistant", "x"))
    _rejected(_check(no_user), "no-user-turn", "1 images but no user turn")
    assert isinstance(_check(_good(root)), Record)


def test_nothing_to_train(root):
    ignored = Record("s:1", "s", [], [Message("user", "q"), Message("assistant", "a", False)], None,
                     {"location": "s.json[1]"})
    _rejected(_check(ignored), "no-trainable-turn", "no assistant turn is trained")
    only_user = _rec(root, [], ("user", "hello"))
    _rejected(_check(only_user), "no-trainable-turn", "no assistant turn")
    empty = _rec(root, [], ("user", "q"), ("assistant", "fine"), ("user", "q2"), ("assistant", "  \n"))
    _rejected(_check(empty), "empty-assistant", "turn 3")
    assert isinstance(_check(_rec(root, [], ("user", "q"), ("assistant", "a"))), Record)


def test_image_limit(root):
    many = _rec(root, ["images/a.png"] * 3, ("user", "Look."), ("assistant", "Same image thrice."))
    _rejected(_check(many, max_images=2), "too-many-images", "3 images; the limit is 2")
    assert isinstance(_check(many, max_images=3), Record)


def test_missing_and_undecodable_images(root):
    missing = _rec(root, ["images/gone.png"], ("user", "<image>"), ("assistant", "x"))
    _rejected(_check(missing), "image-missing", "images/gone.png does not exist")
    (root / "images/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    bad = _rec(root, ["images/bad.png"], ("user", "<image>"), ("assistant", "x"))
    _rejected(_check(bad), "image-undecodable", "images/bad.png: cannot decode image")
    assert isinstance(_check(bad, decode=False), Record)  # the quick pass only looks for the file


def test_paths_escaping_the_root(root, tmp_path):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    dotdot = _rec(root, ["images/../../secret.png"], ("user", "<image>"), ("assistant", "x"))
    _rejected(_check(dotdot), "image-escapes-root", "leaves the allowed folders")
    os.symlink(outside, root / "images/link.png")
    link = _rec(root, ["images/link.png"], ("user", "<image>"), ("assistant", "x"))
    _rejected(_check(link), "image-escapes-root", f"resolves to {outside}")
    assert isinstance(_check(link, roots=(str(tmp_path),)), Record)  # images linked to a named folder are fine
    absolute = _rec(root, [str(outside)], ("user", "<image>"), ("assistant", "x"))
    # an absolute path outside the dataset's folder is refused, with the fix in the message ...
    _rejected(_check(absolute), "image-escapes-root", f"add --image-root {tmp_path}")
    assert isinstance(_check(absolute, roots=(str(tmp_path),)), Record)  # ... unless its folder is named
    inside = _rec(root, ["images/./a.png"], ("user", "<image>"), ("assistant", "x"))
    assert isinstance(_check(inside), Record)


def test_aspect_ratio_only_with_a_resolution_policy(root):
    Image.new("RGB", (402, 2)).save(root / "images/strip.png")
    strip = _rec(root, ["images/strip.png"], ("user", "<image>"), ("assistant", "x"))
    assert isinstance(_check(strip), Record)
    _rejected(_check(strip, resolution=ResolutionPolicy()), "image-aspect-ratio", "402x2")


def test_dicom_images_pass_through_the_same_checks(root):
    from pydicom.data import get_testdata_file

    os.symlink(get_testdata_file("MR_small.dcm", download=False), root / "images/mr.dcm")
    rec = _rec(root, ["images/mr.dcm"], ("user", "Which sequence?"), ("assistant", "T1."))
    pydicom_dir = os.path.dirname(get_testdata_file("MR_small.dcm", download=False))
    out = _check(rec, roots=(pydicom_dir,))
    assert out.meta["image_sizes"] == [[64, 64]] and out.messages[0].content.startswith("<image>\n")


def test_rejection_counts_follow_the_reason_order(root):
    results = [_check(_rec(root, [], ("user", "q"))), _check(_rec(root, ["x.png"], ("user", "q"), ("assistant", "a"))),
               _check(_rec(root, [], ("user", "q")))]
    assert rejection_counts(results) == {"no-trainable-turn": 2, "image-missing": 1}


def test_read_then_check_a_mixed_file(root):
    import json

    from medvl.data.formats import read_file

    rows = [
        {"image": ["images/a.png"], "conversations": [{"from": "human", "value": "Describe."},
                                                      {"from": "gpt", "value": "Green."}]},
        {"image": ["images/none.png"], "conversations": [{"from": "human", "value": "?"},
                                                         {"from": "gpt", "value": "x"}]},
        {"image": "images/b.jpg", "conversations": [{"from": "human", "value": "<image>\n?"},
                                                    {"from": "ignored_gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "fine"}]},
    ]
    path = root / "pmv.json"
    path.write_text(json.dumps(rows))
    results = [r if isinstance(r, Rejection) else check_record(r) for r in read_file(path)]
    kept = [r for r in results if isinstance(r, Record)]
    assert [r.id for r in kept] == ["pmv:0", "pmv:3"]
    assert kept[0].messages[0].content == "<image>\nDescribe." and kept[0].meta["image_sizes"] == [[64, 48]]
    assert [(r.code, r.location) for r in results if isinstance(r, Rejection)] == [
        ("image-missing", f"{path}[1]"), ("no-trainable-turn", f"{path}[2]")]
    assert Record.from_dict(json.loads(kept[0].to_json())) == kept[0]  # what the shard holds reads back identically
