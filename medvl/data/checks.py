"""Per-sample validation and repair, before any tokenizer is involved.

`check_record(record, policy)` returns the record, repaired when a repair is safe, or a `Rejection` that says
which rule failed, for which sample, and where it came from. The rules, cheapest first:

1. `no-trainable-turn`: at least one assistant turn must have `train: true`, or the sample adds nothing to the
   loss (a batch of such samples is the mean-over-nothing that gives NaN losses upstream).
   `empty-assistant`: a trained assistant turn must have non-whitespace content.
2. `placeholder-outside-user`: `<image>` may appear only in user turns (Qwen-VL's README forbids tags in answers;
   system text is placed differently by each family's template).
3. `too-many-images`: at most `policy.max_images` (default 8, HuatuoGPT-Vision's train_vl.py limit).
4. Placeholder count against image count: none at all and n images -> n `"<image>\\n"` are inserted at the start
   of the FIRST USER turn (never a system turn), the convention every upstream loader uses for PubMedVision;
   `meta.repairs` records it. More placeholders than images -> `extra-placeholders`. Some but fewer than images ->
   `missing-placeholders`: we cannot know which image goes where, and guessing would bind text to the wrong
   image. Images but no user turn -> `no-user-turn`.
5. Image paths, by the one root rule of `paths.py`: `image-escapes-root` when a path (relative through `..`, or
   absolute) or its real path (symlinks resolved) lies outside `image_root` and every folder in `policy.roots`
   (the `--image-root` folders; datasets that link `images/` to another disk name that disk there); the message
   names the `--image-root DIR` that would allow it. Then `image-missing`. Relative paths not found beside
   the data are looked up in the `policy.search` folders first (`--image-root`, in order).
6. `image-undecodable`: every image is decoded in full through `images.probe_image` (`policy.decode=False` skips
   this for a quick pass); the sizes the model will see go to `meta.image_sizes` as [[width, height], ...].
   `image-aspect-ratio`: with `policy.resolution` set, an image over 200:1 is refused as Qwen-VL would.

The exact token-length check needs the model's processor and lives with the collator, not here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from medvl.data.images import MAX_ASPECT_RATIO, ResolutionPolicy, probe_image
from medvl.data.paths import path_problem
from medvl.data.schema import IMAGE_PLACEHOLDER, REJECTION_REASONS, Message, Record, Rejection
from medvl.errors import MedvlError

__all__ = ["CheckPolicy", "check_record", "Rejection", "REJECTION_REASONS"]


@dataclass(frozen=True)
class CheckPolicy:
    max_images: int = 8  # HuatuoGPT-Vision train_vl.py drops items with more than 8 images
    roots: tuple[str, ...] = ()  # extra folders images may live in (--image-root; the disk images/ links to)
    search: tuple[str, ...] = ()  # where relative paths not found beside the data are looked up (--image-root)
    decode: bool = True  # decode every image in full; False only checks that the files exist
    frame: str | int = "middle"  # multi-frame DICOM frame, see images.py
    resolution: ResolutionPolicy | None = None  # when set, refuse images Qwen-VL's resize refuses


def check_record(record: Record, policy: CheckPolicy = CheckPolicy()) -> Record | Rejection:
    """The record (repaired when safe) or the first rule it breaks."""

    def reject(code: str, message: str) -> Rejection:
        return Rejection(code, message, record.location, record.id)

    trained = [m for m in record.messages if m.role == "assistant" and m.train]
    if not trained:
        return reject("no-trainable-turn", "no assistant turn is trained (every answer is missing or ignored)")
    if any(not m.content.strip() for m in trained):
        turn = next(i for i, m in enumerate(record.messages) if m.role == "assistant" and m.train
                    and not m.content.strip())
        return reject("empty-assistant", f"turn {turn} is a trained assistant turn with no text")
    for i, m in enumerate(record.messages):
        if m.role != "user" and IMAGE_PLACEHOLDER in m.content:
            return reject("placeholder-outside-user", f"turn {i} ({m.role}) contains {IMAGE_PLACEHOLDER}")
    n_images = len(record.images)
    if n_images > policy.max_images:
        return reject("too-many-images", f"{n_images} images; the limit is {policy.max_images}")
    record = _placeholders(record, reject)
    if isinstance(record, Rejection):
        return record
    record = _rebase(record, policy)
    sizes = []
    for path in record.images:
        problem = _path_problem(record, path, policy)
        if problem:
            return reject(*problem)
        if policy.decode:
            try:
                info = probe_image(_full_path(record, path), frame=policy.frame)
            except MedvlError as e:
                return reject("image-undecodable", f"{path}: {e.what}")
            if policy.resolution is not None and max(info.width, info.height) > MAX_ASPECT_RATIO * min(
                    info.width, info.height):
                return reject("image-aspect-ratio", f"{path} is {info.width}x{info.height}, over "
                                                    f"{MAX_ASPECT_RATIO}:1")
            sizes.append([info.width, info.height])
    if sizes:  # a new meta dict: the caller's record is never changed
        record = replace(record, meta={**record.meta, "image_sizes": sizes})
    return record


def _placeholders(record: Record, reject) -> Record | Rejection:
    n_images, count = len(record.images), record.placeholder_count()
    if count > n_images:
        return reject("extra-placeholders", f"{count} {IMAGE_PLACEHOLDER} placeholders but {n_images} images")
    if count == n_images:
        return record
    if count > 0:
        return reject("missing-placeholders",
                      f"{count} {IMAGE_PLACEHOLDER} placeholders for {n_images} images: add one per image where "
                      "it belongs, or remove them all to have them placed at the start of the first user turn")
    first_user = next((i for i, m in enumerate(record.messages) if m.role == "user"), None)
    if first_user is None:
        return reject("no-user-turn", f"{n_images} images but no user turn to show them in")
    messages = list(record.messages)
    old = messages[first_user]
    messages[first_user] = Message(old.role, (IMAGE_PLACEHOLDER + "\n") * n_images + old.content, old.train)
    repairs = list(record.meta.get("repairs", [])) + [
        f"inserted {n_images} {IMAGE_PLACEHOLDER} at the start of turn {first_user} (first user turn)"]
    return replace(record, messages=messages, meta={**record.meta, "repairs": repairs})


def _rebase(record: Record, policy: CheckPolicy) -> Record:
    """Relative images not all beside the data: the first `policy.search` folder that holds them all becomes the
    record's image_root (JSON in one folder, `images/` unzipped in another: `--image-root` that other one)."""
    relative = [p for p in record.images if not os.path.isabs(p)]
    if not relative or not policy.search or record.image_root is None or all(
            os.path.isfile(os.path.join(record.image_root, p)) for p in relative):
        return record
    for folder in policy.search:
        if all(os.path.isfile(os.path.join(folder, p)) for p in relative):
            return replace(record, image_root=folder)
    return record


def _full_path(record: Record, path: str) -> str:
    if os.path.isabs(path) or record.image_root is None:
        return path
    return os.path.join(record.image_root, path)


def _path_problem(record: Record, path: str, policy: CheckPolicy) -> tuple[str, str] | None:
    problem = path_problem(path, base=record.image_root, roots=policy.roots)  # the one root rule (paths.py)
    if problem:
        return "image-escapes-root", problem
    full = _full_path(record, path)
    if not os.path.isfile(full):
        return "image-missing", f"{path} does not exist (looked for {full})"
    return None


def rejection_counts(rejections: Iterable[Rejection]) -> dict[str, int]:
    """Count per reason code, in REJECTION_REASONS order, codes with zero left out (for the summary table)."""
    counts = {code: 0 for code in REJECTION_REASONS}
    for r in rejections:
        counts[r.code] += 1
    return {code: n for code, n in counts.items() if n}


def resolve_image(record: Record, index: int) -> Path:
    """Absolute path of one of a record's images, for callers that open it (collator, inspect)."""
    return Path(_full_path(record, record.images[index])).absolute()
