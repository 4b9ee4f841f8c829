"""One evaluation run, start to finish: load suites -> check images -> generate -> score -> write.

Everything that can be wrong with the inputs is found before the model is loaded: the model and adapter paths,
the suite names and records, a text-only model facing image questions, and every missing or unreadable image
(all listed in one error; upstream asserts existence only after generating, and its chatbot silently drops
images it cannot open). Under `accelerate launch` each process answers its shard; process 0 writes the files.

Output directory:
    predictions.partial.jsonl   the answer cache, appended as items are answered (see generate.py)
    predictions.jsonl           one scored item per line: question, options, gold, raw output, letter, verdicts
    results.json                per scorer: overall / per dataset / per subset accuracy, each with n; counts; meta
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medvl.errors import MedvlError
from medvl.evaluate.generate import (Decoding, Generator, Target, answer_items, make_decoding, merge_shards,
                                     resolve_target)
from medvl.evaluate.report import (ComparisonRow, check_out_dir, comparison_rows, write_predictions,
                                   write_results)
from medvl.evaluate.scoring import Scores, score
from medvl.evaluate.suites import ALL, EvalSet, ImageProblem, check_images, load_suites
from medvl.progress import NullProgress, ProgressSink

BUNDLE_NAME = "medical_multimodel_evaluation_data.json"  # sic: upstream spells it "multimodel"
SHOW_PROBLEMS = 20  # image problems listed in the error; the rest are counted


@dataclass(frozen=True, kw_only=True)
class EvalRun:
    out_dir: Path
    predictions: Path
    results: Path
    scores: Scores
    rows: list[ComparisonRow]
    eval_set: EvalSet
    target: Target
    decoding: Decoding
    generated: int  # answered by this run (all processes)
    cached: int  # taken from an earlier, interrupted or finished, run
    wall_s: float
    questions_per_s: float  # generated / generation time, 0 when nothing was generated
    world_size: int = 1
    is_main: bool = True
    notes: list[str] = field(default_factory=list)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: object = None
    barrier: Callable[[], None] = lambda: None
    gather: Callable[[object], list] = lambda obj: [obj]


def _distributed() -> _Dist:
    """This process's place under `accelerate launch` / torchrun; one process otherwise."""
    import os

    import torch
    from accelerate import PartialState

    # Without a GPU accelerate only goes multi-process (gloo) when told cpu=True; otherwise each of N launched
    # processes would believe it is alone, answer everything and race on the same cache file.
    state = PartialState(cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise MedvlError(f"launched as {launched} processes, but accelerate sees {state.num_processes}",
                         fix="launch with `accelerate launch` or `torchrun`, or run one process")
    if state.num_processes == 1:
        return _Dist(device=state.device)
    from accelerate.utils import gather_object

    # gather_object flattens lists; one-element lists keep each rank's dict whole.
    return _Dist(state.process_index, state.num_processes, state.device, state.wait_for_everyone,
                 lambda obj: gather_object([obj]))


def resolve_data(data: str | Path) -> Path:
    """The bundle JSON, or a directory holding it (the unzipped Medical_Multimodal_Evaluation_Data)."""
    path = Path(data)
    if path.is_dir() and (path / BUNDLE_NAME).is_file():
        return path / BUNDLE_NAME
    return path


def image_problems(eval_set: EvalSet, progress: ProgressSink | None = None) -> list[ImageProblem]:
    """Every missing or unreadable image of the selected items (each path once, with the items using it)."""
    with warnings.catch_warnings():  # Pillow probing a DICOM as TIFF warns "Corrupt EXIF data"; re-checked below
        warnings.simplefilter("ignore", UserWarning)
        problems = check_images(eval_set.items, progress=progress)
    # check_images verifies with Pillow, which cannot open DICOM: re-check those with the DICOM loader.
    from medvl.data.images import is_dicom, probe_image

    kept = []
    for problem in problems:
        if problem.reason != "missing" and is_dicom(problem.path):
            try:
                probe_image(problem.path)
                continue
            except MedvlError as exc:
                problem = ImageProblem(problem.path, f"unreadable: {exc.what}", problem.test_ids)
        kept.append(problem)
    return kept


def raise_image_problems(problems: list[ImageProblem], eval_set: EvalSet) -> None:
    if not problems:
        return
    items = {t for p in problems for t in p.test_ids}
    missing = sum(p.reason == "missing" for p in problems)

    def ids(p: ImageProblem) -> str:
        shown = ", ".join(map(str, p.test_ids[:5]))
        return shown + (f" +{len(p.test_ids) - 5}" if len(p.test_ids) > 5 else "")

    lines = [f"{p.path}: {p.reason} (test_id {ids(p)})" for p in problems[:SHOW_PROBLEMS]]
    if len(problems) > SHOW_PROBLEMS:
        lines.append(f"... and {len(problems) - SHOW_PROBLEMS} more")
    root = eval_set.source.parent
    raise MedvlError(
        f"{len(problems)} image(s) cannot be used ({missing} missing, {len(problems) - missing} unreadable), "
        f"needed by {len(items)} of {len(eval_set.items)} items; nothing was generated:\n  " + "\n  ".join(lines),
        where=str(eval_set.source),
        fix=f"image paths are relative to {root}: extract images.zip there (it holds images/), or remove the "
            "items that use these files",
    )


def refuse_text_only(target: Target, eval_set: EvalSet, allow: bool) -> list[str]:
    """A text-only model cannot see the images a question is about: refuse, or (when allowed) say so."""
    if target.family.is_vision:
        return []
    with_images = sum(1 for it in eval_set.items if it.images)
    if not with_images:
        return []
    if not allow:
        raise MedvlError(
            f"{target.base} is a text-only model ({target.family.name}), and {with_images} of "
            f"{len(eval_set.items)} items are questions about images",
            fix="evaluate a vision-language model, or pass --allow-text-only to answer from the text alone "
                "(a blind baseline: the images are ignored and the results say so)",
        )
    return [f"text-only model: the images of {with_images} items were not shown (blind baseline)"]


def evaluate(model: str | Path | None, data: str | Path, suites: str | list[str] = ALL,
             out_dir: str | Path = "runs/eval", *, adapter: str | Path | None = None, decoding: str = "greedy",
             batch_size: int = 8, sample: int | None = None, seed: int = 42, max_new_tokens: int | None = None,
             dtype: str = "auto", allow_text_only: bool = False, image_roots=(),
             progress: ProgressSink | None = None) -> EvalRun:
    """Evaluate a model (optionally a LoRA adapter on it) on benchmark suites; write predictions and results.

    Re-running with the same arguments and output directory skips items already answered there.
    """
    t0 = time.perf_counter()
    progress = progress or NullProgress()
    out_dir = Path(out_dir)
    if batch_size < 1:
        raise MedvlError(f"batch size must be at least 1, got {batch_size}")
    check_out_dir(out_dir)
    dec = make_decoding(decoding, max_new_tokens=max_new_tokens, seed=seed)
    target = resolve_target(model, adapter)
    eval_set = load_suites(resolve_data(data), suites, sample=sample, seed=seed, image_roots=image_roots)
    notes = refuse_text_only(target, eval_set, allow_text_only)
    if target.family.is_vision:
        raise_image_problems(image_problems(eval_set, progress), eval_set)

    dist = _distributed()
    generator = Generator.load(target, dec, dtype=dtype, device=dist.device)
    answers = answer_items(generator, eval_set.items, out_dir, batch_size=batch_size, rank=dist.rank,
                           world=dist.world, progress=progress, barrier=dist.barrier)
    parts = dist.gather(answers.outputs)
    seconds = max(dist.gather(answers.generated_s))
    generated = merge_shards(parts, [it.test_id for it in eval_set.items if it.test_id not in answers.cached])
    outputs = {**answers.cached, **generated}
    notes += answers.notes

    scores = score((it, outputs[it.test_id]) for it in eval_set.items)
    rows = comparison_rows(scores)
    predictions, results = out_dir / "predictions.jsonl", out_dir / "results.json"
    is_main = dist.rank == 0
    if is_main:
        meta = {
            "model": str(target.base), "adapter": str(target.adapter) if target.adapter else None,
            "family": target.family.name, "decoding": dec.as_dict(), "batch_size": batch_size,
            "world_size": dist.world, "generated": len(generated), "cached": len(answers.cached),
            "generation_s": round(seconds, 3), "notes": notes,
        }
        write_predictions(predictions, scores)
        write_results(results, scores, eval_set, meta=meta)
    dist.barrier()
    return EvalRun(out_dir=out_dir, predictions=predictions, results=results, scores=scores, rows=rows,
                   eval_set=eval_set, target=target, decoding=dec, generated=len(generated),
                   cached=len(answers.cached), wall_s=time.perf_counter() - t0,
                   questions_per_s=len(generated) / seconds if generated and seconds > 0 else 0.0,
                   world_size=dist.world, is_main=is_main, notes=notes)
