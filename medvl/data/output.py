"""The prepare-data output folder: open it fresh, resume it, or replace it, and leave nothing behind a failure.

- The state file (`prepare-state.json`: settings fingerprint + size and mtime of every input) only counts once a
  shard is complete (`stats-*.json`). Leftovers of a run that failed before that, and the output of a run that
  finished but failed (a file-level failure, nothing kept), are cleared without asking: the corrected command
  just runs.
- Same settings and unchanged inputs: resume, skipping complete shards. Anything else over a finished, good
  output needs `--overwrite`.
- Only prepare-data's own files are ever removed: a folder holding anything else is refused, with or without
  `--overwrite` (`--out ~/thesis` by mistake must not cost a thesis).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from medvl.errors import MedvlError

STATE_FILE = "prepare-state.json"


def _input_stats(settings) -> list[list[int]]:
    """(size, mtime in ns) per input file: a resumed run must read the very same files."""
    return [[os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in settings.inputs]


def _is_output_file(p: Path) -> bool:
    name = p.name.lstrip(".")
    return name.startswith(("data-", "quarantine", "stats-", "manifest.json", STATE_FILE)) and (
        p.suffix in (".jsonl", ".json", ".tmp"))


def open_output(out: Path, settings, overwrite: bool) -> set[int]:
    """Create or reopen the output directory; the shards already complete (for resuming).

    The state only counts once a shard is complete: leftovers of a run that failed before that (a wrong
    --format, an unreadable file with --strict), and the output of a run that finished but failed (a file-level
    failure, nothing kept), are cleared without asking, so the corrected command just runs.
    """
    if out.exists() and not out.is_dir():
        raise MedvlError(f"--out {out} is a file, not a folder", where=str(out),
                         fix="give a new or empty folder for the prepared data")
    state = out / STATE_FILE
    if out.is_dir() and any(out.iterdir()):
        foreign = [p.name for p in out.iterdir() if not _is_output_file(p)]
        if foreign:
            raise MedvlError(f"--out {out} is not empty and does not hold prepared data (it has "
                             f"{', '.join(sorted(foreign)[:5])}{', ...' if len(foreign) > 5 else ''})",
                             where=str(out), fix="give a new or empty folder for the prepared data")
        complete = list(out.glob("stats-*.json"))
        finished = (out / "manifest.json").is_file()
        try:
            old = json.loads(state.read_text()) if state.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            old = {}
        same = old.get("fingerprint") == settings.fingerprint() and old.get("input_stats") == _input_stats(settings)
        if not complete and not finished or finished and _failed_output(out):
            _clear(out)  # nothing of value: a run that never completed a shard, or one that failed (exit 2)
        elif overwrite and (finished or not same):
            _clear(out)
        elif not same:
            kind = "prepared data" if finished else f"an unfinished prepare-data run ({len(complete)} shard(s) done)"
            changed = " or the input files changed since" if old.get("fingerprint") == settings.fingerprint() else ""
            raise MedvlError(f"{out} already holds {kind} made with other inputs or settings{changed}",
                             where=str(out), fix="pass --overwrite to start over in this folder, or choose a new "
                                                 "--out folder")
    out.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"fingerprint": settings.fingerprint(), "settings": asdict(settings),
                                 "input_stats": _input_stats(settings)}, indent=2))
    return {int(p.stem.split("-")[1]) for p in out.glob("stats-*.json")}


def _failed_output(out: Path) -> bool:
    """A finished output whose run failed (a file could not be read, or nothing was kept): the re-run replaces it."""
    try:
        m = json.loads((out / "manifest.json").read_text())
        return m.get("accepted") == 0 or any(f.get("error") for f in m.get("files", []))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, AttributeError):
        return False


def _clear(out: Path) -> None:
    """Remove prepare-data's own files from `out` (never anything else: --out may be a mistyped folder)."""
    for p in out.iterdir():
        if _is_output_file(p) and p.is_file():
            p.unlink()


def cleanup_failed(out: Path, created: bool) -> None:
    """A failed run with no complete shard leaves nothing: no state file, no temp files, no empty folder."""
    if not out.is_dir() or any(out.glob("stats-*.json")) or (out / "manifest.json").is_file():
        return  # complete shards are kept for the resumed run
    _clear(out)
    if created and not any(out.iterdir()):
        out.rmdir()

