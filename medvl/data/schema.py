"""The normalized training record: one sample, one line of JSONL.

Every source format (see `formats.py`) is turned into this one shape; `checks.py` repairs or rejects it; the
collator renders it with the model family's chat template. A line looks like this (wrapped here for reading):

    {"id": "PubMedVision_Alignment_VQA:17",
     "source": "PubMedVision_Alignment_VQA",
     "images": ["images/pmc_123_1.jpg"],
     "image_root": "/data/pubmedvision",
     "messages": [{"role": "user", "content": "<image>\\nPlease describe this picture."},
                  {"role": "assistant", "content": "The image is an axial CT ...", "train": true}],
     "meta": {"format": "sharegpt", "location": "/data/pubmedvision/align.json[17]",
              "modality": "Computed Tomography", "body_part": "Abdomen"}}

Fields (all required; the key order above is the order written):
- `id` (str, non-empty): stable across runs. `"{source}:{own id}"` when the sample carries an id
  (`id`, `_id`), else `"{source}:{index}"` with the 0-based record index in its file. Copies made by an
  InternVL `repeat_time` > 1 get `"#r1"`, `"#r2"`, ... appended, so ids stay unique.
- `source` (str, non-empty): the dataset name: the InternVL meta key, or the file name without its extension.
- `images` (list of str): image paths in placeholder order. A relative path is relative to `image_root`;
  an absolute path stands alone. `[]` for a text-only sample.
- `image_root` (str or null): absolute directory that relative `images` resolve against (the annotation file's
  folder unless the source or the user names another). null only when every path is absolute.
- `messages` (non-empty list): turns in order, each `{"role", "content"}` plus `"train"` on assistant turns.
  `role` is one of `system`, `user`, `assistant`. `content` is a str; each image is the literal placeholder
  `<image>` at the place it belongs in the text. `train` (bool, assistant turns only; defaults to true when
  read) says whether the turn is supervised: Ovis `ignored_gpt` turns become `train: false`. System and user
  turns never carry `train: true`.
- `meta` (object of JSON values): always `format` (the reader that produced it) and `location` (`file:line` for
  JSONL/CSV, `file[index]` for a JSON array, used in every error message); when the source has them:
  `modality`, `body_part`, `width`/`height` (one image) or `widths`/`heights` (several), `dataset`, `subset`,
  `question_type`, `origin` (DISC's own source tag). `checks.py` adds `image_sizes` ([[width, height], ...],
  after EXIF rotation / DICOM decoding) and `repairs` (list of str) when it changed the sample.

Records in a prepared shard also satisfy the semantic rules of `checks.py`: exactly one `<image>` per image, all
of them in user turns, and at least one non-empty assistant turn with `train: true`.

`Rejection` is the other thing a reader or check can produce: a reason code from `REJECTION_REASONS`, a message
meant for a person, and the sample's location. The quarantine file holds their `to_json()` lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from medvl.errors import MedvlError

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")

# Every reason a sample can be quarantined for, in the order the prepare summary lists them. Explicit, so the
# summary table and the README can list them all; `Rejection` refuses a code not in here.
REJECTION_REASONS: dict[str, str] = {
    "bad-json": "the line or element is not valid JSON",
    "bad-shape": "the sample lacks a field its format needs, or a field has the wrong type",
    "unknown-role": "a turn's role is none of system/human/user/gpt/assistant/bot/ignored_gpt",
    "unsupported-media": "video, remote (http) images, or inline data: images without a folder to write them to",
    "bad-answer": "an evaluation item whose answer is not one of its options",
    "duplicate-id": "the sample's id was already used by an earlier sample (the first one is kept)",
    "no-trainable-turn": "no assistant turn is trained, so the sample would add nothing to the loss",
    "empty-assistant": "a trained assistant turn has empty content",
    "no-user-turn": "the sample has images but no user turn to put them in",
    "placeholder-outside-user": "an <image> placeholder sits in a system or assistant turn",
    "extra-placeholders": "more <image> placeholders than images",
    "missing-placeholders": "some but not all images have a placeholder, so which image goes where is unknown",
    "too-many-images": "more images than the limit",
    "image-missing": "an image file does not exist",
    "image-escapes-root": "an image path leaves the dataset root (`..` or a symlink pointing elsewhere)",
    "image-undecodable": "an image file cannot be decoded",
    "image-aspect-ratio": "an image is more than 200 times longer than it is wide (Qwen-VL refuses it)",
    # measured with the model's processor (prepare.py, --model):
    "too-long": "even the first exchange is longer than --max-seq-len tokens",
    "template": "the model's chat template cannot render the conversation consistently",
    "images-for-text-model": "the sample has images, but the model is text-only",
}


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    train: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.role == "assistant":
            d["train"] = self.train
        return d


@dataclass
class Record:
    id: str
    source: str
    images: list[str]
    messages: list[Message]
    image_root: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def location(self) -> str:
        return str(self.meta.get("location", self.id))

    def placeholder_count(self) -> int:
        return sum(m.content.count(IMAGE_PLACEHOLDER) for m in self.messages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "images": list(self.images),
            "image_root": self.image_root,
            "messages": [m.to_dict() for m in self.messages],
            "meta": self.meta,
        }

    def to_json(self) -> str:
        # ensure_ascii=False keeps Chinese medical text readable in the shard (and ~3x smaller than \\u escapes).
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, obj: Any, *, where: str | None = None) -> Record:
        problems = shape_problems(obj)
        if problems:
            raise MedvlError(
                "not a normalized medvl record: " + "; ".join(problems),
                where=where,
                fix="re-create the shard with `medvl prepare-data`, or fix the listed fields by hand",
            )
        messages = [
            Message(m["role"], m["content"], bool(m.get("train", True)) if m["role"] == "assistant" else False)
            for m in obj["messages"]
        ]
        return cls(obj["id"], obj["source"], list(obj["images"]), messages, obj["image_root"], dict(obj["meta"]))


def shape_problems(obj: Any) -> list[str]:
    """Every way `obj` (a parsed JSON line) differs from the normalized shape; [] when it conforms."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    problems = []
    for key in ("id", "source"):
        if not isinstance(obj.get(key), str) or not obj.get(key):
            problems.append(f"`{key}` must be a non-empty string")
    images = obj.get("images")
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        problems.append("`images` must be a list of non-empty path strings")
    if "image_root" not in obj or not (obj["image_root"] is None or isinstance(obj["image_root"], str)):
        problems.append("`image_root` must be present, a string or null")
    if not isinstance(obj.get("meta"), dict):
        problems.append("`meta` must be an object")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        problems.append("`messages` must be a non-empty list")
        return problems
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            problems.append(f"messages[{i}] must be an object")
            continue
        if m.get("role") not in ROLES:
            problems.append(f"messages[{i}].role is {m.get('role')!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            problems.append(f"messages[{i}].content must be a string")
        if "train" in m and not isinstance(m["train"], bool):
            problems.append(f"messages[{i}].train must be true or false")
        elif m.get("train") is True and m.get("role") != "assistant":
            problems.append(f"messages[{i}] is a {m.get('role')} turn and cannot be trained")
        extra = set(m) - {"role", "content", "train"}
        if extra:
            problems.append(f"messages[{i}] has unknown keys {sorted(extra)}")
    return problems


@dataclass(frozen=True)
class Rejection:
    """Why one sample was not kept. `code` is a key of REJECTION_REASONS."""

    code: str
    message: str
    location: str
    id: str | None = None

    def __post_init__(self) -> None:
        if self.code not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection code {self.code!r}; add it to REJECTION_REASONS")

    def to_json(self) -> str:
        return json.dumps(
            {"code": self.code, "message": self.message, "location": self.location, "id": self.id},
            ensure_ascii=False,
        )

    def render(self) -> str:
        """One line for --strict and logs: `file:line: code: message`."""
        return f"{self.location}: {self.code}: {self.message}"
