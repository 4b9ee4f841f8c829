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
    """Evaluate on medical VQA benchmarks: batched, resumable, scored the published way and strictly."""
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


def render(result) -> None:
    """The comparison table (ours with n beside the published numbers), then notes and file paths."""
    from rich.table import Table

    name = _label(result.target.base) + (f" + {_label(result.target.adapter)}" if result.target.adapter else "")
    table = Table(title=f"{name}  ({result.decoding.name} decoding)", title_justify="left")
    for col, justify in (("suite", "left"), ("n", "right"), ("huatuo", "right"), ("strict", "right"),
                         ("HGV-7B", "right"), ("HGV-34B", "right"), ("7B rerun", "right"),
                         ("LLaVA-Med-7B", "right"), ("LLaVA-v1.6-34B", "right")):
        table.add_column(col, justify=justify)
    subsets = result.scores.results["huatuo"].subsets
    strict_subsets = result.scores.results["strict"].subsets
    for row in result.rows:
        mark = "" if row.comparable else " *"
        table.add_row(f"[bold]{row.suite}[/]{mark}", str(row.n), _pct(row.ours["huatuo"]), _pct(row.ours["strict"]),
                      _pct(row.huatuo_7b), _pct(row.huatuo_34b), _pct(row.rerun_7b),
                      _pct(row.baselines.get("LLaVA-Med-7B")), _pct(row.baselines.get("LLaVA-v1.6-34B")))
        for sub, acc in subsets.get(row.dataset, {}).items():
            strict = strict_subsets[row.dataset][sub]
            table.add_row(f"[dim]  {sub}[/]", f"[dim]{acc.n}[/]", f"[dim]{100 * acc.acc:.1f}[/]",
                          f"[dim]{100 * strict.acc:.1f}[/]", "", "", "", "", "")
    overall = {k: v.overall for k, v in result.scores.results.items()}
    table.add_section()
    table.add_row("[bold]overall (micro)[/]", str(overall["huatuo"].n), f"{100 * overall['huatuo'].acc:.1f}",
                  f"{100 * overall['strict'].acc:.1f}", "", "", "", "", "")
    console.print(table)
    console.print("[dim]accuracy %. huatuo: the published scorer's verdicts (its crash cases fall back to option "
                  "text, then similarity); strict: an answer must name an option letter. HGV = HuatuoGPT-Vision "
                  "(README / paper Table 2-4); 7B rerun: official eval.py on this bundle (third party).[/]")
    for row in result.rows:
        if not row.comparable:
            console.print(f"[yellow]* {row.suite}:[/] " + (row.note or "no published numbers for this dataset"))
    counts = result.scores.counts
    console.print(f"no stand-alone letter in {counts['no_letter']} of {len(result.scores.items)} answers "
                  f"(strict counts {counts['no_option']} as naming no option)")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    speed = f", {result.questions_per_s:.2f} questions/s" if result.generated else ""
    console.print(f"{result.generated} answered, {result.cached} from cache{speed}, {result.wall_s:.1f} s")
    console.print(f"[bold]wrote[/] {result.predictions}\n      {result.results}")
