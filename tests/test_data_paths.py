"""The root rule for paths that come from data (medvl/data/paths.py), and the places that use it: prepare-data
(tests/test_prepare_corrupt.py), train (tests/test_data_dataset.py) and eval (here; issue 9.2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from medvl.data.paths import PathOutsideRoots, allowed_path, path_problem
from medvl.errors import MedvlError
from medvl.evaluate.suites import load_suites


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    for p in ("data/images/a.png", "outside/secret.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / p)
    return tmp_path


def test_relative_and_absolute_paths_inside_the_base_are_allowed(tree):
    base = tree / "data"
    assert allowed_path("images/a.png", base=base) == str(base / "images" / "a.png")
    assert allowed_path(str(base / "images" / "a.png"), base=base) == str(base / "images" / "a.png")
    assert allowed_path("images/./x/../a.png", base=base) == str(base / "images" / "a.png")


@pytest.mark.parametrize("path", ["../outside/secret.png", "images/../../outside/secret.png", "/etc/passwd"])
def test_paths_leaving_the_base_are_refused_with_the_fix(tree, path):
    with pytest.raises(PathOutsideRoots) as err:
        allowed_path(path, base=tree / "data", where="bundle.json")
    assert isinstance(err.value, MedvlError) and "add --image-root " in err.value.fix
    assert err.value.where == "bundle.json"


def test_an_image_root_allows_its_folder_and_symlinks_are_followed(tree):
    base, outside = tree / "data", tree / "outside"
    assert path_problem(str(outside / "secret.png"), base=base, roots=[outside]) is None
    os.symlink(outside / "secret.png", base / "images" / "link.png")
    problem = path_problem("images/link.png", base=base)
    assert "through a symbolic link" in problem and f"--image-root {outside}" in problem
    assert path_problem("images/link.png", base=base, lexical=True) is None  # the cheap pass cannot see links
    assert path_problem("images/link.png", base=base, roots=[outside]) is None


def _bundle(tree, image):
    path = tree / "data" / "medical_multimodel_evaluation_data.json"
    path.write_text(json.dumps([{"question": "Q?", "options": ["A", "B"], "answer": "A", "dataset": "VQA-RAD_test",
                                 "image": ["images/a.png"]},
                                {"question": "Q2?", "options": ["A", "B"], "answer": "B", "dataset": "VQA-RAD_test",
                                 "image": [image]}]))
    return path


def test_eval_refuses_bundle_images_outside_its_folder(tree):
    """Issue 9.2: `../outside/secret.png` in a bundle's image field was read."""
    bundle = _bundle(tree, "../outside/secret.png")
    with pytest.raises(MedvlError) as err:
        load_suites(bundle, "all")
    assert "1 image path(s) lead outside the bundle's folder" in err.value.what and "test_id 2" in err.value.what
    assert "--image-root" in err.value.fix
    items = load_suites(bundle, "all", image_roots=[tree / "outside"]).items
    assert items[1].images == (str(tree / "outside" / "secret.png"),)


def test_eval_cli_refuses_the_escape_before_loading_anything(tree, tiny_dir):
    bundle = _bundle(tree, "../outside/secret.png")
    medvl = str(Path(sys.executable).parent / "medvl")
    args = [medvl, "eval", "-m", str(tiny_dir("qwen2.5-vl")), "-d", str(bundle), "-o", str(tree / "out")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "300"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out and "outside the bundle" in out, out
    assert not (tree / "out").exists()
    (tree / "taken").write_text("x")
    proc = subprocess.run(args[:-1] + [str(tree / "taken")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stdout + proc.stderr


def test_within_compares_whole_path_components():
    from medvl.data.paths import within

    assert within("/data/pmv", "/data/pmv") and within("/data/pmv/images/1.png", "/data/pmv")
    assert not within("/data/pmv2/1.png", "/data/pmv") and not within("/data", "/data/pmv")
    assert within("/etc/passwd", "/") and not within("/data/pm", "/data/pmv")
