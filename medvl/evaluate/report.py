"""Report: scores -> results JSON, predictions JSONL, and rows beside the published numbers.

Accuracies in the results JSON are fractions (0..1, as upstream's `_result.json`), each with its n and count
correct; the comparison rows are percentages, as the published tables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from medvl.errors import MedvlError
from medvl.evaluate.scoring import Scores, ScoredItem
from medvl.evaluate.suites import SUITES, EvalSet

UPSTREAM_TOTAL_KEY = "The total score for multiple-choice questions"


@dataclass(frozen=True)
class Reference:
    huatuo_7b: float
    huatuo_34b: float
    baselines: dict[str, float]
    measured_on: str  # the split the published numbers come from
    rerun_7b: float | None = None  # HuatuoGPT-Vision-7B, official eval.py on this bundle (third party, 2026-05)
    note: str = ""


# Paper arXiv:2406.19280v4: Table 2 (VQA-RAD, SLAKE, PathVQA, PMC-VQA), Table 3 "Avg" (OmniMedVQA), Table 4
# "H&M" (MMMU test). HuatuoGPT-Vision-7B numbers are from the README only. "+X" rows are LLaVA-v1.5-LLaMA3-8B
# trained with X, the paper's ablation. Values in _BASELINE_MODELS order.
_BASELINE_MODELS = (
    "Med-Flamingo", "RadFM", "LLaVA-Med-7B", "Qwen-VL-Chat", "Yi-VL-34B", "LLaVA-v1.6-7B", "LLaVA-v1.6-13B",
    "LLaVA-v1.6-34B", "LLaVA-v1.5-LLaMA3-8B", "LLaVA-v1.5-LLaMA3-8B+LLaVA_Med", "LLaVA-v1.5-LLaMA3-8B+PubMedVision",
)  # fmt: skip
_BASELINES = {
    "vqa-rad": (45.4, 50.6, 51.4, 47.0, 53.0, 52.6, 55.8, 58.6, 54.2, 60.2, 63.8),
    "slake": (43.5, 34.6, 48.6, 56.0, 58.9, 57.9, 58.9, 67.3, 59.4, 61.2, 74.5),
    "pathvqa": (54.7, 38.7, 56.8, 55.1, 47.3, 47.9, 51.9, 59.1, 54.1, 54.5, 59.9),
    "pmc-vqa": (23.3, 25.9, 24.7, 36.6, 39.5, 35.5, 36.6, 44.4, 36.4, 46.6, 52.7),
    "omnimedvqa": (30.2, 30.5, 44.5, 49.5, 54.9, 49.6, 50.6, 61.4, 48.8, 65.5, 75.1),
    "mmmu-medical": (28.3, 27.0, 36.9, 32.7, 41.5, 33.1, 39.3, 48.8, 38.2, 41.1, 49.1),
}
# Paper Table 8: MMMU Health & Medicine *validation*, the split the bundle holds (HuatuoGPT-Vision-7B: none).
MMMU_VALIDATION = {
    "HuatuoGPT-Vision-34B": 58.6, "LLaVA-v1.6-34B": 55.9, "LLaVA-v1.5-LLaMA3-8B+PubMedVision": 50.3,
    "Yi-VL-34B": 48.2, "LLaVA-v1.5-LLaMA3-8B+LLaVA_Med": 42.8, "LLaVA-v1.6-13B": 39.3, "LLaVA-Med-7B": 38.6,
    "LLaVA-v1.5-LLaMA3-8B": 38.6, "LLaVA-v1.6-7B": 33.1, "Qwen-VL-Chat": 31.7, "Med-Flamingo": 28.4, "RadFM": 27.9,
}  # fmt: skip


def _ref(suite: str, b7: float, b34: float, on: str, rerun: float, note: str = "") -> Reference:
    return Reference(b7, b34, dict(zip(_BASELINE_MODELS, _BASELINES[suite])), on, rerun, note)


PUBLISHED: dict[str, Reference] = {
    "vqa-rad": _ref("vqa-rad", 63.7, 68.1, "test, closed questions", 61.35),
    "slake": _ref("slake", 76.2, 76.9, "test, English closed", 76.44),
    "pathvqa": _ref("pathvqa", 57.9, 63.5, "test, yes/no", 57.67),
    "pmc-vqa": _ref("pmc-vqa", 54.3, 58.2, "test", 54.20),
    "omnimedvqa": _ref(
        "omnimedvqa", 74.0, 76.9, "open-access part", 73.46, "34B: README 76.9, paper Table 3 76.7 (inconsistent)"
    ),
    "mmmu-medical": _ref(
        "mmmu-medical", 50.6, 54.4, "TEST (official server)", 50.34,
        "published MMMU H&M numbers are TEST-set; this bundle is VALIDATION (n=145): not comparable. "
        "Validation (paper Table 8): HuatuoGPT-Vision-34B 58.6, LLaVA-v1.6-34B 55.9 (MMMU_VALIDATION)",
    ),  # fmt: skip
}


@dataclass(frozen=True)
class ComparisonRow:
    suite: str  # suite name, or the raw dataset value for datasets outside the published six
    dataset: str
    ours: dict[str, float]  # scorer name -> accuracy in percent
    n: int
    huatuo_7b: float | None
    huatuo_34b: float | None
    baselines: dict[str, float] = field(default_factory=dict)
    rerun_7b: float | None = None  # the closest comparison: published 7B rerun on this very bundle
    comparable: bool = True  # False for MMMU (test vs validation) and datasets without published numbers
    note: str = ""

    @property
    def scorer_gap(self) -> float:
        """Published scorer minus reader, in points: how much of a published-style number is the scorer."""
        return self.ours["huatuo"] - self.ours["reader"]


def comparison_rows(scores: Scores) -> list[ComparisonRow]:
    """One row per scored dataset, in the order scored, with the published numbers where they exist."""
    suite_of = {dataset: suite for suite, dataset in SUITES.items()}
    rows = []
    for dataset, acc in scores.results["huatuo"].datasets.items():
        ours = {name: 100.0 * result.datasets[dataset].acc for name, result in scores.results.items()}
        suite = suite_of.get(dataset, dataset)
        ref = PUBLISHED.get(suite)
        if ref is None:
            rows.append(ComparisonRow(suite, dataset, ours, acc.n, None, None, comparable=False))
            continue
        rows.append(
            ComparisonRow(
                suite, dataset, ours, acc.n, ref.huatuo_7b, ref.huatuo_34b, dict(ref.baselines), ref.rerun_7b,
                comparable=suite != "mmmu-medical", note=ref.note,
            )
        )  # fmt: skip
    return rows


def upstream_result(scores: Scores, scorer: str = "huatuo") -> dict[str, float]:
    """The published `{model}_{data}_result.json` shape: datasets, the total, then f"{dataset}_{subset}" keys.

    One deliberate difference: upstream leaves datasets whose name contains "___" out of the total's numerator
    (not its denominator); no published dataset has such a name, so the total here is plain sum/sum.
    """
    result = scores.results[scorer]
    flat = {dataset: acc.acc for dataset, acc in result.datasets.items()}
    flat[UPSTREAM_TOTAL_KEY] = result.overall.acc
    for dataset, subsets in result.subsets.items():
        flat.update({f"{dataset}_{subset}": acc.acc for subset, acc in subsets.items()})
    return flat


def scorer_gap(scores: Scores) -> dict:
    """huatuo minus reader accuracy (fractions, as the accuracies): overall and per dataset."""
    huatuo, reader = scores.results["huatuo"], scores.results["reader"]
    return {
        "overall": huatuo.overall.acc - reader.overall.acc,
        "datasets": {d: acc.acc - reader.datasets[d].acc for d, acc in huatuo.datasets.items()},
    }


def results_dict(scores: Scores, eval_set: EvalSet | None = None, meta: Mapping | None = None,
                 data: Mapping | None = None) -> dict:
    """Everything `results.json` holds: per scorer {overall, datasets, subsets}, the huatuo - reader gap,
    counts, the records left out as unscorable, the data (plus `data`), the upstream form, and `meta`."""
    counts = dict(scores.counts)
    data = {"items_scored": len(scores.items), **(data or {})}
    if eval_set is not None:
        # The loader drops open and option-less items before generation; the scorer counts any that reach it.
        counts["open_skipped"] += eval_set.open_skipped
        counts["empty_options"] += eval_set.empty_options_skipped
        data.update(
            source=str(eval_set.source),
            datasets=list(eval_set.datasets),
            records_in_file=eval_set.records_in_file,
            sampled=dict(eval_set.sampled),
        )
    return {
        "scorers": {name: result.as_dict() for name, result in scores.results.items()},
        "scorer_gap": scorer_gap(scores),
        "counts": counts,
        "unscorable": [u.as_dict() for u in scores.unscorable],
        "data": data,
        "upstream_format": upstream_result(scores),
        "meta": dict(meta or {}),
    }


def prediction_row(scored: ScoredItem) -> dict:
    item = scored.item
    return {
        "test_id": item.test_id,
        "dataset": item.dataset,
        "subset": item.subset,
        "question": item.question,
        "options": list(item.options),
        "gold": item.answer,
        "gold_letter": scored.gold,
        "images": list(item.images),
        "output": scored.output,
        "letter": scored.letter,
        "method": scored.method,
        "strict_letter": scored.strict_letter,
        "reading": scored.reading,
        "reading_rule": scored.reading_rule,
        "verdicts": dict(scored.verdicts),
    }


def write_results(
    path: str | Path, scores: Scores, eval_set: EvalSet | None = None, meta: Mapping | None = None,
    data: Mapping | None = None,
) -> Path:
    results = results_dict(scores, eval_set, meta, data)
    return _write_atomic(Path(path), json.dumps(results, indent=2, ensure_ascii=False))


def write_predictions(path: str | Path, scores: Scores) -> Path:
    """One JSON object per scored item, in scoring order (kept items only: duplicates and skips are counted)."""
    lines = (json.dumps(prediction_row(s), ensure_ascii=False) for s in scores.items)
    return _write_atomic(Path(path), "".join(line + "\n" for line in lines))


OUTPUT_FILES = ("predictions.jsonl", "results.json")


def check_out_dir(out_dir: str | Path) -> Path:
    """The --out folder of eval / score, refused before any work when the files cannot be written there: it is a
    file, it lies under a file, or predictions.jsonl / results.json in it are folders."""
    out_dir = Path(out_dir)
    blocker = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        what = "is a file, not a folder" if blocker == out_dir else f"lies under {blocker}, which is a file"
        raise MedvlError(f"--out {out_dir} {what}", where=str(blocker),
                         fix="give a new folder (or the folder of an earlier run to write into it again)")
    for name in OUTPUT_FILES:
        if (out_dir / name).is_dir():
            raise MedvlError(f"--out {out_dir}: {name} there is a folder, so the {name} file cannot be written",
                             where=str(out_dir / name), fix="remove or rename that folder, or choose another --out")
    return out_dir


def _write_atomic(path: Path, text: str) -> Path:
    # Write then rename: an interrupted run never leaves a half-written results file that looks complete.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write or rename, no stray .tmp is left next to the results
    return path
