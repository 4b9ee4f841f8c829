"""Writing a directory so that a crash, a full disk or a Ctrl-C never leaves half of it behind.

Everything is written into a sibling temporary directory, then swapped in with one rename. A pre-existing
target is moved aside first and deleted only once the new one is in place, so a failure at any point leaves
either the old directory or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from medvl.errors import MedvlError


def check_writable_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise MedvlError(f"{target} exists and is not a directory", where=str(target),
                         fix="choose another output path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise MedvlError(f"output directory {target} is not empty", where=str(target),
                         fix="choose a new directory, or pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, overwrite: bool = False):
    """Yield a temporary directory; on success it becomes `target` in one rename, on failure it is removed."""
    target = Path(target)
    check_writable_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
