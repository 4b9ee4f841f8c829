"""Turning a recipe into what the loop needs: the accelerator (single process, DDP, DeepSpeed, FSDP; CPU or GPU),
the model and processor with their trainability plan, and the run directory."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from medvl.engine.background import TRAIN_LOG
from medvl.errors import MedvlError
from medvl.families import Family, detect_family, get_family


def build_accelerator(recipe):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    import torch

    cpu = recipe.train.device == "cpu" or (recipe.train.device == "auto" and not torch.cuda.is_available())
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.train.precision]
    if recipe.train.precision == recipe.model.dtype and recipe.model.dtype != "fp32":
        precision = "no"  # weights already in 16 bit: no autocast on top (HuatuoGPT: bf16 weights, bf16 compute)
    deepspeed = recipe.distributed.strategy.startswith("deepspeed") and recipe.world_size > 1
    fsdp = recipe.distributed.strategy == "fsdp" and recipe.world_size > 1
    if fsdp and cpu:
        raise MedvlError("distributed.strategy fsdp needs CUDA GPUs: on CPU accelerate runs each process alone",
                         fix="on CPU use ddp, deepspeed-zero2 or deepspeed-zero3 (all tested on CPU)")
    # accelerate silently drops the DeepSpeed and FSDP plugins when cpu=True (it ran plain DDP); on a CPU-only
    # box the gloo backend below is what makes them work.
    kwargs = dict(cpu=cpu and not (deepspeed or fsdp), mixed_precision=precision,
                  gradient_accumulation_steps=recipe.train.grad_accum)
    handlers = []
    if cpu and recipe.world_size > 1:
        # On CPU the process group must be gloo; without saying so accelerate resolves no backend and silently
        # runs N independent single processes (environment.md section 6).
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    if cpu:
        _skip_deepspeed_cpu_jit()
    if deepspeed:
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(recipe))
    elif fsdp:
        from accelerate.utils import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                               state_dict_type="FULL_STATE_DICT")
    elif recipe.world_size > 1:
        from accelerate.utils import DistributedDataParallelKwargs

        # Text-only micro-batches would leave the vision tower without gradients; medvl appends an ignored
        # one-image row instead (keepalive_sample), so DDP keeps its faster find_unused_parameters=False.
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=False))
    return Accelerator(kwargs_handlers=handlers, **kwargs)


def _skip_deepspeed_cpu_jit() -> None:
    # DeepSpeed JIT-compiles a shared-memory allreduce for CPU on first use (~33 s with g++); plain gloo
    # collectives are enough for CPU runs, which exist for tests and the demo.
    with contextlib.suppress(Exception):
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(recipe) -> dict:
    path = recipe.distributed.deepspeed_config_path()
    if not path.is_file():
        raise MedvlError(f"DeepSpeed config {path} does not exist", where="distributed.deepspeed_config",
                         fix="give a JSON file path, or a shipped name: zero2.json, zero3.json")
    text = path.read_text()
    cfg = json.loads(text)
    # The loop clips (and reports the norm) itself only outside DeepSpeed; inside, DeepSpeed must clip.
    cfg["gradient_clipping"] = recipe.optim.max_grad_norm or 0.0
    cfg["train_micro_batch_size_per_gpu"] = recipe.train.micro_batch_size if not recipe.data.packing else 1
    cfg["gradient_accumulation_steps"] = recipe.train.grad_accum
    cfg.pop("train_batch_size", None)
    cfg["zero_allow_untested_optimizer"] = True
    return cfg


def load_for_training(recipe, accelerator):
    from medvl.models import apply_resolution, load_model, load_processor

    family = get_family(recipe.model.family) if recipe.model.family else detect_family(recipe.model.base)
    if recipe.method == "qlora":
        _require_qlora(accelerator)
    processor = load_processor(recipe.model.base, family)
    apply_resolution(processor, family, *recipe.data.pixel_range)
    attn = recipe.model.attn_implementation
    model = load_model(recipe.model.base, family, dtype=recipe.model.dtype, attn_implementation=attn,
                       trust_remote_code=recipe.model.trust_remote_code,
                       quantize_4bit=recipe.method == "qlora")
    if recipe.train.gradient_checkpointing or recipe.train.vision_gradient_checkpointing:
        _gradient_checkpointing(model, family, recipe.train.gradient_checkpointing,
                                recipe.train.vision_gradient_checkpointing)
    return family, model, processor


def _require_qlora(accelerator) -> None:
    import importlib.util

    if accelerator.device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise MedvlError("method: qlora needs a CUDA GPU and the bitsandbytes package",
                         fix="use method: lora here, or run on a CUDA machine with `pip install bitsandbytes`")


def _gradient_checkpointing(model, family: Family, language: bool, vision: bool) -> None:
    """Recompute activations in the backward pass, for the language model and the vision tower separately
    (ms-swift: ViT checkpointing alone cut Qwen2.5-VL-7B from 77 to 56 GiB)."""
    wanted = {"language": language, "vision": vision}
    for group, on in wanted.items():
        for prefix in getattr(family.layout, group):
            if not on:
                continue
            module = model.get_submodule(prefix.rstrip("."))
            if hasattr(module, "gradient_checkpointing_enable"):
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if language and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings + LoRA: checkpointed blocks still need a grad path


def prepare_run_dir(recipe, resume: str | None) -> Path:
    """Check the model's files and output.dir before any heavy work; the loop creates the run directory only
    once the model and data have loaded, so a run that fails early leaves no empty run directory behind."""
    from medvl.engine.checkpoint import check_resumable, list_checkpoints, recipe_changes, resolve_resume

    from medvl.models import check_model_weights

    if not recipe.model.family:
        detect_family(recipe.model.base)  # a missing or mistyped model.base fails here, in a second, not after
    check_model_weights(recipe.model.base)  # torch and accelerate have loaded (~10 s); truncated weights too
    run_dir = Path(recipe.output.dir)
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise MedvlError(f"output.dir {run_dir}: {blocker} is a file, not a directory", where=str(blocker),
                         fix="choose another output.dir (train writes a run directory there)")
    if blocker is not None and not os.access(blocker, os.W_OK | os.X_OK):
        raise MedvlError(f"output.dir {run_dir}: {blocker} is not writable by you", where=str(blocker),
                         fix="choose an output.dir you can write to")
    # launch-recipe.yaml is written by `medvl train` just before it starts the processes (engine/launch.py), and
    # train.log by `medvl train --tui` before it starts `medvl train` in the background (engine/background.py)
    held_files = ([p for p in run_dir.iterdir() if p.name not in ("launch-recipe.yaml", TRAIN_LOG)]
                  if run_dir.is_dir() else [])
    if resume in (None, "", "no", "none") and held_files:
        if not recipe.output.overwrite:
            found = list_checkpoints(run_dir)
            held = (f"{len(found)} checkpoint(s), newest {found[-1].name}" if found else
                    "a final model" if (run_dir / "final").is_dir() else "files of an earlier run")
            raise MedvlError(f"run directory {run_dir} already holds a run ({held}); nothing was deleted",
                             where=str(run_dir),
                             fix="continue it with --resume auto, choose another output.dir, or start over with "
                                 "output.overwrite=true (deletes its checkpoints, metrics and final/)")
    found = resolve_resume(resume, run_dir)
    if found is not None:  # the checkpoint's own files and settings, checked before the model loads
        state = check_resumable(found)
        recipe_changes(state["resume_state"].get("recipe"), recipe, found)
    return run_dir
