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


# ------------------------------------------------------------------- the cached real path (issue 15 item 0)


@pytest.fixture
def links(tree):
    """data/images/{a.png, link.png -> outside/secret.png, chain.png -> link.png, inside.png -> a.png},
    data/out -> outside (a linked sub-folder), data/ok -> data/images (a linked sub-folder inside), and a link to
    the data folder itself (an allowed folder reached through a link)."""
    img, outside = tree / "data" / "images", tree / "outside"
    os.symlink(outside / "secret.png", img / "link.png")
    os.symlink(img / "link.png", img / "chain.png")
    os.symlink(img / "a.png", img / "inside.png")
    os.symlink(outside, tree / "data" / "out")
    os.symlink(img, tree / "data" / "ok")
    os.symlink(tree / "data", tree / "data-link")
    return tree


def test_the_cached_real_path_is_realpath(links):
    from medvl.data.paths import _real_path, resolve_data_path

    data = links / "data"
    cases = ["images/a.png", "images/link.png", "images/chain.png", "images/inside.png", "out/secret.png",
             "ok/a.png", "ok/link.png", "images/gone.png", "gone/x.png", "images/a.png/x", "images", "out", "/",
             str(links / "data-link" / "images" / "a.png"), str(links / "data-link" / "out" / "secret.png")]
    for _ in range(2):  # the second round answers from the folder cache
        for p in cases:
            full = resolve_data_path(p, data)
            assert _real_path(full) == os.path.realpath(full), p


def test_linked_files_and_folders_pointing_outside_are_refused_cache_or_not(links):
    from medvl.data.paths import allowed_resolved_path, resolve_data_path

    data, outside = links / "data", links / "outside"
    roots = (str(data),)

    def check(p):
        full = resolve_data_path(p, data)
        try:
            got = allowed_resolved_path(full, roots=roots, where="shard")
        except PathOutsideRoots as e:
            got = e
        try:
            want = allowed_path(full, base=None, roots=roots, where="shard")  # the uncached rule's answer
        except PathOutsideRoots as e:
            want = e
        if isinstance(want, PathOutsideRoots):
            assert isinstance(got, PathOutsideRoots) and (got.what, got.fix, got.where) == (want.what, want.fix,
                                                                                            want.where), p
        else:
            assert got == want == full, p
        return got

    for _ in range(2):  # again once the folders are cached
        assert check("images/a.png") == str(data / "images" / "a.png")
        assert check("images/inside.png") == str(data / "images" / "inside.png")
        assert check("ok/a.png") == str(data / "ok" / "a.png")  # a linked sub-folder that stays inside
        for p in ("images/link.png", "images/chain.png", "out/secret.png", "ok/link.png"):
            err = check(p)
            assert isinstance(err, PathOutsideRoots) and f"resolves to {outside / 'secret.png'}" in err.what, p
            assert "through a symbolic link" in err.what and err.fix.endswith(f"add --image-root {outside}"), p
        # the same folder reached through another name is refused by the lexical rule, as before
        assert isinstance(check(str(links / "data-link" / "images" / "a.png")), PathOutsideRoots)
    # a file checked (its folder now cached) and then replaced by a link pointing outside: refused
    b = data / "images" / "b.png"
    Image.new("RGB", (8, 8)).save(b)
    assert check("images/b.png") == str(b)
    b.unlink()
    os.symlink(outside / "secret.png", b)
    assert isinstance(check("images/b.png"), PathOutsideRoots)
    # an allowed folder given through a link: its images are inside, its linked-out sub-folder is not
    linked = links / "data-link"
    a = str(linked / "images" / "a.png")
    assert allowed_resolved_path(a, roots=(str(linked),)) == a
    with pytest.raises(PathOutsideRoots, match="through a symbolic link"):
        allowed_resolved_path(str(linked / "out" / "secret.png"), roots=(str(linked),))


def test_a_missing_image_passes_the_check_and_the_open_reports_it(tree):
    from medvl.data.paths import allowed_resolved_path

    gone = str(tree / "data" / "images" / "gone.png")
    assert allowed_resolved_path(gone, roots=(str(tree / "data"),)) == gone
    assert path_problem("images/gone.png", base=tree / "data") is None
