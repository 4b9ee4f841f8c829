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
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
