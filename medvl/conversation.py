"""A chat's images and what a chat becomes on disk: a training record (/save) and a report (/export).

Images: a path is checked once, when it is attached, by the rules prepare-data applies to a dataset
(medvl.data.checks: missing file, a relative path whose `..` or symlink leaves the root, here the folder chat
was started in; absolute paths are taken as written) and decoded by the one loader (medvl.data.images), so a
bad path is a message, never a crash halfway through an answer. DICOM images carry an optional window
(`/window lung` or `/window 40/400`, center/width) that replaces the file's own for the thumbnail and the model.

/save appends ONE normalized record (medvl.data.schema.Record, the line `prepare-data` and `train` read) per
call: the whole conversation, every assistant turn trained, so a clinician who corrects an answer (/undo, ask
again, or edit the file) turns the session into training data. Image paths are written relative to the file's
folder when the image lies inside it (never with `..`), else absolute: prepare-data reads either unchanged.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from medvl.errors import MedvlError

SOURCE = "medvl-chat"


@dataclass
class ChatImage:
    path: Path
    window: tuple[float, float] | None = None  # DICOM (center, width); None: the file's own window
    dicom: bool = False
    _image: object = field(default=None, repr=False, compare=False)

    def load(self):
        """The RGB PIL image the model sees (decoded once, then kept)."""
        if self._image is None:
            from medvl.data.images import load_image

            self._image = load_image(self.path, window=self.window if self.dicom else None)
        return self._image


def parse_window(text: str) -> tuple[float, float] | None:
    """'lung' | 'mediastinum' | 'bone' | 'brain' | 'abdomen' | 'C/W' (e.g. '40/400') | 'file' (the file's own)."""
    from medvl.data.images import WINDOW_PRESETS

    text = text.strip().lower()
    if text in ("file", "default", "auto", ""):
        return None
    if text in WINDOW_PRESETS:
        return WINDOW_PRESETS[text]
    parts = text.replace(",", "/").split("/")
    try:
        center, width = (float(p) for p in parts)
    except ValueError:
        raise MedvlError(f"unknown window '{text}'",
                         fix=f"use one of {', '.join(WINDOW_PRESETS)}, 'file', or CENTER/WIDTH such as 40/400") from None
    if width <= 1:
        raise MedvlError(f"window width must be above 1, got {width:g}", fix="e.g. /window 40/400 (center/width)")
    return center, width


def check_image(path: str | Path, root: str | Path = ".", window: tuple[float, float] | None = None) -> ChatImage:
    """A ChatImage that exists, stays inside `root` (relative paths) and decodes; MedvlError otherwise."""
    from medvl.data.images import is_dicom
    from medvl.data.paths import path_problem

    raw = str(path).strip()
    if not raw:
        raise MedvlError("no image path given", fix="/image PATH")
    raw = os.path.expanduser(raw)
    # A path the user types is theirs to open: an absolute one is taken as written. A relative one follows the
    # root rule of data paths (medvl.data.paths): it may not climb out of the folder chat was started in.
    problem = None if os.path.isabs(raw) else path_problem(raw, base=Path(root).absolute())
    if problem is not None:
        raise MedvlError(f"image-escapes-root: {problem.split('; ')[0]}", where=raw,
                         fix="give a path inside the folder chat was started in, or an absolute path")
    full = Path(raw) if os.path.isabs(raw) else Path(root).absolute() / raw  # /save and /export outlive the cwd
    if not full.is_file():
        what = "is a folder, not an image" if full.is_dir() else "does not exist"
        raise MedvlError(f"image-missing: {raw} {what}", where=str(full), fix="check the path (TAB completes it)")
    image = ChatImage(full, window, is_dicom(full))
    image.load()  # undecodable: MedvlError from the loader, now rather than mid-answer
    return image


def to_record(turns, *, system: str | None, model: str, out_file: str | Path) -> dict:
    """The conversation as one normalized record (a dict, `Record.to_dict()` shape) for `out_file`."""
    from medvl.data.schema import IMAGE_PLACEHOLDER, Message, Record

    if not any(t.role == "assistant" and t.text.strip() for t in turns):
        raise MedvlError("nothing to save yet", fix="ask a question and let the model answer first")
    folder = Path(out_file).absolute().parent
    images, messages = [], [Message("system", system)] if system else []
    for t in turns:
        if t.role == "user":
            images += [_portable(im.path, folder) for im in t.images]
            messages.append(Message("user", IMAGE_PLACEHOLDER * len(t.images) + t.text))
        elif t.text.strip():
            messages.append(Message("assistant", t.text, True))
    stamp = time.strftime("%Y%m%dT%H%M%S")
    record = Record(f"{SOURCE}:{stamp}", SOURCE, images, messages, str(folder),
                    {"format": SOURCE, "model": model,
                     "windows": [list(im.window) if im.window else None for t in turns for im in t.images]})
    return record.to_dict()


def _portable(path: Path, folder: Path) -> str:
    full = Path(os.path.abspath(path))
    try:
        return str(full.relative_to(folder))  # inside the file's folder: no `..`, ever
    except ValueError:
        return str(full)


def _check_out_file(out: Path, usage: str) -> None:
    """/save and /export targets: a folder, or a path under a file, is the user's slip, not a crash."""
    if out.is_dir():
        raise MedvlError(f"{out} is a directory", where=str(out), fix=usage)
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise MedvlError(f"cannot write {out}: {blocker} is a file, not a folder", where=str(out), fix=usage)


def _write_error(out: Path, exc: OSError, usage: str) -> MedvlError:
    return MedvlError(f"cannot write {out}: {exc.strerror or exc}", where=str(out),
                      fix=f"{usage} in a folder you can write to")


def save_record(turns, out_file: str | Path, *, system: str | None, model: str) -> Path:
    """Append the conversation to `out_file` (JSONL) as one record; returns the file."""
    out = Path(out_file)
    record = to_record(turns, system=system, model=model, out_file=out)
    _check_out_file(out, "/save FILE.jsonl")
    line = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:  # one write of one line: a crash never leaves half a record
            f.write(line)
    except OSError as exc:  # permission denied, a full disk: the session goes on
        raise _write_error(out, exc, "/save FILE.jsonl") from None
    return out


def to_markdown(turns, *, system: str | None, model: str) -> str:
    lines = [f"# Chat with {model}", "", time.strftime("%Y-%m-%d %H:%M"), ""]
    if system:
        lines += [f"**System:** {system}", ""]
    for t in turns:
        if t.role == "user":
            for im in t.images:
                win = f" (window {im.window[0]:g}/{im.window[1]:g})" if im.window else ""
                lines.append(f"![{im.path.name}]({im.path}){win}")
            lines += [f"**You:** {t.text}", ""]
        else:
            lines += [f"**Model:** {t.text}", ""]
    return "\n".join(lines)


def export_markdown(turns, out_file: str | Path, *, system: str | None, model: str) -> Path:
    out = Path(out_file)
    _check_out_file(out, "/export FILE.md")
    tmp = out.with_name(f".{out.name}.partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(to_markdown(turns, system=system, model=model), encoding="utf-8")
        os.replace(tmp, out)  # all or nothing
    except OSError as exc:
        raise _write_error(out, exc, "/export FILE.md") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out
