"""One launched training process: `python -m medvl.commands.worker RECIPE.yaml [--resume X]`.

Started by torchrun (medvl/engine/launch.py builds the line); never by hand. Rank 0 draws the console view;
a user-fixable error prints once, from rank 0, and the process exits 2 so the launcher stops the other ranks.
"""

from __future__ import annotations

import argparse
import os
import sys

MODULE = "medvl.commands.worker"  # what `medvl train` tells the library to launch (python -m MODULE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("recipe")
    parser.add_argument("--resume", default=None)
    args = parser.parse_args(argv)

    from medvl.commands.main import _quiet_known_noise
    from medvl.commands.ui import TrainConsole, print_error
    from medvl.config import load_recipe
    from medvl.engine.train import train
    from medvl.errors import MedvlError

    _quiet_known_noise()
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        train(load_recipe(args.recipe), resume=args.resume, sinks=[TrainConsole()] if rank0 else [])
    except MedvlError as exc:
        if rank0:
            print_error(exc)
        _leave_process_group(wait=False)
        return 2
    _leave_process_group(wait=True)
    return 0


def _leave_process_group(wait: bool) -> None:
    """Leave the process group before the interpreter exits: gloo's threads still alive at exit abort a rank that
    finished its work ("terminate called without an active exception", SIGABRT), and torchrun then reports the
    whole successful run as failed (seen about once in 30 multi-process runs on the 2-core machine)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait:
            dist.barrier()  # every rank is done before any rank tears its side down
        dist.destroy_process_group()
    except Exception:  # a rank that already died: nothing left to leave cleanly
        pass


def _exit(code: int) -> None:
    """End the process without the interpreter's teardown. Leaving the process group did not remove the abort at
    exit (a finished rank still died with SIGABRT in about 1 of 5 runs of a 2-process test on the 2-core machine):
    threads of torch's backends are destroyed while joinable during static destruction. Everything the run writes
    is closed by now (sinks, checkpoints, final/ are written atomically), so only the console needs flushing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
