"""Checkpoints that survive crashes, and resuming at the exact sample where a run stopped.

Layout: `RUN/checkpoints/step-000100/` holds accelerate's state (model as safetensors, optimizer, every rank's
RNG; DeepSpeed and FSDP write their own shards there) plus `trainer_state.json`, which also carries medvl's own
resume state (the schedule and the data position) as plain JSON.

No checkpoint runs code when it is loaded. A pickle can call any function while it is read (a crafted
`custom_checkpoint_0.pkl` ran `os.system` in accelerate's loader, which reads it with weights_only=False), and a
checkpoint may come from a colleague or a shared filesystem. So medvl registers no pickled objects with
accelerate, every torch file (optimizer, RNG, DeepSpeed shards) is read by torch's weights-only unpickler
(forced for the whole load, whatever the library underneath asks for), and a file that needs more than tensors
and plain data is refused with the reason. Every rank writes into `.step-000100.partial/`; rank 0 renames it into place
once all ranks are done, so a crash or a full disk mid-save leaves only a `.partial` directory, which is
ignored and later removed: the previous checkpoint stays intact. Only the newest `keep_last` are kept.

Outside DeepSpeed, a checkpoint holds only the trainable parameters: frozen weights are the base model's and
never change, so a LoRA run of a 7B model writes its adapter (~80 MB at r 16) per checkpoint, not 15 GB.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from medvl.atomic import follow_umask
from medvl.checkpoint_files import checkpoint_dir, list_checkpoints, safe_torch_load, step_of
from medvl.errors import MedvlError

@dataclass
class Resumable:
    """What a checkpoint restores. accelerate saves the model and optimizer (tensors); medvl saves the schedule
    and the data position itself, as JSON in trainer_state.json (accelerate would pickle them)."""

    model: object
    optimizer: object
    scheduler: object
    position: object
    recipe: object = None  # saved with each checkpoint: what a resume compares its own recipe against
    health: object = None  # the run's guards.Collapse: which checkpoints are known good (never saved)

    def json_state(self) -> dict:
        state = {"scheduler": self.scheduler.state_dict(), "position": self.position.state_dict()}
        if self.recipe is not None:
            state["recipe"] = json.loads(self.recipe.model_dump_json())
        return state

    def load_json_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.position.load_state_dict(state["position"])


def save_checkpoint(accelerator, run_dir: Path, step: int, trainer_state: dict, *, keep_last: int,
                    resumable: Resumable) -> Path:
    """Write `step-N` next to the older checkpoints; refuse to write weights that are not finite, or to start
    a save the disk cannot hold. On failure the previous checkpoint is untouched and the error names it."""
    from medvl.engine import guards

    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:06d}"
    partial = root / f".step-{step:06d}.partial"
    guards.check_finite_state(accelerator, resumable.model, resumable.optimizer, step, run_dir, resumable.health)
    need = guards.check_free_space(accelerator, root, resumable.model, resumable.optimizer, run_dir,
                                   resumable.health)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with guards.disk_full_diagnosis(partial, need, run_dir, resumable.health):
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {**trainer_state, "resume_state": resumable.json_state()}
            (partial / "trainer_state.json").write_text(json.dumps(state, indent=2))
            follow_umask(partial)
            if final.exists():  # re-saving the same step (a resumed run's final save)
                shutil.rmtree(final)
            os.replace(partial, final)
    if accelerator.is_main_process:
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


# ---------------------------------------------------------------------------------------------------------
# resuming a run that already finished. `--resume auto` on it used to go on silently to whatever max_steps the
# recipe now says (recorded only as a recipe_change): with the same steps it re-saved its last checkpoint and
# final/ for nothing. Now the same (or fewer) steps is "nothing to do", and more steps is an announced extension.

def total_steps(recipe, steps_per_epoch: int) -> int:
    """The optimizer steps a recipe asks for: train.max_steps, else its epochs at `steps_per_epoch`."""
    return recipe.train.max_steps or max(1, int(steps_per_epoch * recipe.train.epochs))


@dataclass
class FinishedRun:
    """A run whose last start was followed by its end: final/ holds the model of step `step`."""

    step: int
    final_dir: Path
    steps_per_epoch: int | None  # as the finished run counted them: epoch-based recipes' total before data loads

    def total_steps(self, recipe) -> int | None:
        """The steps `recipe` asks for in all (None: epoch-based and the run never said its epoch length)."""
        if recipe.train.max_steps or self.steps_per_epoch:
            return total_steps(recipe, self.steps_per_epoch)
        return None

    def done_for(self, recipe) -> bool:
        """`recipe` asks for no step beyond the finished run's end (unknown before the data loads: False)."""
        total = self.total_steps(recipe)
        return total is not None and total <= self.step

    def nothing_to_do(self) -> str:
        return (f"already finished at step {self.step} (final model: {self.final_dir}); nothing to do — raise "
                f"train.max_steps above {self.step} to train further")


def finished_run(run_dir: Path, resume: str | None) -> FinishedRun | None:
    """The finished run `resume` would continue from its end (auto, or its newest checkpoint named by path), or
    None (not finished; no resume; resuming an earlier checkpoint re-trains from there, as asked). A finished run
    that kept no checkpoint (train.save_every 0) cannot be continued: refused, as it would start over."""
    from medvl.engine.metrics import EndEvent, StartEvent, parse_line

    if resume in (None, "", "no", "none"):
        return None
    start = end = None
    with contextlib.suppress(OSError), open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            event = parse_line(line)
            if isinstance(event, StartEvent):
                start, end = event, None  # a later start (a resume) reopens the run
            elif isinstance(event, EndEvent) and event.step is not None:
                end = event
    if end is None:
        return None
    # Where train() writes it, not the end event's final_dir: that path is stale once the run folder is moved or
    # copied, or was recorded relative to another working directory, and the guard must not be skipped then.
    final = Path(run_dir) / "final"
    found = resolve_resume(resume, run_dir)
    if found is None:
        fix = (f"train on from its final model in a new run: model.base={final} output.dir=ANOTHER_DIR (or start "
               "over with output.overwrite=true)" if final.is_dir() else
               "start it over with output.overwrite=true (its final/ model is gone too)")
        raise MedvlError(f"run {run_dir} finished at step {end.step} but kept no checkpoint (train.save_every: 0), "
                         "so it cannot be continued: --resume auto would start it over", where=str(run_dir),
                         fix=fix)
    if step_of(found) < end.step:
        return None
    return FinishedRun(end.step, final, start.steps_per_epoch if start is not None else None)


def load_checkpoint(accelerator, path: Path, resumable: Resumable) -> dict:
    state = _read_trainer_state(path)
    saved_world = state.get("world_size")
    if saved_world and saved_world != accelerator.num_processes and accelerator.distributed_type.name == "DEEPSPEED":
        raise MedvlError(
            f"checkpoint {path.name} was written by {saved_world} processes, this run has {accelerator.num_processes}",
            where=str(path),
            fix="resume with the same number of processes, or consolidate it with `medvl export` and start a new run "
                "from the exported model")
    check_resumable(path, state)
    for rng in sorted(path.glob("random_states_*.pkl")):
        # accelerate swallows any error while reading these and carries on with fresh RNG, which would break
        # the exact resume silently: read them here first, with the same weights-only loader.
        with safe_torch_load(rng):
            from accelerate.utils import load

            load(rng)
    changes = recipe_changes(state["resume_state"].get("recipe"), resumable.recipe, path)
    fresh = _optimizer_settings(resumable)
    with safe_torch_load(path):
        accelerator.load_state(str(path))
    resumable.load_json_state(state["resume_state"])
    if any(key.startswith("optim.") for key in changes):
        _reapply_optimizer_settings(resumable, fresh)
    state["recipe_changes"] = changes
    return state


# ---------------------------------------------------------------------------------------------------------
# resuming with a changed recipe. Settings read afresh every step apply by themselves; the optimizer's
# hyperparameters and the schedule's base rates are restored from the checkpoint and would silently stay the
# old ones (lr=1e-5 on resume trained at the checkpoint's 4.1e-4), so medvl re-applies them. Settings that
# change what the checkpoint means (its weights, or the data position, counted in batches of a size drawn
# from one seed) cannot change mid-run without breaking the exact resume: they are refused unless forced.

APPLIES = ("optim.", "train.max_steps", "train.epochs", "train.log_every", "train.save_every", "train.keep_last",
           "train.eval_every", "train.gradient_checkpointing", "train.vision_gradient_checkpointing", "eval.",
           "output.", "data.num_workers", "model.attn_implementation", "distributed.master_addr",
           "distributed.master_port", "distributed.node_rank")
FORCE_ENV = "MEDVL_ALLOW_RECIPE_CHANGE"  # set by `medvl train --allow-recipe-change` (inherited by launched ranks)


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def recipe_changes(saved: dict | None, recipe, path: Path) -> dict[str, tuple]:
    """{dotted key: (checkpoint value, this run's value)} of the settings that differ and may apply; refuses
    the others (unless FORCE_ENV is set) with each change and why."""
    if saved is None or recipe is None:
        return {}
    now = _flat(json.loads(recipe.model_dump_json()))
    before = _flat(saved)
    diff = {k: (before.get(k), now.get(k)) for k in sorted(set(now) | set(before)) if before.get(k) != now.get(k)}
    refused = {k: v for k, v in diff.items() if not k.startswith(APPLIES)}
    if refused and os.environ.get(FORCE_ENV) != "1":
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise MedvlError(f"resuming {path.name} with settings that cannot change mid-run: {listed}. The "
                         "checkpoint's weights and data position belong to the old values (the batches after step "
                         f"{step_of(path)} would not be the ones the run would have seen)", where=str(path),
                         fix="put them back (the run's recipe is RUN/recipe.yaml), start a new run, or pass "
                             "--allow-recipe-change to resume anyway (recorded in metrics.jsonl and medvl_run.json)")
    return diff


def recipe_change_event(step: int, changes: dict[str, tuple]) -> dict:
    """The metrics.jsonl line that records a resume with changed settings (and which were forced)."""
    return {"kind": "recipe_change", "step": step,
            "changes": {k: {"checkpoint": a, "now": b} for k, (a, b) in changes.items()},
            "forced": [k for k in changes if not k.startswith(APPLIES)]}


def recipe_change_history(run_dir: Path) -> list[dict]:
    """Every recipe_change event of this run, in order: with `recipe`, what really ran (medvl_run.json)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("kind") == "recipe_change":
                    out.append({k: event[k] for k in ("step", "changes", "forced") if k in event})
    return out


def _optimizer_settings(resumable: Resumable) -> dict:
    groups = [{k: g[k] for k in ("weight_decay", "betas", "eps") if k in g}
              for g in resumable.optimizer.param_groups]
    return {"base_lrs": list(resumable.scheduler.base_lrs), "groups": groups}


def _reapply_optimizer_settings(resumable: Resumable, fresh: dict) -> None:
    """This run's rates and AdamW settings over the checkpoint's, at the restored point of the schedule."""
    sched = resumable.scheduler
    sched.base_lrs = list(fresh["base_lrs"])
    lrs = []
    for group, base, lam, settings in zip(resumable.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas,
                                          fresh["groups"]):
        group.update(settings)
        group["initial_lr"] = base
        group["lr"] = base * lam(sched.last_epoch)
        lrs.append(group["lr"])
    sched._last_lr = lrs


def check_resumable(path: Path, state: dict | None = None) -> dict:
    """The cheap part of loading a checkpoint (JSON and file names only), also run before torch is imported."""
    state = _read_trainer_state(path) if state is None else state
    if "resume_state" not in state or list(path.glob("custom_checkpoint_*.pkl")):
        raise MedvlError(f"checkpoint {path.name} keeps its resume state in pickle files (custom_checkpoint_*.pkl); "
                         "medvl does not load those, because unpickling a file can run code hidden in it",
                         where=str(path),
                         fix="start the run again, or export the checkpoint's weights with `medvl export` (it reads "
                             "tensors only) and train from the exported model")
    return state


def _read_trainer_state(path: Path) -> dict:
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedvlError(f"cannot read {path / 'trainer_state.json'}: {exc}", where=str(path),
                         fix="resume from another checkpoint (--resume PATH), or start the run again") from None
    if not isinstance(state, dict):
        raise MedvlError(f"{path / 'trainer_state.json'} is not a medvl trainer state", where=str(path),
                         fix="resume from another checkpoint (--resume PATH), or start the run again")
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
