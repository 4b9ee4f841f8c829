"""prepare-data on a corrupt corpus, as a new user meets it: duplicate ids, images outside the allowed folders,
CSV column mapping and huge fields, an unreadable file among good ones, folders as input, empty files, a bad
--out, and the corrected re-run after a failure (issues 16 and 9.10 / 9.14)."""

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from medvl.data.prepare import prepare
from medvl.errors import MedvlError


def _img(path, colour=(20, 120, 220)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def _pair(q="<image>\nWhat is shown?", a="A square."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@dataclass
class Ran:
    exit_code: int
    output: str


def _cli(*args):
    """Through the console script, as a user runs it: MedvlError -> exit 2 happens there."""
    proc = subprocess.run([str(Path(sys.executable).parent / "medvl"), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"}, timeout=300)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    return Ran(proc.returncode, " ".join(out.split()))  # rich wraps long lines: compare on single spaces


def _quarantine(out):
    return [json.loads(line) for line in open(out / "quarantine.jsonl")]


@pytest.fixture
def raw(tmp_path):
    d = tmp_path / "raw"
    for i in range(4):
        _img(d / "images" / f"{i}.png", (60 * i, 90, 200))
    return d


def test_duplicate_ids_first_wins_later_quarantined(raw, tmp_path):
    llava = [{"id": "a", "image": "images/0.png", "conversations": _pair(a="first")},
             {"id": "b", "image": "images/1.png", "conversations": _pair()},
             {"id": "a", "image": "images/2.png", "conversations": _pair(a="second")}]
    (raw / "llava.json").write_text(json.dumps(llava))
    disc = [{"_id": "d1", "conversation": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]}] * 3
    (raw / "disc.jsonl").write_text("\n".join(json.dumps(d) for d in disc))
    res = prepare([raw / "llava.json", raw / "disc.jsonl"], tmp_path / "out")
    assert res.manifest["accepted"] == 3 and res.manifest["rejected"] == {"duplicate-id": 3}
    kept = [json.loads(line) for line in open(tmp_path / "out" / "data-00000.jsonl")]
    assert [r["messages"][-1]["content"] for r in kept if r["id"] == "llava:a"] == ["first"]
    dup = [q for q in _quarantine(tmp_path / "out") if q["id"] == "llava:a"]
    assert dup[0]["code"] == "duplicate-id" and dup[0]["location"].endswith("llava.json[2]")
    res = _cli("prepare-data", raw / "llava.json", "--out", tmp_path / "cli")
    assert res.exit_code == 0 and "duplicate-id" in res.output  # reported in the summary table


def test_absolute_image_outside_the_allowed_folders_is_an_escape_with_the_fix(raw, tmp_path):
    secret = _img(tmp_path / "elsewhere" / "secret.png")
    rows = [{"id": "ok", "image": "images/0.png", "conversations": _pair()},
            {"id": "abs", "image": str(secret), "conversations": _pair()},
            {"id": "up", "image": "../elsewhere/secret.png", "conversations": _pair()}]
    (raw / "d.json").write_text(json.dumps(rows))
    res = prepare([raw / "d.json"], tmp_path / "out")
    assert res.manifest["accepted"] == 1 and res.manifest["rejected"] == {"image-escapes-root": 2}
    messages = {q["id"]: q["message"] for q in _quarantine(tmp_path / "out")}
    assert f"--image-root {secret.parent}" in messages["d:abs"] and f"--image-root {secret.parent}" in messages["d:up"]
    allowed = prepare([raw / "d.json"], tmp_path / "out2", image_root=[str(secret.parent)])
    assert allowed.manifest["accepted"] == 3 and str(secret.parent) in allowed.manifest["image_roots"]


def test_image_root_finds_relative_images_unzipped_elsewhere(tmp_path):
    _img(tmp_path / "pmv" / "images" / "pmc_1_1.jpg")
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "a.json").write_text(json.dumps([{"image": ["images/pmc_1_1.jpg"],
                                                            "conversations": _pair("Describe.")}]))
    assert prepare([tmp_path / "json" / "a.json"], tmp_path / "o1").manifest["rejected"] == {"image-missing": 1}
    res = prepare([tmp_path / "json" / "a.json"], tmp_path / "o2", image_root=[str(tmp_path / "pmv")])
    rec = json.loads((tmp_path / "o2" / "data-00000.jsonl").read_text())
    assert res.manifest["accepted"] == 1 and rec["image_root"] == str(tmp_path / "pmv")


def test_csv_column_mapping_and_fields_over_the_default_limit(raw, tmp_path):
    path = raw / "seed.csv"
    long_report = "findings " * 20_000  # 180,000 characters: over csv's default 131,072
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["findings", "impression", "file", "case"])
        w.writerow(["What organ?", "Lung.", "images/0.png", "c1"])
        w.writerow([long_report, "Normal.", "", "c2"])
        w.writerow(["Which side?", "Left.", "images/1.png", "c3"])
    res = prepare([path], tmp_path / "out", columns="user=findings,assistant=impression,image=file,id=case")
    assert res.manifest["accepted"] == 3 and not res.failed
    recs = {r["id"]: r for r in map(json.loads, open(tmp_path / "out" / "data-00000.jsonl"))}
    assert recs["seed:c1"]["images"] == ["images/0.png"]
    assert recs["seed:c1"]["messages"][0]["content"] == "<image>\nWhat organ?"
    assert recs["seed:c2"]["images"] == [] and len(recs["seed:c2"]["messages"][0]["content"]) == len(long_report)
    # the same CSV without a mapping: the big field no longer gives a traceback, the shape is a file-level error
    res = _cli("prepare-data", path, "--out", tmp_path / "nomap")
    assert res.exit_code == 2 and "cannot tell the data format" in res.output
    res = _cli("prepare-data", path, "--out", tmp_path / "wrong", "--columns", "user=prompt,assistant=impression")
    assert res.exit_code == 2 and "no column prompt (user)" in res.output and "findings" in res.output
    res = _cli("prepare-data", path, "--out", tmp_path / "bad", "--columns", "user=findings")
    assert res.exit_code == 2 and "no column given for assistant" in res.output
    assert not (tmp_path / "wrong").exists() and not (tmp_path / "bad").exists()


def test_auto_detected_csv_unused_columns_warned_or_refused(raw, tmp_path):
    (raw / "notes.csv").write_text("question,answer,note\nWhat organ?,Lung.,checked\n")
    (raw / "qa.csv").write_text("question,answer,path\nWhat organ?,Lung.,images/0.png\n")
    res = _cli("prepare-data", raw / "notes.csv", raw / "qa.csv", "--out", tmp_path / "out")
    assert res.exit_code == 2
    assert "warning:" in res.output and "'note' are not read" in res.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (warning,) = manifest["warnings"]
    assert warning.startswith(f"{raw / 'notes.csv'}: column(s) 'note' are not read")
    files = {Path(f["path"]).name: f for f in manifest["files"]}
    assert files["notes.csv"]["kept"] == 1 and files["notes.csv"]["warnings"] == [warning]
    assert files["qa.csv"]["kept"] == 0 and "'path' looks like image paths" in files["qa.csv"]["error"]
    assert "--columns user=question,assistant=answer,image=path" in files["qa.csv"]["error"]


def test_one_unreadable_file_fails_alone_and_the_run_finishes(raw, tmp_path):
    good = [{"id": i, "image": f"images/{i}.png", "conversations": _pair()} for i in range(3)]
    (raw / "good.json").write_text(json.dumps(good))
    (raw / "truncated.json").write_text(json.dumps(good)[:-40])  # cut inside element 2
    (raw / "shape.json").write_text(json.dumps([{"foo": 1, "bar": 2}]))
    (raw / "empty.jsonl").write_text("")
    alpaca = [{"instruction": "Classify: chest pain", "input": "", "output": "cardiology"}]
    (raw / "alpaca.json").write_text(json.dumps(alpaca))
    inputs = [raw / n for n in ("good.json", "truncated.json", "shape.json", "empty.jsonl", "alpaca.json")]
    res = prepare(inputs, tmp_path / "out")
    assert res.failed and res.manifest["accepted"] == 3 + 2 + 1  # the truncated file's first 2 samples are kept
    failed = {f["path"].rsplit("/", 1)[-1]: f["error"] for f in res.failed_files}
    assert set(failed) == {"truncated.json", "shape.json", "empty.jsonl"}
    assert "invalid JSON in element 2" in failed["truncated.json"] and "2 sample(s) before" in failed["truncated.json"]
    assert "cannot tell the data format" in failed["shape.json"] and "empty (0 bytes)" in failed["empty.jsonl"]
    res = _cli("prepare-data", *inputs, "--out", tmp_path / "cli")
    assert res.exit_code == 2 and "3 of 5 input file(s) failed" in res.output and "truncated.json" in res.output
    # --strict stops at the first problem, and leaves nothing behind
    res = _cli("prepare-data", *inputs, "--out", tmp_path / "strict", "--strict")
    assert res.exit_code == 2 and "truncated.json" in res.output and not (tmp_path / "strict").exists()


def test_a_folder_reads_every_supported_file_and_says_what_it_skipped(raw, tmp_path):
    (raw / "a.json").write_text(json.dumps([{"id": 1, "image": "images/0.png", "conversations": _pair()}]))
    (raw / "notes.txt").write_text("read me")
    ann = raw / "ann"
    ann.mkdir()
    (ann / "part.jsonl").write_text(json.dumps({"id": 7, "image": "images/1.png", "conversations": _pair()}))
    (raw / "meta.json").write_text(json.dumps({"part": {"root": ".", "annotation": "ann/part.jsonl",
                                                        "repeat_time": 1, "length": 1}}))
    (raw / "part.jsonl").write_text((ann / "part.jsonl").read_text())  # an annotation copy beside its meta ...
    meta = json.loads((raw / "meta.json").read_text())
    meta["part"]["annotation"] = "part.jsonl"  # ... named by the meta: read only through it
    (raw / "meta.json").write_text(json.dumps(meta))
    res = prepare([raw], tmp_path / "out")
    assert res.manifest["accepted"] == 2 and not res.failed
    assert set(res.manifest["sources"]) == {"a", "part"}
    skipped = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in res.skipped_files}
    assert "not a data file (.txt" in skipped["notes.txt"] and "a folder" in skipped["images"]
    assert "read through its meta file" in skipped["part.jsonl"]
    res = _cli("prepare-data", raw, "--out", tmp_path / "cli")
    assert res.exit_code == 0 and "skipped 1 file(s)" in res.output and "notes.txt" in res.output


def test_empty_input_and_nothing_kept_are_file_level_messages(raw, tmp_path):
    (raw / "empty.json").write_text("")
    res = _cli("prepare-data", raw / "empty.json", "--out", tmp_path / "o1")
    assert res.exit_code == 2 and "empty (0 bytes)" in res.output and not (tmp_path / "o1").exists()
    (raw / "none.json").write_text(json.dumps([{"image": "images/nope.png", "conversations": _pair()}] * 2))
    res = _cli("prepare-data", raw / "none.json", "--out", tmp_path / "o2")
    assert res.exit_code == 2 and "none of its 2 samples was kept" in res.output and "image-missing" in res.output


def test_out_that_is_a_file_is_refused(raw, tmp_path):
    (raw / "a.json").write_text(json.dumps([{"id": 1, "image": "images/0.png", "conversations": _pair()}]))
    target = tmp_path / "taken.txt"
    target.write_text("mine")
    res = _cli("prepare-data", raw / "a.json", "--out", target)
    assert res.exit_code == 2 and "is a file, not a folder" in res.output and target.read_text() == "mine"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    res = _cli("prepare-data", raw / "a.json", "--out", other, "--overwrite")  # never deletes a user's folder
    assert res.exit_code == 2 and "does not hold prepared data" in res.output and (other / "thesis.tex").exists()


def test_a_failed_run_does_not_block_the_corrected_rerun(raw, tmp_path):
    """Issue 9.14: leftovers of a failed run refused the corrected command ("made with other inputs")."""
    (raw / "odd.json").write_text(json.dumps([{"q": "What?", "a": "That."}]))
    out = tmp_path / "out"
    res = _cli("prepare-data", raw / "odd.json", "--out", out, "--strict")
    assert res.exit_code == 2 and not out.exists()  # no empty folder, no prepare-state.json
    res = _cli("prepare-data", raw / "odd.json", "--out", out, "--format", "columns", "--columns", "user=q,assistant=a")
    assert res.exit_code == 0, res.output
    # a run that finished with a failed file is replaced by the corrected one, no flag needed
    good = [{"id": i, "image": f"images/{i}.png", "conversations": _pair()} for i in range(2)]
    (raw / "good.json").write_text(json.dumps(good))
    (raw / "cut.json").write_text(json.dumps(good)[:-10])
    out2 = tmp_path / "out2"
    assert _cli("prepare-data", raw / "good.json", raw / "cut.json", "--out", out2).exit_code == 2
    (raw / "cut.json").write_text(json.dumps(good).replace('"id": 0', '"id": 5').replace('"id": 1', '"id": 6'))
    res = _cli("prepare-data", raw / "good.json", raw / "cut.json", "--out", out2)
    assert res.exit_code == 0, res.output
    assert json.loads((out2 / "manifest.json").read_text())["accepted"] == 4
    # a good output made with other settings still needs --overwrite, and --overwrite works
    res = _cli("prepare-data", raw / "good.json", "--out", out2)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert _cli("prepare-data", raw / "good.json", "--out", out2, "--overwrite").exit_code == 0


def test_interrupted_run_with_no_finished_shard_leaves_nothing(raw, tmp_path, monkeypatch):
    import medvl.data.prepare as mod

    (raw / "a.json").write_text(json.dumps([{"id": 1, "image": "images/0.png", "conversations": _pair()}]))

    def dying(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "process_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare([raw / "a.json"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MedvlError, match="input not found"):
        prepare([raw / "missing.json"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_demo_out_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "demo.txt"
    target.write_text("mine")
    res = _cli("demo", "--out", target, "--steps", "1")
    assert res.exit_code == 2 and "is a file, not a folder" in res.output and target.read_text() == "mine"


def test_same_file_name_in_two_folders_is_not_a_duplicate(tmp_path):
    for name in ("a", "b"):
        _img(tmp_path / name / "images" / "0.png")
        (tmp_path / name / "train.json").write_text(json.dumps([{"image": "images/0.png",
                                                                  "conversations": _pair()}]))
    res = prepare([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert res.manifest["accepted"] == 2 and set(res.manifest["sources"]) == {"a/train", "b/train"}
