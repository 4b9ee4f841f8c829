"""Writing a directory so that a crash, a full disk or a Ctrl-C never leaves half of it behind.

Everything is written into a sibling temporary directory, then swapped in with one rename. A pre-existing
target is moved aside first and deleted only once the new one is in place, so a failure at any point leaves
either the old directory or the new one, never a mix.

Modes follow the umask, as `save_pretrained` and `cp` do: mkdtemp creates its directory 0700 and safetensors'
save_file writes 0600 (measured, safetensors 0.6), which left exports, conversions and `final/` unreadable to a
separate serving user under umask 022. `follow_umask` resets the tree to 0777/0666 minus the umask before the
rename makes it visible.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from medvl.errors import MedvlError


def current_umask() -> int:
    mask = os.umask(0o022)  # the only portable read is a write; set it straight back
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """chmod a freshly written tree to what plain open()/mkdir() would have given under the current umask."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            path = os.path.join(dirpath, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def check_writable_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise MedvlError(f"{target} exists and is not a directory", where=str(target),
                         fix="choose another output path (it must be a directory, new or empty)")
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
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        kept = f"the previous {target} is untouched" if target.exists() else f"nothing was written to {target}"
        raise MedvlError(f"the disk filled up while writing {target}; {kept}", where=str(target.parent),
                         fix="free space on that filesystem (or choose an --out elsewhere) and run it again"
                         ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    follow_umask(tmp)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
