"""How long `medvl --help` and one TAB completion take, against `import torch` for contrast.

Median wall time of several runs after one warm-up (the warm-up fills the OS page cache and __pycache__, as on
a box where medvl has been run before). Target: under 0.25 s, the point where a TAB press starts to feel slow.
Exit status 1 when a medvl figure is over target.

    python -m tests.bench.cli_startup [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 0.25


def median_wall(cmd: list[str], env: dict[str, str], runs: int) -> float:
    subprocess.run(cmd, env=env, capture_output=True, check=False)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, check=False)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    medvl = Path(sys.executable).with_name("medvl")
    if not medvl.exists():
        print(f"no console script at {medvl}: pip install -e .", file=sys.stderr)
        return 1
    base = {k: v for k, v in os.environ.items() if not k.startswith(("COMP_", "_TYPER", "_MEDVL"))}
    complete = {**base, "_MEDVL_COMPLETE": "complete_bash", "COMP_WORDS": "medvl doctor --", "COMP_CWORD": "2"}
    cases = [
        ("medvl --help", [str(medvl), "--help"], base, True),
        # A subcommand's help also pays typer 0.29's pydantic import (~55 ms) for parameter coercion.
        ("medvl doctor --help", [str(medvl), "doctor", "--help"], base, True),
        ("medvl TAB completion (bash)", [str(medvl)], complete, True),
        ('python -c "import torch"', [sys.executable, "-c", "import torch"], base, False),
    ]
    print(f"cli startup: median of {args.runs} runs after a warm-up, target < {TARGET_S} s")
    over = False
    for label, cmd, env, judged in cases:
        # The contrast is only there for scale: 3 runs of a ~2 s import are enough.
        t = median_wall(cmd, env, args.runs if judged else min(args.runs, 3))
        verdict = ("ok" if t < TARGET_S else "OVER TARGET") if judged else "(contrast)"
        over |= judged and t >= TARGET_S
        print(f"  {label:<30} {t:6.3f} s  {verdict}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
