"""How fast the training dashboard opens a long run, and how much memory it holds.

For runs that logged every step for 10k, 100k and 500k steps (a train event per step, eval and checkpoint every
1,000, one resume half way), each measured in a fresh process:
  read   reading the complete run history (RunHistory.poll: every rare event, sampled train lines, the tail;
         the dashboard does this in a thread after its first frame);
  open   from creating the Dashboard to its first drawn chart (headless, 120 x 40): its quick read included;
  RSS    peak resident memory of the process after the open, and its growth over the process before reading.
Target: open under 1 s at 500k lines; memory bounded (the history keeps at most 4,096 points per metric).
Exit status 1 when a target is missed.

    python -m tests.bench.dashboard_open [--sizes 10000,100000,500000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_OPEN_S = 1.0


def write_run(run: Path, steps: int) -> int:
    from medvl.engine.metrics import CheckpointEvent, EndEvent, EvalEvent, StartEvent, TrainEvent

    run.mkdir(parents=True, exist_ok=True)
    t = 1.79e9
    with open(run / "metrics.jsonl", "w") as f:
        f.write(StartEvent(recipe="bench", model="m", method="full", total_steps=steps, world_size=8, time=t).to_json() + "\n")
        for s in range(1, steps + 1):
            f.write(TrainEvent(step=s, total_steps=steps, epoch=round(s / 10_000, 3), loss=round(2 + 1 / s ** 0.3, 6),
                               lr=1e-5, grad_norm=1.234567, tokens=51_234, tokens_per_s=20531.2, samples_per_s=64.123,
                               input_tokens_per_s=81234.5, memory_gb=71.123, memory_gb_per_device=[71.123] * 8,
                               eta_s=float(steps - s), rejected=0, time=t + s).to_json() + "\n")
            if s % 1000 == 0:
                f.write(EvalEvent(step=s, eval_loss=2.1, time=t + s).to_json() + "\n")
                f.write(CheckpointEvent(step=s, path=f"c/step-{s:06d}", size_bytes=15_000_000_000, keep_last=3,
                                        time=t + s).to_json() + "\n")
            if s == steps // 2:
                f.write(StartEvent(total_steps=steps, start_step=s - 500, resumed_from="c", time=t + s).to_json() + "\n")
        f.write(EndEvent(step=steps, time=t + steps + 1).to_json() + "\n")
    return (run / "metrics.jsonl").stat().st_size


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def child(run: str) -> None:
    """One measurement in this (fresh) process; prints JSON."""
    import asyncio
    import resource

    from medvl.engine.history import RunHistory
    from medvl.tui.dashboard import Dashboard

    before = rss_mb()
    t0 = time.perf_counter()
    h = RunHistory(run)
    h.poll()
    read_s = time.perf_counter() - t0
    del h

    async def first_paint() -> float:
        t1 = time.perf_counter()
        app = Dashboard([run])
        async with app.run_test(size=(120, 40)) as pilot:
            while not getattr(app.chart, "drawn", None):
                await pilot.pause(0.01)
            await pilot.pause(0)  # let the frame render
            return time.perf_counter() - t1

    open_s = asyncio.run(first_paint())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"read_s": read_s, "open_s": open_s, "rss_mb": rss_mb(), "peak_mb": peak, "base_mb": before}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,500000")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    failed = False
    print(f"{'lines':>9} {'file MB':>8} {'read s':>7} {'open s':>7} {'RSS MB':>7} {'growth MB':>9}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for steps in (int(s) for s in args.sizes.split(",")):
            run = Path(tmp) / f"run-{steps}"
            size = write_run(run, steps)
            out = subprocess.run([sys.executable, "-m", "tests.bench.dashboard_open", "--child", str(run)],
                                 capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:])
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            lines = sum(1 for _ in open(run / "metrics.jsonl", "rb"))
            print(f"{lines:>9,} {size / 2**20:>8.1f} {r['read_s']:>7.2f} {r['open_s']:>7.2f} {r['peak_mb']:>7.0f} "
                  f"{r['peak_mb'] - r['base_mb']:>9.0f}", flush=True)
            failed |= r["open_s"] > TARGET_OPEN_S
    print(f"target: open under {TARGET_OPEN_S} s at every size" + ("  MISSED" if failed else "  met"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
