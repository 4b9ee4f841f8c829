"""`medvl score`: re-score answers already generated (medvl's predictions.jsonl or the published eval.py output)
with the three scorers, beside the published numbers. No model, no torch: seconds for the 17k-item bundle."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from medvl.commands.evaluate import print_scores
from medvl.commands.options import JsonOpt
from medvl.commands.ui import console

EXAMPLES = """[bold]Examples[/]
  medvl score runs/eval/predictions.jsonl                      [dim]# the table; writes nothing[/]
  medvl score runs/eval                                        [dim]# a `medvl eval` output directory[/]
  medvl score HuatuoGPT-Vision-7B_medical_multimodel_evaluation_data.json -o rescored   [dim]# published eval.py[/]
  medvl score predictions.jsonl --json | jq .scorer_gap"""


def score(
    file: Path = typer.Argument(..., help="predictions.jsonl from `medvl eval` (or its output directory), or the "
                                "JSON the published eval.py wrote (records with model_output and test_id).",
                                show_default=False),
    out: Path = typer.Option(None, "--out", "-o", help="Write predictions.jsonl (with every verdict) and "
                             "results.json here. Without it nothing is written.", show_default=False),
    as_json: JsonOpt = False,
) -> None:
    """Re-score generated answers without a model: huatuo, reader and strict, with the published numbers."""
    from medvl.evaluate.rescore import rescore
    from medvl.evaluate.report import results_dict

    result = rescore(file, out)
    if as_json:
        data = {"source": str(result.source), "format": result.format, "records_in_file": result.records}
        payload = results_dict(result.scores, meta={"rescored": True}, data=data)
        if result.results:
            payload = {"results": str(result.results), "predictions": str(result.predictions), **payload}
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    kind = "published eval.py output" if result.format == "published" else "medvl predictions"
    print_scores(f"{result.source.name}  ({kind}, {result.records} records)", result.scores, result.rows)
    counts = result.scores.counts
    console.print(f"{len(result.scores.items)} scored, {counts['duplicates']} duplicate test_ids dropped (first "
                  f"kept), {counts['open_skipped']} open, {counts['unscorable']} unscorable; {result.wall_s:.2f} s")
    if result.results:
        console.print(f"[bold]wrote[/] {result.predictions}\n      {result.results}")
