"""`medvl eval` end to end (medvl.evaluate.run + commands/evaluate.py) on tiny models and a bundle in the
published shape: files, table, determinism, resume, missing images, adapters, text-only models, completion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medvl.commands.evaluate import SUITE_NAMES, complete_suite
from medvl.commands.main import app
from medvl.errors import MedvlError
from medvl.evaluate import SUITES
from medvl.evaluate.generate import PARTIAL, Generator
from medvl.evaluate.run import evaluate

from .conftest import RecordingProgress
from .test_eval_generate import one_torch_thread, write_eval_bundle  # noqa: F401 (autouse fixture)

SIX = "vqa-rad,slake,pmc-vqa,omnimedvqa,mmmu-medical,pathvqa"
# Items per dataset in write_eval_bundle (the open question is skipped; the DICOM item is in VQA-RAD).
N = {"VQA-RAD_test": 3, "SLAKE_test": 2, "PMC-VQA_test": 2, "OmniMedVQA": 3, "MMMU_Medical_Validation": 1,
     "PathVQA_test": 2}
TOKENS = "6"  # new tokens per answer: random tiny models never stop early, so this sets the run time


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write_eval_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def reference(tiny_dir, bundle, tmp_path_factory):
    """An uninterrupted greedy run of the tiny Qwen2.5-VL on all six suites, one item per batch."""
    return evaluate(tiny_dir("qwen2.5-vl"), bundle, SIX, tmp_path_factory.mktemp("ref"), batch_size=1,
                    max_new_tokens=int(TOKENS))


def outputs(predictions: Path) -> dict[int, str]:
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    return {row["test_id"]: row["output"] for row in rows}


def cli(*args: str):
    return CliRunner().invoke(app, ["eval", *args], env={"COLUMNS": "160"})


def test_cli_end_to_end_writes_files_and_the_comparison_table(tiny_dir, bundle, tmp_path):
    out = tmp_path / "eval"
    result = cli("-m", str(tiny_dir("qwen2.5-vl")), "-d", str(bundle.parent), "-s", SIX, "-o", str(out),
                 "-b", "4", "--max-new-tokens", TOKENS)
    assert result.exit_code == 0, result.output + repr(result.exception)

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 13 and len({r["test_id"] for r in rows}) == 13
    assert set(rows[0]) >= {"question", "options", "gold", "gold_letter", "output", "letter", "method", "verdicts"}
    assert {r["dataset"] for r in rows} == set(N)
    assert any(r["images"][0].endswith("ct_small.dcm") for r in rows)  # the DICOM item was answered
    results = json.loads((out / "results.json").read_text())
    huatuo = results["scorers"]["huatuo"]
    assert {d: a["n"] for d, a in huatuo["datasets"].items()} == N
    assert huatuo["subsets"]["OmniMedVQA"]["X-Ray"]["n"] == 2
    assert huatuo["overall"]["n"] == 13 and results["counts"]["open_skipped"] == 1
    correct = sum(r["verdicts"]["huatuo"] for r in rows)
    assert huatuo["overall"]["correct"] == correct
    meta = results["meta"]
    assert (meta["generated"], meta["cached"], meta["family"], meta["decoding"]["do_sample"]) == (
        13, 0, "qwen2.5-vl", False)
    assert len((out / PARTIAL).read_text().splitlines()) == 13

    table = result.output
    for suite in SIX.split(","):
        assert suite in table
    # Published HuatuoGPT-Vision 7B / 34B numbers beside ours: VQA-RAD 63.7 / 68.1, PMC-VQA 54.3 / 58.2.
    vqa_rad = next(line for line in table.splitlines() if "vqa-rad" in line)
    ours = {k: 100 * results["scorers"][k]["datasets"]["VQA-RAD_test"]["acc"]
            for k in ("huatuo", "reader", "strict")}
    cells = [cell.strip() for cell in vqa_rad.split("│")[1:-1]]
    # suite, n, huatuo, reader, strict, gap, HGV-7B, HGV-34B, 7B rerun, LLaVA-Med-7B, LLaVA-v1.6-34B
    assert cells == ["vqa-rad", "3", f"{ours['huatuo']:.1f}", f"{ours['reader']:.1f}", f"{ours['strict']:.1f}",
                     f"{ours['huatuo'] - ours['reader']:+.1f}", "63.7", "68.1", "61.4", "51.4", "58.6"]
    assert 100 * results["scorer_gap"]["datasets"]["VQA-RAD_test"] == pytest.approx(ours["huatuo"] - ours["reader"])
    assert "54.3" in next(line for line in table.splitlines() if "pmc-vqa" in line)
    assert "mmmu-medical *" in table and "TEST-set" in table  # the caveat: published MMMU is the test split
    assert "X-Ray" in table and "overall (micro)" in table
    assert "13 answered, 0 from cache" in table

    again = cli("-m", str(tiny_dir("qwen2.5-vl")), "-d", str(bundle), "-s", SIX, "-o", str(out),
                "--max-new-tokens", TOKENS, "--json")
    assert again.exit_code == 0, again.output
    data = json.loads(again.stdout)  # progress lines go to stderr
    assert (data["meta"]["generated"], data["meta"]["cached"]) == (0, 13)
    assert data["scorers"]["huatuo"] == huatuo


def test_two_greedy_runs_give_identical_predictions(tiny_dir, bundle, reference, tmp_path):
    """Also across batch sizes: the reference ran one item per batch, this one 5 (left padding, length groups)."""
    run = evaluate(tiny_dir("qwen2.5-vl"), bundle, SIX, tmp_path, batch_size=5, max_new_tokens=int(TOKENS))
    assert run.generated == 13
    assert outputs(run.predictions) == outputs(reference.predictions)
    assert len(set(outputs(run.predictions).values())) >= 8  # not one degenerate answer repeated


class StopAfter(RecordingProgress):
    """Interrupts generation once `k` items have been answered (as Ctrl-C or a preempted job would)."""

    def __init__(self, k: int):
        super().__init__()
        self.k, self.answered = k, 0

    def advance(self, n: int = 1) -> None:
        super().advance(n)
        if self.tasks[-1][0] == "generating":
            self.answered += n
            if self.answered >= self.k:
                raise KeyboardInterrupt


def test_an_interrupted_run_resumes_where_it_stopped(tiny_dir, bundle, reference, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_dir("qwen2.5-vl"), bundle, SIX, tmp_path, batch_size=2, max_new_tokens=int(TOKENS),
                 progress=StopAfter(4))
    lines = [json.loads(line) for line in (tmp_path / PARTIAL).read_text().splitlines()]
    assert len(lines) == 4 and not (tmp_path / "predictions.jsonl").exists()
    progress = RecordingProgress()
    run = evaluate(tiny_dir("qwen2.5-vl"), bundle, SIX, tmp_path, batch_size=2, max_new_tokens=int(TOKENS),
                   progress=progress)
    assert (run.generated, run.cached) == (9, 4)
    assert ("generating", 9) in progress.tasks
    ids = [json.loads(line)["test_id"] for line in (tmp_path / PARTIAL).read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 13
    assert outputs(run.predictions) == outputs(reference.predictions)
    # Another decoding budget is another fingerprint: nothing stale is reused.
    other = evaluate(tiny_dir("qwen2.5-vl"), bundle, "vqa-rad", tmp_path, max_new_tokens=3)
    assert (other.generated, other.cached) == (3, 0)


def test_missing_and_unreadable_images_are_all_reported_before_any_generation(tiny_dir, bundle, tmp_path,
                                                                            monkeypatch):
    root = tmp_path / "broken"
    shutil.copytree(bundle.parent, root)
    (root / "images" / "img0.png").unlink()  # used by 2 items
    (root / "images" / "img7.png").unlink()
    (root / "images" / "img5.png").write_bytes(b"not a png")
    (root / "images" / "ct_small.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded or generation started before the images were checked")

    monkeypatch.setattr(Generator, "load", never)
    monkeypatch.setattr(Generator, "generate", never)
    with pytest.raises(MedvlError) as err:
        evaluate(tiny_dir("qwen2.5-vl"), root, "all", tmp_path / "out")
    what = err.value.what
    assert what.startswith("4 image(s) cannot be used (2 missing, 2 unreadable), needed by 6 of 13 items")
    for name in ("img0.png: missing (test_id 1, 10)", "img7.png: missing", "img5.png: unreadable",
                 "ct_small.dcm: unreadable"):
        assert name in what
    assert "extract images.zip" in err.value.fix and not (tmp_path / "out").exists()

    records = json.loads(bundle.read_text())[:2] * 15  # 30 items, each with its own missing image
    for i, record in enumerate(records):
        records[i] = {**record, "image": [f"images/gone{i}.png"]}
    many = tmp_path / "many.json"
    many.write_text(json.dumps(records))
    with pytest.raises(MedvlError) as err:
        evaluate(tiny_dir("qwen2.5-vl"), many, "vqa-rad", tmp_path / "out")
    assert err.value.what.count("gone") == 20 and err.value.what.endswith("... and 10 more")


def test_adapter_is_evaluated_unmerged_on_the_base_named_in_its_config(tiny_dir, bundle, reference, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from medvl.families import get_family
    from medvl.models import load_model

    base = tiny_dir("qwen2.5-vl")
    family = get_family("qwen2.5-vl")
    model = get_peft_model(load_model(base, family), LoraConfig(r=4, lora_alpha=8,
                                                                target_modules=family.lora_regex()))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (adapter = identity); give it an effect
                param.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "lora-run" / "final")
    assert json.loads((tmp_path / "lora-run" / "final" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(base)
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    shutil.copy(base / "chat_template.jinja", tmp_path / "merged")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        shutil.copy(base / name, tmp_path / "merged")

    result = cli("--adapter", str(tmp_path / "lora-run"), "-d", str(bundle), "-s", SIX, "-o",
                 str(tmp_path / "eval"), "--max-new-tokens", TOKENS)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"{base.name} + lora-run  (greedy decoding)" in result.output
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["meta"]["adapter"] == str(tmp_path / "lora-run" / "final")
    with_adapter = outputs(tmp_path / "eval" / "predictions.jsonl")
    base_outputs = outputs(reference.predictions)
    assert sum(with_adapter[t] != base_outputs[t] for t in base_outputs) >= 10  # the adapter is applied
    merged = evaluate(tmp_path / "merged", bundle, SIX, tmp_path / "eval-merged", max_new_tokens=int(TOKENS))
    assert outputs(merged.predictions) == with_adapter  # ... and applied correctly


def test_text_only_model_is_refused_unless_allowed(tiny_dir, bundle, tmp_path):
    with pytest.raises(MedvlError, match="text-only model") as err:
        evaluate(tiny_dir("causal-lm"), bundle, "slake", tmp_path)
    assert "--allow-text-only" in err.value.fix
    run = evaluate(tiny_dir("causal-lm"), bundle, "slake", tmp_path, allow_text_only=True, max_new_tokens=4)
    assert run.generated == 2
    notes = json.loads(run.results.read_text())["meta"]["notes"]
    assert notes == ["text-only model: the images of 2 items were not shown (blind baseline)"]


def test_unknown_suite_lists_the_valid_ones(tiny_dir, bundle, tmp_path):
    result = cli("-m", str(tiny_dir("qwen2.5-vl")), "-d", str(bundle), "-s", "vqa-rad,slak", "-o", str(tmp_path))
    assert isinstance(result.exception, MedvlError)
    assert "did you mean 'slake'" in result.exception.fix and "mmmu-medical" in result.exception.fix


def test_suite_completion_lists_names_and_continues_comma_lists():
    assert SUITE_NAMES == (*SUITES, "all")
    assert complete_suite("") == list(SUITE_NAMES)
    assert complete_suite("p") == ["pathvqa", "pmc-vqa"]
    assert complete_suite("vqa-rad,s") == ["vqa-rad,slake"]
    assert complete_suite("slake,vqa-rad,") == ["slake,vqa-rad,pathvqa", "slake,vqa-rad,pmc-vqa",
                                                "slake,vqa-rad,omnimedvqa", "slake,vqa-rad,mmmu-medical",
                                                "slake,vqa-rad,all"]


def test_suite_completion_through_the_console_script_imports_nothing_heavy():
    from .test_cli_startup import MEDVL, heavy_in, run

    if not MEDVL.exists():
        pytest.skip("console script not installed")
    proc, modules = run([], _MEDVL_COMPLETE="complete_bash", COMP_WORDS="medvl eval --suite vqa-rad,s",
                        COMP_CWORD="3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["vqa-rad,slake"]
    assert heavy_in(modules) == []
