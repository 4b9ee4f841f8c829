"""Re-scoring: answers already generated -> the same scores, report and files as `medvl eval`, without a model.

Reads medvl's own `predictions.jsonl` (records with `output`, `gold`, `options`, `test_id`, ...) or the output
file of the published `eval.py` (a JSON list of the evaluation records, each with `model_output` and the
`test_id` eval.py gave it). Pure Python: nothing here imports torch, transformers or numpy.

Differences from the eval path, on purpose:
- the file's own `test_id`s are kept (the eval loader numbers records 1..N itself); a file without any
  `test_id` is numbered by position, and records without one in a file that has them are unscorable;
- padding duplicates (accelerate repeats items to fill the last shard) are dropped, first occurrence wins, as
  the published scorer does;
- a record that cannot be scored (gold answer not among its options, a missing field, an output that is not
  text) is listed with its reason and the rest is scored; `medvl eval` refuses such records before generating.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from medvl.errors import MedvlError
from medvl.evaluate.report import (ComparisonRow, check_out_dir, comparison_rows, write_predictions,
                                   write_results)
from medvl.evaluate.scoring import Scores, Unscorable, score
from medvl.evaluate.suites import EvalItem, parse_item, read_records

PREDICTIONS = "predictions.jsonl"
FORMATS = {"published": ("model_output", "answer"), "medvl": ("output", "gold")}  # (output key, gold key)
_FIX = ("pass medvl's predictions.jsonl (from `medvl eval`) or the JSON file the published eval.py wrote "
        "(records with model_output, test_id, question, options, answer, dataset)")


@dataclass(frozen=True)
class Rescore:
    source: Path
    format: str  # "published" or "medvl"
    records: int  # in the file
    scores: Scores
    rows: list[ComparisonRow]
    wall_s: float
    predictions: Path | None = None  # written only with an output directory
    results: Path | None = None


def resolve_predictions(path: str | Path) -> Path:
    """The file, or a `medvl eval` output directory holding predictions.jsonl."""
    path = Path(path)
    if path.is_dir() and (path / PREDICTIONS).is_file():
        return path / PREDICTIONS
    return path


def load_predictions(path: str | Path) -> tuple[list[tuple[EvalItem, str]], list[Unscorable], str, int]:
    """(item, output) pairs in file order, the records that cannot be parsed, the format, the record count.

    Raises MedvlError when the file itself is unusable: missing, a directory, empty, not JSON, or not a
    predictions file at all (no record carries an output, or none a gold answer).
    """
    path = resolve_predictions(path)
    if path.is_dir():
        raise MedvlError(f"{path} is a directory without {PREDICTIONS}",
                         fix="pass a `medvl eval` output directory, or the predictions file itself")
    records = read_records(path, kind="predictions file", fix=_FIX)
    if not records:
        raise MedvlError(f"the predictions file is empty: {path}", fix=_FIX)
    fmt = next((name for name, (out, _) in FORMATS.items() if any(out in r for r in records)), None)
    if fmt is None:
        looks = " (it looks like an evaluation file: run `medvl eval` on it)" if "answer" in records[0] else ""
        raise MedvlError(f"no record has 'model_output' (published eval.py) or 'output' (medvl){looks}",
                         where=str(path), fix=_FIX)
    out_key, gold_key = FORMATS[fmt]
    if not any(gold_key in r for r in records):
        cache = " (it looks like the answer cache of an unfinished `medvl eval`: it holds no questions)" if all(
            set(r) == {"test_id", "key", "output"} for r in records) else ""
        raise MedvlError(f"no record has the gold answer '{gold_key}' next to '{out_key}'{cache}", where=str(path),
                         fix=_FIX if not cache else "run the same `medvl eval` again to finish it (answers are "
                         "kept), then score its predictions.jsonl")
    numbered = any("test_id" in r for r in records)
    pairs: list[tuple[EvalItem, str]] = []
    rejected: list[Unscorable] = []
    for position, record in enumerate(records, 1):
        dataset = str(record.get("dataset", ""))
        test_id = record.get("test_id") if numbered else position
        if isinstance(test_id, bool) or not isinstance(test_id, int):
            rejected.append(Unscorable(None, dataset, f"record {position}: test_id must be an integer, "
                                                      f"got {test_id!r}"))
            continue
        output = record.get(out_key)
        if not isinstance(output, str):
            rejected.append(Unscorable(test_id, dataset, f"record {position}: '{out_key}' is not text: "
                                                         f"{type(output).__name__}"))
            continue
        fields = {**record, "answer": record.get(gold_key)} if gold_key in record else record
        if record.get("question_type") == "open":  # counted, as upstream, whatever else the record lacks
            pairs.append((EvalItem(test_id, dataset, "", "", (), "", (), "open"), output))
            continue
        try:
            item = parse_item(fields, test_id, path.parent, resolve_images=False)
        except MedvlError as exc:
            rejected.append(Unscorable(test_id, dataset, f"record {position}: {exc.what}"))
            continue
        pairs.append((item, output))
    return pairs, rejected, fmt, len(records)


def rescore(path: str | Path, out_dir: str | Path | None = None) -> Rescore:
    """Score a predictions file with every scorer; with `out_dir`, write predictions.jsonl and results.json."""
    t0 = time.perf_counter()
    source = resolve_predictions(path)
    if out_dir is not None:
        check_out_dir(out_dir)  # before reading: a bad --out is reported first, and nothing is written
    pairs, rejected, fmt, n_records = load_predictions(source)
    scores = score(pairs, unscorable="report", rejected=rejected)
    if not scores.items:
        reasons = "\n  ".join(u.reason for u in scores.unscorable[:10]) or "every record was skipped"
        raise MedvlError(f"none of the {n_records} records can be scored:\n  {reasons}", where=str(source),
                         fix=_FIX)
    rows = comparison_rows(scores)
    predictions = results = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        predictions, results = out_dir / PREDICTIONS, out_dir / "results.json"
        if predictions.resolve() == source.resolve():
            raise MedvlError(f"the output would overwrite the file being scored: {source}",
                             fix="choose another --out directory")
        data = {"source": str(source), "format": fmt, "records_in_file": n_records}
        write_predictions(predictions, scores)
        write_results(results, scores, meta={"rescored": True}, data=data)
    return Rescore(source, fmt, n_records, scores, rows, time.perf_counter() - t0, predictions, results)
