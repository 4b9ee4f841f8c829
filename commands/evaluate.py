"""`medvl eval`: score a model on the six medical VQA benchmarks, the published way, beside the published numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from medvl.commands.options import JsonOpt, OutDirOpt
from medvl.commands.ui import RichProgress, console

EXAMPLES = """[bold]Examples[/]
  medvl eval -m runs/sft/final -d Medical_Multimodal_Evaluation_Data -s vqa-rad,slake -o runs/sft/eval
  medvl eval -m Qwen2.5-VL-7B -d data/medical_multimodel_evaluation_data.json -s all -o eval/base -b 16
  medvl eval --adapter runs/lora -d bundle.json -s pmc-vqa --sample 200 -o lora-eval  [dim]# base from the adapter[/]
  medvl eval -m M -d bundle.json -s all -o out --decoding huatuo       [dim]# published sampling, seed 42[/]
  accelerate launch --num_processes 8 $(which medvl) eval -m M -d bundle.json -s all -o out  [dim]# sharded[/]
  [dim]Interrupted? Run the same command again: answered items are kept in OUT/predictions.partial.jsonl.[/]"""

# Keep in step with medvl.evaluate.SUITES (tests/test_eval_cli.py checks it); duplicated so that TAB completion
# never imports the library.
SUITE_NAMES = ("vqa-rad", "slake", "pathvqa", "pmc-vqa", "omnimedvqa", "mmmu-medical", "all")
DECODINGS = ("greedy", "huatuo")
SCORER_NAMES = ("huatuo", "reader", "strict")  # medvl.evaluate.SCORERS, in its order (tests check it)
SHOW_UNSCORABLE = 10
BASELINE_COLUMNS = ("LLaVA-Med-7B", "LLaVA-v1.6-34B")
WIDE_TABLE = 140  # terminal columns from which the baseline models are shown too


def complete_suite(incomplete: str) -> list[str]:
    """Completes the last name of a comma list: `vqa-rad,sl<TAB>` -> `vqa-rad,slake`."""
    head, _, last = incomplete.rpartition(",")
    chosen = set(head.split(",")) if head else set()
    prefix = head + "," if head else ""
    return [prefix + name for name in SUITE_NAMES if name.startswith(last) and name not in chosen]


def complete_decoding(incomplete: str) -> list[str]:
    return [d for d in DECODINGS if d.startswith(incomplete)]


SuiteOpt = Annotated[str, typer.Option(
    "--suite", "-s", autocompletion=complete_suite,
    help=f"Comma list of benchmarks: {', '.join(SUITE_NAMES)}; or a `dataset` value of your own JSONL.")]


def evaluate(
    model: Path = typer.Option(None, "--model", "-m", help="Model directory (save_pretrained layout) or a medvl "
                               "run directory. Optional with --adapter when the adapter names a local base.",
                               show_default=False),
    data: Path = typer.Option(..., "--data", "-d", help="The evaluation bundle JSON (or its folder, or a JSONL of "
                              "the same shape); image paths are relative to it.", show_default=False),
    suite: SuiteOpt = "all",
    out: OutDirOpt = ...,
    adapter: Path = typer.Option(None, "--adapter", help="A LoRA run or adapter directory, evaluated on top of "
                                 "its base without merging.", show_default=False),
    decoding: str = typer.Option("greedy", "--decoding", autocompletion=complete_decoding,
                                 help="greedy (deterministic) or huatuo (published: sampling, temperature 0.2, "
                                      "repetition penalty 1.2, seeded)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Prompts per generate call."),
    sample: int = typer.Option(None, "--sample", min=1, help="At most N items per suite (seeded).",
                               show_default=False),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="Answer budget in tokens (default 256, "
                                       "as published).", show_default=False),
    seed: int = typer.Option(42, "--seed", help="Seed for --sample and for huatuo sampling (published: 42)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on a GPU, fp32 on CPU), fp32, bf16 or fp16."),
    allow_text_only: bool = typer.Option(False, "--allow-text-only", help="Let a text-only model answer image "
                                         "questions blind (a baseline; the images are ignored)."),
    image_root: list[Path] = typer.Option(None, "--image-root", help="A folder outside the bundle's own that its "
                                          "image paths may point into (repeat for several).", show_default=False),
    as_json: JsonOpt = False,
) -> None:
    """Evaluate on medical VQA benchmarks: batched, resumable, scored the published way, as a reader would, strictly.

    To re-score answers already generated, without a model: `medvl score FILE`."""
    from transformers.utils import logging

    from medvl.evaluate.run import evaluate as run

    logging.disable_progress_bar()  # the eval has its own progress bar; "Loading weights" bars would break it
    result = run(model, data, suite, out, adapter=adapter, decoding=decoding, batch_size=batch_size, sample=sample,
                 seed=seed, max_new_tokens=max_new_tokens, dtype=dtype, allow_text_only=allow_text_only,
                 image_roots=image_root or (), progress=RichProgress())
    if not result.is_main:
        return
    if as_json:
        print(json.dumps({"results": str(result.results), "predictions": str(result.predictions),
                          **json.loads(result.results.read_text())}, indent=2, ensure_ascii=False))
        return
    render(result)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _label(path: Path) -> str:
    """A run's `final/` is named after its run directory."""
    return path.parent.name if path.name == "final" else path.name


def scores_table(title: str, scores, rows):
    """Ours (three scorers, the huatuo - reader gap, n) beside the published numbers; subsets dimmed. Below
    WIDE_TABLE columns the two baseline models are left out so that the scores never wrap."""
    from rich.table import Table

    baselines = BASELINE_COLUMNS if console.width >= WIDE_TABLE else ()
    table = Table(title=title, title_justify="left")
    table.add_column("suite", no_wrap=True, overflow="ellipsis", max_width=30)
    for col in ("n", *SCORER_NAMES, "gap", "HGV-7B", "HGV-34B", "7B rerun", *baselines):
        table.add_column(col, justify="right", no_wrap=True)
    blank = [""] * (4 + len(baselines))
    results = scores.results
    for row in rows:
        mark = "" if row.comparable else " *"
        table.add_row(f"[bold]{row.suite}[/]{mark}", str(row.n), *(_pct(row.ours[k]) for k in SCORER_NAMES),
                      f"{row.scorer_gap:+.1f}", _pct(row.huatuo_7b), _pct(row.huatuo_34b), _pct(row.rerun_7b),
                      *(_pct(row.baselines.get(b)) for b in baselines))
        for sub, acc in results["huatuo"].subsets.get(row.dataset, {}).items():
            cells = [100 * results[k].subsets[row.dataset][sub].acc for k in SCORER_NAMES]
            table.add_row(f"[dim]  {sub}[/]", f"[dim]{acc.n}[/]", *(f"[dim]{c:.1f}[/]" for c in cells),
                          f"[dim]{cells[0] - cells[1]:+.1f}[/]", *blank[1:])
    overall = [results[k].overall for k in SCORER_NAMES]
    table.add_section()
    table.add_row("[bold]overall (micro)[/]", str(overall[0].n), *(f"{100 * a.acc:.1f}" for a in overall),
                  f"{100 * (overall[0].acc - overall[1].acc):+.1f}", *blank[1:])
    return table


def print_scores(title: str, scores, rows) -> None:
    """The table, the legend, the caveats, what the scorers could not read, and any unscorable records."""
    console.print(scores_table(title, scores, rows))
    console.print("[dim]accuracy %. huatuo: the published scorer's verdicts (its crash cases fall back to option "
                  "text, then similarity); reader: the option a careful reader takes the answer to name (two "
                  "options or none: wrong); strict: an option letter or an option's exact text, read the same "
                  "by the reader; gap: huatuo - reader, how much of a published-style number is the scorer. "
                  "HGV = HuatuoGPT-Vision (README / paper Table 2-4); 7B rerun: official eval.py on this bundle "
                  "(third party).[/]")
    for row in rows:
        if not row.comparable:
            console.print(f"[yellow]* {row.suite}:[/] " + (row.note or "no published numbers for this dataset"))
    counts = scores.counts
    console.print(f"no stand-alone letter in {counts['no_letter']} of {len(scores.items)} answers "
                  f"(strict counts {counts['no_option']} as naming no option); the reader finds two options in "
                  f"{counts['reader_ambiguous']} and none in {counts['reader_none']}")
    if scores.unscorable:
        console.print(f"[yellow]{len(scores.unscorable)} record(s) could not be scored[/] (left out of every "
                      "accuracy, all listed in results.json):")
        for u in scores.unscorable[:SHOW_UNSCORABLE]:
            console.print(f"  test_id {u.test_id} ({u.dataset or '?'}): {u.reason}", markup=False)
        if len(scores.unscorable) > SHOW_UNSCORABLE:
            console.print(f"  ... and {len(scores.unscorable) - SHOW_UNSCORABLE} more")


def render(result) -> None:
    """The comparison table (ours with n beside the published numbers), then notes and file paths."""
    name = _label(result.target.base) + (f" + {_label(result.target.adapter)}" if result.target.adapter else "")
    print_scores(f"{name}  ({result.decoding.name} decoding)", result.scores, result.rows)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    speed = f", {result.questions_per_s:.2f} questions/s" if result.generated else ""
    console.print(f"{result.generated} answered, {result.cached} from cache{speed}, {result.wall_s:.1f} s")
    console.print(f"[bold]wrote[/] {result.predictions}\n      {result.results}")
