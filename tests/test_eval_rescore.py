"""`medvl score` / medvl.evaluate.rescore: re-scoring a published eval.py output file and medvl's own
predictions.jsonl without a model (no torch import), keeping the file's test_ids, dropping padding duplicates,
listing unscorable records, and refusing unusable files with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medvl.commands.evaluate import SCORER_NAMES
from medvl.commands.main import app
from medvl.evaluate import SCORERS, EvalItem, rescore, score, write_predictions

from .test_cli_startup import MEDVL, heavy_in, run

YN = ["yes", "no"]
FOUR = ["Pneumonia", "Pleural effusion", "Cardiomegaly", "Normal"]


def rec(test_id, output, options=FOUR, answer="Pleural effusion", dataset="PMC-VQA_test", subset="", **extra):
    return {"question": f"q{test_id}", "options": options, "answer": answer, "image": [f"images/{test_id}.png"],
            "dataset": dataset, "subset": subset, "test_id": test_id, "model_output": output, **extra}


PUBLISHED = [
    rec(101, "B"),  # all three right
    rec(102, "b"),  # published: lowercase, wrong; reader: B
    rec(103, "A or B"),  # published reads B; reader: two options, wrong
    rec(104, "I think it's b."),  # published reads I
    rec(105, "Pleural effusion"),  # no letter: the published scorer crashes here; every scorer reads B
    rec(106, "yes", YN, "yes", "PathVQA_test"),
    rec(107, "No, there is no mass.", YN, "no", "PathVQA_test"),
    rec(108, "B", ["B-cell lymphoma", "T-cell lymphoma"], "T-cell lymphoma", "OmniMedVQA", "X-Ray"),
    # option A's text; the published letter rule reads its "B" and credits it
    rec(109, "B-cell lymphoma", ["B-cell lymphoma", "T-cell lymphoma"], "T-cell lymphoma", "OmniMedVQA", "X-Ray"),
    rec(110, "C", answer="pleural effusion (small)"),  # gold not among the options: unscorable
    rec(111, "A lesion", [], "lesion", "VQA-RAD_test", question_type="open"),  # open: skipped, counted
    {"question": "q112", "answer": "x", "dataset": "SLAKE_test", "test_id": 112, "model_output": "A"},  # no options
    rec(101, "A"),  # accelerate padding: test_id 101 again, the first occurrence wins
    rec(102, "B"),
    rec(112, "B", FOUR, "Pneumonia", "SLAKE_test"),  # ... also over an unscorable first occurrence
]
# Expected per scorer over the 9 scored records (101-109).
EXPECTED = {
    "huatuo": {"PMC-VQA_test": (3, 5), "PathVQA_test": (2, 2), "OmniMedVQA": (2, 2)},  # 101 103 105; 106 107; both
    "reader": {"PMC-VQA_test": (4, 5), "PathVQA_test": (2, 2), "OmniMedVQA": (1, 2)},  # 101 102 104 105; 108
    "strict": {"PMC-VQA_test": (2, 5), "PathVQA_test": (1, 2), "OmniMedVQA": (1, 2)},  # 101 105; 106; 108
}


def published_file(tmp_path: Path) -> Path:
    path = tmp_path / "HuatuoGPT-Vision-7B_medical_multimodel_evaluation_data.json"
    path.write_text(json.dumps(PUBLISHED, indent=2), encoding="utf-8")
    return path


def table(results: dict) -> dict:
    return {name: {d: (a["correct"], a["n"]) for d, a in r["datasets"].items()}
            for name, r in results["scorers"].items()}


def test_scorer_names_of_the_table_are_the_library_ones():
    assert SCORER_NAMES == SCORERS


@pytest.mark.skipif(not MEDVL.exists(), reason="console script not installed")
def test_cli_rescores_a_published_file_without_importing_torch(tmp_path):
    out = tmp_path / "rescored"
    proc, modules = run(["score", str(published_file(tmp_path)), "-o", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert heavy_in(modules) == []  # no torch, transformers, numpy...
    results = json.loads((out / "results.json").read_text())
    assert table(results) == EXPECTED
    assert results["counts"]["duplicates"] == 3 and results["counts"]["open_skipped"] == 1
    assert results["unscorable"] == [
        {"test_id": 112, "dataset": "SLAKE_test", "reason": "record 12: missing field 'options'"},
        {"test_id": 110, "dataset": "PMC-VQA_test",
         "reason": "gold answer 'pleural effusion (small)' is not among the options "
                   "['Pneumonia', 'Pleural effusion', 'Cardiomegaly', 'Normal']"},
    ]  # fmt: skip
    assert results["data"]["format"] == "published" and results["data"]["records_in_file"] == 15
    assert results["scorer_gap"]["datasets"]["PMC-VQA_test"] == pytest.approx(3 / 5 - 4 / 5)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    # the file's own test_ids, in file order; the first of each duplicated id was scored
    assert [r["test_id"] for r in rows] == [101, 102, 103, 104, 105, 106, 107, 108, 109]
    assert (rows[0]["output"], rows[1]["output"]) == ("B", "b")
    assert rows[3]["reading"] == "B" and rows[3]["letter"] == "I" and rows[2]["reading"] is None
    assert "huatuo" in proc.stdout and "reader" in proc.stdout and "could not be scored" in proc.stdout


@pytest.mark.skipif(not MEDVL.exists(), reason="console script not installed")
def test_cli_rescores_medvl_predictions_to_the_same_results_without_torch(tmp_path):
    """eval's predictions.jsonl scored again gives eval's numbers (here: built by score() and write_predictions)."""
    items = [(EvalItem(i, d, s, f"q{i}", tuple(o), a), out) for i, (d, s, o, a, out) in enumerate([
        ("VQA-RAD_test", "", YN, "no", "No"), ("VQA-RAD_test", "", YN, "yes", "b"),
        ("OmniMedVQA", "CT(Computed Tomography)", FOUR, "Normal", "D. Normal"),
        ("OmniMedVQA", "X-Ray", FOUR, "Cardiomegaly", "The heart is enlarged: cardiomegaly."),
        ("MMMU_Medical_Validation", "validation_Pharmacy", FOUR, "Pneumonia", "A or C"),
    ], start=7)]
    original = score(items)
    run_dir = tmp_path / "eval"
    write_predictions(run_dir / "predictions.jsonl", original)
    proc, modules = run(["score", str(run_dir), "--json"])  # the eval output directory
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert heavy_in(modules) == []
    results = json.loads(proc.stdout)
    assert results["scorers"] == {k: v.as_dict() for k, v in original.results.items()}
    assert results["data"]["format"] == "medvl" and results["unscorable"] == []
    assert results["scorers"]["reader"]["overall"]["correct"] == 3  # No, D. Normal, ... cardiomegaly
    assert not (run_dir / "results.json").exists()  # nothing written without --out


def test_rescore_in_process_keeps_test_ids_and_reports(tmp_path):
    result = rescore(published_file(tmp_path))
    assert [s.item.test_id for s in result.scores.items][:3] == [101, 102, 103]
    assert result.format == "published" and result.records == 15 and result.predictions is None
    assert {r.suite: round(r.scorer_gap, 1) for r in result.rows} == {"pmc-vqa": -20.0, "pathvqa": 0.0,
                                                                     "omnimedvqa": 50.0}


def test_table_shows_the_three_scores_the_gap_and_the_unscorable(tmp_path):
    result = CliRunner().invoke(app, ["score", str(published_file(tmp_path))], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "suite" in line)
    assert [c.strip() for c in header.split("┃")[1:7]] == ["suite", "n", "huatuo", "reader", "strict", "gap"]
    pmc = next(line for line in result.output.splitlines() if "pmc-vqa" in line)
    assert [c.strip() for c in pmc.split("│")[1:8]] == ["pmc-vqa", "5", "60.0", "80.0", "40.0", "-20.0", "54.3"]
    assert "2 record(s) could not be scored" in result.output and "test_id 110 (PMC-VQA_test)" in result.output
    assert "9 scored, 3 duplicate test_ids dropped (first kept), 1 open, 2 unscorable" in result.output


def test_writing_over_the_scored_file_is_refused(tmp_path):
    from medvl.errors import MedvlError

    items = [(EvalItem(1, "VQA-RAD_test", "", "q", ("Yes", "No"), "No"), "B")]
    path = write_predictions(tmp_path / "predictions.jsonl", score(items))
    with pytest.raises(MedvlError, match="would overwrite"):
        rescore(path, tmp_path)


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "garbage.json").write_text("this is not json\n")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    bundle = [{k: v for k, v in r.items() if k != "model_output"} for r in PUBLISHED[:3]]
    (tmp_path / "bundle.json").write_text(json.dumps(bundle))
    no_gold = [{k: v for k, v in r.items() if k != "answer"} for r in PUBLISHED[:3]]
    (tmp_path / "no_gold.json").write_text(json.dumps(no_gold))
    (tmp_path / "run").mkdir()
    (tmp_path / "predictions.partial.jsonl").write_text('{"test_id": 1, "key": "ab12", "output": "B"}\n')
    return {
        "missing": (tmp_path / "nope.jsonl", "predictions file not found"),
        "empty": (tmp_path / "empty.json", "the predictions file is empty"),
        "not json": (tmp_path / "garbage.json", "invalid JSON"),
        "not utf-8": (tmp_path / "binary.json", "not UTF-8 text"),
        "no model_output": (tmp_path / "bundle.json", "it looks like an evaluation file"),
        "no answer": (tmp_path / "no_gold.json", "no record has the gold answer 'answer'"),
        "directory": (tmp_path / "run", "is a directory without predictions.jsonl"),
        "answer cache": (tmp_path / "predictions.partial.jsonl", "answer cache of an unfinished `medvl eval`"),
    }


@pytest.mark.skipif(not MEDVL.exists(), reason="console script not installed")
def test_unusable_files_exit_2_with_a_clear_message_and_write_nothing(tmp_path):
    for case, (path, message) in bad_inputs(tmp_path).items():
        out = tmp_path / f"out-{case.replace(' ', '_')}"
        proc, _ = run(["score", str(path), "-o", str(out)])
        assert proc.returncode == 2, (case, proc.stdout, proc.stderr[-2000:])
        text = " ".join((proc.stdout + proc.stderr).split())  # the panel wraps long lines
        assert message in text, (case, text[-1500:])
        assert "Traceback" not in text and "fix:" in text, case
        assert not out.exists(), case


def test_nothing_scorable_is_an_error_listing_why(tmp_path):
    from medvl.errors import MedvlError

    path = tmp_path / "p.json"
    path.write_text(json.dumps([rec(1, "A", answer="zzz"), rec(2, 7)]))
    with pytest.raises(MedvlError) as err:
        rescore(path)
    assert "none of the 2 records can be scored" in err.value.what
    assert "record 2: 'model_output' is not text: int" in err.value.what and "'zzz'" in err.value.what


def test_a_file_without_test_ids_is_numbered_by_position_and_mixed_ids_are_unscorable(tmp_path):
    plain = [{k: v for k, v in r.items() if k != "test_id"} for r in PUBLISHED[:3]]
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(plain))
    assert [s.item.test_id for s in rescore(path).scores.items] == [1, 2, 3]
    path.write_text(json.dumps([PUBLISHED[0], plain[1], {**PUBLISHED[2], "test_id": "3"}]))
    result = rescore(path)
    assert [s.item.test_id for s in result.scores.items] == [101]
    assert [u.reason for u in result.scores.unscorable] == [
        "record 2: test_id must be an integer, got None", "record 3: test_id must be an integer, got '3'"]


def test_rescoring_leaves_torch_out_of_sys_modules(tmp_path):
    """The same check through sys.modules of a fresh interpreter that ran `medvl score` in-process."""
    import subprocess
    import sys

    source, out = published_file(tmp_path), tmp_path / "o"
    script = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from medvl.commands.main import app\n"
        f"result = CliRunner().invoke(app, ['score', {str(source)!r}, '-o', {str(out)!r}])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'numpy', 'accelerate', 'peft', 'PIL'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    assert (out / "results.json").is_file()
