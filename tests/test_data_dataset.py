"""Prepared data at training time: relative image paths, and prepared directories that are not whole."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from medvl.config import load_recipe
from medvl.data.dataset import index_prepared
from medvl.data.prepare import prepare
from medvl.engine.train import train
from medvl.errors import MedvlError


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


# ---------------------------------------------------------------------------------------------------------
# prepared data that is not whole: refused before step 1 (issue 16, issue 9.11)

@pytest.fixture
def prepared(tmp_path):
    raw = pubmedvision(tmp_path / "raw", n=12)
    out = tmp_path / "prepared"
    prepare([raw], out, shard_size=4)
    return out


def _refused(out, *fragments):
    with pytest.raises(MedvlError) as err:
        index_prepared([out])
    for f in fragments:
        assert f in str(err.value), str(err.value)
    return err.value


def test_complete_prepared_data_indexes(prepared):
    index = index_prepared([prepared])
    assert len(index) == 12 and len(index.shards) == 3
    assert index.image_paths(0, index.read(0))[0].startswith(str(prepared.parent / "raw" / "images"))


def test_interrupted_prepare_no_manifest_is_refused(prepared):
    (prepared / "manifest.json").unlink()
    _refused(prepared, "incomplete: no manifest.json", "run the same prepare-data command again")


def test_raw_data_given_as_prepared_data_suggests_a_new_output_folder(tmp_path):
    from medvl.data.dataset import verify_prepared
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "llava.json").write_text("[]")
    with pytest.raises(MedvlError, match="is a file") as info:
        verify_prepared(raw / "llava.json")
    fix = info.value.fix
    assert f"`medvl prepare-data {raw / 'llava.json'} --out {raw / 'llava'}`" in fix  # never --out the raw file
    assert "--out " + str(raw / "llava.json") not in fix
    assert "data.train in the recipe, or `medvl inspect-data" in fix  # fits both train and inspect-data
    with pytest.raises(MedvlError, match="no prepared data") as info:
        verify_prepared(raw)  # a folder of raw data: prepared next to it, not into it
    assert f"--out {tmp_path / 'raw-prepared'}`" in info.value.fix


def test_missing_or_extra_shard_is_refused(prepared, tmp_path):
    moved = tmp_path / "moved.jsonl"
    (prepared / "data-00001.jsonl").rename(moved)
    _refused(prepared, "1 shard(s) listed in manifest.json are missing", "data-00001.jsonl")
    moved.rename(prepared / "data-00001.jsonl")
    (prepared / "data-00007.jsonl").write_text((prepared / "data-00000.jsonl").read_text())
    _refused(prepared, "data-00007.jsonl is not in manifest.json")


def test_truncated_or_edited_shard_is_refused(prepared):
    shard = prepared / "data-00002.jsonl"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 30])  # a cut last line
    err = _refused(prepared, "not valid JSON", "truncated or corrupt")
    assert "data-00002.jsonl:4" in err.where
    shard.write_bytes(data.replace(b"number", b"NUMBER"))
    _refused(prepared, "data-00002.jsonl does not match manifest.json (different content", "changed after")
    shard.write_bytes(data.split(b"\n", 1)[1])  # one whole line gone: still valid JSON
    _refused(prepared, "(3 records; the manifest says 4 records")


def test_corrupt_manifest_is_refused(prepared):
    (prepared / "manifest.json").write_text('{"version": 2, "shard_files": [')
    _refused(prepared, "manifest.json is corrupt")
    (prepared / "manifest.json").write_text('{"version": 1, "accepted": 12}')
    _refused(prepared, "no valid shard list")


def test_train_refuses_broken_prepared_data_before_step_one(tiny_dir, prepared, tmp_path):
    (prepared / "manifest.json").write_text("not json")
    recipe = load_recipe("tiny_cpu", [f"model.base={tiny_dir('qwen2.5-vl')}", f"data.train=[{prepared}]",
                                      f"output.dir={tmp_path / 'run'}", "train.max_steps=2", "train.save_every=null",
                                      "train.eval_every=null", "data.val_fraction=null", "train.micro_batch_size=4"])
    with pytest.raises(MedvlError, match="manifest.json is corrupt"):
        train(recipe)
    assert not (tmp_path / "run").exists()  # refused before the model loads: no run folder, no step


def test_inspect_data_on_a_truncated_shard_is_a_clear_error(prepared, tiny_dir):
    shard = prepared / "data-00000.jsonl"
    shard.write_bytes(shard.read_bytes()[:-25])
    proc = subprocess.run([str(Path(sys.executable).parent / "medvl"), "inspect-data", str(prepared), "--model",
                           str(tiny_dir("qwen2.5-vl"))], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out and "truncated or corrupt" in out, out


def test_train_rechecks_image_paths_against_the_manifest_roots(prepared, tmp_path):
    """A shard edited to point at a file outside the manifest's image folders is refused at load; one that
    links out through a symlink is refused when the image is opened."""
    shard = prepared / "data-00000.jsonl"
    lines = shard.read_text().splitlines()
    rec = json.loads(lines[0])
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    rec["images"] = [str(secret)]
    shard.write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    _reseal(prepared)
    _refused(prepared, "outside the prepared data's image folders", str(secret))
    rec["images"] = ["images/link.png"]
    (tmp_path / "raw" / "images" / "link.png").symlink_to(secret)
    shard.write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    _reseal(prepared)
    index = index_prepared([prepared])  # lexically inside: loads
    with pytest.raises(MedvlError, match="through a symbolic link"):
        index.image_paths(0, index.read(0))


def _reseal(out):
    from .conftest import write_manifest

    roots = json.loads((out / "manifest.json").read_text())["image_roots"]
    write_manifest(out, image_roots=roots)


def test_launched_train_refuses_broken_prepared_data_before_launching(tiny_dir, prepared, tmp_path):
    (prepared / "manifest.json").unlink()
    proc = subprocess.run([str(Path(sys.executable).parent / "medvl"), "train", "tiny_cpu",
                           f"model.base={tiny_dir('causal-lm')}", f"data.train=[{prepared}]",
                           f"output.dir={tmp_path / 'run'}", "distributed.nproc=2", "train.max_steps=1"],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out and "no manifest.json" in out, out
    assert not (tmp_path / "run").exists()
