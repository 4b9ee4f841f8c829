"""Medical VQA evaluation: the published HuatuoGPT-Vision bundle, prompt, scorers and report. Pure Python.

The order a caller (the `medvl eval` command, the training loop) follows:

    eval_set = load_suites(path, "vqa-rad,slake", sample=None, seed=0)   # raises MedvlError on bad records
    problems = check_images(eval_set.items)                              # report ALL, then stop if any
    prompts  = {it.test_id: build_prompt(it) for it in eval_set.items}   # + chat template, images first
    outputs  = ...generation...                                          # test_id -> raw decoded text
    scores   = score((it, outputs[it.test_id]) for it in eval_set.items)
    write_predictions(run / "predictions.jsonl", scores)
    write_results(run / "results.json", scores, eval_set, meta={...})
    rows     = comparison_rows(scores)                                   # for the rich table

Re-scoring answers already generated (medvl's predictions.jsonl or the published eval.py output), no model:

    run = rescore("runs/eval/predictions.jsonl", out_dir="runs/rescored")  # scores, rows, unscorable listed
"""

from medvl.evaluate.report import (
    MMMU_VALIDATION,
    PUBLISHED,
    ComparisonRow,
    Reference,
    comparison_rows,
    prediction_row,
    results_dict,
    scorer_gap,
    upstream_result,
    write_predictions,
    write_results,
)
from medvl.evaluate.reader import Reading, read_answer
from medvl.evaluate.rescore import Rescore, load_predictions, rescore
from medvl.evaluate.scoring import (
    METHODS,
    SCORERS,
    Accuracy,
    Parsed,
    ScoredItem,
    ScorerResult,
    Scores,
    Unscorable,
    letter_rule,
    parse_output,
    score,
)
from medvl.evaluate.suites import (
    ALL,
    LETTERS,
    SUITES,
    EvalItem,
    EvalSet,
    ImageProblem,
    build_prompt,
    check_images,
    load_suites,
    read_records,
    resolve_suites,
)

__all__ = [
    "ALL", "LETTERS", "METHODS", "MMMU_VALIDATION", "PUBLISHED", "SCORERS", "SUITES",
    "Accuracy", "ComparisonRow", "EvalItem", "EvalSet", "ImageProblem", "Parsed", "Reading", "Reference",
    "Rescore", "ScoredItem", "ScorerResult", "Scores", "Unscorable",
    "build_prompt", "check_images", "comparison_rows", "letter_rule", "load_predictions", "load_suites",
    "parse_output", "prediction_row", "read_answer", "read_records", "rescore", "resolve_suites", "results_dict",
    "score", "scorer_gap", "upstream_result", "write_predictions", "write_results",
]  # fmt: skip
