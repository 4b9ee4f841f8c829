"""medvl's training loop side by side with ms-swift's and LLaMA-Factory's: same tiny Qwen2.5-VL, same 2,400
easy-vqa samples, same hyper-parameters, fp32, CPU, one thread, one process each.

    python -m tests.bench.vs_peers [--swift PATH/bin/swift] [--llamafactory PATH/bin/llamafactory-cli] [ROUNDS] [STEPS]

Either peer may be left out (defaults: $MEDVL_BENCH_SWIFT, $MEDVL_BENCH_LLAMAFACTORY); with neither, it says so and
exits 0 (`make bench` runs it). Each peer runs in its own virtualenv, outside this repository; on a 2-core CPU box
with torch 2.13.0+cpu these installs worked (PyPI's torchvision/torchaudio are CUDA-linked, so they go in with
--no-deps and are made to import without their C extensions; no CUDA torch is ever pulled):

    python3 -m venv /work/peers/swift && /work/peers/swift/bin/pip install torch==2.13.0
    printf 'torch==2.13.0\ntransformers==5.19.0\npeft==0.20.0\naccelerate==1.15.0\n' > swift-c.txt  # swift: <5.20, <0.21
    /work/peers/swift/bin/pip install -c swift-c.txt ms-swift==4.6.0 qwen-vl-utils==0.0.14
    python3 -m venv /work/peers/lf && /work/peers/lf/bin/pip install torch==2.13.0
    printf 'torch==2.13.0\ntransformers==5.6.0\npeft==0.18.1\naccelerate==1.11.0\n' > lf-c.txt  # llamafactory's caps
    /work/peers/lf/bin/pip install -c lf-c.txt 'accelerate<=1.11.0,>=1.3.0' 'av<=16.0.0,>=10.0.0' \
        'datasets<=4.0.0,>=2.16.0' einops fastapi fire 'gradio<=5.50.0,>=4.38.0' hf-transfer 'matplotlib>=3.7.0' \
        modelscope numpy omegaconf packaging pandas 'peft<=0.18.1,>=0.18.0' protobuf pydantic pyyaml safetensors \
        scipy sentencepiece sse-starlette tiktoken 'torchdata<=0.11.0,>=0.10.0' \
        'transformers!=4.52.0,!=4.57.0,<=5.6.0,>=4.55.0' 'trl<=0.24.0,>=0.18.0' 'tyro<0.9.0' uvicorn
    /work/peers/lf/bin/pip install --no-deps llamafactory==0.9.5 torchaudio==2.11.1
    rm /work/peers/lf/lib/python3.11/site-packages/torchaudio/lib/*.so   # links libc10_cuda: pure Python without
    for v in swift lf; do /work/peers/$v/bin/pip install --no-deps torchvision==0.28.0   # qwen-vl-utils, transformers
      sed -i 's/^@torch.library.register_fake("torchvision::\\(q\\?nms\\)")$/@(torch.library.register_fake(\
    "torchvision::\\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
        /work/peers/$v/lib/python3.11/site-packages/torchvision/_meta_registrations.py; done
    # (torchvision's _C.so cannot load beside CPU torch; its two unguarded nms fake kernels then raise at import)

What each run gets: medvl the tiny_cpu recipe (vs_trainer.medvl_run); the peers the same samples in their own format
(swift: a messages jsonl + a template registered with the tiny model's image-token ids, since swift's qwen2_5_vl
template hard-codes Qwen's 151655; LLaMA-Factory: sharegpt json + dataset_info.json, template qwen2_vl) and a copy of
the model folder with a preprocessor_config.json (with torchvision present, transformers builds a video processor
from it). Steps, micro-batch 8, lr 1e-3, warmup 10, cosine, weight decay 0, max grad norm 1.0, max length 256, image
pixels 3136-12544, fp32, sdpa, no gradient checkpointing, no packing, 0 dataloader workers, AdamW betas
(0.9, 0.999); LoRA r16 alpha32 dropout 0.05 on medvl's language-model regex (LLaMA-Factory: lora_target all with the
vision tower and projector frozen, the same 14 modules); full: every parameter trains on all three (medvl's tiny_cpu
trains vision, projector, language and head; the peers' freeze_vit/aligner/vision_tower/projector are turned off).
Each tool keeps its own optimizer implementation, collator and loss (listed in the facts table).

What is measured, per run (runs interleaved round by round, medians and ranges over rounds):
  loop   - each tool's own figure: medvl's samples_per_s at the last step, the peers' train_samples_per_second
           (transformers Trainer); both are samples / seconds from the loop's start to its last step.
  steady - the same definition for all: samples of steps SKIP+1..STEPS / time between the end of step SKIP and the end
           of the last step, from a clock at each step's end (medvl: its scheduler step; peers: Trainer's
           on_step_end callback), so first-step and loader start-up costs drop out.
  wall   - the whole process, start-up included; "wall speed" = peer wall / medvl wall.
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
COMMON = {"steps": None, "batch": BATCH, "lr": LR, "warmup": WARMUP, "max_len": 256, "min_px": 3136, "max_px": 12544}

# Run inside a peer's own interpreter: clocks each step's end, keeps the Trainer's logs and the first batch's facts,
# then runs the peer's own entry module as its CLI would.
PROBE = r"""
import time
t0 = time.perf_counter()
import atexit, json, os, runpy, sys
import torch
from transformers import Trainer
from transformers.trainer_callback import CallbackHandler
rec = {"stamps": [], "logs": [], "threads": torch.get_num_threads()}
def step_end(self, args, state, control, _f=CallbackHandler.on_step_end):
    rec["stamps"].append(time.perf_counter() - t0); return _f(self, args, state, control)
def on_log(self, args, state, control, logs, _f=CallbackHandler.on_log):
    rec["logs"].append({k: v for k, v in logs.items() if isinstance(v, (int, float))})
    return _f(self, args, state, control, logs)
def first(self, model, inputs, *a, _f=Trainer.training_step, **k):
    if "batch" not in rec:
        ids, px = inputs["input_ids"], inputs.get("pixel_values")
        rec["batch"] = {"rows": ids.shape[0], "width": ids.shape[1],
                        "image_tokens": int((ids == model.config.image_token_id).sum()),
                        "patches": None if px is None else px.shape[0],
                        "supervised": int((inputs["labels"] != -100).sum())}
        rec["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rec["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        rec["optim"] = getattr(self.args.optim, "value", str(self.args.optim))
        rec["checkpointing"] = bool(getattr(model, "is_gradient_checkpointing", False))
    return _f(self, model, inputs, *a, **k)
CallbackHandler.on_step_end, CallbackHandler.on_log, Trainer.training_step = step_end, on_log, first
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
        if not (peer_model / f.name).exists():
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
            "tuner_type": method, "max_steps": steps, "per_device_train_batch_size": BATCH,
            "gradient_accumulation_steps": 1, "learning_rate": LR, "warmup_steps": WARMUP, "lr_scheduler_type": "cosine",
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
    """One medvl run (vs_trainer.medvl_run) with a clock at each scheduler step (each step's end) and the first
    batch's facts, like the peers' probe."""
    t0 = time.perf_counter()
    import torch

    import medvl.engine.train as engine

    torch.set_num_threads(1)
    rec: dict = {"stamps": [], "threads": torch.get_num_threads(), "dtype": "float32", "checkpointing": False}
    build_scheduler, build_optimizer, loss = engine.build_scheduler, engine.build_optimizer, engine.token_loss_sum

    def clocked(*a, **k):
        sched = build_scheduler(*a, **k)
        step = sched.step
        sched.step = lambda *x, **y: (step(*x, **y), rec["stamps"].append(time.perf_counter() - t0))[0]
        return sched

    def optimizer(*a, **k):
        opt = build_optimizer(*a, **k)
        rec["optim"] = f"{type(opt).__name__}{' fused' if opt.defaults.get('fused') else ''}"
        return opt

    def first(model, family, batch, **k):
        if "batch" not in rec:
            ids, px = batch["input_ids"], batch.get("pixel_values")
            rec["batch"] = {"rows": ids.shape[0], "width": ids.shape[1],
                            "image_tokens": int((ids == model.config.image_token_id).sum()),
                            "patches": None if px is None else px.shape[0],
                            "supervised": int((batch["labels"] != -100).sum())}
        return loss(model, family, batch, **k)

    engine.build_scheduler, engine.build_optimizer, engine.token_loss_sum = clocked, optimizer, first
    res = medvl_run(Path(root), method, steps)
    out = Path(root) / f"medvl-{method}"
    events = [e for e in map(json.loads, open(out / "metrics.jsonl")) if e["kind"] == "train"]
    table = json.loads((out / "trainability.json").read_text())
    print(json.dumps(dict(rec, loop=res["loop"], losses=[events[0]["loss"], events[-1]["loss"]],
                          trainable=sum(int(r.get("trainable") or 0) for r in table))))


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
    stamps = rec.pop("stamps")
    if len(stamps) != steps:
        raise SystemExit(f"{tool}-{method}: {len(stamps)} step clocks for {steps} steps")
    rec.update(steady=BATCH * (steps - SKIP) / (stamps[-1] - stamps[SKIP - 1]), wall=wall, first_step=stamps[0])
    if not rec["losses"][-1] < rec["losses"][0]:
        raise SystemExit(f"{tool}-{method} did not train: loss {rec['losses']}")
    if rec["batch"]["image_tokens"] * 4 != rec["batch"]["patches"]:  # 2x2 patches merge into one token
        raise SystemExit(f"{tool}-{method}: image tokens and vision patches disagree: {rec['batch']}")
    return rec


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
        ratio = {k: statistics.median(r[k] for r in m) / statistics.median(r[k] for r in rs) for k in ("loop", "steady")}
        wall = statistics.median(r["wall"] for r in rs) / statistics.median(r["wall"] for r in m)
        cells = ["", "", ""] if tool == "medvl" else [f"{ratio['loop']:.2f}", f"{ratio['steady']:.2f}", f"{wall:.2f}"]
        print(f"{tool + '-' + method:<18} {col('loop'):>17} {col('steady'):>17} {cells[0]:>10} {cells[1]:>12} "
              f"{col('wall'):>15} {cells[2]:>10} {col('first_step'):>14}")
        if tool != "medvl" and ratio["steady"] < TARGET:
            slow.append(f"{tool}-{method}")
    print(f"\n{'run':<18} {'trainable':>9} {'threads':>7} {'logged loss':>16}  first batch: rows x width, image tokens, "
          "vision patches, supervised tokens; dtype; optimizer; gradient checkpointing")
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
    ap.add_argument("--swift", default=os.environ.get("MEDVL_BENCH_SWIFT"), help="the `swift` script of a venv")
    ap.add_argument("--llamafactory", default=os.environ.get("MEDVL_BENCH_LLAMAFACTORY"),
                    help="the `llamafactory-cli` script of a venv")
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
