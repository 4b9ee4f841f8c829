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
- InternVL `repeat_time` follows InternVL's own loader, deterministically: below 1 keeps the first
  floor(N * r) samples; above 1 emits each sample floor(r) times, plus one more copy for the first
  floor(N * fraction) samples. Relative `root` and `annotation` paths resolve against the meta file's folder.
"""

from __future__ import annotations

import ast
import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from medvl.data.containers import BadJSON, _container, iter_raw
from medvl.data.schema import IMAGE_PLACEHOLDER, Message, Record, Rejection
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
# --columns keys: which column holds each part of a one-exchange sample
COLUMN_ROLES = ("user", "assistant", "image", "system", "id")
ALIASES = {"pubmedvision": "sharegpt", "huatuo": "sharegpt", "llava": "sharegpt", "ovis": "sharegpt",
           "qwen-vl": "sharegpt", "internvl": "internvl-meta", "qwen2-vl-csv": "llm-finetune"}

MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
MCQ_LETTERS = "ABCDEFGHIJK"  # HuatuoGPT-Vision's evaluator zips options with these 11 letters
# role as written -> (normalized role, trained). Matched case-insensitively.
ROLE_ALIASES = {"system": ("system", False), "developer": ("system", False), "human": ("user", False),
                "user": ("user", False), "gpt": ("assistant", True), "assistant": ("assistant", True),
                "bot": ("assistant", True), "ignored_gpt": ("assistant", False)}
_VISION_SPAN = re.compile(r"<\|vision_start\|>(.*?)<\|vision_end\|>", re.S)
_MIME_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp",
                "image/bmp": ".bmp", "image/tiff": ".tiff", "application/dicom": ".dcm"}


@dataclass(frozen=True)
class ReadOptions:
    source: str | None = None  # dataset name; default: the file name without its extension
    image_root: str | None = None  # folder relative image paths resolve against; default: the file's folder
    mcq_answer: str = "letter-text"  # medeval answers: "letter-text" -> "B. Pneumonia", "letter" -> "B"
    csv_prompt: str = "COCO Yes:"  # user text of llm-finetune CSV rows (LLM-Finetune's csv2json prompt)
    inline_image_dir: str | None = None  # where openai data: URL images are written; None rejects them
    chunk_chars: int = 1 << 16  # read size of the streaming JSON array reader
    columns: tuple[tuple[str, str], ...] = ()  # ("user", "question"), ...: read rows with the `columns` format


def parse_columns(spec: str) -> tuple[tuple[str, str], ...]:
    """`user=question,assistant=answer,image=path` -> (("user", "question"), ...); user and assistant required."""
    pairs: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, eq, column = (x.strip() for x in part.partition("="))
        if not eq or not column or key not in COLUMN_ROLES:
            raise MedvlError(f"cannot read column mapping {part!r}", where="--columns",
                             fix=f"write ROLE=COLUMN pairs, ROLE one of {', '.join(COLUMN_ROLES)}: "
                                 "--columns user=question,assistant=answer,image=path")
        if key in pairs:
            raise MedvlError(f"{key} is mapped twice", where="--columns")
        pairs[key] = column
    missing = [k for k in ("user", "assistant") if k not in pairs]
    if missing:
        raise MedvlError(f"no column given for {' and '.join(missing)}", where="--columns",
                         fix="e.g. --columns user=question,assistant=answer")
    return tuple(pairs.items())


class _Reject(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class _Ctx:
    fmt: str
    source: str
    image_root: str
    location: str
    index: int
    options: ReadOptions


# --------------------------------------------------------------------------------------------- containers


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


def detect_format(path: str | Path) -> str:
    path = Path(path)
    for location, _, raw in iter_raw(path):
        if _container(path) == "object" and _is_internvl_meta(raw):
            return "internvl-meta"
        if isinstance(raw, dict):
            return detect_record_format(raw, where=location)
    raise MedvlError("no samples in the file to detect its format from", where=str(path))


# --------------------------------------------------------------------------------------------- reading


def read_file(path: str | Path, format: str | None = None, *,
              options: ReadOptions = ReadOptions()) -> Iterator[Record | Rejection]:
    """Normalized records (or rejections) of every sample in one file, in file order."""
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


def _record_id(own: Any, ctx: _Ctx) -> str:
    return f"{ctx.source}:{own}" if own not in (None, "") else f"{ctx.source}:{ctx.index}"


def _record(raw_id: Any, ctx: _Ctx, images: list[str], messages: list[Message], **meta: Any) -> Record:
    if not messages:
        raise _Reject("bad-shape", "the sample has no turns")
    meta = {"format": ctx.fmt, "location": ctx.location, **{k: v for k, v in meta.items() if v not in (None, "")}}
    return Record(_record_id(raw_id, ctx), ctx.source, images, messages, ctx.image_root, meta)


def _role(value: Any) -> tuple[str, bool]:
    mapped = ROLE_ALIASES.get(str(value).lower()) if isinstance(value, str) else None
    if mapped is None:
        raise _Reject("unknown-role", f"turn role {value!r} is none of {', '.join(ROLE_ALIASES)}")
    return mapped


def _turns(raw: dict, key: str) -> list:
    if not isinstance(raw.get(key), list):
        raise _Reject("bad-shape", f"`{key}` must be a list of turns")
    return raw[key]


def _image_list(raw: dict) -> list[str]:
    value = raw.get("image", raw.get("images"))
    if value is None:
        return []
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
        raise _Reject("bad-shape", "`image` must be a path or a list of paths")
    return list(value)


def _no_video(raw: dict) -> None:
    for key in ("video", "video_frames", "videos"):
        if raw.get(key):
            raise _Reject("unsupported-media", f"`{key}` sample: medvl trains on images, not video")


def _from_sharegpt(raw: dict, ctx: _Ctx) -> Record:
    _no_video(raw)
    images, embedded, messages = _image_list(raw), [], []
    for i, turn in enumerate(_turns(raw, "conversations")):
        if not isinstance(turn, dict):
            raise _Reject("bad-shape", f"turn {i} is not an object")
        role, train = _role(turn.get("from", turn.get("role")))
        content = next((turn[k] for k in ("value", "content", "text") if k in turn), None)
        if not isinstance(content, str):
            raise _Reject("bad-shape", f"turn {i} has no text (`value` or `content`)")
        # LLM-Finetune puts the image path itself between vision tokens; keep a placeholder in its place.
        for path in _VISION_SPAN.findall(content):
            if path.strip() and path.strip() != "<|image_pad|>":
                embedded.append(path.strip())
        content = _VISION_SPAN.sub(IMAGE_PLACEHOLDER, content)
        messages.append(Message(role, content, train))
    if images and embedded:
        raise _Reject("bad-shape", "images are given both in `image` and between vision tokens")
    meta = {k: raw.get(k) for k in ("modality", "body_part", "width", "height")}
    return _record(raw.get("id"), ctx, images or embedded, messages, **meta,
                   widths=raw.get("width_list"), heights=raw.get("height_list"))


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


def _from_columns(raw: dict, ctx: _Ctx) -> Record:
    cols = dict(ctx.options.columns)
    value = {role: raw.get(col) for role, col in cols.items()}
    for role in ("user", "assistant", "system"):
        if value.get(role) is not None and not isinstance(value[role], str):
            value[role] = str(value[role])  # flat JSON numbers / booleans (labels) become their text
    if not (value["user"] or "").strip() or not (value["assistant"] or "").strip():
        raise _Reject("bad-shape", f"empty {cols['user']!r} (user) or {cols['assistant']!r} (assistant) column")
    image = (value.get("image") or "").strip() if isinstance(value.get("image"), str) else ""
    messages = [Message("system", value["system"])] if (value.get("system") or "").strip() else []
    messages += [Message("user", value["user"]), Message("assistant", value["assistant"], True)]
    return _record(value.get("id"), ctx, [image] if image else [], messages)


def _from_disc(raw: dict, ctx: _Ctx) -> Record:
    messages = []
    for i, turn in enumerate(_turns(raw, "conversation")):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise _Reject("bad-shape", f"conversation turn {i} needs a `role` and a string `content`")
        role, train = _role(turn.get("role"))
        messages.append(Message(role, turn["content"], train))
    return _record(raw.get("_id", raw.get("id")), ctx, [], messages, origin=raw.get("source"))


def _from_llm_finetune(raw: dict, ctx: _Ctx) -> Record:
    if "conversations" in raw:
        return _from_sharegpt(raw, ctx)
    image, caption = raw.get("image_path"), raw.get("caption")
    if not image or not isinstance(caption, str) or not caption.strip():
        raise _Reject("bad-shape", "a CSV row needs `image_path` and a non-empty `caption`")
    prompt = ctx.options.csv_prompt
    user = f"{prompt} {IMAGE_PLACEHOLDER}" if prompt else IMAGE_PLACEHOLDER
    return _record(raw.get("id"), ctx, [image.strip()],
                   [Message("user", user), Message("assistant", caption, True)])


def _from_openai(raw: dict, ctx: _Ctx) -> Record:
    images, messages = _image_list(raw), []
    for i, msg in enumerate(_turns(raw, "messages")):
        if not isinstance(msg, dict):
            raise _Reject("bad-shape", f"message {i} is not an object")
        role, train = _role(msg.get("role"))
        content = msg.get("content")
        if isinstance(content, list):
            parts = []
            for block in content:
                kind = block.get("type") if isinstance(block, dict) else None
                if kind in ("text", "input_text", "output_text") and isinstance(block.get("text"), str):
                    parts.append(block["text"])
                elif kind in ("image_url", "input_image", "image"):
                    ref = block.get(kind) if kind != "input_image" else block.get("image_url")
                    ref = ref.get("url") if isinstance(ref, dict) else ref or block.get("url") or block.get("path")
                    if not isinstance(ref, str) or not ref:
                        raise _Reject("bad-shape", f"message {i} has an image block without a url or path")
                    images.append(_image_ref(ref, ctx))
                    parts.append(IMAGE_PLACEHOLDER)
                else:
                    raise _Reject("unsupported-media", f"message {i} has a content block of type {kind!r}")
            content = "\n".join(parts)
        if not isinstance(content, str):
            raise _Reject("bad-shape", f"message {i} has no text content (tool calls are not training text)")
        messages.append(Message(role, content, train and msg.get("weight", 1) != 0))
    return _record(raw.get("id"), ctx, images, messages)


def _image_ref(ref: str, ctx: _Ctx) -> str:
    if ref.startswith("data:"):
        return _inline_image(ref, ctx)
    if ref.startswith("file://"):
        return unquote(urlparse(ref).path)
    if re.match(r"^[a-z][a-z0-9+.-]*://", ref, re.I):
        raise _Reject("unsupported-media", f"remote image {ref[:80]!r}: download it and give a local path")
    return ref


def _inline_image(url: str, ctx: _Ctx) -> str:
    folder = ctx.options.inline_image_dir
    if folder is None:
        raise _Reject("unsupported-media", "inline data: image and no folder to write it to "
                                           "(ReadOptions.inline_image_dir)")
    header, _, payload = url.partition(",")
    mime = header[5:].split(";")[0].lower()
    if not header.endswith(";base64") or mime not in _MIME_SUFFIX:
        raise _Reject("unsupported-media", f"data: URL of type {header[:60]!r}; expected base64 PNG/JPEG/"
                                           "WebP/BMP/TIFF/DICOM")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _Reject("bad-shape", "data: URL payload is not valid base64") from None
    dest = Path(folder).resolve() / (hashlib.sha256(data).hexdigest()[:24] + _MIME_SUFFIX[mime])
    if not dest.exists():  # content-addressed: a second worker or a resumed run writes the same bytes
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    return str(dest)


def _from_alpaca(raw: dict, ctx: _Ctx) -> Record:
    instruction, extra, output = raw.get("instruction"), raw.get("input") or "", raw.get("output")
    if not all(isinstance(v, str) for v in (instruction, extra, output)):
        raise _Reject("bad-shape", "`instruction`, `input` and `output` must be strings")
    messages = [Message("system", raw["system"])] if isinstance(raw.get("system"), str) and raw["system"] else []
    for pair in raw.get("history") or []:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise _Reject("bad-shape", "`history` must be a list of [question, answer] pairs")
        messages += [Message("user", pair[0]), Message("assistant", pair[1], True)]
    user = f"{instruction}\n{extra}" if extra and instruction else instruction or extra
    messages += [Message("user", user), Message("assistant", output, True)]
    return _record(raw.get("id"), ctx, [], messages)


def _from_medeval(raw: dict, ctx: _Ctx) -> Record:
    question, answer, options = raw.get("question"), raw.get("answer"), raw.get("options") or []
    if isinstance(options, str):  # some copies store the list as a Python literal string
        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError):
            raise _Reject("bad-shape", "`options` is a string that is not a list literal") from None
    if not isinstance(question, str) or not isinstance(answer, str) or not isinstance(options, list):
        raise _Reject("bad-shape", "`question` and `answer` must be strings and `options` a list")
    options = [str(o) for o in options]
    images = _image_list(raw)
    lead = (IMAGE_PLACEHOLDER + "\n") * len(images)
    meta = {k: raw.get(k) for k in ("dataset", "subset", "question_type")}
    if not options:
        return _record(raw.get("id"), ctx, images, [Message("user", lead + question),
                                                    Message("assistant", answer, True)], **meta)
    if len(options) > len(MCQ_LETTERS):
        raise _Reject("bad-shape", f"{len(options)} options; the prompt has letters for {len(MCQ_LETTERS)}")
    if answer in options:
        letter = MCQ_LETTERS[options.index(answer)]
    elif answer in MCQ_LETTERS[: len(options)] and len(answer) == 1:
        letter = answer  # an answer given as its letter
    else:
        raise _Reject("bad-answer", f"answer {answer[:80]!r} is not one of the options {options}")
    listing = "\n".join(f"{MCQ_LETTERS[i]}. {opt}" for i, opt in enumerate(options))
    reply = letter if ctx.options.mcq_answer == "letter" else f"{letter}. {options[MCQ_LETTERS.index(letter)]}"
    return _record(raw.get("id"), ctx, images, [Message("user", f"{lead}{question}\n{listing}\n{MCQ_SUFFIX}"),
                                                Message("assistant", reply, True)], **meta)


_CONVERTERS: dict[str, Callable[[dict, _Ctx], Record]] = {
    "sharegpt": _from_sharegpt, "disc": _from_disc, "llm-finetune": _from_llm_finetune, "openai": _from_openai,
    "alpaca": _from_alpaca, "medeval": _from_medeval, "columns": _from_columns,
}


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
