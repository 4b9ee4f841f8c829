"""Measuring a run while it trains: eval loss on the held-out split, and benchmark accuracy on the recipe's
`eval:` suites with the weights of the current step."""

from __future__ import annotations

from pathlib import Path

from medvl.engine.batches import collate_with_keepalive, idle_batch
from medvl.engine.loss import supervised_tokens, token_loss_sum
from medvl.models import tokenizer_of


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
        tokenizer_of(processor).padding_side = "right"
    parts = gather_object([answers.outputs]) if accelerator.num_processes > 1 else [answers.outputs]
    outputs = {**answers.cached, **merge_shards(parts, [it.test_id for it in eval_set.items
                                                       if it.test_id not in answers.cached])}
    scores = score((it, outputs[it.test_id]) for it in eval_set.items).results["huatuo"]
    return {"kind": "eval", "step": step, "benchmark_accuracy": round(scores.overall.acc, 4),
            "benchmark_n": scores.overall.n,
            "benchmark": {name: {"acc": round(a.acc, 4), "n": a.n} for name, a in scores.datasets.items()}}


def eval_loss(model, family, val, processor, accelerator, recipe, keepalive=None, idle=None) -> float:
    """Mean token loss over the validation set, each rank scoring its share. With several processes every rank
    runs the same number of forwards (ZeRO-3 / FSDP gather parameters in each one, so a rank with one batch
    fewer would leave the others waiting): a rank short of batches, or whose batch lost every sample, runs
    `idle` (batches.idle_sample: labels all ignored, so it adds no loss and no token)."""
    import math

    import torch

    dataset, ids = val
    tok = tokenizer_of(processor)
    mb, world = recipe.train.micro_batch_size, accelerator.num_processes
    mine = ids[accelerator.process_index::world]
    n_batches = math.ceil(math.ceil(len(ids) / world) / mb) if idle is not None else math.ceil(len(mine) / mb)
    total = torch.zeros(2, device=accelerator.device)
    model.eval()
    with torch.no_grad():
        for i in range(0, n_batches * mb, mb):
            encs = [dataset[j] for j in mine[i:i + mb]]
            encs = [e for e in encs if hasattr(e, "input_ids")]
            if not encs and idle is None:
                continue
            batch = (collate_with_keepalive(encs, tok.pad_token_id, False, keepalive) if encs
                     else idle_batch(idle, tok.pad_token_id, False))
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                total[0] += token_loss_sum(model, family, batch).float()
            total[1] += supervised_tokens(batch)
    model.train()
    total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1].clamp(min=1))
