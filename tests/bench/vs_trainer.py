"""medvl's training loop side by side with the loop a user would write with transformers' Trainer (+ peft for
LoRA): same tiny Qwen2.5-VL, same encoded samples and batches, same optimizer settings, fp32, one thread each.

    python -m tests.bench.vs_trainer [ROUNDS] [STEPS]

Each run is its own process; runs are interleaved round by round (medvl full, Trainer full, medvl LoRA, Trainer
LoRA) and the median per run is reported with the ratio medvl / Trainer. "loop" is samples/s inside the
training loop (medvl: its train events; Trainer: train_samples_per_second), "wall" the whole process.
Data: 2,400 easy-vqa questions with their 64x64 images, micro-batch 8, max length 256, padded batches.
Exit status 1 when medvl's loop is slower than the Trainer's (loop ratio < 1.0).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = ("medvl-full", "trainer-full", "medvl-lora", "trainer-lora")
BATCH, LR, WARMUP, R, ALPHA, DROPOUT = 8, 1e-3, 10, 16, 32, 0.05
WORKERS = int(os.environ.get("MEDVL_BENCH_WORKERS", "0"))  # data loader worker processes, both sides
TARGET = 1.0  # never slower than the Trainer; medians of 3 runs on a shared 2-core machine swing by ~10 %


def setup(root: Path, n: int = 2400) -> None:
    from medvl.tiny import build_tiny
    from tests.bench.train_throughput import prepare_bench_data

    build_tiny("qwen2.5-vl", root / "tiny")
    prepare_bench_data(root, False, n, root / "data")


def medvl_run(root: Path, method: str, steps: int) -> dict:
    from medvl.config import load_recipe
    from medvl.engine.train import train

    out = root / f"medvl-{method}"
    extra = [f"lora.r={R}", f"lora.alpha={ALPHA}", f"lora.dropout={DROPOUT}"] if method == "lora" else []
    recipe = load_recipe("tiny_cpu", [f"model.base={root / 'tiny'}", f"data.train=[{root / 'data'}]",
                                      f"output.dir={out}", "output.overwrite=true", f"train.max_steps={steps}", "train.save_every=null",
                                      "train.eval_every=null", "data.val_fraction=null", "data.packing=false",
                                      f"train.micro_batch_size={BATCH}", f"optim.lr={LR}",
                                      f"optim.warmup_steps={WARMUP}", "train.log_every=100000", f"method={method}",
                                      f"data.num_workers={WORKERS}",
                                      *extra])
    train(recipe)
    last = [e for e in map(json.loads, open(out / "metrics.jsonl")) if e["kind"] == "train"][-1]
    return {"loop": last["samples_per_s"]}


def trainer_run(root: Path, method: str, steps: int) -> dict:
    """What a user writes: the model, (peft), a Dataset and a collator, TrainingArguments, Trainer.train()."""
    import torch
    from transformers import Trainer, TrainingArguments

    from medvl.data.collate import collate
    from medvl.data.dataset import EncodedDataset, index_prepared
    from medvl.engine.batches import load_image
    from medvl.families import get_family
    from medvl.models import apply_resolution, load_model, load_processor

    family = get_family("qwen2.5-vl")
    processor = load_processor(root / "tiny", family)
    apply_resolution(processor, family, 3136, 12544)
    model = load_model(root / "tiny", family)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                 target_modules=family.lora_regex(), task_type="CAUSAL_LM"))
    data = EncodedDataset(index_prepared([root / "data"]), processor, family, loss_mask="all", max_seq_len=256,
                          load_image=load_image)
    pad = processor.tokenizer.pad_token_id

    def collator(encs):
        batch = collate(encs, pad)
        for k in ("seq_lens", "images_per_sample"):
            batch.pop(k)
        return batch

    class _Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    args = TrainingArguments(output_dir=str(root / f"trainer-{method}"), per_device_train_batch_size=BATCH,
                             max_steps=steps, learning_rate=LR, warmup_steps=WARMUP, lr_scheduler_type="cosine",
                             weight_decay=0.0, max_grad_norm=1.0, logging_steps=100000, save_strategy="no",
                             report_to=[], use_cpu=True, dataloader_num_workers=WORKERS, remove_unused_columns=False,
                             seed=0, disable_tqdm=True)
    out = Trainer(model=model, args=args, train_dataset=_Data(), data_collator=collator).train()
    return {"loop": out.metrics["train_samples_per_second"]}


def child(root: str, run: str, steps: int) -> None:
    import torch

    torch.set_num_threads(1)
    who, method = run.split("-")
    res = (medvl_run if who == "medvl" else trainer_run)(Path(root), method, steps)
    print(json.dumps(res))


def measure(root: Path, run: str, steps: int) -> dict:
    t0 = time.perf_counter()
    code = f"from tests.bench.vs_trainer import child; child({str(root)!r}, {run!r}, {steps})"
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin",
           "MEDVL_BENCH_WORKERS": str(WORKERS)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{run} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]), wall=time.perf_counter() - t0)


def run(rounds: int, steps: int, n: int = 2400, judge: bool = True) -> dict:
    results: dict[str, list[dict]] = {r: [] for r in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup(root, n)
        for i in range(rounds):
            for r in RUNS:
                results[r].append(measure(root, r, steps))
            print(f"round {i + 1}/{rounds} done", file=sys.stderr)
    med = {r: {k: statistics.median(x[k] for x in xs) for k in xs[0]} for r, xs in results.items()}
    print(f"\n{'method':>7} {'medvl loop samples/s':>21} {'Trainer loop samples/s':>23} {'loop ratio':>11} "
          f"{'wall speed ratio':>17}   ({steps} steps x batch {BATCH}, medians of {rounds})")
    slow = []
    for method in ("full", "lora"):
        m, t = med[f"medvl-{method}"], med[f"trainer-{method}"]
        print(f"{method:>7} {m['loop']:>21.1f} {t['loop']:>23.1f} {m['loop'] / t['loop']:>11.2f} "
              f"{t['wall'] / m['wall']:>17.2f}")
        if m["loop"] / t["loop"] < TARGET:
            slow.append(method)
    print(f"target: loop ratio >= {TARGET} (issue 15's goal: >= 1.1)")
    if slow and judge:
        raise SystemExit(f"medvl's loop is slower than the Trainer's: {', '.join(slow)}")
    return med


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 3, int(sys.argv[2]) if len(sys.argv) > 2 else 100)
