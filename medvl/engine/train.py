"""The one training loop: alignment and instruction tuning, full or LoRA, one CPU process to many GPUs.

    result = train(load_recipe("tiny_cpu"), sinks=[ListSink()])

Reads top to bottom: set up accelerate -> load model and processor -> decide what trains -> index the data and
plan the batches -> optimizer and schedule -> resume -> loop -> save. The pieces live beside it: setup.py
(accelerator, model, plan), batches.py (data and batch plan), loss.py, validate.py (eval loss, benchmarks),
checkpoint.py, metrics.py.

Loss normalisation. Every optimizer step sums token cross-entropy over all its micro-batches on all ranks and
divides by the number of supervised tokens in that whole window (all-reduced before the first backward), so a
rank or micro-batch with long answers weighs by its tokens, not as one mean among means. DDP and DeepSpeed
average gradients over ranks and accelerate/DeepSpeed divide by grad_accum; the loss is multiplied back by both.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from medvl.engine import checkpoint as ckpt
from medvl.engine import guards
from medvl.engine.batches import build_data, idle_batch, idle_sample, keepalive_sample, make_loader, text_tokens_note
from medvl.engine.loss import require_supervision, supervised_tokens, token_loss_sum
from medvl.engine.metrics import (CheckpointEvent, EndEvent, EvalEvent, Fanout, JsonlSink, StartEvent, TrainEvent,
                                  device_stats, dir_size, process_facts, record_stop, trainable_params)
from medvl.engine.trackers import reporting_sinks
from medvl.engine.optim import build_optimizer, build_scheduler
from medvl.engine.params import param_groups, rows_as_dicts, trainability
from medvl.engine.setup import build_accelerator, load_for_training, prepare_run_dir
from medvl.engine.packing import use_segment_attention
from medvl.engine.throughput import flops_per_token, mfu, peak_flops
from medvl.engine.validate import benchmark_eval, eval_loss, load_benchmark
from medvl.errors import MedvlError
from medvl.models import tokenizer_of
from medvl.plan import apply_plan, plan_from_recipe
from medvl.versions import library_versions


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    table: list[dict] = field(default_factory=list)
    already_finished: bool = False  # resumed a finished run without asking for more steps: nothing was done


def train(recipe, *, resume: str | None = None, sinks=(), stop_after_step: int | None = None) -> RunResult:
    """Run a recipe to the end (or to `stop_after_step`, used by the kill-and-resume test); returns the run.
    A run that stops by an exception leaves a `stop` event in metrics.jsonl saying why (for the dashboard)."""
    from medvl.config import recipe_to_yaml
    from medvl.data.dataset import verify_recipe_data

    verify_recipe_data(recipe)  # unfinished or broken prepared data: refused before the model loads
    _absolute_local_base(recipe)
    if recipe.eval.every and recipe.world_size > 1 and recipe.distributed.strategy in ("deepspeed-zero3", "fsdp"):
        raise MedvlError(f"benchmark evaluation during training (eval.every) is not supported with "
                         f"{recipe.distributed.strategy}: sharded weights would make every rank generate in lockstep",
                         fix="drop eval.every and run `medvl eval` on the checkpoints, or use ddp / deepspeed-zero2")
    bench_set = load_benchmark(recipe) if recipe.eval.every else None
    run_dir = prepare_run_dir(recipe, resume)  # cheap checks first: torch + accelerate take seconds to import
    finished = ckpt.finished_run(run_dir, resume)
    if finished is not None and finished.done_for(recipe):
        return RunResult(run_dir, finished.final_dir, finished.step, already_finished=True)  # the run is untouched
    import torch
    from accelerate.utils import set_seed

    accelerator = build_accelerator(recipe)
    if recipe.world_size > 1 and (accelerator.num_processes != recipe.world_size
                                  or accelerator.distributed_type.name == "NO"):
        raise MedvlError(f"the recipe asks for {recipe.world_size} processes but this run has "
                         f"{accelerator.num_processes} ({accelerator.distributed_type.name}): the processes would "
                         "train alone, each on its own", fix="start it with `medvl train` (it launches the processes)")
    set_seed(recipe.train.seed)
    main = accelerator.is_main_process
    if main:
        if not resume and recipe.output.overwrite:
            for stale in ("metrics.jsonl", "checkpoints", "final"):
                p = run_dir / stale
                if p.is_dir():
                    import shutil

                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()

    family, model, processor = load_for_training(recipe, accelerator)
    plan = plan_from_recipe(recipe, family)
    model = apply_plan(model, family, plan)
    table = rows_as_dicts(trainability(model, family, plan))
    if not any(r["trainable"] for r in table):
        raise MedvlError("nothing is trainable with this recipe", fix="unfreeze a group or use method: lora")

    dataset, train_ids, batch_plan, val, packing_note = build_data(recipe, family, processor, accelerator)
    packed = batch_plan.pack_budget is not None
    if packed:
        use_segment_attention(model)  # sdpa: attention per packed sample (medvl/engine/packing.py)
    flops_token, peak = flops_per_token(model, family), peak_flops(accelerator.device, recipe.train.precision,
                                                                   recipe.model.dtype)
    total_steps = ckpt.total_steps(recipe, batch_plan.steps_per_epoch)
    if finished is not None and total_steps <= finished.step:  # epoch-based, its length known only now
        return RunResult(run_dir, finished.final_dir, finished.step, table=table, already_finished=True)
    optimizer = build_optimizer(param_groups(model, family, plan, recipe.optim.weight_decay),
                                betas=recipe.optim.betas, eps=recipe.optim.eps)
    scheduler = build_scheduler(optimizer, total=total_steps, warmup=recipe.optim.warmup_for(total_steps),
                                kind=recipe.optim.scheduler, floor=recipe.optim.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    position = _Position()
    collapse = guards.Collapse(accelerator.unwrap_model(model), run_dir)  # also the run's health record
    resumable = ckpt.Resumable(model, optimizer, scheduler, position, recipe, health=collapse)
    ckpt.save_trainable_only(accelerator)

    start = 0
    resume_from = ckpt.resolve_resume(resume, run_dir)
    changes = {}
    if resume_from is not None:
        changes = ckpt.load_checkpoint(accelerator, resume_from, resumable)["recipe_changes"]
        start = position.step

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)  # only now: a run that fails to load leaves no empty folder
    sink = Fanout(list(sinks) + ([JsonlSink(run_dir / "metrics.jsonl", append=resume_from is not None)] if main else []))
    try:
        if main and resume_from is None:
            (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
            (run_dir / "trainability.json").write_text(json.dumps(table, indent=2))
            (run_dir / "versions.json").write_text(json.dumps(library_versions(), indent=2))
        if main:
            sink.sinks += reporting_sinks(recipe.output.report_to, run_dir, run_dir.name, json.loads(recipe.model_dump_json()))
            sink.log(StartEvent(
                run_dir=str(run_dir), recipe=Path(recipe.source).stem if recipe.source else None, model=recipe.model.base,
                family=family.name, method=recipe.method, total_steps=total_steps, start_step=start,
                resumed_from=str(resume_from) if resume_from is not None else None,
                world_size=accelerator.num_processes, global_batch=recipe.global_batch,
                steps_per_epoch=batch_plan.steps_per_epoch, samples=len(train_ids),
                dropped_per_epoch=batch_plan.dropped_per_epoch(), trainable_params=trainable_params(table), table=table,
                distributed=accelerator.distributed_type.name, device=str(accelerator.device),
                keep_last=recipe.train.keep_last, packing=packing_note, text_tokens=text_tokens_note(dataset, train_ids),
                finished_at=finished.step if finished is not None else None, **process_facts()))
            if changes:
                sink.log(ckpt.recipe_change_event(start, changes))

        tok = tokenizer_of(processor)
        keepalive = keepalive_sample(processor, family) if family.is_vision and _needs_keepalive(recipe, table) else None
        loader = make_loader(dataset, train_ids, batch_plan, accelerator.process_index, start, total_steps,
                             recipe.data.num_workers, tok.pad_token_id, packed, keepalive)
        # With several processes a rank whose micro-batch lost every sample still runs the wrapped model's forward
        # (on this ignored row), or its gradient all-reduce / ZeRO-3 gathers would pair with the wrong step's.
        idle = idle_sample(processor, family, keepalive) if accelerator.num_processes > 1 else None
        dtype = next(p for p in model.parameters()).dtype

        result = RunResult(run_dir, run_dir / "final", start, table=table)
        guard = _Guard(sink, run_dir, collapse)
        micro_iter = iter(loader)
        # listed once: walking the modules for them every step cost 0.35 ms of a 20 ms step on the tiny model
        trainable = [p for p in model.parameters() if p.requires_grad]
        t_start, tokens_seen, samples_seen, inputs_seen = time.perf_counter(), 0, 0, 0
        model.train()
        for step in range(start, total_steps):
            # ---- gather the window, count its supervised tokens on all ranks
            window = [next(micro_iter) for _ in range(recipe.train.grad_accum)]
            rejected = [r for _, rej in window for r in rej]
            local = [sum(supervised_tokens(b) for b, _ in window), len(rejected),
                     sum(len(b["seq_lens"]) - int(b["keepalive"]) for b, _ in window if b is not None),  # samples
                     sum(int(b["seq_lens"].sum()) for b, _ in window if b is not None)]  # input tokens, no padding
            counts = accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum")
            window_tokens, n_rejected, window_samples, window_inputs = (int(c) for c in counts)
            loss_sum = torch.zeros((), device=accelerator.device)
            for m, (batch, _) in enumerate(window):
                with accelerator.accumulate(model):
                    if batch is None and idle is not None and window_tokens:
                        batch = idle_batch(idle, tok.pad_token_id, packed)
                    if batch is None or window_tokens == 0:
                        loss = _zero_loss(model)
                    else:
                        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                        if batch.get("pixel_values") is not None:
                            batch["pixel_values"] = batch["pixel_values"].to(dtype)
                        with accelerator.autocast():
                            summed = token_loss_sum(model, family, batch)
                        loss_sum += summed.detach()
                        loss = summed / window_tokens * accelerator.num_processes * recipe.train.grad_accum
                    accelerator.backward(loss)
            grad_norm = _clip(accelerator, model, trainable, recipe.optim.max_grad_norm)
            with guards.optimizer_overflow(step + 1, run_dir, collapse):
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position.step = step + 1

            # ---- bookkeeping (rank 0 logs; every rank checks the guardrails so all stop together)
            mean_loss = float(accelerator.reduce(loss_sum, "sum")) / max(window_tokens, 1)
            tokens_seen += window_tokens
            samples_seen += window_samples
            inputs_seen += window_inputs
            result.losses.append(mean_loss)
            guard.check(step + 1, mean_loss, grad_norm, window_tokens, n_rejected, rejected)
            require_supervision(tokens_seen, step + 1 - start, batch_plan.steps_per_epoch, total_steps - start)
            collapse.check(step + 1, mean_loss, grad_norm, window_tokens)
            if (step + 1) % recipe.train.log_every == 0 or step + 1 == total_steps or step == start:
                elapsed = time.perf_counter() - t_start
                done = step + 1 - start
                memory, util = device_stats(accelerator)  # a collective: every rank is here
                sink.log(TrainEvent(
                    step=step + 1, total_steps=total_steps, epoch=round((step + 1) / batch_plan.steps_per_epoch, 3),
                    loss=round(mean_loss, 6), lr=scheduler.get_last_lr()[0], grad_norm=grad_norm, tokens=window_tokens,
                    tokens_per_s=round(tokens_seen / elapsed, 1), samples_per_s=round(samples_seen / elapsed, 3),
                    input_tokens_per_s=round(inputs_seen / elapsed, 1), memory_gb=max(memory),
                    memory_gb_per_device=memory, gpu_util=util,
                    mfu=mfu(flops_token, inputs_seen / elapsed, peak, accelerator.num_processes) if peak else None,
                    eta_s=round(elapsed / done * (total_steps - step - 1), 1), rejected=n_rejected))
            if val is not None and recipe.train.eval_every and (step + 1) % recipe.train.eval_every == 0:
                v = eval_loss(model, family, val, processor, accelerator, recipe, keepalive, idle)
                result.eval_losses.append((step + 1, v))
                sink.log(EvalEvent(step=step + 1, eval_loss=round(v, 6)))
            if bench_set is not None and (step + 1) % recipe.eval.every == 0:
                sink.log(benchmark_eval(model, processor, family, bench_set, recipe, accelerator, run_dir, step + 1))
            if recipe.train.save_every and (step + 1) % recipe.train.save_every == 0 and step + 1 < total_steps:
                path = ckpt.save_checkpoint(accelerator, run_dir, step + 1, _trainer_state(step + 1, accelerator, recipe),
                                            keep_last=recipe.train.keep_last or 1, resumable=resumable)
                sink.log(CheckpointEvent(step=step + 1, path=str(path), size_bytes=dir_size(path),
                                         keep_last=recipe.train.keep_last or 1))
            if stop_after_step is not None and step + 1 >= stop_after_step:
                result.steps = step + 1
                sink.close()
                accelerator.wait_for_everyone()
                return result

        result.steps = total_steps
        if val is not None and not (result.eval_losses and result.eval_losses[-1][0] == total_steps):
            v = eval_loss(model, family, val, processor, accelerator, recipe, keepalive, idle)
            result.eval_losses.append((total_steps, v))
            sink.log(EvalEvent(step=total_steps, eval_loss=round(v, 6)))
        if recipe.train.save_every:
            path = ckpt.save_checkpoint(accelerator, run_dir, total_steps, _trainer_state(total_steps, accelerator, recipe),
                                        keep_last=recipe.train.keep_last or 1, resumable=resumable)
            sink.log(CheckpointEvent(step=total_steps, path=str(path), size_bytes=dir_size(path),
                                     keep_last=recipe.train.keep_last or 1))
        save_final(accelerator, model, processor, recipe, run_dir / "final", table)
        sink.log(EndEvent(step=total_steps, final_dir=str(run_dir / "final"), wall_s=round(time.perf_counter() - t_start, 2)))
        sink.close()
        accelerator.wait_for_everyone()
        return result
    except BaseException as exc:
        record_stop(run_dir, exc)  # the `stop` event is written before the sinks close
        raise
    finally:
        sink.close()  # every sink, trackers included (TensorBoard/W&B finish()), on every way out


class _Position:
    """The data position, saved in every checkpoint (accelerate calls state_dict/load_state_dict)."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


def _needs_keepalive(recipe, table) -> bool:
    vision_trains = any(r["group"] in ("vision", "projector") and r["trainable"] for r in table)
    return (vision_trains and recipe.world_size > 1) or recipe.distributed.strategy == "deepspeed-zero3"


def _zero_loss(model):
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


def _clip(accelerator, model, trainable, max_norm):
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        norm = model.get_global_grad_norm() if hasattr(model, "get_global_grad_norm") else None
        return None if norm is None else round(float(norm), 6)
    if not accelerator.sync_gradients:
        return None
    norm = accelerator.clip_grad_norm_(trainable, max_norm or float("inf"))
    return round(float(norm), 6)


def _trainer_state(step, accelerator, recipe) -> dict:
    return {"step": step, "world_size": accelerator.num_processes, "global_batch": recipe.global_batch,
            "recipe_sha256": _recipe_sha256(recipe)}


def _recipe_sha256(recipe) -> str:
    import hashlib

    return hashlib.sha256(recipe.model_dump_json().encode()).hexdigest()[:16]


class _Guard:
    """Stops on NaN/inf with a diagnosis; warns on windows with nothing to learn and on a loss stuck at zero."""

    def __init__(self, sink, run_dir, health):
        self.sink = sink
        self.run_dir = run_dir
        self.health = health
        self.zero_run = 0

    def check(self, step, loss, grad_norm, tokens, n_rejected, rejected):
        if tokens == 0:
            self.sink.log({"kind": "warning", "step": step, "code": "no_supervised_tokens",
                           "message": "this optimizer step had no supervised token (all labels masked)",
                           "hint": "check loss_mask and the quarantine report of prepare-data; samples: "
                                   + ", ".join(r.sample_id for r in rejected[:5])})
            return
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            raise guards.diverged(f"the {what} became {loss if what == 'loss' else grad_norm}", step, self.run_dir,
                                  watch=self.health)
        self.zero_run = self.zero_run + 1 if loss == 0.0 else 0
        if self.zero_run == 3:
            self.sink.log({"kind": "warning", "step": step, "code": "loss_zero",
                           "message": "loss has been exactly 0 for 3 steps",
                           "hint": "usually every label is masked or the model copies the labels through the input"})
        if n_rejected:
            self.sink.log({"kind": "warning", "step": step, "code": "rejected_samples",
                           "message": f"{n_rejected} sample(s) could not be encoded and were skipped",
                           "hint": "; ".join(f"{r.sample_id}: {r.message}" for r in rejected[:3])})


def _absolute_local_base(recipe) -> None:
    """A base model given as a relative folder is recorded absolute (recipe.yaml, medvl_run.json and a LoRA
    adapter's base_model_name_or_path, which peft takes from the path the model was loaded from): the run's
    adapter and checkpoints then load from any working directory (chat, eval, export, serve)."""
    base = Path(recipe.model.base).expanduser()
    if not base.is_absolute() and base.is_dir():
        recipe.model.base = str(base.resolve())


def save_final(accelerator, model, processor, recipe, out: Path, table) -> None:
    """A standard save_pretrained model (or LoRA adapter) + processor + chat template + run facts."""
    state = accelerator.get_state_dict(model)  # all ranks: gathers ZeRO-3 / FSDP shards
    if accelerator.is_main_process:
        from medvl.atomic import atomic_dir

        with atomic_dir(out, overwrite=True) as tmp:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            processor.save_pretrained(tmp)
            (tmp / "medvl_run.json").write_text(json.dumps({
                "recipe": json.loads(recipe.model_dump_json()), "versions": library_versions(),
                "trainability": table, "base_model": recipe.model.base, "method": recipe.method,
                "data_manifests": _manifest_hashes(recipe),
                "recipe_changes": ckpt.recipe_change_history(out.parent)}, indent=2))
    accelerator.wait_for_everyone()


def _manifest_hashes(recipe) -> dict:
    out = {}
    for src in recipe.data.train:
        path = Path(src.path) / "manifest.json"
        if path.is_file():
            out[src.path] = json.loads(path.read_text()).get("content_hash")
    return out


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
