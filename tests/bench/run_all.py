"""Run every benchmark module in tests/bench/ (`make bench`): each as `python -m tests.bench.<name>` from the
repository root, printing its figures as it goes, then a summary. Exit status 1 if any bench failed.

A bench is any tests/bench/*.py other than this file, __init__.py and gpu_check.py; it prints its own figures and exits
non-zero when it misses its target.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def discover() -> list[str]:
    # gpu_check has its own target (`make gpu-check`): it needs a GPU and up to 8 minutes of it
    return sorted(p.stem for p in HERE.glob("*.py") if p.stem not in ("run_all", "__init__", "gpu_check"))


def main() -> int:
    results = []
    for name in discover():
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", f"tests.bench.{name}"], cwd=ROOT).returncode
        results.append((name, rc, time.perf_counter() - t0))
    print("== summary")
    for name, rc, wall in results:
        print(f"  {name:<28} {'ok' if rc == 0 else f'FAILED (exit {rc})':<18} {wall:6.1f} s")
    return 1 if any(rc for _, rc, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
