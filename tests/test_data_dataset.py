"""Prepared data at training time: relative image paths, and prepared directories that are not whole."""

import json

from PIL import Image

from medvl.config import load_recipe
from medvl.data.prepare import prepare
from medvl.engine.train import train


def pubmedvision(folder, n=8):
    """A PubMedVision-shaped JSON (`image` list of `images/...` paths, no <image> tags) with its images."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        Image.new("RGB", (64, 48), (30 * i % 255, 90, 200)).save(folder / "images" / f"pmc_{i}_1.jpg")
        records.append({"image": [f"images/pmc_{i}_1.jpg"], "modality": "Computed Tomography", "body_part": "Chest",
                        "conversations": [{"from": "human", "value": "Please describe this picture."},
                                          {"from": "gpt", "value": f"An axial CT slice, number {i}."}]})
    path = folder / "PubMedVision_Alignment_VQA.json"
    path.write_text(json.dumps(records))
    return path


def test_train_reads_prepared_relative_image_paths(tiny_dir, tmp_path):
    """Issue 16.1: `root / p` with a str image_root crashed every real dataset at step 1."""
    raw = pubmedvision(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare([raw], out)
    rec = json.loads((out / "data-00000.jsonl").read_text().splitlines()[0])
    assert rec["images"] == ["images/pmc_0_1.jpg"] and rec["image_root"] == str((tmp_path / "raw").resolve())
    recipe = load_recipe("tiny_cpu", [f"model.base={tiny_dir('qwen2.5-vl')}", f"data.train=[{out}]",
                                      f"output.dir={tmp_path / 'run'}", "train.max_steps=1", "train.save_every=null",
                                      "train.eval_every=null", "data.val_fraction=null", "train.micro_batch_size=4"])
    res = train(recipe)
    assert res.steps == 1 and (tmp_path / "run" / "final" / "model.safetensors").is_file()
