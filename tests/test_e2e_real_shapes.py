"""End to end on raw data in the exact published shapes, as a new user runs it (issue 16).

One corpus folder holds every input format medvl reads, each with relative image paths as the real datasets
have them (PubMedVision's `images/...`, LLaVA-Med's `PMC.../...jpg`, ShareGPT4V's `coco/train2017/...`, an
InternVL meta with its own `root`, `../images` from a sibling folder). The commands run through the console
script from a working directory that is not the corpus's, with the corpus named by relative paths: prepare-data
(several files and folders at once, two outputs) -> train on both -> eval -> export, and the same training in 2
processes. The prepare test is the fast one; the chains are slow (console-script start-ups, ~40-60 s each).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

MEDVL = str(Path(sys.executable).parent / "medvl")
Q = "<image>\nWhat does the image show?"


def _img(path: Path, i: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48 + 8 * (i % 3), 40), ((37 * i) % 256, 90, 200 - 10 * (i % 7))).save(path)
    return path.name


def write_corpus(root: Path, n: int = 6) -> dict[str, Path]:
    """Every format, n samples each (InternVL: n, DISC/Alpaca text-only), relative image paths throughout."""
    files: dict[str, Path] = {}
    # PubMedVision (Alignment VQA): `image` is a list, no <image> tag, modality + body_part
    pmv = []
    for i in range(n):
        _img(root / "images" / f"pmc_{100 + i}_1.jpg", i)
        pmv.append({"image": [f"images/pmc_{100 + i}_1.jpg"], "modality": "Computed Tomography",
                    "body_part": "Chest", "conversations": [
                        {"from": "human", "value": "Please describe this picture."},
                        {"from": "gpt", "value": f"An axial CT of the chest, finding {i % 3}."}]})
    files["pubmedvision"] = root / "PubMedVision_Alignment_VQA.json"
    # LLaVA-Med instruct: `image` a str under a PMC folder, <image> tag in the first human turn, multi-turn
    llava_med = []
    for i in range(n):
        _img(root / "llava_med" / "PMC4512345" / f"fig{i}.jpg", i + 10)
        llava_med.append({"id": f"PMC4512345_fig{i}", "image": f"llava_med/PMC4512345/fig{i}.jpg", "conversations": [
            {"from": "human", "value": Q}, {"from": "gpt", "value": "A chest radiograph."},
            {"from": "human", "value": "Is there an effusion?"}, {"from": "gpt", "value": "No." if i % 2 else "Yes."}]})
    files["llava_med"] = root / "llava_med_instruct_10k.json"
    # ShareGPT4V: coco-style nested image folders
    sharegpt4v = []
    for i in range(n):
        _img(root / "coco" / "train2017" / f"{i:012d}.jpg", i + 20)
        sharegpt4v.append({"id": f"{i:012d}", "image": f"coco/train2017/{i:012d}.jpg", "conversations": [
            {"from": "human", "value": "What is in the image?\n<image>"},
            {"from": "gpt", "value": f"A detailed caption of picture {i}."}]})
    files["sharegpt4v"] = root / "sharegpt4v_instruct_gpt4-vision_cap100k.json"
    # Qwen-VL fine-tune README: JSONL with `images` (list) and one <image> per image
    qwen = []
    for i in range(n):
        _img(root / "qwen" / f"q{i}.png", i + 30)
        qwen.append({"images": [f"qwen/q{i}.png"], "conversations": [
            {"from": "human", "value": Q}, {"from": "gpt", "value": "An MRI of the knee."}]})
    files["qwen"] = root / "qwen_vl_sft.jsonl"
    # InternVL: meta JSON naming an annotation JSONL under its own root; width/height given
    (root / "internvl").mkdir()
    ann = []
    for i in range(n):
        _img(root / "internvl" / "imgs" / f"{i:04d}.jpg", i + 40)
        ann.append({"id": i, "image": f"{i:04d}.jpg", "width": 48, "height": 40, "conversations": [
            {"from": "human", "value": Q}, {"from": "gpt", "value": "An ultrasound image."}]})
    (root / "internvl" / "medical_vqa.jsonl").write_text("\n".join(json.dumps(a) for a in ann) + "\n")
    (root / "internvl_meta.json").write_text(json.dumps({"medical_vqa": {
        "root": "internvl/imgs/", "annotation": "internvl/medical_vqa.jsonl", "data_augment": False,
        "repeat_time": 1, "length": n}}))
    files["internvl"] = root / "internvl_meta.json"
    # OpenAI messages with image blocks (a relative path and a file:// URL inside the corpus)
    openai = []
    for i in range(n):
        name = _img(root / "openai" / f"o{i}.png", i + 50)
        ref = {"type": "image", "image": f"openai/{name}"} if i % 2 else {
            "type": "image_url", "image_url": {"url": f"file://{root / 'openai' / name}"}}
        openai.append({"messages": [{"role": "user", "content": [ref, {"type": "text", "text": "Describe it."}]},
                                    {"role": "assistant", "content": "A dermatology photo."}]})
    files["openai"] = root / "openai_messages.jsonl"
    # DISC-MedLLM: text-only JSONL; Alpaca: text-only JSON
    disc = [{"_id": f"01-{9000 + i}", "source": "meddial", "conversation": [
        {"role": "user", "content": f"I have had a cough for {i + 2} days."},
        {"role": "assistant", "content": "Do you have a fever?"}]} for i in range(n)]
    files["disc"] = root / "disc_med_sft.jsonl"
    alpaca = [{"instruction": "Classify the department.", "input": f"chest pain {i}", "output": "cardiology"}
              for i in range(n)]
    files["alpaca"] = root / "alpaca_med.json"
    # LLM-Finetune JSON: the path between vision tokens
    llmft = []
    for i in range(n):
        _img(root / "coco2014" / f"c{i}.jpg", i + 60)
        llmft.append({"id": f"identity_{i}", "conversations": [
            {"from": "user", "value": f"COCO Yes: <|vision_start|>coco2014/c{i}.jpg<|vision_end|>"},
            {"from": "assistant", "value": "A man riding a bike."}]})
    files["llm_finetune"] = root / "data_vl.json"
    for key, data in (("pubmedvision", pmv), ("llava_med", llava_med), ("sharegpt4v", sharegpt4v),
                      ("alpaca", alpaca), ("llm_finetune", llmft)):
        files[key].write_text(json.dumps(data, ensure_ascii=False))
    for key, data in (("qwen", qwen), ("openai", openai), ("disc", disc)):
        files[key].write_text("\n".join(json.dumps(d) for d in data) + "\n")
    # a CSV read through --columns (a table of report findings -> impressions with an image column)
    tables = root / "tables"
    tables.mkdir()
    with open(tables / "reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "findings", "impression", "file"])
        for i in range(n):
            _img(tables / "img" / f"r{i}.png", i + 70)
            w.writerow([f"case{i}", "Findings: clear lungs.", "Impression: normal.", f"img/r{i}.png"])
    (tables / "README.md").write_text("reports table")
    files["csv"] = tables
    # a second folder: LLM-Finetune's CSV (absolute image paths, inside the corpus), evaluation-shaped training
    # items (question / options / answer), and Ovis (ignored_gpt turns)
    second = root / "second"
    second.mkdir()
    with open(second / "coco-2024-dataset.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "caption"])
        for i in range(n):
            w.writerow([str(root / "coco2014" / f"c{i}.jpg"), f"A person walking a dog, take {i}."])
    medeval = [{"question": "Which modality?", "options": ["CT", "MRI", "X-ray"], "answer": ["CT", "MRI", "X-ray"][i % 3],
                "image": [f"../images/pmc_{100 + i}_1.jpg"], "dataset": "train-mcq"} for i in range(n)]
    (second / "mcq_train.json").write_text(json.dumps(medeval))
    ovis = [{"id": 1000 + i, "image": f"../qwen/q{i}.png", "conversations": [
        {"from": "human", "value": Q}, {"from": "ignored_gpt", "value": "Let me look."},
        {"from": "human", "value": "And?"}, {"from": "gpt", "value": "A knee MRI."}]} for i in range(n)]
    (second / "ovis_sft.json").write_text(json.dumps(ovis))
    files["second"] = second
    # the evaluation bundle in the published shape, images relative to it
    bundle = root / "eval"
    items = []
    for i in range(4):
        _img(bundle / "images" / f"e{i}.png", i + 80)
        items.append({"question": "Is this a CT?", "options": ["yes", "no"], "answer": "yes" if i % 2 else "no",
                      "image": [f"images/e{i}.png"], "dataset": "VQA-RAD_test"})
    (bundle / "medical_multimodel_evaluation_data.json").write_text(json.dumps(items))
    files["bundle"] = bundle
    return files


def run(cwd: Path, *args, timeout: int = 600) -> str:
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([MEDVL, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, f"medvl {' '.join(map(str, args))}\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    files = write_corpus(base / "corpus")
    work = base / "work"  # the user's shell is here, not in the corpus
    work.mkdir()
    return base, files, work


def rel(path: Path, cwd: Path) -> str:
    return os.path.relpath(path, cwd)


@pytest.fixture(scope="module")
def prepared(corpus, tiny_dir):
    base, files, work = corpus
    tiny = tiny_dir("qwen2.5-vl")
    inputs = [rel(files[k], work) for k in ("pubmedvision", "llava_med", "sharegpt4v", "qwen", "internvl", "openai",
                                             "disc", "alpaca", "llm_finetune", "csv")]
    out = run(work, "prepare-data", *inputs, "--out", "prepared", "--model", tiny, "--max-seq-len", "256",
              "--columns", "user=findings,assistant=impression,image=file,id=case")
    manifest = json.loads((work / "prepared" / "manifest.json").read_text())
    # `../images` leaves the second folder: allowed by naming the corpus folder
    run(work, "prepare-data", rel(files["second"], work), "--out", "prepared2", "--model", tiny,
        "--image-root", rel(files["pubmedvision"].parent, work))
    return work / "prepared", manifest, out


def test_prepare_data_reads_every_format_with_relative_paths(prepared, corpus):
    out_dir, manifest, output = prepared
    # 10 sources x 6 samples, nothing lost: every relative path resolved against its own file's folder
    assert manifest["inputs"] == 60 and manifest["accepted"] == 60, json.dumps(manifest["rejected"])
    assert set(manifest["sources"]) == {
        "PubMedVision_Alignment_VQA", "llava_med_instruct_10k", "sharegpt4v_instruct_gpt4-vision_cap100k",
        "qwen_vl_sft", "medical_vqa", "openai_messages", "disc_med_sft", "alpaca_med", "data_vl", "reports"}
    assert manifest["images"] == 48  # 8 image sources x 6
    assert all(f["error"] is None and f["kept"] == 6 for f in manifest["files"])
    assert any("README.md" in s["path"] and "not a data file" in s["reason"] for s in manifest["skipped_files"])
    assert "skipped" in output and "README.md" in output
    records = [json.loads(line) for p in sorted(out_dir.glob("data-*.jsonl")) for line in open(p)]
    by_source = {}
    for r in records:
        by_source.setdefault(r["source"], r)  # the first of each source
    corpus_dir = corpus[1]["pubmedvision"].parent
    assert by_source["PubMedVision_Alignment_VQA"]["images"] == ["images/pmc_100_1.jpg"]
    assert by_source["PubMedVision_Alignment_VQA"]["image_root"] == str(corpus_dir.resolve())
    assert by_source["medical_vqa"]["image_root"] == str((corpus_dir / "internvl" / "imgs").resolve())
    assert by_source["reports"]["messages"][0]["content"].startswith("<image>\n")
    assert all(r["meta"]["n_tokens"] > 0 for r in records)
    second = json.loads((out_dir.parent / "prepared2" / "manifest.json").read_text())
    assert second["accepted"] == 18 and second["sources"].keys() == {"coco-2024-dataset", "mcq_train", "ovis_sft"}


def _train_args(tiny, data, out, *extra):
    return ["train", "tiny_cpu", f"model.base={tiny}", f"data.train=[{data}]", f"output.dir={out}",
            "train.max_steps=4", "train.save_every=null", "train.eval_every=null", "data.val_fraction=null",
            "train.micro_batch_size=4", "train.log_every=1", "optim.warmup_steps=1", *extra]


@pytest.mark.slow  # ~40 s of console-script start-ups; tests/test_data_dataset.py has the fast train check
def test_train_eval_export_on_the_prepared_corpus(prepared, corpus, tiny_dir):
    base, files, work = corpus
    data = f"{rel(prepared[0], work)},prepared2"  # two prepared folders at once
    run(work, *_train_args(tiny_dir("qwen2.5-vl"), data, "run"))
    events = [json.loads(line) for line in open(work / "run" / "metrics.jsonl")]
    steps = [e for e in events if e["kind"] == "train"]
    assert len(steps) == 4 and all(e["tokens"] > 0 for e in steps)
    assert (work / "run" / "final" / "model.safetensors").is_file()
    out = run(work, "eval", "-m", "run/final", "-d", rel(files["bundle"], work), "-s", "vqa-rad", "-o", "eval",
              "--max-new-tokens", "4", "-b", "4")
    results = json.loads((work / "eval" / "results.json").read_text())
    assert "VQA-RAD" in out or "vqa-rad" in out
    assert sum(1 for _ in open(work / "eval" / "predictions.jsonl")) == 4 and results
    run(work, "export", "run", "--out", "exported", "--dtype", "fp32")
    assert (work / "exported" / "config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in (work / "exported").iterdir())


@pytest.mark.slow
def test_two_process_training_on_the_prepared_corpus(prepared, corpus, tiny_dir):
    base, files, work = corpus
    run(work, *_train_args(tiny_dir("qwen2.5-vl"), rel(prepared[0], work), "run2", "distributed.nproc=2",
                           "train.micro_batch_size=2"))
    events = [json.loads(line) for line in open(work / "run2" / "metrics.jsonl")]
    start = next(e for e in events if e["kind"] == "start")
    assert start["world_size"] == 2 and start["distributed"] == "MULTI_CPU"
    assert len([e for e in events if e["kind"] == "train"]) == 4
    assert (work / "run2" / "final" / "model.safetensors").is_file()
