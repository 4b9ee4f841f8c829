"""A run's step checkpoints as files: where they are, which are complete, the step each holds, and reading their
torch files without running code. Shared by training (medvl.engine.checkpoint writes and resumes them) and by
the resolver (chat, eval and export read a step checkpoint through medvl.resolve), so neither imports the other.

`RUN/checkpoints/step-000100/` is complete once its `trainer_state.json` is there (a save in progress is a
`.step-000100.partial/` directory, never listed).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from medvl.errors import MedvlError

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    """The step a checkpoint directory holds (`step-000100` -> 100; 0 for any other name)."""
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else 0


# Plain classes that DeepSpeed and numpy put in their torch files; rebuilding them runs no user code.
def _extra_safe_globals() -> list:
    found = []
    with contextlib.suppress(Exception):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        found += [LossScaler, DynamicLossScaler, ZeroStageEnum]
    with contextlib.suppress(Exception):
        from deepspeed.utils.tensor_fragment import fragment_address

        found.append(fragment_address)
    return found


@contextlib.contextmanager
def safe_torch_load(where: Path):
    """Every torch.load inside, by medvl or the libraries it calls (accelerate, DeepSpeed), is weights-only:
    tensors, containers and a short list of plain classes. A file that needs anything else is refused."""
    import pickle

    import torch

    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_extra_safe_globals()):
            yield
    except pickle.UnpicklingError as exc:
        blocked = re.search(r"GLOBAL ([\w.]+)|Unsupported global: GLOBAL ([\w.]+)", str(exc))
        name = next((g for g in blocked.groups() if g), None) if blocked else None
        raise MedvlError(f"refused to load {where}: it holds a pickled Python object"
                         f"{f' ({name})' if name else ''} that could run code when loaded; medvl reads only tensors "
                         "and plain data from checkpoints", where=str(where),
                         fix="use a checkpoint written by medvl, or one you trust converted to safetensors") from None
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old
