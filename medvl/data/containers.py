"""Reading a data file's container, whatever its format: JSON array (streamed), JSONL, a single JSON object or
CSV. Yields (location, index, raw sample); `location` is `file:line` or `file[index]`, used in every message.

A JSON array is read element by element with `json.JSONDecoder.raw_decode` over a buffered text stream, so a
700 MB PubMedVision file costs memory for one element, not the file. A sample that is not valid JSON comes out
as `BadJSON` (its error text) so the reader can quarantine it and go on.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medvl.errors import MedvlError


class BadJSON(str):
    """A JSONL line that failed to parse; the str is the parser's message."""


def iter_json_array(path: str | Path, *, chunk_chars: int = 1 << 16) -> Iterator[tuple[int, Any]]:
    """(index, element) for each element of a top-level JSON array, holding about one element in memory."""
    decoder, where = json.JSONDecoder(), str(path)
    with open(path, encoding="utf-8-sig") as f:
        buf, pos, dropped, eof = "", 0, 0, False

        def fill(size: int) -> bool:
            nonlocal buf, pos, dropped, eof
            chunk = f.read(size)
            if not chunk:
                eof = True
                return False
            dropped += pos  # compact only when reading: one copy per chunk, not one per element
            buf, pos = buf[pos:] + chunk, 0
            return True

        def next_char() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not fill(chunk_chars):
                    return buf[pos] if pos < len(buf) else ""

        try:
            if next_char() != "[":
                raise MedvlError("expected a JSON array ([ ... ]) at the start of the file", where=where)
            pos += 1
            index = 0
            while True:
                c = next_char()
                if c == "]" and index == 0:
                    pos += 1
                    break
                if index > 0:
                    if c == "]":
                        pos += 1
                        break
                    if c != ",":
                        raise MedvlError(f"expected ',' or ']' after element {index - 1}, found {c!r}"
                                         f" at character {dropped + pos}", where=where)
                    pos += 1
                    next_char()
                size = chunk_chars
                while True:
                    try:
                        obj, end = decoder.raw_decode(buf, pos)
                    except json.JSONDecodeError as e:
                        # Only an error at the end of the buffer (or an open string) can be a cut-off element.
                        cut = e.pos >= len(buf) - 32 or e.msg.startswith("Unterminated string")
                        if eof or not cut or not fill(size):
                            raise MedvlError(f"invalid JSON in element {index}: {e.msg} at character "
                                             f"{dropped + e.pos}", where=f"{where}[{index}]") from None
                        size = min(size * 2, 1 << 26)  # doubling keeps a huge element O(n log n), not O(n^2)
                        continue
                    # A number cut at the buffer edge parses as a shorter number ("-1" of "-1.5e-7"): read on
                    # while it touches the edge or is followed by something that cannot end it.
                    number = type(obj) in (int, float)
                    if not eof and (end == len(buf) or number and end > len(buf) - 32
                                    and buf[end] not in ",] \t\r\n") and fill(size):
                        continue
                    break
                yield index, obj
                index += 1
                pos = end
            if next_char():
                raise MedvlError(f"unexpected data after the closing ] at character {dropped + pos}", where=where)
        except UnicodeDecodeError as e:
            raise MedvlError(f"file is not UTF-8 ({e.reason})", where=where, fix="re-save it as UTF-8") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number from 1, parsed value or BadJSON) for each non-blank line."""
    with open(path, "rb") as f:  # bytes, so one bad UTF-8 line is one bad sample, not a dead reader
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield lineno, BadJSON(f"line is not UTF-8 ({e.reason})")
            except json.JSONDecodeError as e:
                yield lineno, BadJSON(f"{e.msg} at column {e.colno}")


def _container(path: Path) -> str:
    """'csv', 'array', 'lines' or 'object', from the suffix and the first bytes."""
    if path.suffix.lower() == ".csv":
        return "csv"
    if path.suffix.lower() == ".jsonl":
        return "lines"
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        return "array"
    lines = [ln for ln in head.splitlines() if ln.strip()]
    if len(lines) >= 2 and lines[1].lstrip().startswith("{"):
        try:
            json.loads(lines[0])
            return "lines"  # a .json file that is really JSONL
        except json.JSONDecodeError:
            pass
    return "object"


def iter_raw(path: str | Path, *, chunk_chars: int = 1 << 16) -> Iterator[tuple[str, int, Any]]:
    """(location, index, raw sample) for every sample in a file, whatever its container."""
    path = Path(path)
    kind = _container(path)
    if kind == "array":
        for i, obj in iter_json_array(path, chunk_chars=chunk_chars):
            yield f"{path}[{i}]", i, obj
    elif kind == "lines":
        for i, (lineno, obj) in enumerate(iter_jsonl(path)):
            yield f"{path}:{lineno}", i, obj
    elif kind == "csv":
        yield from _iter_csv(path)
    else:
        yield str(path), 0, _load_object(path)


def _iter_csv(path: Path) -> Iterator[tuple[str, int, dict]]:
    # Python's default field limit is 131,072 characters; a long report or an inline caption passes it. The
    # limit exists against runaway quoting, which shows up here as one row swallowing the rest of the file.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = None
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            for i, row in enumerate(reader):
                yield f"{path}:{reader.line_num}", i, row
    except csv.Error as e:
        line = f":{reader.line_num}" if reader is not None else ""
        raise MedvlError(f"not a readable CSV: {e}", where=f"{path}{line}",
                         fix="check the quoting near that line (an unclosed quote swallows the rows after it)"
                         ) from None
    except UnicodeDecodeError as e:
        raise MedvlError(f"file is not UTF-8 ({e.reason})", where=str(path), fix="re-save it as UTF-8") from None


def _load_object(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MedvlError(f"not valid JSON: {e}", where=str(path)) from None


# --------------------------------------------------------------------------------------------- detection
