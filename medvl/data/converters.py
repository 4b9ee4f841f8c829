"""One converter per source format: a raw sample (a dict, as `containers.iter_raw` yields it) -> a normalized
`Record`, or `_Reject` with a reason code. `formats.py` picks the converter, reads the files and holds the table
of formats and the decisions each converter follows.
"""

from __future__ import annotations

import ast
import base64
import binascii
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from medvl.data.schema import IMAGE_PLACEHOLDER, Message, Record
from medvl.errors import MedvlError

# --columns keys: which column holds each part of a one-exchange sample
COLUMN_ROLES = ("user", "assistant", "image", "system", "id")

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

