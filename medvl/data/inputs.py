"""What `prepare-data` reads: input paths (files or folders) to data files, and those files to one sample stream
in which a file that cannot be read is a file-level failure, not the end of the run.

- A folder reads every supported file directly inside it (`.json`, `.jsonl`, `.csv`), in name order; anything
  else is skipped and reported with the reason (an image, a sub-folder, medvl's own output). InternVL annotation
  files are read only through their meta file (read on their own they would lose the meta's `root` and
  `repeat_time`, and be read twice when the meta is there too).
- Each file's samples are named after the file (`source`); two inputs with the same file name get their parent
  folder's name in front (`a/train`, `b/train`), so their ids stay apart.
- A file whose container cannot be read (truncated JSON array, unknown shape, not UTF-8, a CSV without the
  mapped columns) stops being read where it broke: the samples before are kept, the failure is recorded with
  the file and the count. An empty file, or one with no samples, is a failure too. `strict=True` raises instead.
- Ids must be unique over the whole run: the first sample with an id wins, later ones are quarantined as
  `duplicate-id`. The seen-set holds a 64-bit hash per id (~70 bytes), ~90 MB for PubMedVision's 1.3 M samples.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from medvl.data.containers import _container, _load_object
from medvl.data.formats import ReadOptions, _is_internvl_meta, read_file
from medvl.data.schema import Record, Rejection
from medvl.errors import MedvlError

DATA_SUFFIXES = (".json", ".jsonl", ".csv")
# prepare-data's own output files: a folder holding them is prepared data, not raw data
OUTPUT_PREFIXES = ("data-", "quarantine", "stats-", "manifest", "prepare-state")


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute
    source: str  # dataset name in ids and the manifest


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class FileReport:
    """What became of one input file: how many samples were read, and why it stopped early if it did."""

    path: str
    samples: int = 0
    error: str | None = None  # a file-level failure, for a person
    warnings: list[str] = field(default_factory=list)  # read, but maybe not as meant (unused CSV columns)
    sources: set[str] = field(default_factory=set)  # dataset names its records carry (InternVL: the meta keys)

    def as_dict(self) -> dict:
        return {"path": self.path, "samples": self.samples, "error": self.error, "warnings": list(self.warnings),
                "sources": sorted(self.sources)}


def expand_inputs(paths) -> tuple[list[InputFile], list[Skipped]]:
    """Input paths (files and folders) -> the data files to read, in order, and what was skipped and why."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise MedvlError(f"input not found: {', '.join(missing)}", fix="check the paths (files or folders)")
    files: list[Path] = []
    skipped: list[Skipped] = []
    for p in map(Path, paths):
        if p.is_dir():
            found, skip = _scan_folder(p)
            files += found
            skipped += skip
        else:
            files.append(p)
    files = list(dict.fromkeys(f.resolve() for f in files))
    annotations = _internvl_annotations(files)
    kept = []
    for f in files:
        if f in annotations:
            skipped.append(Skipped(str(f), f"InternVL annotation file: read through its meta file {annotations[f]}"))
        else:
            kept.append(f)
    if not kept:
        where = ", ".join(str(p) for p in paths)
        raise MedvlError("no data files to read" + (f" ({len(skipped)} skipped: {skipped[0].reason}, ...)"
                                                    if skipped else ""), where=where,
                         fix="give .json, .jsonl or .csv files, or folders holding them")
    stems = [f.stem for f in kept]
    return [InputFile(str(f), f"{f.parent.name}/{f.stem}" if stems.count(f.stem) > 1 else f.stem)
            for f in kept], skipped


def _scan_folder(folder: Path) -> tuple[list[Path], list[Skipped]]:
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise MedvlError(f"cannot list the input folder: {e.strerror or e}", where=str(folder)) from None
    prepared = any(e.name in ("manifest.json", "prepare-state.json") for e in entries)
    files, skipped = [], []
    for e in entries:
        if e.name.startswith("."):
            continue  # hidden files: editor swap files, .DS_Store
        if prepared and e.name.startswith(OUTPUT_PREFIXES):
            skipped.append(Skipped(str(e), "medvl prepare-data output, not raw data"))
        elif e.is_dir():
            skipped.append(Skipped(str(e), "a folder: folders inside an input folder are not searched "
                                           "(name it as an input to read it)"))
        elif e.suffix.lower() not in DATA_SUFFIXES:
            skipped.append(Skipped(str(e), f"not a data file ({e.suffix or 'no extension'}; reads "
                                           f"{', '.join(DATA_SUFFIXES)})"))
        else:
            files.append(e)
    return files, skipped


def _internvl_annotations(files: list[Path]) -> dict[Path, Path]:
    """annotation file -> the InternVL meta file that names it, over every JSON object file among `files`."""
    named: dict[Path, Path] = {}
    for f in files:
        if f.suffix.lower() != ".json" or f.stat().st_size == 0:
            continue
        try:
            if _container(f) != "object":
                continue
            obj = _load_object(f)
        except (MedvlError, OSError):
            continue  # reported when the file itself is read
        if _is_internvl_meta(obj):
            for entry in obj.values():
                if isinstance(entry.get("annotation"), str):
                    named[(f.parent / entry["annotation"]).resolve()] = f
    return named


def read_inputs(files: list[InputFile], fmt: str | None, options: ReadOptions, reports: list[FileReport], *,
                strict: bool = False) -> Iterator[Record | Rejection]:
    """Every sample of every file, in order; appends one FileReport per file as it finishes (or fails)."""
    for f in files:
        report = FileReport(f.path)
        reports.append(report)
        try:
            if os.path.getsize(f.path) == 0:
                raise MedvlError("the file is empty (0 bytes)", where=f.path)
            for item in read_file(f.path, fmt, options=replace(options, source=f.source), notes=report.warnings):
                report.samples += 1
                if isinstance(item, Record):
                    report.sources.add(item.source)
                yield item
            if report.samples == 0:
                raise MedvlError("the file holds no samples", where=f.path)
        except (MedvlError, OSError) as e:
            if strict:
                raise
            if isinstance(e, MedvlError):
                what = e.what + (f" (at {e.where})" if e.where and e.where != f.path else "")
                what += f" (fix: {e.fix})" if e.fix else ""
            else:
                what = f"cannot read the file: {e.strerror or e}"
            kept = f"; the {report.samples} sample(s) before the failure are kept" if report.samples else ""
            report.error = f"{f.path}: {what}{kept}"


def unique_ids(items: Iterator[Record | Rejection]) -> Iterator[Record | Rejection]:
    """The stream with every record whose id was seen before replaced by a `duplicate-id` rejection."""
    seen: set[int] = set()
    for item in items:
        if isinstance(item, Record):
            key = int.from_bytes(hashlib.blake2b(item.id.encode(), digest_size=8).digest(), "little")
            if key in seen:
                item = Rejection("duplicate-id", f"id {item.id!r} was already used by an earlier sample (the first "
                                 "one is kept); give every sample its own id", item.location, item.id)
            else:
                seen.add(key)
        yield item
