"""The one training loop: alignment and instruction tuning, full or LoRA, one CPU process to many GPUs.

    result = train(load_recipe("tiny_cpu"), sink=ListSink())

Reads top to bottom: set up accelerate -> load model and processor -> decide what trains -> index the data and
plan the batches -> optimizer and schedule -> resume -> loop -> save. Each step is a named helper below.

Loss normalisation. Every optimizer step sums token cross-entropy over all its micro-batches on all ranks and
divides by the number of supervised tokens in that whole window (all-reduced before the first backward), so a
rank or micro-batch with long answers weighs by its tokens, not as one mean among means. DDP and DeepSpeed
average gradients over ranks and accelerate/DeepSpeed divide by grad_accum; the loss is multiplied back by both.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from medvl.data.collate import IGNORE, collate, model_inputs
from medvl.engine import checkpoint as ckpt
from medvl.engine.metrics import Fanout, JsonlSink, reporting_sinks
from medvl.engine.optim import build_optimizer, build_scheduler
from medvl.engine.params import Plan, apply_plan, param_groups, rows_as_dicts, trainability
from medvl.errors import MedvlError
from medvl.families import Family, detect_family, get_family
from medvl.versions import library_versions


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    table: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# set-up helpers

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


def plan_from_recipe(recipe, family: Family) -> Plan:
    f = recipe.freeze
    lrs = {"language": recipe.optim.lr, "head": recipe.optim.lr,
           "vision": recipe.optim.vision_lr or recipe.optim.lr, "projector": recipe.optim.projector_lr or recipe.optim.lr}
    if recipe.method == "full":
        modes = {"vision": "frozen" if f.vision_tower else "full", "projector": "frozen" if f.projector else "full",
                 "language": "frozen" if f.language_model else "full", "head": "frozen" if f.language_model else "full"}
        return Plan(modes, lrs)
    lora = recipe.lora
    # LoRA: adapters where asked; every other group stays frozen (the base weights never change).
    modes = {"language": "lora", "head": "frozen", "vision": "lora" if lora.include_vision else "frozen",
             "projector": "lora" if lora.include_projector else "frozen"}
    regex = None if lora.target == "language" else lora.target
    return Plan(modes, lrs, lora_r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, lora_regex=regex)


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


# ---------------------------------------------------------------------------------------------------------
# data

def build_data(recipe, family, processor, accelerator):
    from medvl.data.dataset import EncodedDataset, Plan as BatchPlan, index_prepared

    index = index_prepared([s.path for s in recipe.data.train])
    dataset = EncodedDataset(index, processor, family, loss_mask=recipe.data.loss_mask,
                             max_seq_len=recipe.data.max_seq_len, load_image=load_image)
    lengths = [n if n > 0 else recipe.data.max_seq_len // 2 for n in index.n_tokens]
    if recipe.data.packing and any(n <= 0 for n in index.n_tokens):
        lengths = _measure_lengths(dataset)
    train_ids, val_ids = _split(len(index), recipe)
    train_ids = _apply_weights(train_ids, index, recipe)
    pack = recipe.data.max_seq_len * recipe.train.micro_batch_size if recipe.data.packing else None
    plan = BatchPlan([lengths[i] for i in train_ids], recipe.train.seed, recipe.train.micro_batch_size, pack,
                     accelerator.num_processes, recipe.train.grad_accum)
    if plan.steps_per_epoch == 0:
        raise MedvlError(
            f"{len(train_ids)} training samples make no full optimizer step for global batch "
            f"{recipe.global_batch}", fix="lower train.micro_batch_size / train.grad_accum, or add data")
    val = None
    if recipe.data.val:
        vindex = index_prepared([recipe.data.val])
        val = (EncodedDataset(vindex, processor, family, loss_mask=recipe.data.loss_mask,
                              max_seq_len=recipe.data.max_seq_len, load_image=load_image), list(range(len(vindex))))
    elif val_ids:
        val = (dataset, val_ids)
    return dataset, train_ids, plan, val


def load_image(path):
    from medvl.data.images import load_image as load  # PIL + DICOM; imported only when a sample has images

    return load(path)


def _split(n: int, recipe) -> tuple[list[int], list[int]]:
    if not recipe.data.val_fraction:
        return list(range(n)), []
    import random

    ids = list(range(n))
    random.Random(recipe.train.seed).shuffle(ids)
    k = max(1, int(n * recipe.data.val_fraction))
    return sorted(ids[k:]), sorted(ids[:k])


def _apply_weights(ids: list[int], index, recipe) -> list[int]:
    """data.train[].weight repeats a source per epoch: 2.0 = twice, 0.5 = a seeded half (the same half every
    epoch, so the mixture is fixed for the run)."""
    import random

    weights = {str(index.roots[k]): 1.0 for k in range(len(index.shards))}
    for src in recipe.data.train:
        weights[str(Path(src.path))] = src.weight
    if all(w == 1.0 for w in weights.values()):
        return ids
    rng = random.Random(recipe.train.seed)
    out = []
    by_source: dict[str, list[int]] = {}
    for i in ids:
        by_source.setdefault(str(index.roots[index.shard_of[i]]), []).append(i)
    for root, members in by_source.items():
        w = weights.get(root, 1.0)
        whole, frac = int(w), w - int(w)
        out += members * whole + rng.sample(members, round(len(members) * frac))
    return out


def _measure_lengths(dataset) -> list[int]:
    out = []
    for i in range(len(dataset)):
        enc = dataset[i]
        out.append(len(enc) if hasattr(enc, "input_ids") else 1)
    return out


def make_loader(dataset, ids, plan, rank, start, total, num_workers, pad_id, pack, keepalive=None):
    import torch

    from medvl.data.dataset import StepBatchSampler

    class _Remapped:  # plan indices are positions in `ids` (the training split)
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return dataset[ids[i]]

    def _collate(encs):
        good = [e for e in encs if hasattr(e, "input_ids")]
        rejected = [e for e in encs if not hasattr(e, "input_ids")]
        return collate_with_keepalive(good, pad_id, pack, keepalive), rejected

    # Its own generator: a DataLoader iterator draws a seed from the global RNG, which would put a resumed run's
    # dropout one draw out of step with the uninterrupted run (LoRA dropout made that visible).
    return torch.utils.data.DataLoader(_Remapped(), batch_sampler=StepBatchSampler(plan, rank, start, total),
                                       collate_fn=_collate, num_workers=num_workers,
                                       generator=torch.Generator().manual_seed(plan.seed + rank),
                                       persistent_workers=False, prefetch_factor=4 if num_workers else None)


# ---------------------------------------------------------------------------------------------------------
# one step

def supervised_tokens(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum()) if batch is not None else 0


def token_loss_sum(model, family, batch):
    import torch

    out = model(**model_inputs(model, family, batch))
    logits = out.logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten().to(logits.device),
                                             ignore_index=IGNORE, reduction="sum")


def keepalive_sample(processor, family):
    """A one-image sample whose labels are all ignored. Appended to a micro-batch that has no image when every
    rank must run the vision tower (its parameters train under DDP, or ZeRO-3 gathers it): the tower then runs
    inside the same forward, in the same module order, on every rank, and the loss is unchanged."""
    from PIL import Image

    from medvl.data.collate import Encoded, encode_record

    rec = {"id": "__keepalive__", "messages": [{"role": "user", "content": "<image>"},
                                               {"role": "assistant", "content": "."}]}
    enc = encode_record(rec, [Image.new("RGB", (56, 56))], processor, family)
    return Encoded(enc.input_ids, [IGNORE] * len(enc), enc.vision, enc.mm_token_type_ids, 1, 0, "__keepalive__")


def collate_with_keepalive(encs, pad_id: int, pack: bool, keepalive=None):
    if keepalive is not None and not any(e.n_images for e in encs):
        encs = encs + [keepalive]
    if not encs:
        return None
    import torch

    batch = collate(encs, pad_id, pack=pack)
    batch["keepalive"] = torch.tensor(int(encs[-1] is keepalive))
    return batch


# ---------------------------------------------------------------------------------------------------------
# the run

def prepare_run_dir(recipe, resume: str | None) -> Path:
    run_dir = Path(recipe.output.dir)
    if resume in (None, "", "no", "none") and run_dir.is_dir() and any(run_dir.iterdir()):
        if not recipe.output.overwrite:
            raise MedvlError(f"run directory {run_dir} already holds a run", where=str(run_dir),
                             fix="resume it with --resume auto, choose another output.dir, or set output.overwrite=true")
    return run_dir


def train(recipe, *, resume: str | None = None, sinks=(), stop_after_step: int | None = None) -> RunResult:
    """Run a recipe to the end (or to `stop_after_step`, used by the kill-and-resume test); returns the run."""
    import torch
    from accelerate.utils import set_seed

    from medvl.config import recipe_to_yaml

    if recipe.eval.every and recipe.world_size > 1 and recipe.distributed.strategy in ("deepspeed-zero3", "fsdp"):
        raise MedvlError(f"benchmark evaluation during training (eval.every) is not supported with "
                         f"{recipe.distributed.strategy}: sharded weights would make every rank generate in lockstep",
                         fix="drop eval.every and run `medvl eval` on the checkpoints, or use ddp / deepspeed-zero2")
    bench_set = load_benchmark(recipe) if recipe.eval.every else None
    run_dir = prepare_run_dir(recipe, resume)
    accelerator = build_accelerator(recipe)
    if recipe.world_size > 1 and (accelerator.num_processes != recipe.world_size
                                  or accelerator.distributed_type.name == "NO"):
        raise MedvlError(f"the recipe asks for {recipe.world_size} processes but this run has "
                         f"{accelerator.num_processes} ({accelerator.distributed_type.name}): the processes would "
                         "train alone, each on its own", fix="start it with `medvl train` (it launches the processes)")
    set_seed(recipe.train.seed)
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
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

    dataset, train_ids, batch_plan, val = build_data(recipe, family, processor, accelerator)
    total_steps = recipe.train.max_steps or max(1, int(batch_plan.steps_per_epoch * recipe.train.epochs))
    optimizer = build_optimizer(param_groups(model, family, plan, recipe.optim.weight_decay),
                                betas=recipe.optim.betas, eps=recipe.optim.eps)
    scheduler = build_scheduler(optimizer, total=total_steps, warmup=recipe.optim.warmup_for(total_steps),
                                kind=recipe.optim.scheduler, floor=recipe.optim.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    position = _Position()
    accelerator.register_for_checkpointing(scheduler, position)
    ckpt.save_trainable_only(accelerator)

    start = 0
    resume_from = ckpt.resolve_resume(resume, run_dir)
    if resume_from is not None:
        ckpt.load_checkpoint(accelerator, resume_from)
        start = position.step

    sink = Fanout(list(sinks) + ([JsonlSink(run_dir / "metrics.jsonl", append=resume_from is not None)] if main else []))
    if main and resume_from is None:
        (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        (run_dir / "trainability.json").write_text(json.dumps(table, indent=2))
        (run_dir / "versions.json").write_text(json.dumps(library_versions(), indent=2))
    if main:
        sink.sinks += reporting_sinks(recipe.output.report_to, run_dir, run_dir.name, json.loads(recipe.model_dump_json()))
        sink.log({"kind": "start", "run_dir": str(run_dir), "family": family.name, "total_steps": total_steps,
                  "start_step": start, "world_size": accelerator.num_processes, "global_batch": recipe.global_batch,
                  "steps_per_epoch": batch_plan.steps_per_epoch, "samples": len(train_ids),
                  "dropped_per_epoch": batch_plan.dropped_per_epoch(), "table": table,
                  "distributed": accelerator.distributed_type.name, "device": str(accelerator.device)})

    tok = getattr(processor, "tokenizer", processor)
    keepalive = keepalive_sample(processor, family) if family.is_vision and _needs_keepalive(recipe, table) else None
    loader = make_loader(dataset, train_ids, batch_plan, accelerator.process_index, start, total_steps,
                         recipe.data.num_workers, tok.pad_token_id, recipe.data.packing, keepalive)
    dtype = next(p for p in model.parameters()).dtype

    result = RunResult(run_dir, run_dir / "final", start, table=table)
    guard = _Guard(sink)
    micro_iter = iter(loader)
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
        grad_norm = _clip(accelerator, model, recipe.optim.max_grad_norm)
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
        if (step + 1) % recipe.train.log_every == 0 or step + 1 == total_steps or step == start:
            elapsed = time.perf_counter() - t_start
            done = step + 1 - start
            sink.log({"kind": "train", "step": step + 1, "total_steps": total_steps,
                      "epoch": round((step + 1) / batch_plan.steps_per_epoch, 3), "loss": round(mean_loss, 6),
                      "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": window_tokens,
                      "tokens_per_s": round(tokens_seen / elapsed, 1), "samples_per_s": round(samples_seen / elapsed, 3),
                      "input_tokens_per_s": round(inputs_seen / elapsed, 1),
                      "memory_gb": _memory_gb(accelerator), "eta_s": round(elapsed / done * (total_steps - step - 1), 1),
                      "rejected": n_rejected})
        if val is not None and recipe.train.eval_every and (step + 1) % recipe.train.eval_every == 0:
            v = eval_loss(model, family, val, processor, accelerator, recipe, keepalive)
            result.eval_losses.append((step + 1, v))
            sink.log({"kind": "eval", "step": step + 1, "eval_loss": round(v, 6)})
        if bench_set is not None and (step + 1) % recipe.eval.every == 0:
            sink.log(benchmark_eval(model, processor, family, bench_set, recipe, accelerator, run_dir, step + 1))
        if recipe.train.save_every and (step + 1) % recipe.train.save_every == 0 and step + 1 < total_steps:
            path = ckpt.save_checkpoint(accelerator, run_dir, step + 1, _trainer_state(step + 1, accelerator, recipe),
                                        keep_last=recipe.train.keep_last or 1)
            sink.log({"kind": "checkpoint", "step": step + 1, "path": str(path)})
        if stop_after_step is not None and step + 1 >= stop_after_step:
            result.steps = step + 1
            sink.close()
            accelerator.wait_for_everyone()
            return result

    result.steps = total_steps
    if val is not None and not (result.eval_losses and result.eval_losses[-1][0] == total_steps):
        v = eval_loss(model, family, val, processor, accelerator, recipe, keepalive)
        result.eval_losses.append((total_steps, v))
        sink.log({"kind": "eval", "step": total_steps, "eval_loss": round(v, 6)})
    if recipe.train.save_every:
        ckpt.save_checkpoint(accelerator, run_dir, total_steps, _trainer_state(total_steps, accelerator, recipe),
                             keep_last=recipe.train.keep_last or 1)
    save_final(accelerator, model, processor, recipe, run_dir / "final", table)
    sink.log({"kind": "end", "step": total_steps, "final_dir": str(run_dir / "final"),
              "wall_s": round(time.perf_counter() - t_start, 2)})
    sink.close()
    accelerator.wait_for_everyone()
    return result


def load_benchmark(recipe):
    """The benchmark items scored during training, checked (paths, suites, every image) before step 1."""
    from medvl.evaluate.run import image_problems, raise_image_problems, resolve_data
    from medvl.evaluate.suites import load_suites

    eval_set = load_suites(resolve_data(recipe.eval.data), recipe.eval.suites or "all", sample=recipe.eval.sample,
                           seed=recipe.train.seed)
    problems = image_problems(eval_set)
    if problems:
        raise_image_problems(problems, eval_set)
    return eval_set


def benchmark_eval(model, processor, family, eval_set, recipe, accelerator, run_dir: Path, step: int) -> dict:
    """Greedy answers to the recipe's benchmark items with the weights of this step, scored like `medvl eval`;
    every rank answers its shard. Returns the metric event (accuracy per dataset with n)."""
    from accelerate.utils import gather_object

    from medvl.evaluate.generate import Generator, answer_items, make_decoding, merge_shards
    from medvl.evaluate.scoring import score

    inner = accelerator.unwrap_model(model)
    inner.eval()
    try:
        gen = Generator(inner, processor, family, make_decoding("greedy", max_new_tokens=recipe.eval.max_new_tokens),
                        fingerprint={"run": str(run_dir), "step": step})
        answers = answer_items(gen, eval_set.items, run_dir / "eval" / f"step-{step:06d}",
                               batch_size=recipe.train.micro_batch_size * 4, rank=accelerator.process_index,
                               world=accelerator.num_processes, barrier=accelerator.wait_for_everyone)
    finally:
        inner.train()
        getattr(processor, "tokenizer", processor).padding_side = "right"
    parts = gather_object([answers.outputs]) if accelerator.num_processes > 1 else [answers.outputs]
    outputs = {**answers.cached, **merge_shards(parts, [it.test_id for it in eval_set.items
                                                       if it.test_id not in answers.cached])}
    scores = score((it, outputs[it.test_id]) for it in eval_set.items).results["huatuo"]
    return {"kind": "eval", "step": step, "benchmark_accuracy": round(scores.overall.acc, 4),
            "benchmark_n": scores.overall.n,
            "benchmark": {name: {"acc": round(a.acc, 4), "n": a.n} for name, a in scores.datasets.items()}}


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


def _clip(accelerator, model, max_norm):
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        norm = model.get_global_grad_norm() if hasattr(model, "get_global_grad_norm") else None
        return None if norm is None else round(float(norm), 6)
    if not accelerator.sync_gradients:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    norm = accelerator.clip_grad_norm_(params, max_norm or float("inf"))
    return round(float(norm), 6)


def _memory_gb(accelerator) -> float:
    import torch

    if accelerator.device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 3)
    import psutil

    return round(psutil.Process().memory_info().rss / 2**30, 3)


def _trainer_state(step, accelerator, recipe) -> dict:
    return {"step": step, "world_size": accelerator.num_processes, "global_batch": recipe.global_batch,
            "recipe_sha256": _sha(recipe)}


def _sha(recipe) -> str:
    import hashlib

    return hashlib.sha256(recipe.model_dump_json().encode()).hexdigest()[:16]


class _Guard:
    """Stops on NaN/inf with a diagnosis; warns on windows with nothing to learn and on a loss stuck at zero."""

    def __init__(self, sink):
        self.sink = sink
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
            raise MedvlError(
                f"the {what} became {loss if what == 'loss' else grad_norm} at step {step}; training stopped, "
                "the last saved checkpoint is intact",
                fix="lower optim.lr or raise warmup; with fp16 switch to bf16; with flash attention try sdpa; "
                    "resume from the last checkpoint with --resume auto")
        self.zero_run = self.zero_run + 1 if loss == 0.0 else 0
        if self.zero_run == 3:
            self.sink.log({"kind": "warning", "step": step, "code": "loss_zero",
                           "message": "loss has been exactly 0 for 3 steps",
                           "hint": "usually every label is masked or the model copies the labels through the input"})
        if n_rejected:
            self.sink.log({"kind": "warning", "step": step, "code": "rejected_samples",
                           "message": f"{n_rejected} sample(s) could not be encoded and were skipped",
                           "hint": "; ".join(f"{r.sample_id}: {r.message}" for r in rejected[:3])})


def eval_loss(model, family, val, processor, accelerator, recipe, keepalive=None) -> float:
    import torch

    dataset, ids = val
    tok = getattr(processor, "tokenizer", processor)
    mine = ids[accelerator.process_index::accelerator.num_processes]
    total = torch.zeros(2, device=accelerator.device)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(mine), recipe.train.micro_batch_size):
            encs = [dataset[j] for j in mine[i:i + recipe.train.micro_batch_size]]
            encs = [e for e in encs if hasattr(e, "input_ids")]
            if not encs:
                continue
            batch = collate_with_keepalive(encs, tok.pad_token_id, False, keepalive)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                total[0] += token_loss_sum(model, family, batch).float()
            total[1] += supervised_tokens(batch)
    model.train()
    total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1].clamp(min=1))


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
                "data_manifests": _manifest_hashes(recipe)}, indent=2))
    accelerator.wait_for_everyone()


def _manifest_hashes(recipe) -> dict:
    out = {}
    for src in recipe.data.train:
        path = Path(src.path) / "manifest.json"
        if path.is_file():
            out[src.path] = json.loads(path.read_text()).get("content_hash")
    return out


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
