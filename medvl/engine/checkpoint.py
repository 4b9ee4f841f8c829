"""Checkpoints that survive crashes, and resuming at the exact sample where a run stopped.

Layout: `RUN/checkpoints/step-000100/` holds accelerate's state (model, optimizer, scheduler, every rank's RNG,
and the sampler's position, registered as a checkpointable object; DeepSpeed and FSDP write their own shards
there) plus `trainer_state.json`. Every rank writes into `.step-000100.partial/`; rank 0 renames it into place
once all ranks are done, so a crash or a full disk mid-save leaves only a `.partial` directory, which is
ignored and later removed: the previous checkpoint stays intact. Only the newest `keep_last` are kept.

Outside DeepSpeed, a checkpoint holds only the trainable parameters: frozen weights are the base model's and
never change, so a LoRA run of a 7B model writes its adapter (~80 MB at r 16) per checkpoint, not 15 GB.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def save_checkpoint(accelerator, run_dir: Path, step: int, trainer_state: dict, *, keep_last: int) -> Path:
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:06d}"
    partial = root / f".step-{step:06d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        if final.exists():  # re-saving the same step (a resumed run's final save)
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".step-*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`auto`: the newest complete checkpoint of this run (None if there is none); a path: that checkpoint."""
    if resume in (None, "", "no", "none"):
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise MedvlError(f"{path} is not a complete medvl checkpoint (no trainer_state.json)", where=str(path),
                         fix=f"use --resume auto, or one of: {', '.join(p.name for p in list_checkpoints(run_dir)) or 'none yet'}")
    return path


def load_checkpoint(accelerator, path: Path) -> dict:
    state = json.loads((path / "trainer_state.json").read_text())
    saved_world = state.get("world_size")
    if saved_world and saved_world != accelerator.num_processes and accelerator.distributed_type.name == "DEEPSPEED":
        raise MedvlError(
            f"checkpoint {path.name} was written by {saved_world} processes, this run has {accelerator.num_processes}",
            where=str(path),
            fix="resume with the same number of processes, or consolidate it with `medvl export` and start a new run "
                "from the exported model")
    accelerator.load_state(str(path))
    return state


def save_trainable_only(accelerator) -> None:
    """Checkpoint only what trains (resume then loads it over the base weights); no-op under DeepSpeed/FSDP,
    which save their own shards."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return

    def trainable_names(model) -> set[str]:
        return {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

    def on_save(models, weights, output_dir):
        for i, model in enumerate(models):
            keep = trainable_names(model)
            if len(keep) < len(weights[i]):
                weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    def on_load(models, input_dir):
        from safetensors.torch import load_file

        for i, model in list(enumerate(models)):
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            if not path.is_file():
                continue
            state = load_file(str(path))
            inner = accelerator.unwrap_model(model)
            expected = trainable_names(model)
            if set(state) != expected and len(state) < len(inner.state_dict()):
                raise MedvlError(f"checkpoint {input_dir} holds {len(state)} trainable tensors, this run trains "
                                 f"{len(expected)}", where=str(input_dir),
                                 fix="resume with the recipe the run was started with (RUN/recipe.yaml)")
            inner.load_state_dict(state, strict=False)
            models.remove(model)

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)
