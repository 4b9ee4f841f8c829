"""The demo: the whole recipe on a laptop CPU, offline, in a few minutes, and proof that the model learned.

    build a tiny Qwen2.5-VL -> write raw data in the published evaluation shape -> prepare-data -> train ->
    eval on held-out questions -> accuracy next to the majority-answer baseline

Data, all shipped inside installed packages:
- easy-vqa (64x64 shapes): "what color is the shape?", "does the image contain a circle?", ... as multiple
  choice over the colours (8), the shapes (3) or yes/no.
- pydicom's test files as medical images: "Which imaging modality produced this image?" CT / MR / US,
  decoded through medvl's DICOM path (rescale, window, MONOCHROME1). Train and test use different files.

Figures on the 2-core reference machine: 300 steps of global batch 8 take ~20 s of training; a tiny model
reaches ~65 % held-out accuracy against ~35 % for always giving the most common training answer.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

COLOURS = ["red", "green", "blue", "yellow", "teal", "gray", "black", "brown"]
SHAPES = ["circle", "rectangle", "triangle"]
MODALITIES = ["CT", "MR", "US"]
MODALITY_QUESTIONS = ["Which imaging modality produced this image?", "What kind of scan is this?",
                      "Name the imaging modality of this picture."]


@dataclass
class DemoResult:
    out_dir: Path
    train_samples: int
    test_items: int
    steps: int
    train_seconds: float
    accuracy: dict[str, tuple[float, int]]  # dataset -> (accuracy, n); "overall" too
    baseline: dict[str, float]  # dataset -> majority-answer accuracy
    majority_answer: str
    loss_first: float
    loss_last: float
    notes: list[str] = field(default_factory=list)
    chat_command: str = ""  # the exact `medvl chat` line that talks to the model this demo trained


def chat_command(run_dir: Path, images: Path) -> str:
    """`medvl chat RUN --image IMG` on a held-out CT slice (the model never saw it), else any held-out image."""
    import shlex

    held_out = sorted(images.glob("CT-*.dcm")) or sorted(images.iterdir())
    image = f" --image {shlex.quote(str(held_out[0]))}" if held_out else ""
    return f"medvl chat {shlex.quote(str(run_dir))}{image}"


def _options(answer: str) -> tuple[list[str], str]:
    if answer in COLOURS:
        return COLOURS, "colour"
    if answer in SHAPES:
        return SHAPES, "shape"
    return ["yes", "no"], "yes/no"


def _dicom_files() -> dict[str, list[str]]:
    """pydicom's bundled images by modality (only files that ship in the wheel; no download)."""
    import warnings

    import pydicom
    from pydicom.data import get_testdata_file

    root = Path(get_testdata_file("CT_small.dcm")).parent
    found: dict[str, list[str]] = {m: [] for m in MODALITIES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.suffix not in ("", ".dcm"):
                continue
            try:  # one read: only the two tags decided on here
                ds = pydicom.dcmread(path, specific_tags=["Modality", "PixelData"])
            except Exception:
                continue
            modality = str(ds.get("Modality", ""))
            if modality in found and "PixelData" in ds:
                found[modality].append(str(path))
    return found


def write_raw_data(raw: Path, *, train_samples: int, test_samples: int, seed: int = 0) -> tuple[Path, Path]:
    """(train JSON, test bundle JSON), both in the published medical-evaluation shape."""
    import easy_vqa

    from medvl.data.images import load_image

    rng = random.Random(seed)
    (raw / "test" / "images").mkdir(parents=True, exist_ok=True)
    q, a, ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    train = []
    for i in rng.sample(range(len(q)), train_samples):
        opts, kind = _options(a[i])
        train.append({"question": q[i], "options": opts, "answer": a[i], "image": [paths[ids[i]]],
                      "dataset": "easy-vqa", "subset": kind})
    tq, ta, tids = easy_vqa.get_test_questions()
    tpaths = easy_vqa.get_test_image_paths()
    test = []
    for i in rng.sample(range(len(tq)), test_samples):
        opts, kind = _options(ta[i])
        dst = raw / "test" / "images" / Path(tpaths[tids[i]]).name
        if not dst.exists():
            shutil.copyfile(tpaths[tids[i]], dst)
        test.append({"question": tq[i], "options": opts, "answer": ta[i], "image": [f"images/{dst.name}"],
                     "dataset": "easy-vqa", "subset": kind})
    # DICOM: every third file of each modality is held out; the rest train, each under every phrasing and
    # repeated so that the modality task is not drowned by easy-vqa.
    for modality, files in _dicom_files().items():
        for j, path in enumerate(files):
            try:
                load_image(path)
            except Exception:  # a codec pydicom lacks here (JPEG-LS, ...): not usable for the demo
                continue
            if j % 3 == 2:
                dst = raw / "test" / "images" / f"{modality}-{j}.dcm"
                shutil.copyfile(path, dst)
                test.append({"question": MODALITY_QUESTIONS[j % 3], "options": MODALITIES, "answer": modality,
                             "image": [f"images/{dst.name}"], "dataset": "dicom-modality", "subset": modality})
            else:
                for _ in range(4):
                    for question in MODALITY_QUESTIONS:
                        train.append({"question": question, "options": MODALITIES, "answer": modality,
                                      "image": [path], "dataset": "dicom-modality", "subset": modality})
    rng.shuffle(train)
    train_path, test_path = raw / "train.json", raw / "test" / "medical_multimodel_evaluation_data.json"
    train_path.write_text(json.dumps(train))
    test_path.write_text(json.dumps(test, indent=1))
    return train_path, test_path


def _image_folders(train_path: Path) -> list[str]:
    """The package folders the training images live in (easy-vqa, pydicom): the root rule allows only these."""
    images = {Path(p).parent for r in json.loads(train_path.read_text()) for p in r["image"]}
    return sorted(str(f) for f in images if not any(g in f.parents for g in images))  # the top-most ones


def majority_baseline(train_path: Path, test_path: Path) -> tuple[str, dict[str, float]]:
    """Accuracy of always giving the most common training answer."""
    train = json.loads(train_path.read_text())
    top = Counter(r["answer"] for r in train).most_common(1)[0][0]
    test = json.loads(test_path.read_text())
    out: dict[str, list[int]] = {}
    for r in test:
        for key in (r["dataset"], "overall"):
            out.setdefault(key, []).append(int(r["answer"] == top))
    return top, {k: sum(v) / len(v) for k, v in out.items()}


def run_demo(out: str | Path = "demo-out", *, train_samples: int = 2400, test_samples: int = 400,
             steps: int = 300, sinks=(), progress=None) -> DemoResult:
    import time

    from medvl.config import load_recipe
    from medvl.data.prepare import prepare
    from medvl.engine.train import train
    from medvl.evaluate.run import evaluate
    from medvl.tiny import build_tiny

    out = Path(out)
    if out.exists() and not out.is_dir():
        from medvl.errors import MedvlError

        raise MedvlError(f"--out {out} is a file, not a folder", where=str(out),
                         fix="give a folder for everything the demo makes (it is created when missing)")
    raw = out / "raw"
    shutil.rmtree(raw, ignore_errors=True)
    train_path, test_path = write_raw_data(raw, train_samples=train_samples, test_samples=test_samples)
    tiny = out / "tiny-qwen2.5-vl"
    build_tiny("qwen2.5-vl", tiny, overwrite=True)
    recipe = load_recipe("tiny_cpu", [f"model.base={tiny}", f"data.train=[{out / 'data'}]",
                                      f"output.dir={out / 'run'}", f"train.max_steps={steps}",
                                      "output.overwrite=true"])  # the demo rebuilds all of demo-out/
    lo, hi = recipe.data.pixel_range
    prepared = prepare([train_path], out / "data", model=str(tiny), max_seq_len=recipe.data.max_seq_len,
                       min_pixels=lo, max_pixels=hi, overwrite=True, progress=progress,
                       image_root=_image_folders(train_path))
    t0 = time.perf_counter()
    run = train(recipe, sinks=sinks)
    seconds = time.perf_counter() - t0
    result = evaluate(run.final_dir, test_path, "all", out / "eval", batch_size=32, max_new_tokens=8,
                      progress=progress)
    scores = result.scores.results["huatuo"]
    accuracy = {name: (acc.acc, acc.n) for name, acc in scores.datasets.items()}
    accuracy["overall"] = (scores.overall.acc, scores.overall.n)
    top, baseline = majority_baseline(train_path, test_path)
    return DemoResult(out, prepared.manifest["accepted"], scores.overall.n, run.steps, round(seconds, 1), accuracy,
                      baseline, top, run.losses[0], sum(run.losses[-10:]) / len(run.losses[-10:]),
                      chat_command=chat_command(run.run_dir, raw / "test" / "images"))
