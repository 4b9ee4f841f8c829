r"""medvl's training loop side by side with ms-swift's and LLaMA-Factory's: same tiny Qwen2.5-VL, same 2,400
easy-vqa samples, same hyper-parameters, fp32, CPU, one thread, one process each.

    python -m tests.bench.vs_peers [--swift VENV/bin/swift] [--llamafactory VENV/bin/llamafactory-cli] [ROUNDS] [STEPS]

Defaults: $MEDVL_BENCH_SWIFT, $MEDVL_BENCH_LLAMAFACTORY; with no peer it says so and exits 0 (`make bench` runs it).
Each peer lives in its own virtualenv outside the repository. With torch 2.13.0+cpu these installs worked (PyPI's
torchvision and torchaudio are CUDA-linked: --no-deps, then made to import without their C extensions):

    python3 -m venv /work/peers/swift && /work/peers/swift/bin/pip install torch==2.13.0
    printf 'torch==2.13.0\ntransformers==5.19.0\npeft==0.20.0\naccelerate==1.15.0\n' > swift-c.txt  # <5.20, <0.21
    /work/peers/swift/bin/pip install -c swift-c.txt ms-swift==4.6.0 qwen-vl-utils==0.0.14
    python3 -m venv /work/peers/lf && /work/peers/lf/bin/pip install torch==2.13.0
    printf 'torch==2.13.0\ntransformers==5.6.0\npeft==0.18.1\naccelerate==1.11.0\n' > lf-c.txt  # its caps
    unzip -p llamafactory-0.9.5-py3-none-any.whl '*/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v extra \
        | grep -vE '^(torch|torchvision|torchaudio)[<>=! ]' > lf-reqs.txt   # (pip download --no-deps llamafactory)
    /work/peers/lf/bin/pip install -c lf-c.txt -r lf-reqs.txt
    /work/peers/lf/bin/pip install --no-deps llamafactory==0.9.5 torchaudio==2.11.1
    rm /work/peers/lf/lib/python3.11/site-packages/torchaudio/lib/*.so   # need libc10_cuda; pure Python without
    for v in swift lf; do /work/peers/$v/bin/pip install --no-deps torchvision==0.28.0
      f=/work/peers/$v/lib/python3.11/site-packages/torchvision/_meta_registrations.py  # guard 2 unguarded fakes
      sed -i 's/^@\(torch.library.register_fake("torchvision::q\?nms")\)$/@(\1 if torchvision.extension._has_ops() else lambda f: f)/' $f
    done

The peers get the same samples in their own formats (swift: messages jsonl plus a template registered with the tiny
model's image-token ids, as its qwen2_5_vl template hard-codes Qwen's 151655; LLaMA-Factory: sharegpt json plus
dataset_info.json, template qwen2_vl), the model folder plus a preprocessor_config.json (transformers builds the video
processor from it once torchvision imports) and medvl's settings: micro-batch 8, lr 1e-3, warmup 10, cosine, weight
decay 0, max grad norm 1.0, AdamW (0.9, 0.999), max length 256, image pixels 3136-12544, fp32, sdpa, no gradient
checkpointing or packing, 0 loader workers; LoRA r16 alpha32 dropout 0.05 on the language model's 14 linear layers
(swift: medvl's regex; LLaMA-Factory: lora_target all, vision and projector frozen); full: every parameter, as in
tiny_cpu (the peers' vision/aligner/projector freezes off). Collator, loss and optimizer stay each tool's own.

Measured per run, runs interleaved round by round, medians and (min-max) over rounds:
  loop   - each tool's own figure: medvl's samples_per_s at the last step, the peers' train_samples_per_second
           (transformers' Trainer): samples / seconds from the loop's start to the end of its last step.
  steady - one definition for all: samples of steps SKIP+1..STEPS / seconds from the end of step SKIP to the end of
           the last, clocked at each step's end (medvl: its scheduler step; peers: the Trainer's on_step_end).
  wall   - the whole process, start-up included; "wall speed" = peer wall / medvl wall.
  phases - ms per steady step in the DataLoader iterator, accelerate's backward, clip_grad_norm_ and optimizer step
           (the same library calls in all three) and the rest (forward, loss, bookkeeping).
Where the text is tokenized: LLaMA-Factory in a datasets.map pass before training (its loader loads images, runs the
image processor and collates); medvl in prepare-data --model, which stores each sample's text tokens (its loader
loads images, processes them and expands the image tokens); swift in the loader, for every sample.
Exit status 1 when medvl's steady loop is slower than a peer's (ratio < vs_trainer.TARGET).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.vs_trainer import ALPHA, BATCH, DROPOUT, LR, R, TARGET, WARMUP, medvl_run, setup

REPO = Path(__file__).resolve().parents[2]
SKIP = 10  # the steady window starts after warm-up (10 steps), when every lazy start-up cost has been paid
PHASES = ("data", "backward", "clip", "optimizer")

# Run first in every measured process (medvl's and the peers'): times the phases all three share (torch DataLoader
# iterator, accelerate's backward, gradient clipping and optimizer step), clocks each step's end (stamp) and keeps
# the first batch's facts.
CLOCK = r"""
import time
t0 = time.perf_counter()
import accelerate, accelerate.optimizer, torch
from torch.utils.data import dataloader
rec = {"stamps": [], "phases": [], "threads": torch.get_num_threads()}
totals = dict.fromkeys(("data", "backward", "clip", "optimizer"), 0.0)
def timed(cls, name, key, f):
    def run(self, *a, **k):
        if key == "optimizer":
            o, d = self.optimizer, self.optimizer.defaults
            rec.setdefault("optim", f"{type(o).__name__} fused={d.get('fused')} foreach={d.get('foreach')}")
        t = time.perf_counter()
        try:
            return f(self, *a, **k)
        finally:
            totals[key] += time.perf_counter() - t
    setattr(cls, name, run)
for cls, name, key in ((dataloader._BaseDataLoaderIter, "__next__", "data"), (accelerate.Accelerator, "backward",
        "backward"), (accelerate.Accelerator, "clip_grad_norm_", "clip"), (accelerate.optimizer.AcceleratedOptimizer,
        "step", "optimizer")):
    timed(cls, name, key, getattr(cls, name))
def stamp():
    rec["stamps"].append(time.perf_counter() - t0); rec["phases"].append(dict(totals))
def facts(model, batch):
    if "batch" not in rec:
        ids, px = batch["input_ids"], batch.get("pixel_values")
        rec["batch"] = {"rows": ids.shape[0], "width": ids.shape[1], "patches": None if px is None else px.shape[0],
                        "image_tokens": int((ids == model.config.image_token_id).sum()),
                        "supervised": int((batch["labels"] != -100).sum())}
        rec["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rec["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        rec["checkpointing"] = bool(getattr(model, "is_gradient_checkpointing", False))
"""
# A peer's own interpreter: the clock on the Trainer both peers build on (step end, logs, first batch), then the
# peer's own entry module, as its CLI would run it.
PROBE = CLOCK + r"""
import atexit, json, os, runpy, sys
from transformers import Trainer
from transformers.trainer_callback import CallbackHandler
rec["logs"] = []
def step_end(self, args, state, control, _f=CallbackHandler.on_step_end):
    stamp(); return _f(self, args, state, control)
def on_log(self, args, state, control, logs, _f=CallbackHandler.on_log):
    rec["logs"].append({k: v for k, v in logs.items() if isinstance(v, (int, float))})
    return _f(self, args, state, control, logs)
def training_step(self, model, inputs, *a, _f=Trainer.training_step, **k):
    facts(model, inputs); return _f(self, model, inputs, *a, **k)
CallbackHandler.on_step_end, CallbackHandler.on_log, Trainer.training_step = step_end, on_log, training_step
atexit.register(lambda: open(os.environ["VS_PEERS_OUT"], "w").write(json.dumps(rec)))
module, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def write_peer_inputs(root: Path) -> dict:
    """The prepared samples in each peer's format, the peer model folder and swift's template; returns the ids."""
    from medvl.families import get_family

    config = json.loads((root / "tiny" / "config.json").read_text())
    peer_model = root / "tiny-peer"
    peer_model.mkdir(exist_ok=True)
    for f in (root / "tiny").iterdir():
        (peer_model / f.name).unlink(missing_ok=True)
        (peer_model / f.name).symlink_to(f)
    image_proc = json.loads((root / "tiny" / "processor_config.json").read_text())["image_processor"]
    (peer_model / "preprocessor_config.json").write_text(json.dumps(image_proc))
    rows = [json.loads(line) for shard in sorted((root / "data").glob("data-*.jsonl")) for line in open(shard)]
    samples = [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]],
                "images": r["images"]} for r in rows]
    (root / "swift.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (root / "swift_tiny_template.py").write_text(
        "from swift.template import register_template\n"
        "from swift.template.templates.qwen import Qwen2_5VLTemplate, QwenTemplateMeta\n\n\n"
        "class TinyQwen25VLTemplate(Qwen2_5VLTemplate):\n"
        f"    image_token_id = {config['image_token_id']}\n    video_token_id = {config['video_token_id']}\n\n\n"
        "register_template(QwenTemplateMeta('qwen2_5_vl_tiny', template_cls=TinyQwen25VLTemplate))\n")
    lf = root / "lf-data"
    lf.mkdir(exist_ok=True)
    (lf / "bench.json").write_text(json.dumps(samples))
    (lf / "dataset_info.json").write_text(json.dumps({"bench": {
        "file_name": "bench.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    return {"samples": len(samples), "lora_regex": get_family("qwen2.5-vl").lora_regex()}


def swift_args(root: Path, method: str, steps: int, regex: str) -> list[str]:
    out = root / f"swift-{method}"
    args = {"model": root / "tiny-peer", "model_type": "qwen2_5_vl", "template": "qwen2_5_vl_tiny",
            "custom_register_path": root / "swift_tiny_template.py", "dataset": root / "swift.jsonl",
            "tuner_type": method, "max_steps": steps, "per_device_train_batch_size": BATCH, "learning_rate": LR,
            "gradient_accumulation_steps": 1, "warmup_steps": WARMUP, "lr_scheduler_type": "cosine",
            "weight_decay": 0, "max_grad_norm": 1.0, "adam_beta2": 0.999, "max_length": 256, "torch_dtype": "float32",
            "attn_impl": "sdpa", "gradient_checkpointing": "false", "packing": "false", "dataloader_num_workers": 0,
            "split_dataset_ratio": 0, "save_strategy": "no", "eval_strategy": "no", "logging_steps": 10,
            "report_to": "none", "seed": 0, "check_model": "false", "use_hf": "true", "output_dir": out,
            "add_version": "false"}
    if method == "full":
        args.update(freeze_vit="false", freeze_aligner="false")
    else:
        args.update(lora_rank=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_regex=regex)
    return ["swift.cli.sft"] + [x for k, v in args.items() for x in (f"--{k}", str(v))]


def lf_args(root: Path, method: str, steps: int) -> list[str]:
    cfg = {"model_name_or_path": str(root / "tiny-peer"), "image_min_pixels": 3136, "image_max_pixels": 12544,
           "stage": "sft", "do_train": True, "finetuning_type": method, "dataset": "bench",
           "dataset_dir": str(root / "lf-data"), "template": "qwen2_vl", "cutoff_len": 256, "overwrite_cache": True,
           "dataloader_num_workers": 0, "output_dir": str(root / f"lf-{method}"), "overwrite_output_dir": True,
           "logging_steps": 10, "save_strategy": "no", "report_to": "none", "per_device_train_batch_size": BATCH,
           "gradient_accumulation_steps": 1, "learning_rate": LR, "max_steps": steps, "lr_scheduler_type": "cosine",
           "warmup_steps": WARMUP, "weight_decay": 0.0, "max_grad_norm": 1.0, "bf16": False, "seed": 0,
           "disable_gradient_checkpointing": True, "flash_attn": "sdpa", "packing": False, "use_cpu": True}
    if method == "full":
        cfg.update(freeze_vision_tower=False, freeze_multi_modal_projector=False)
    else:  # "all" = every linear layer outside the (frozen) vision tower, projector and lm_head: medvl's 14 modules
        cfg.update(lora_rank=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, lora_target="all")
    path = root / f"lf-{method}.yaml"  # JSON is YAML; llamafactory 0.9.5's .json branch calls json.load on a Path
    path.write_text(json.dumps(cfg))
    return ["llamafactory.cli", "train", str(path)]


def medvl_child(root: str, method: str, steps: int) -> None:
    """One medvl run (vs_trainer.medvl_run) under the same clock: a stamp at each scheduler step (each step's end),
    the first batch's facts at its loss."""
    clock: dict = {}
    exec(CLOCK, clock)
    import torch

    import medvl.engine.train as engine

    torch.set_num_threads(1)
    rec, build_scheduler, loss = clock["rec"], engine.build_scheduler, engine.token_loss_sum

    def clocked(*a, **k):
        sched = build_scheduler(*a, **k)
        step = sched.step
        sched.step = lambda *x, **y: (step(*x, **y), clock["stamp"]())[0]
        return sched

    def first(model, family, batch, **k):
        clock["facts"](model, batch)
        return loss(model, family, batch, **k)

    engine.build_scheduler, engine.token_loss_sum = clocked, first
    res = medvl_run(Path(root), method, steps)
    events = [e for e in map(json.loads, open(Path(root) / f"medvl-{method}" / "metrics.jsonl"))
              if e["kind"] == "train"]
    print(json.dumps(dict(rec, loop=res["loop"], losses=[events[0]["loss"], events[-1]["loss"]])))


def measure(root: Path, tool: str, method: str, steps: int, exe: dict) -> dict:
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "",
           "HF_DATASETS_CACHE": str(root / "hf-datasets"), "MODELSCOPE_CACHE": str(root / "modelscope"),
           "MIN_PIXELS": "3136", "MAX_PIXELS": "12544", "VS_PEERS_OUT": str(root / "probe.json")}
    if tool == "medvl":
        cmd = [sys.executable, "-c", f"from tests.bench.vs_peers import medvl_child; "
                                     f"medvl_child({str(root)!r}, {method!r}, {steps})"]
    else:
        args = swift_args(root, method, steps, exe["regex"]) if tool == "swift" else lf_args(root, method, steps)
        cmd = [exe[tool], "-c", PROBE, *args]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO if tool == "medvl" else root)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"{tool}-{method} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    if tool == "medvl":
        rec = json.loads(out.stdout.strip().splitlines()[-1])
    else:
        rec = json.loads((root / "probe.json").read_text())
        losses = [x["loss"] for x in rec["logs"] if "loss" in x]
        rec.update(loop=[x for x in rec["logs"] if "train_samples_per_second" in x][-1]["train_samples_per_second"],
                   losses=[losses[0], losses[-1]])
    stamps, phases = rec.pop("stamps"), rec.pop("phases")
    if len(stamps) != steps:
        raise SystemExit(f"{tool}-{method}: {len(stamps)} step clocks for {steps} steps")
    window = stamps[-1] - stamps[SKIP - 1]
    rec.update(steady=BATCH * (steps - SKIP) / window, wall=wall, first_step=stamps[0], step=window / (steps - SKIP),
               **{k: (phases[-1][k] - phases[SKIP - 1][k]) / (steps - SKIP) for k in PHASES})
    rec["rest"] = rec["step"] - sum(rec[k] for k in PHASES)
    if not rec["losses"][-1] < rec["losses"][0]:
        raise SystemExit(f"{tool}-{method} did not train: loss {rec['losses']}")
    if rec["batch"]["image_tokens"] * 4 != rec["batch"]["patches"]:  # 2x2 patches merge into one token
        raise SystemExit(f"{tool}-{method}: image tokens and vision patches disagree: {rec['batch']}")
    return rec


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.0f}-{max(xs):.0f})"


def report(results: dict, rounds: int, steps: int) -> list[str]:
    print(f"\n{steps} steps x batch {BATCH}, {rounds} round(s): median (min-max); ratios are medvl / peer "
          f"(> 1: medvl faster); steady = steps {SKIP + 1}-{steps}; wall speed = peer wall / medvl wall")
    print(f"{'run':<18} {'loop samples/s':>17} {'steady samples/s':>17} {'loop ratio':>10} {'steady ratio':>12} "
          f"{'wall s':>15} {'wall speed':>10} {'step 1 done s':>14}")
    slow = []
    for (tool, method), rs in results.items():
        m, col = results[("medvl", method)], (lambda key: spread([r[key] for r in rs]))
        ratio = {k: med(m, k) / med(rs, k) for k in ("loop", "steady")}
        wall = med(rs, "wall") / med(m, "wall")
        cells = ["", "", ""] if tool == "medvl" else [f"{ratio['loop']:.2f}", f"{ratio['steady']:.2f}", f"{wall:.2f}"]
        print(f"{tool + '-' + method:<18} {col('loop'):>17} {col('steady'):>17} {cells[0]:>10} {cells[1]:>12} "
              f"{col('wall'):>15} {cells[2]:>10} {col('first_step'):>14}")
        if tool != "medvl" and ratio["steady"] < TARGET:
            slow.append(f"{tool}-{method}")
    print(f"\nms per step over steps {SKIP + 1}-{steps} (medians): data = DataLoader iterator (load, encode, "
          "collate); rest = forward, loss, zero_grad, scheduler, bookkeeping")
    print(f"{'run':<18} " + " ".join(f"{k:>9}" for k in (*PHASES, "rest", "step")))
    for (tool, method), rs in results.items():
        print(f"{tool + '-' + method:<18} " + " ".join(f"{med(rs, k) * 1e3:>9.2f}" for k in (*PHASES, "rest", "step")))
    print(f"\n{'run':<18} {'trainable':>9} {'threads':>7} {'logged loss':>16}  first batch: rows x width, image "
          "tokens, vision patches, supervised tokens; dtype; optimizer; gradient checkpointing")
    for (tool, method), rs in results.items():
        r, b = rs[-1], rs[-1]["batch"]
        print(f"{tool + '-' + method:<18} {r['trainable']:>9,} {r['threads']:>7} {r['losses'][0]:>6.3f} -> "
              f"{r['losses'][1]:<6.3f}  {b['rows']} x {b['width']}, {b['image_tokens']}, {b['patches']}, "
              f"{b['supervised']}; {r['dtype']}; {r['optim']}; {r['checkpointing']}")
    return slow


def run(rounds: int, steps: int, peers: dict[str, str]) -> list[str]:
    exe = {tool: str(Path(path).with_name("python")) for tool, path in peers.items()}
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup(root)
        exe["regex"] = write_peer_inputs(root)["lora_regex"]
        for i in range(rounds):
            for method in ("full", "lora"):
                for tool in ("medvl", *peers):
                    results.setdefault((tool, method), []).append(measure(root, tool, method, steps, exe))
            print(f"round {i + 1}/{rounds} done", file=sys.stderr)
    return report(results, rounds, steps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--swift", default=os.environ.get("MEDVL_BENCH_SWIFT"))
    ap.add_argument("--llamafactory", default=os.environ.get("MEDVL_BENCH_LLAMAFACTORY"))
    ap.add_argument("rounds", nargs="?", type=int, default=3)
    ap.add_argument("steps", nargs="?", type=int, default=100)
    a = ap.parse_args(argv)
    peers = {t: p for t, p in (("swift", a.swift), ("llamafactory", a.llamafactory)) if p}
    if not peers:
        print("vs_peers: skipped, no peer given (--swift / --llamafactory, or MEDVL_BENCH_SWIFT / "
              "MEDVL_BENCH_LLAMAFACTORY; install commands in tests/bench/vs_peers.py)")
        return 0
    for tool, path in peers.items():
        if not Path(path).with_name("python").is_file():
            print(f"vs_peers: no python beside {tool} script {path} (expected a virtualenv's bin/)", file=sys.stderr)
            return 2
    if a.steps <= SKIP:
        print(f"vs_peers: STEPS must exceed {SKIP} (the steady window starts after step {SKIP})", file=sys.stderr)
        return 2
    slow = run(a.rounds, a.steps, peers)
    if slow:
        print(f"medvl's steady loop is slower than: {', '.join(slow)} (target ratio >= {TARGET})")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
