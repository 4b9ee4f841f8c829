"""Source formats: one reader per format family, each turning raw samples into normalized `Record`s.

`read_file(path)` detects the format from the file's container (containers.py: JSON array, JSONL, JSON object, CSV) and
its first sample, or takes `format=` by name, and yields a `Record` or a `Rejection` per sample, in file order.
Every sample remembers its location (`file:line` for JSONL/CSV, `file[index]` for a JSON array). JSON arrays are
streamed element by element with `json.JSONDecoder.raw_decode` over a buffered text stream, so a 700 MB
PubMedVision file costs memory for one element, not the file.

| name | sources | shape |
|---|---|---|
| `sharegpt` | PubMedVision, HuatuoGPT-Vision, LLaVA, ShareGPT, Ovis, Qwen-VL fine-tune, InternVL annotations | `conversations` of `from`/`value` or `role`/`content`; `image` or `images`, str or list |
| `internvl-meta` | InternVL meta JSON | `{name: {root, annotation, repeat_time, length}}` |
| `disc` | DISC-MedLLM | JSONL `{_id, source, conversation: [{role, content}]}`, text only |
| `llm-finetune` | Zeyi-Lin/LLM-Finetune Qwen2-VL | JSON whose user text holds `<\\|vision_start\\|>PATH<\\|vision_end\\|>`, or CSV `image_path,caption` |
| `openai` | OpenAI chat / Qwen message lists | `messages` with str content or `text` / `image_url` / `image` blocks |
| `alpaca` | Alpaca, text classification, NER | `instruction`, `input`, `output` (+ optional `system`, `history`) |
| `medeval` | HuatuoGPT-Vision medical evaluation JSON | `question`, `options`, `answer`, `image`, `dataset` |
| `columns` | any CSV / flat JSON table (classification, NER, QA) | columns named by `ReadOptions.columns` |

The ShareGPT-shaped sources share one reader because their shapes coincide; their quirks are all handled there:
PubMedVision's missing `<image>` tags (inserted later by `checks.py`), Ovis `ignored_gpt` turns (`train: false`),
the Qwen-VL README's `images` key, InternVL `width`/`height` and `width_list`/`height_list`, and `video` /
`video_frames` samples (rejected: medvl trains on images). Aliases accepted by `format=`: see `ALIASES`.

Decisions:
- `medeval` items become a user turn with the published LLaVA prompt, images first (as HuatuoGPT-Vision's
  evaluator sends them): `"<image>\\n" * n + "{question}\\n{A. opt\\nB. opt}\\nAnswer with the option's letter
  from the given choices directly."`, answered `"{letter}. {text}"` by default (`mcq_answer="letter"` for the
  bare letter). The letter comes first, so the HuatuoGPT scorer still reads it, and the option text gives the
  model more than one supervised token to learn from. Items without options become plain question/answer pairs.
- `openai` data: URLs are written, when `ReadOptions.inline_image_dir` is set, to that folder named by the
  SHA-256 of their bytes (idempotent under re-runs and parallel workers); otherwise they are rejected with a
  reason. `file://` URLs become paths; http(s) URLs are rejected (download them first). An assistant message
  with `"weight": 0` (OpenAI fine-tuning) is kept as context with `train: false`.
- A CSV whose format was detected from its first row (not `--format`, not `--columns`) and has columns that
  format does not read: a warning naming them (`notes`), or a file-level error when one looks like images (name
  has image/img/path/file, or the value ends in an image suffix): its questions would train without their images.
- InternVL `repeat_time` follows InternVL's own loader, deterministically: below 1 keeps the first
  floor(N * r) samples; above 1 emits each sample floor(r) times, plus one more copy for the first
  floor(N * fraction) samples. Relative `root` and `annotation` paths resolve against the meta file's folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import Any

from medvl.data.containers import BadJSON, _container, iter_raw
from medvl.data.converters import (  # noqa: F401  (MCQ_SUFFIX, parse_columns: part of this module's API)
    _CONVERTERS, MCQ_SUFFIX, ReadOptions, _Ctx, _Reject, _record_id, parse_columns)
from medvl.data.schema import Record, Rejection
from medvl.errors import MedvlError

FORMATS: dict[str, str] = {
    "sharegpt": "PubMedVision / HuatuoGPT-Vision / LLaVA / ShareGPT / Ovis / Qwen-VL / InternVL annotations",
    "internvl-meta": "InternVL meta JSON naming annotation JSONL files",
    "disc": "DISC-MedLLM JSONL (conversation of role/content, text only)",
    "llm-finetune": "LLM-Finetune Qwen2-VL JSON (path between vision tokens) or CSV (image_path, caption)",
    "openai": "OpenAI-style messages with text and image content blocks",
    "alpaca": "Alpaca instruction / input / output",
    "medeval": "HuatuoGPT-Vision medical evaluation JSON (question, options, answer, image)",
    "columns": "CSV rows (flat JSON with --format columns) whose columns --columns user=COL,assistant=COL names",
}
ALIASES = {"pubmedvision": "sharegpt", "huatuo": "sharegpt", "llava": "sharegpt", "ovis": "sharegpt",
           "qwen-vl": "sharegpt", "internvl": "internvl-meta", "qwen2-vl-csv": "llm-finetune"}


def canonical_format(name: str) -> str:
    name = name.lower()
    name = ALIASES.get(name, name)
    if name not in FORMATS:
        raise MedvlError(f"unknown data format {name!r}",
                         fix=f"use one of {', '.join(FORMATS)} (or an alias: {', '.join(ALIASES)})")
    return name


def detect_record_format(raw: Any, *, where: str = "") -> str:
    """The format of one raw sample, from its keys."""
    if isinstance(raw, dict):
        if isinstance(raw.get("messages"), list):
            return "openai"
        if isinstance(raw.get("conversation"), list):
            return "disc"
        if "question" in raw and "answer" in raw:
            return "medeval"
        if "instruction" in raw and "output" in raw:
            return "alpaca"
        if "image_path" in raw and "caption" in raw:
            return "llm-finetune"
        if isinstance(raw.get("conversations"), list):
            text = json.dumps(raw["conversations"], ensure_ascii=False)
            return "llm-finetune" if "<|vision_start|>" in text else "sharegpt"
    keys = sorted(raw)[:12] if isinstance(raw, dict) else type(raw).__name__
    raise MedvlError(f"cannot tell the data format of the first sample (keys: {keys})", where=where,
                     fix=f"pass the format by name: one of {', '.join(FORMATS)}")


def _is_internvl_meta(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(v, dict) and "annotation" in v for v in obj.values())


# --------------------------------------------------------------------------------------------- reading


def read_file(path: str | Path, format: str | None = None, *, options: ReadOptions = ReadOptions(),
              notes: list[str] | None = None) -> Iterator[Record | Rejection]:
    """Normalized records (or rejections) of every sample in one file, in file order. Warnings about the file as
    a whole (columns of an auto-detected CSV that its format does not read) are appended to `notes`."""
    path = Path(path)
    if not path.is_file():
        raise MedvlError("data file not found", where=str(path))
    fmt = canonical_format(format) if format else None
    if options.columns and (fmt == "columns" or fmt is None and _container(path) == "csv"):
        fmt = "columns"  # the mapping names CSV columns; JSON files beside them keep their detected format
    elif fmt == "columns":
        raise MedvlError("the columns format needs a column mapping", fix="add --columns user=COL,assistant=COL")
    source = options.source or path.stem
    root = str(Path(options.image_root or path.parent).resolve())
    raws = iter_raw(path, chunk_chars=options.chunk_chars)
    if fmt in (None, "internvl-meta") and _container(path) == "object":
        location, _, obj = next(raws)
        if _is_internvl_meta(obj):
            yield from _read_internvl_meta(path, obj, options)
            return
        raws = chain([(location, 0, obj)], raws)
    if fmt == "internvl-meta":
        raise MedvlError("not an InternVL meta file: expected {name: {root, annotation, ...}}", where=str(path))
    if fmt is None:
        held = []
        for item in raws:
            held.append(item)
            if isinstance(item[2], dict):
                fmt = detect_record_format(item[2], where=item[0])
                if _container(path) == "csv":
                    _check_unused_columns(item[2], fmt, path, notes)
                break
        raws = chain(held, raws)
        if fmt is None:  # nothing but broken samples: report each of them
            fmt = "sharegpt"
    if fmt == "columns":
        raws = _check_columns(raws, options, path)
    for location, index, raw in raws:
        yield normalize(raw, fmt, location=location, index=index, source=source, image_root=root, options=options)


def normalize(raw: Any, fmt: str, *, location: str, index: int, source: str, image_root: str,
              options: ReadOptions = ReadOptions()) -> Record | Rejection:
    """One raw sample (as `iter_raw` yields it) to a record; for callers that shard raw samples themselves."""
    fmt = canonical_format(fmt)
    if fmt not in _CONVERTERS:
        raise MedvlError(f"{fmt} files hold no samples themselves; read them with read_file", where=location)
    ctx = _Ctx(fmt, source, image_root, location, index, options)
    convert = _CONVERTERS[fmt]
    if isinstance(raw, BadJSON):
        return Rejection("bad-json", str(raw), ctx.location)
    if not isinstance(raw, dict):
        return Rejection("bad-shape", f"a sample must be a JSON object, got {type(raw).__name__}", ctx.location)
    try:
        return convert(raw, ctx)
    except _Reject as r:
        return Rejection(r.code, r.message, ctx.location, _record_id(raw.get("id", raw.get("_id")), ctx))


# The CSV columns each auto-detectable format reads, and its (user, assistant, image) columns for the --columns fix.
_CSV_READS = {"medeval": {"id", "question", "answer", "options", "image", "images", "dataset", "subset",
                          "question_type"},
              "alpaca": {"id", "instruction", "input", "output", "system", "history"},
              "llm-finetune": {"id", "image_path", "caption"}}
_CSV_ROLES = {"medeval": ("question", "answer", "image"), "alpaca": ("instruction", "output", None),
              "llm-finetune": ("COLUMN", "caption", "image_path")}
_IMAGE_NAME = re.compile(r"image|img|path|file", re.I)


def _check_unused_columns(row: dict, fmt: str, path: Path, notes: list[str] | None) -> None:
    """Columns of an auto-detected CSV that its format does not read: noted, or the file refused when one looks
    like the images (name or value), since training on the questions without their images is silently wrong."""
    from medvl.data.images import IMAGE_SUFFIXES

    reads = _CSV_READS.get(fmt, set())
    unused = [c for c in row if c and c not in reads]  # None / "": values past the header, blank header cells
    if fmt not in _CSV_READS or not unused:
        return
    images = [c for c in unused if _IMAGE_NAME.search(c) or isinstance(row[c], str)
              and row[c].strip().lower().endswith(IMAGE_SUFFIXES)]
    user, assistant, image = _CSV_ROLES[fmt]
    image = images[0] if images else image if image and image in row else None
    mapping = f"--columns user={user},assistant={assistant}" + (f",image={image}" if image else "")
    names = ", ".join(repr(c) for c in unused)
    if images:
        verb = "looks" if len(images) == 1 else "look"
        raise MedvlError(f"read as the {fmt} format, whose reader does not use the column(s) {names}; "
                         f"{', '.join(map(repr, images))} {verb} like image paths, and training on the text "
                         "without its images is wrong", where=str(path), fix=f"read the file by column: {mapping}")
    if notes is not None:
        notes.append(f"{path}: column(s) {names} are not read (the file was detected as the {fmt} format) and are "
                     f"ignored; to use them, read the file by column: {mapping}")


def _check_columns(raws, options: ReadOptions, path: Path):
    """The first row must have every mapped column: a wrong name is one file-level error, not N rejections."""
    held = []
    for item in raws:
        held.append(item)
        if isinstance(item[2], dict):
            absent = [f"{col} ({role})" for role, col in options.columns if col not in item[2]]
            if absent:
                raise MedvlError(f"no column {', '.join(absent)} in the file; it has: "
                                 f"{', '.join(map(str, list(item[2])[:20]))}", where=item[0],
                                 fix="name existing columns in --columns ROLE=COLUMN")
            break
    return chain(held, raws)


def _read_internvl_meta(path: Path, meta: dict, options: ReadOptions) -> Iterator[Record | Rejection]:
    base = path.parent.resolve()
    for name, entry in meta.items():
        where = f"{path}: {name}"
        annotation = base / entry["annotation"]
        repeat = entry.get("repeat_time", 1)
        if not isinstance(repeat, (int, float)) or isinstance(repeat, bool) or repeat <= 0:
            raise MedvlError(f"repeat_time must be a number above 0, got {repeat!r}", where=where)
        if not annotation.is_file():
            raise MedvlError(f"annotation file {annotation} not found", where=where,
                             fix="relative paths resolve against the meta file's folder")
        sub = replace(options, source=name, image_root=str(base / entry.get("root", "")))
        whole, fraction = int(repeat), repeat - int(repeat)
        extra = 0
        if fraction:  # counting is one cheap pass; only needed when part of the data is kept or repeated
            extra = int(sum(1 for _ in iter_raw(annotation, chunk_chars=options.chunk_chars)) * fraction)
        for i, item in enumerate(read_file(annotation, options=sub)):
            copies = whole + (1 if i < extra else 0)
            if copies == 0:
                break  # repeat_time < 1 keeps a prefix, and we are past it
            if isinstance(item, Rejection):
                yield item
                continue
            item.meta["repeat_time"] = repeat
            yield item
            for k in range(1, copies):
                yield Record(f"{item.id}#r{k}", item.source, list(item.images), list(item.messages),
                             item.image_root, {**item.meta})
