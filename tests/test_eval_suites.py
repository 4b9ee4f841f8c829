"""medvl.evaluate.suites: reading the published bundle, suite names, prompt, image pre-flight, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from medvl.errors import MedvlError
from medvl.evaluate import build_prompt, check_images, load_suites, read_records, resolve_suites
from medvl.evaluate.suites import EvalItem


def _record(question, options, answer, dataset, image="images/ok0.png", **extra):
    return {"question": question, "options": options, "answer": answer, "image": [image], "dataset": dataset,
            **extra}  # fmt: skip


def write_bundle(root: Path, records: list[dict] | None = None) -> Path:
    """A bundle in the published shape: the JSON list with images/ next to it (4 good PNGs, 1 garbage file)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 60, 10, 10)).save(root / "images" / f"ok{i}.png")
    (root / "images" / "garbage.png").write_bytes(b"this is not a png")
    if records is None:
        records = [
            _record("Is there a pleural effusion?", ["Yes", "No"], "No", "VQA-RAD_test", subset=""),
            _record("Is the liver normal?", ["Yes", "No"], "Yes", "VQA-RAD_test", image="images/ok1.png"),
            _record("What organ is shown?", [], "liver", "VQA-RAD_test", question_type="open"),
            _record("Which lobe?", ["Left", "Right"], "Right", "SLAKE_test", image="images/ok2.png"),
            _record("Modality?", ["CT", "MRI", "X-ray", "US"], "MRI", "OmniMedVQA", subset="CT(Computed Tomography)"),
            _record("Finding?", ["Cyst", "Mass"], "Mass", "OmniMedVQA", subset="X-Ray"),
            _record("Which drug?", "['Aspirin', 'Heparin', 'Warfarin']", "Heparin", "MMMU_Medical_Validation",
                    subset="validation_Pharmacy", image="images/ok3.png"),
            _record("Empty options?", [], "x", "PathVQA_test"),
        ]  # fmt: skip
    path = root / "medical_multimodel_evaluation_data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_loads_published_shape_with_upstream_test_ids_and_skips_counted(tmp_path):
    path = write_bundle(tmp_path)
    eval_set = load_suites(path, "all")
    # test_id numbers the whole file 1..8 before filtering (upstream eval.py): 3 (open) and 8 (no options) gone.
    assert [it.test_id for it in eval_set.items] == [1, 2, 4, 5, 6, 7]
    assert (eval_set.open_skipped, eval_set.empty_options_skipped, eval_set.records_in_file) == (1, 1, 8)
    assert eval_set.datasets == ("VQA-RAD_test", "SLAKE_test", "OmniMedVQA", "MMMU_Medical_Validation", "PathVQA_test")
    mmmu = eval_set.items[-1]
    assert mmmu.options == ("Aspirin", "Heparin", "Warfarin")  # Python-literal string parsed
    assert mmmu.gold_letter == "B" and mmmu.subset == "validation_Pharmacy"
    assert mmmu.images == (str((tmp_path / "images" / "ok3.png").resolve()),)
    assert Path(mmmu.images[0]).is_absolute() and Path(mmmu.images[0]).exists()
    assert eval_set.items[0].subset == "" and eval_set.items[3].subset == "CT(Computed Tomography)"


def test_prompt_is_the_published_template_byte_for_byte():
    item = EvalItem(1, "VQA-RAD_test", "", "Is there a pleural effusion?", ("Yes", "No"), "No")
    assert build_prompt(item) == (
        "Is there a pleural effusion?\nA. Yes\nB. No\nAnswer with the option's letter from the given choices directly."
    )
    eleven = EvalItem(2, "X", "", "Q?", tuple(f"o{i}" for i in range(11)), "o10")
    assert build_prompt(eleven).splitlines()[-2] == "K. o10" and eleven.gold_letter == "K"


def test_suite_names_select_datasets_in_order_asked(tmp_path):
    available = ["VQA-RAD_test", "SLAKE_test", "OmniMedVQA", "CustomSet"]
    assert resolve_suites("slake,vqa-rad", available) == ["SLAKE_test", "VQA-RAD_test"]
    assert resolve_suites(["VQA_RAD", " slake ", "vqa-rad"], available) == ["VQA-RAD_test", "SLAKE_test"]
    assert resolve_suites("customset", available) == ["CustomSet"]  # raw dataset values work, any case
    assert resolve_suites("all", available) == available


def test_unknown_suite_lists_valid_names_with_did_you_mean():
    with pytest.raises(MedvlError) as exc:
        resolve_suites("vqa-rda", ["VQA-RAD_test"])
    assert "unknown suite 'vqa-rda'" in exc.value.what
    assert "did you mean 'vqa-rad'?" in exc.value.fix
    for name in ("vqa-rad", "slake", "pathvqa", "pmc-vqa", "omnimedvqa", "mmmu-medical", "all"):
        assert name in exc.value.fix
    with pytest.raises(MedvlError, match="has no items in this file"):
        resolve_suites("pathvqa", ["VQA-RAD_test"])


def test_gold_not_among_options_is_one_error_naming_every_item(tmp_path):
    records = [
        _record("Q1", ["Yes", "No"], "no", "VQA-RAD_test"),  # case differs: exact match required
        _record("Q2", ["Yes", "No"], "Yes", "VQA-RAD_test"),
        _record("Q3", ["Cyst", "Mass"], "Tumour", "SLAKE_test"),
        _record("Q4", ["Cyst", "Mass"], "Tumour", "PathVQA_test"),  # not selected below: not checked
    ]
    path = write_bundle(tmp_path, records)
    with pytest.raises(MedvlError) as exc:
        load_suites(path, "vqa-rad,slake")
    message = exc.value.render()
    assert "2 evaluation records are invalid" in message
    assert "test_id 1 (VQA-RAD_test): gold answer 'no'" in message and "did you mean 'No'?" in message
    assert "test_id 3 (SLAKE_test): gold answer 'Tumour'" in message
    assert "test_id 4" not in message
    with pytest.raises(MedvlError, match="1 evaluation record is invalid"):
        load_suites(path, "vqa-rad")  # only the selected suite's records are checked


def test_more_than_eleven_options_and_unsafe_literals_are_refused(tmp_path):
    records = [
        _record("Q", [f"o{i}" for i in range(12)], "o0", "VQA-RAD_test"),
        _record("Q", "__import__('os').system('touch PWNED')", "x", "VQA-RAD_test"),
        _record("Q", "['a', {'b': 1}]", "a", "VQA-RAD_test"),
    ]
    path = write_bundle(tmp_path, records)
    with pytest.raises(MedvlError) as exc:
        load_suites(path, "vqa-rad")
    message = exc.value.render()
    assert "3 evaluation records are invalid" in message
    assert "test_id 1 (VQA-RAD_test): 12 options" in message
    assert "test_id 2" in message and "not a Python/JSON list literal" in message
    assert "test_id 3" in message and "must be a list of texts" in message
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


def test_check_images_reports_every_missing_and_unreadable_image_once(tmp_path):
    records = [
        _record("Q1", ["Yes", "No"], "No", "VQA-RAD_test", image="images/missing.png"),
        _record("Q2", ["Yes", "No"], "No", "VQA-RAD_test", image="images/garbage.png"),
        _record("Q3", ["Yes", "No"], "No", "VQA-RAD_test", image="images/missing.png"),
        _record("Q4", ["Yes", "No"], "No", "VQA-RAD_test", image="images/ok0.png"),
        _record("Q5", ["Yes", "No"], "No", "VQA-RAD_test", image="images"),  # a directory
    ]
    path = write_bundle(tmp_path, records)
    good = tmp_path / "images" / "ok1.png"
    good.write_bytes(good.read_bytes()[:30])  # truncated PNG: opens, fails verify
    records.append(_record("Q6", ["Yes", "No"], "No", "VQA-RAD_test", image="images/ok1.png"))
    path.write_text(json.dumps(records))
    problems = check_images(load_suites(path, "vqa-rad").items, workers=2)
    by_name = {Path(p.path).name: p for p in problems}
    assert sorted(by_name) == ["garbage.png", "images", "missing.png", "ok1.png"]
    assert by_name["missing.png"].reason == "missing" and by_name["missing.png"].test_ids == (1, 3)
    assert by_name["images"].reason == "missing"
    assert by_name["garbage.png"].reason.startswith("unreadable: UnidentifiedImageError")
    assert by_name["ok1.png"].reason.startswith("unreadable:") and by_name["ok1.png"].test_ids == (6,)


def test_sampling_is_seeded_per_suite_and_keeps_file_order(tmp_path):
    records = [_record(f"Q{i}", ["Yes", "No"], "No", "PathVQA_test") for i in range(40)]
    records += [_record(f"R{i}", ["Yes", "No"], "Yes", "SLAKE_test") for i in range(30)]
    path = write_bundle(tmp_path, records)
    one = load_suites(path, "pathvqa", sample=5, seed=1)
    again = load_suites(path, "pathvqa", sample=5, seed=1)
    other = load_suites(path, "pathvqa", sample=5, seed=2)
    ids = [it.test_id for it in one.items]
    assert len(ids) == 5 and ids == sorted(ids) and ids == [it.test_id for it in again.items]
    assert ids != [it.test_id for it in other.items]
    both = load_suites(path, "pathvqa,slake", sample={"pathvqa": 5}, seed=1)  # slake: not sampled, all 30
    assert [it.test_id for it in both.items if it.dataset == "PathVQA_test"] == ids
    assert both.sampled == {"PathVQA_test": 5, "SLAKE_test": 30}
    assert len(load_suites(path, "slake", sample=1000).items) == 30
    with pytest.raises(MedvlError, match="unknown suites: slak"):
        load_suites(path, "all", sample={"slak": 3})


def test_jsonl_in_the_same_shape_and_file_errors(tmp_path):
    write_bundle(tmp_path, [])
    jsonl = tmp_path / "mine.jsonl"
    rows = [_record("Q1", ["Yes", "No"], "Yes", "MyXray"), _record("Q2", ["Yes", "No"], "No", "MyXray")]
    jsonl.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    eval_set = load_suites(jsonl, "all")
    assert [(it.test_id, it.gold_letter) for it in eval_set.items] == [(1, "A"), (2, "B")]
    jsonl.write_text(json.dumps(rows[0]) + "\n{broken\n")
    with pytest.raises(MedvlError) as exc:
        read_records(jsonl)
    assert exc.value.where == f"{jsonl}:2"
    with pytest.raises(MedvlError, match="evaluation file not found"):
        load_suites(tmp_path / "nope.json")
    jsonl.write_text(json.dumps({**rows[0], "question_type": "open"}) + "\n")
    with pytest.raises(MedvlError, match="no multiple-choice items"):
        load_suites(jsonl)
