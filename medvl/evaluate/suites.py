"""Evaluation suites: the published HuatuoGPT-Vision evaluation bundle (or a JSONL of the same shape) -> items.

The bundle is `medical_multimodel_evaluation_data.json` (sic, "multimodel"), a JSON list of 17,303 records with
`images/` extracted next to it; image paths are relative to the JSON's directory. Each record: `question`,
`options` (list of option texts, or a Python-literal string of one), `answer` (the text of the correct option),
`image` (list of relative paths), `dataset`, optional `subset` and `question_type`.

Upstream numbers every record 1..N in file order *before* any filtering (`eval.py`), so `test_id` here is the
same number the published output files carry; open questions (5 of 17,303 records are dropped by the published
scorer as open or option-less) are excluded before generation instead of after, and counted.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from medvl.data.paths import PathOutsideRoots, allowed_path
from medvl.errors import MedvlError
from medvl.progress import NullProgress, ProgressSink

# Explicit table: suite name -> `dataset` value in the bundle (n per the published scorer's log on a full run).
SUITES: dict[str, str] = {
    "vqa-rad": "VQA-RAD_test",  # 251 closed questions (451 test = 200 open + 251 closed)
    "slake": "SLAKE_test",  # 416, English closed subset
    "pathvqa": "PathVQA_test",  # 3,362 yes/no
    "pmc-vqa": "PMC-VQA_test",  # 2,000, 4 options
    "omnimedvqa": "OmniMedVQA",  # 11,124, 8 modality subsets
    "mmmu-medical": "MMMU_Medical_Validation",  # 145, validation split (published numbers are test!)
}
ALL = "all"

# The published prompt letters its options A..K through `zip`, so option 12 onward would silently vanish from
# the prompt while the gold could be one of them. We refuse such items instead (the bundle has none).
LETTERS = "ABCDEFGHIJK"
PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."

# The published scorer treats a gold answer of "?" as unanswerable: the item counts, and is always wrong.
UNKNOWN_GOLD = "?"


@dataclass(frozen=True)
class EvalItem:
    test_id: int  # 1..N over the whole file in file order, as upstream
    dataset: str
    subset: str  # "" when absent
    question: str
    options: tuple[str, ...]
    answer: str  # the text of the correct option
    images: tuple[str, ...] = ()  # absolute paths
    question_type: str | None = None

    @property
    def gold_letter(self) -> str | None:
        """Letter of the first option equal to the answer (upstream `options.index`); None for "?" or no match."""
        if self.answer in self.options:
            index = self.options.index(self.answer)
            return LETTERS[index] if index < len(LETTERS) else None
        return None


@dataclass(frozen=True)
class EvalSet:
    items: list[EvalItem]
    source: Path
    datasets: tuple[str, ...]  # the selected `dataset` values, in the order asked
    records_in_file: int
    open_skipped: int = 0  # `question_type == "open"` in the selected datasets
    empty_options_skipped: int = 0  # no options: the published scorer drops these too
    sampled: dict[str, int] = field(default_factory=dict)  # dataset -> items kept, when sampling


def build_prompt(item: EvalItem) -> str:
    """The published multiple-choice prompt, byte for byte (`eval.py` `llava_prompt`)."""
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, item.options))
    return f"{item.question}\n{options}\n{PROMPT_SUFFIX}"


def resolve_suites(names: str | Sequence[str], available: Sequence[str]) -> list[str]:
    """Suite names (comma list or sequence) -> `dataset` values present in the file, in the order asked.

    Accepted: the six suite names (any case, `_` for `-`), `all` (every dataset in the file, which for the
    published bundle is exactly the six), or a raw `dataset` value from the file (for custom JSONL files).
    """
    requested = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not requested:
        raise MedvlError("no suite given", fix=f"pass one or more of: {', '.join([*SUITES, ALL])}")
    by_lower = {d.lower(): d for d in available}
    valid = [*SUITES, ALL, *(d for d in available if d not in SUITES.values())]
    chosen: list[str] = []
    for name in requested:
        key = name.lower().replace("_", "-")
        if key == ALL:
            picks = list(available)
        elif key in SUITES:
            picks = [SUITES[key]]
        elif name.lower() in by_lower:
            picks = [by_lower[name.lower()]]
        else:
            close = difflib.get_close_matches(key, [v.lower() for v in valid], n=1, cutoff=0.6)
            hint = f"did you mean '{next(v for v in valid if v.lower() == close[0])}'? " if close else ""
            raise MedvlError(f"unknown suite '{name}'", fix=f"{hint}valid suites: {', '.join(valid)}")
        for dataset in picks:
            if dataset not in available:
                raise MedvlError(
                    f"suite '{name}' ({dataset}) has no items in this file",
                    fix=f"the file holds: {', '.join(available) or 'nothing'}",
                )
            if dataset not in chosen:
                chosen.append(dataset)
    return chosen


BUNDLE_FIX = ("download Medical_Multimodal_Evaluation_Data (medical_multimodel_evaluation_data.json + images.zip "
              "extracted next to it) from FreedomIntelligence/HuatuoGPT-Vision")


def read_records(path: str | Path, *, kind: str = "evaluation file", fix: str = BUNDLE_FIX) -> list[dict]:
    """A JSON list (the published bundle, eval.py's output) or JSONL (one record per line; blank lines skipped).

    `kind` and `fix` word the errors for the file being read (an evaluation file, a predictions file).
    """
    path = Path(path)
    if path.is_dir():
        raise MedvlError(f"{kind} is a directory: {path}", fix=fix)
    if not path.is_file():
        raise MedvlError(f"{kind} not found: {path}", fix=fix)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MedvlError(f"{kind} is not UTF-8 text (byte {exc.start})", where=str(path), fix=fix) from None
    if path.suffix.lower() == ".jsonl" or not text.lstrip().startswith("["):
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise MedvlError(f"invalid JSON: {exc.msg}", where=f"{path}:{line_no}",
                                 fix=f"the {kind} must be a JSON list or JSONL, one object per line") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MedvlError(f"invalid JSON: {exc.msg}", where=f"{path}:{exc.lineno}") from None
    bad = [i for i, r in enumerate(records, 1) if not isinstance(r, dict)]
    if bad:
        raise MedvlError(f"{len(bad)} records are not JSON objects", where=f"{path}: record {bad[0]}",
                         fix=f"the {kind} must be a JSON list or JSONL of objects")
    return records


def parse_item(record: Mapping, test_id: int, root: Path, image_roots: Sequence[str | Path] = (), *,
               resolve_images: bool = True) -> EvalItem:
    """One record -> EvalItem; raises MedvlError naming the field. Gold membership is checked by the caller.

    Image paths follow the root rule (medvl/data/paths.py): inside the bundle's folder `root` or one of
    `image_roots` (`--image-root`), symlinks resolved; anything else raises `PathOutsideRoots`.
    `resolve_images=False` keeps them as written (re-scoring never opens them; checking 17k paths costs a
    file-system walk each)."""
    for key in ("question", "options", "answer", "dataset"):
        if key not in record:
            raise MedvlError(f"missing field '{key}'")
    options = _parse_options(record["options"])
    images = record.get("image", record.get("images")) or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(record["question"], str) or not isinstance(images, list) or not all(
            isinstance(p, str) and p for p in images):
        raise MedvlError("'question' must be a string and 'image' a list of paths")
    return EvalItem(
        test_id=test_id,
        dataset=str(record["dataset"]),
        subset=str(record.get("subset") or ""),
        question=record["question"],
        options=options,
        answer=str(record["answer"]),
        images=tuple(allowed_path(p, base=root, roots=image_roots, where=f"test_id {test_id}") if resolve_images
                     else str(p) for p in images),
        question_type=record.get("question_type"),
    )


def load_suites(
    path: str | Path,
    suites: str | Sequence[str] = ALL,
    *,
    sample: int | Mapping[str, int] | None = None,
    seed: int = 0,
    image_roots: Sequence[str | Path] = (),
) -> EvalSet:
    """Read the file, select suites, drop open/option-less items (counted), validate golds, optionally sample.

    Every record problem in the selected suites (bad options, gold answer not among the options, more than 11
    options) is collected and raised as one MedvlError: the published scorer dies on the first one with
    `assert False` after the whole generation run; we fail before it starts.
    `sample`: items per suite (an int for all, or {suite name: n}); the same seed gives the same items, and a
    suite's sample does not change when other suites are added (each draws from its own seeded stream).
    `image_roots`: folders besides the bundle's own that its image paths may point into (`--image-root`); an
    image path outside them all is refused before anything is opened.
    """
    path = Path(path)
    records = read_records(path)
    datasets_in_file = list(dict.fromkeys(str(r.get("dataset", "")) for r in records))
    chosen = resolve_suites(suites, datasets_in_file)
    wanted = set(chosen)
    items: list[EvalItem] = []
    problems: list[str] = []
    escapes: list[str] = []
    open_skipped = empty_skipped = 0
    for test_id, record in enumerate(records, 1):
        if str(record.get("dataset", "")) not in wanted:
            continue
        if record.get("question_type") == "open":
            open_skipped += 1
            continue
        try:
            item = parse_item(record, test_id, path.parent.resolve(), image_roots)
        except PathOutsideRoots as exc:
            escapes.append(f"test_id {test_id} ({record.get('dataset')}): {exc.what}; {exc.fix}")
            continue
        except MedvlError as exc:
            problems.append(f"test_id {test_id} ({record.get('dataset')}): {exc.what}")
            continue
        if not item.options:
            empty_skipped += 1
            continue
        problem = gold_problem(item)
        if len(item.options) > len(LETTERS):
            problem = f"test_id {test_id} ({item.dataset}): {len(item.options)} options, the prompt letters A..K (11)"
        if problem:
            problems.append(problem)
            continue
        items.append(item)
    if escapes:
        shown = "\n  ".join(escapes[:10])
        more = f"\n  ... and {len(escapes) - 10} more" if len(escapes) > 10 else ""
        raise MedvlError(f"{len(escapes)} image path(s) lead outside the bundle's folder; nothing was read from "
                         f"them:\n  {shown}{more}", where=str(path),
                         fix="an evaluation bundle may only name images inside its own folder; if the images "
                             "really live elsewhere, pass that folder with --image-root DIR")
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise MedvlError(
            f"{len(problems)} evaluation record{'s are' if len(problems) > 1 else ' is'} invalid:\n  {shown}{more}",
            where=str(path),
            fix="'answer' must equal one option text exactly, options must be a list (at most 11): fix or drop them",
        )
    if not items:
        raise MedvlError(
            "no multiple-choice items to evaluate in the selected suites",
            where=str(path),
            fix=f"{open_skipped} open and {empty_skipped} option-less items were skipped; pick other suites",
        )
    sampled: dict[str, int] = {}
    if sample is not None:
        items, sampled = _sample(items, chosen, sample, seed)
    return EvalSet(items, path, tuple(chosen), len(records), open_skipped, empty_skipped, sampled)


def gold_problem(item: EvalItem) -> str | None:
    """Why this item's gold has no letter, or None. Upstream crashes on exactly these (ValueError/IndexError).

    Shared by the loader and the scorer (which may get items built by hand or read from other files).
    """
    where = f"test_id {item.test_id} ({item.dataset})"
    if item.answer == UNKNOWN_GOLD:
        return None
    if item.answer in item.options:
        index = item.options.index(item.answer)
        if index < len(LETTERS):
            return None
        return f"{where}: the gold answer is option {index + 1}, past the 11 letters A..K"
    near = [o for o in item.options if o.strip().lower() == item.answer.strip().lower()]
    hint = f" (did you mean {near[0]!r}? the comparison is exact)" if near else ""
    return f"{where}: gold answer {item.answer!r} is not among the options {list(item.options)}{hint}"


@dataclass(frozen=True)
class ImageProblem:
    path: str
    reason: str  # "missing" or "unreadable: <error>"
    test_ids: tuple[int, ...]


def check_images(
    items: Iterable[EvalItem], *, workers: int = 8, progress: ProgressSink | None = None
) -> list[ImageProblem]:
    """Every missing or unreadable image, each path once with the items that use it. Run before generation.

    Upstream asserts existence only after generating (and its chatbot silently drops images it cannot open).
    `verify()` checks structure (PNG chunk CRCs) without decoding pixels: ~0.1-1 ms per file, threaded
    because most of it is file I/O, so the 17k-item bundle checks in seconds.
    """
    users: dict[str, list[int]] = {}
    for item in items:
        for image in item.images:
            users.setdefault(image, []).append(item.test_id)
    progress = progress or NullProgress()
    progress.start("checking images", total=len(users))

    def check(image: str) -> str | None:
        if not os.path.isfile(image):
            return "missing"
        from PIL import Image  # lazy: importing medvl.evaluate must stay cheap

        try:
            with Image.open(image) as handle:
                handle.verify()
        except Exception as exc:  # any failure means the model would not see this image
            return f"unreadable: {type(exc).__name__}: {exc}"
        return None

    problems = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for image, reason in zip(users, pool.map(check, users)):
            progress.advance()
            if reason:
                problems.append(ImageProblem(image, reason, tuple(users[image])))
    progress.finish()
    return problems


def _parse_options(raw: object) -> tuple[str, ...]:
    if isinstance(raw, str):
        try:  # literal_eval, never eval: the file is downloaded data
            raw = ast.literal_eval(raw) if raw.strip() else []
        except (ValueError, SyntaxError):
            raise MedvlError(f"'options' is a string but not a Python/JSON list literal: {raw[:60]!r}") from None
    if not isinstance(raw, (list, tuple)) or not all(isinstance(o, (str, int, float, bool)) for o in raw):
        raise MedvlError(f"'options' must be a list of texts, got {type(raw).__name__}")
    return tuple(str(o) for o in raw)  # upstream formats options with f"{o}", the same text


def _sample(
    items: list[EvalItem], datasets: list[str], sample: int | Mapping[str, int], seed: int
) -> tuple[list[EvalItem], dict[str, int]]:
    suite_of = {v: k for k, v in SUITES.items()}
    if isinstance(sample, Mapping):
        unknown = [k for k in sample if k not in SUITES and k not in datasets]
        if unknown:
            raise MedvlError(f"sample names unknown suites: {', '.join(unknown)}", fix=f"use: {', '.join(SUITES)}")
    keep: set[int] = set()
    counts: dict[str, int] = {}
    for dataset in datasets:
        ids = [it.test_id for it in items if it.dataset == dataset]
        if isinstance(sample, Mapping):
            n = sample.get(suite_of.get(dataset, dataset), sample.get(dataset, len(ids)))
        else:
            n = sample
        if n < 1:
            raise MedvlError(f"sample must be at least 1, got {n}", where=dataset)
        # A string seed is hashed with SHA-512 by `random`, so this is stable across runs and PYTHONHASHSEED.
        rng = random.Random(f"medvl-eval:{seed}:{dataset}")
        chosen = ids if n >= len(ids) else rng.sample(ids, n)
        keep.update(chosen)
        counts[dataset] = len(chosen)
    return [it for it in items if it.test_id in keep], counts  # file order kept
