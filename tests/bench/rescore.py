"""Seconds to re-score a full-size published eval.py output file with `medvl score`, and proof that no heavy
module (torch, transformers, numpy, ...) is imported on the way.

The file is synthetic, in the published shape: 17,303 records with the bundle's datasets, subsets and sizes
(reference notes, upstreams.md 1.3), 5 open questions, accelerate's padding duplicates (8 processes: the last
shard repeats 1 record), one record whose gold is not among its options, and model outputs in the styles real
models produce (bare letters, "B. text", lowercase letters, option text alone or in a sentence, explanations,
"A or B", refusals) at fixed rates, each answer right with the published HuatuoGPT-Vision-7B rate of its
dataset. Exit status 1 if re-scoring takes longer than --target seconds or imports a heavy module.

    python -m tests.bench.rescore [--target 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "transformers", "accelerate", "peft", "deepspeed", "numpy", "textual")
# dataset -> (n, subsets {name: n} or None, option count, published 7B accuracy %)
DATASETS = {
    "OmniMedVQA": (11124, {"MR (Mag-netic Resonance Imaging)": 4040, "CT(Computed Tomography)": 1991,
                           "ultrasound": 1354, "X-Ray": 1019, "Dermoscopy": 796, "Microscopy Images": 728,
                           "Fundus Photography": 626, "OCT (Optical Coherence Tomography": 570}, 4, 74.0),
    "PathVQA_test": (3362, None, 2, 57.9),
    "PMC-VQA_test": (2000, None, 4, 54.3),
    "SLAKE_test": (416, None, 2, 76.2),
    "VQA-RAD_test": (251, None, 2, 63.7),
    "MMMU_Medical_Validation": (145, {"validation_Basic_Medical_Science": 28, "validation_Clinical_Medicine": 30,
                                      "validation_Diagnostics_and_Laboratory_Medicine": 30,
                                      "validation_Pharmacy": 27, "validation_Public_Health": 30}, 5, 50.6),
}  # fmt: skip
TERMS = ("Pneumonia", "Pleural effusion", "Cardiomegaly", "Normal", "Glioma", "Meningioma", "Cyst", "Hemorrhage",
         "Fracture", "Melanoma", "Nevus", "Diabetic retinopathy", "Glaucoma", "B-cell lymphoma", "Hepatitis B",
         "Vitamin C deficiency", "Adenocarcinoma", "Tuberculosis", "Atelectasis", "Edema")  # fmt: skip
# (style, weight): how the simulated model phrases an answer naming option `x` (letter L, text T); `other` is
# another option. Weights sum to 100.
STYLES = (("L", 58), ("L. T", 12), ("l", 5), ("T", 6), ("sentence", 4), ("answer is L", 4), ("it's l", 2),
          ("(L)", 2), ("explained", 3), ("L or other", 2), ("refusal", 1), ("L. other-text", 1))


def _say(style: str, rng: random.Random, options: list[str], pick: int) -> str:
    letter, text = "ABCDEFGHIJK"[pick], options[pick]
    other = rng.choice([i for i in range(len(options)) if i != pick])
    return {
        "L": letter, "L. T": f"{letter}. {text}", "l": letter.lower(), "T": text, "(L)": f"({letter})",
        "sentence": f"The image shows findings consistent with {text.lower()}.",
        "answer is L": f"The answer is {letter}.", "it's l": f"I think it's {letter.lower()}.",
        "explained": f"{letter}. {text} fits the appearance best; the margins are well defined.",
        "L or other": f"{min(letter, 'ABCDEFGHIJK'[other])} or {max(letter, 'ABCDEFGHIJK'[other])}",
        "refusal": "I cannot determine this from the image.",
        "L. other-text": f"{letter}. {options[other]}",
    }[style]


def published_records(seed: int = 0) -> list[dict]:
    """The published eval.py output for a simulated model, in file order, padding duplicates appended."""
    rng = random.Random(seed)
    styles, weights = zip(*STYLES)
    records = []
    for dataset, (n, subsets, k, acc) in DATASETS.items():
        names = [s for s, m in (subsets or {"": n}).items() for _ in range(m)]
        for i, subset in enumerate(names):
            options = ["yes", "no"] if k == 2 else rng.sample(TERMS, k)
            gold = rng.randrange(k)
            pick = gold if rng.random() < acc / 100 else rng.choice([j for j in range(k) if j != gold])
            style = rng.choices(styles, weights)[0]
            records.append({"question": f"Question {i} about the {dataset} image?", "options": options,
                            "answer": options[gold], "image": [f"images/{dataset}_{i}.png"], "dataset": dataset,
                            "subset": subset, "model_output": _say(style, rng, options, pick)})
    for i in range(5):  # the open questions upstream drops
        records.append({"question": f"Describe finding {i}.", "options": [], "answer": "a lesion", "image": [],
                        "dataset": "VQA-RAD_test", "subset": "", "question_type": "open", "model_output": "A mass"})
    records[7]["answer"] = "pleural effusion (small)"  # the record upstream dies on: gold not among the options
    for test_id, record in enumerate(records, 1):
        record["test_id"] = test_id
    pad = -len(records) % 8  # accelerate fills the last of 8 shards by repeating the first records
    return records + [dict(r, model_output="padding") for r in records[:pad]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=20.0, help="seconds allowed for the whole command")
    parser.add_argument("--keep", type=Path, help="write the file and the results here instead of a temp dir")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="medvl-rescore-"))
    root.mkdir(parents=True, exist_ok=True)
    source = root / "HuatuoGPT-Vision-7B_medical_multimodel_evaluation_data.json"
    records = published_records()
    source.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    medvl = Path(sys.executable).with_name("medvl")
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "COLUMNS": "150"}
    t0 = time.perf_counter()
    proc = subprocess.run([str(medvl), "score", str(source), "-o", str(root / "rescored")], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:") and "cumulative" not in line}
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    print("\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:")))
    print(proc.stdout)
    results = json.loads((root / "rescored" / "results.json").read_text()) if proc.returncode == 0 else {}
    overall = {k: round(100 * v["overall"]["acc"], 2) for k, v in results.get("scorers", {}).items()}
    print(f"medvl score: {len(records)} records ({results.get('data', {}).get('items_scored')} scored) in "
          f"{wall:.2f} s (target {args.target:.0f} s), exit {proc.returncode}; overall {overall}; "
          f"heavy modules imported: {heavy or 'none'}")
    return 0 if proc.returncode == 0 and not heavy and wall <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
