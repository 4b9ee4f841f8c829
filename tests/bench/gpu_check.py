"""One-command GPU check (`make gpu-check`): does medvl train and generate on this GPU, how fast, in how much
memory. Meant for the first day a GPU is available; needs only the repository and pip (`make gpu-check` builds
the virtualenv and tries `pip install bitsandbytes` for the QLoRA case).

    python -m tests.bench.gpu_check [--smoke] [--steps N]

Model: a 2-layer Qwen2.5-VL at the 7B's widths (text hidden 3,584, MLP 18,944, 28 heads / 4 KV heads, vocab
152,064; vision hidden 1,280, 16 heads), built from its config with random weights (~1.6 B parameters, 3.2 GB in
bf16), so memory and kernels are real-shaped without a download. Data: 256 synthetic 448x448 images (256 visual
tokens each) with answers of 1-60 words. Cases, each a PASS / FAIL / SKIP line with supervised and input
tokens/s, MFU and peak memory:
  full, lora                     bf16 (fp32 in --smoke), padded batches, sdpa
  qlora                          4-bit base (SKIP unless bitsandbytes imports)
  packed-sdpa                    packed rows, per-sample sdpa (medvl_sdpa_segments)
  padded-fa2, packed-fa2         flash_attention_2, padded vs packed varlen (SKIP unless flash_attn imports)
  zero2, zero3                   DeepSpeed on NCCL, 2 ranks (SKIP with fewer than 2 GPUs)
  eval-generate                  greedy generation through medvl's evaluation Generator
Exit status 1 if any case FAILs. Without a GPU it says so and exits 0; --smoke runs the same cases on CPU at
tiny widths in fp32 (what tests/test_gpu_check.py runs), to prove the harness itself.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

WIDTHS_7B = dict(hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064, mrope=[16, 24, 24],
                 vision_hidden=1280, vision_intermediate=3420, vision_heads=16, image=448)
WIDTHS_SMOKE = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=600, mrope=[4, 2, 2],
                    vision_hidden=32, vision_intermediate=64, vision_heads=2, image=56)


class Skip(Exception):
    pass


def build_model(out: Path, w: dict, gpu: bool) -> None:
    """2-layer Qwen2.5-VL at the given widths, random weights, saved with the tiny model's tokenizer/processor."""
    import transformers as T

    from medvl.tiny import build_tiny

    _, processor = build_tiny("qwen2.5-vl")
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=max(w["vocab"], len(tok)), hidden_size=w["hidden"], intermediate_size=w["intermediate"],
                num_hidden_layers=2, num_attention_heads=w["heads"], num_key_value_heads=w["kv_heads"],
                max_position_embeddings=32768, rms_norm_eps=1e-6, pad_token_id=tok.pad_token_id, bos_token_id=None,
                eos_token_id=ids("<|im_end|>"),
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": w["mrope"]})
    vision = dict(depth=2, hidden_size=w["vision_hidden"], intermediate_size=w["vision_intermediate"],
                  num_heads=w["vision_heads"], out_hidden_size=w["hidden"], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
    config = T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                                video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                                vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)
    import torch

    # initialised on the GPU in bf16: 1.6 B parameters take minutes to initialise in fp32 on a CPU
    with torch.device("cuda" if gpu else "cpu"):
        model = T.Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16 if gpu else torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_data(root: Path, model_dir: Path, w: dict, n: int = 256) -> Path:
    from PIL import Image, ImageDraw

    from medvl.data.prepare import prepare

    rng = random.Random(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    colours = ["red", "green", "blue", "yellow", "white"]
    for i in range(n):
        colour = colours[i % len(colours)]
        img = Image.new("RGB", (w["image"], w["image"]), "black")
        s = w["image"] // 4
        ImageDraw.Draw(img).ellipse((s, s, 3 * s, 3 * s), fill=colour)
        path = root / "images" / f"{i}.png"
        img.save(path)
        answer = " ".join([colour] + [rng.choice(["the", "lesion", "is", "round", "and", "bright"])
                                      for _ in range(rng.randint(0, 59))])
        recs.append({"id": i, "image": [str(path)], "conversations": [
            {"from": "human", "value": "<image>\nDescribe the finding."}, {"from": "gpt", "value": answer}]})
    raw = root / "raw.json"
    raw.write_text(json.dumps(recs))
    pixels = w["image"] * w["image"]
    prepare([raw], root / "data", model=str(model_dir), max_seq_len=1024, min_pixels=pixels, max_pixels=pixels)
    return root / "data"


def train_case(ctx: dict, name: str, *extra: str, nproc: int = 1) -> dict:
    from medvl.config import load_recipe
    from medvl.engine.train import train

    out = ctx["root"] / f"run-{name}"
    gpu = ctx["gpu"]
    base = [f"model.base={ctx['model']}", f"data.train=[{ctx['data']}]", f"output.dir={out}",
            f"train.max_steps={ctx['steps']}", "train.save_every=null", "train.eval_every=null",
            "data.val_fraction=null", "train.log_every=1", "train.micro_batch_size=4", "data.max_seq_len=1024",
            "optim.lr=1e-5", "optim.warmup_steps=1", f"data.min_pixels={ctx['pixels']}",
            f"data.max_pixels={ctx['pixels']}", "data.num_workers=2" if gpu else "data.num_workers=0",
            f"train.device={'cuda' if gpu else 'cpu'}",
            *(["model.dtype=bf16", "train.precision=bf16"] if gpu else []), *extra]
    recipe = load_recipe("tiny_cpu", base + ([f"distributed.nproc={nproc}"] if nproc > 1 else []))
    _fresh_memory(gpu)  # memory_gb is the process's peak: reset it so each case reports its own
    if nproc > 1:
        from medvl.engine.launch import run_launched

        if run_launched(recipe, worker="medvl.commands.worker") != 0:
            raise RuntimeError(f"the {nproc}-process run exited non-zero")
    else:
        train(recipe)
    events = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [e for e in events if e["kind"] == "train"]
    losses = [e["loss"] for e in steps]
    if not steps or not all(x == x and abs(x) < 1e4 for x in losses):
        raise RuntimeError(f"losses not finite: {losses}")
    last = steps[-1]
    return {"sup_tok_s": last["tokens_per_s"], "in_tok_s": last["input_tokens_per_s"], "mfu": last.get("mfu"),
            "peak_gb": max(e["memory_gb"] for e in steps), "note": f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"}


def _fresh_memory(gpu: bool) -> None:
    import gc

    import torch

    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def generate_case(ctx: dict) -> dict:
    import torch

    from medvl.data.collate import to_template_messages
    from medvl.evaluate.generate import Generator, Prompt, make_decoding
    from medvl.families import get_family
    from medvl.models import apply_resolution, load_model, load_processor

    family = get_family("qwen2.5-vl")
    device = torch.device("cuda" if ctx["gpu"] else "cpu")
    _fresh_memory(ctx["gpu"])
    processor = load_processor(ctx["model"], family)
    apply_resolution(processor, family, ctx["pixels"], ctx["pixels"])
    model = load_model(ctx["model"], family, dtype="bf16" if ctx["gpu"] else "fp32").to(device).eval()
    gen = Generator(model, processor, family, make_decoding("greedy", max_new_tokens=32), device=device)
    text = processor.apply_chat_template(to_template_messages([{"role": "user", "content": "<image>Describe."}], True),
                                         tokenize=False, add_generation_prompt=True)
    images = sorted((ctx["root"] / "images").glob("*.png"))[:8]
    prompts = [Prompt(i, text, (str(p),)) for i, p in enumerate(images)]
    t0 = time.perf_counter()
    answers = gen.generate(prompts)
    wall = time.perf_counter() - t0
    if len(answers) != len(prompts):
        raise RuntimeError(f"{len(answers)} answers for {len(prompts)} prompts")
    new = sum(len(gen.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    peak = torch.cuda.max_memory_allocated() / 2**30 if ctx["gpu"] else None
    return {"out_tok_s": new / wall, "peak_gb": peak, "note": f"{len(answers)} answers, {new} new tokens"}


def cases(ctx: dict):
    import importlib.util

    import torch

    gpus = torch.cuda.device_count() if ctx["gpu"] else 0

    def need(module: str, why: str):
        if importlib.util.find_spec(module) is None:
            raise Skip(why)

    def qlora():
        if not ctx["gpu"]:
            raise Skip("QLoRA needs CUDA")
        need("bitsandbytes", "bitsandbytes is not installed (pip install bitsandbytes)")
        return train_case(ctx, "qlora", "method=qlora")

    def fa2(packed: bool):
        def run():
            if not ctx["gpu"]:
                raise Skip("flash_attention_2 needs CUDA")
            need("flash_attn", "flash-attn is not installed (pip install flash-attn --no-build-isolation)")
            return train_case(ctx, f"{'packed' if packed else 'padded'}-fa2",
                              "model.attn_implementation=flash_attention_2", f"data.packing={str(packed).lower()}")
        return run

    def zero(stage: int):
        def run():
            if gpus < 2:
                raise Skip(f"DeepSpeed ZeRO-{stage} on NCCL needs 2 GPUs, this machine has {gpus}")
            need("deepspeed", "deepspeed is not installed")
            return train_case(ctx, f"zero{stage}", f"distributed.strategy=deepspeed-zero{stage}", nproc=2)
        return run

    return [
        ("full", lambda: train_case(ctx, "full")),
        ("lora", lambda: train_case(ctx, "lora", "method=lora")),
        ("qlora", qlora),
        ("packed-sdpa", lambda: train_case(ctx, "packed-sdpa", "data.packing=true")),
        ("padded-fa2", fa2(False)),
        ("packed-fa2", fa2(True)),
        ("zero2", zero(2)),
        ("zero3", zero(3)),
        ("eval-generate", lambda: generate_case(ctx)),
    ]


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="medvl GPU check")
    parser.add_argument("--smoke", action="store_true", help="run the cases on CPU at tiny widths (harness test)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per training case")
    args = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        print("SKIP gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to check. "
              "Run it on a GPU machine with `make gpu-check`; `--smoke` exercises the harness on CPU.")
        return 0
    w = WIDTHS_7B if gpu else WIDTHS_SMOKE
    t_all = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        device = torch.cuda.get_device_name(0) if gpu else "cpu (smoke, fp32)"
        print(f"device: {device}; building a 2-layer Qwen2.5-VL at "
              f"{'the 7B' if gpu else 'tiny'} widths and {'256' if gpu else '32'} samples ...", flush=True)
        build_model(root / "model", w, gpu)
        data = build_data(root, root / "model", w, n=256 if gpu else 32)
        ctx = {"root": root, "model": root / "model", "data": data, "gpu": gpu, "pixels": w["image"] ** 2,
               "steps": args.steps or (20 if gpu else 2)}
        for name, fn in cases(ctx):
            t0 = time.perf_counter()
            try:
                res = fn()
                status = "PASS"
            except Skip as why:
                res, status = {"note": str(why)}, "SKIP"
            except Exception as exc:  # a check reports every failure and goes on to the next case
                res, status = {"note": f"{type(exc).__name__}: {exc}"[:300]}, "FAIL"
                traceback.print_exc(limit=3)
            res.update(case=name, status=status, wall_s=round(time.perf_counter() - t0, 1))
            results.append(res)
            print(f"{status} {name:<14} sup tok/s {_fmt(res.get('sup_tok_s'), '>8.0f')}  in tok/s "
                  f"{_fmt(res.get('in_tok_s'), '>8.0f')}  out tok/s {_fmt(res.get('out_tok_s'), '>6.0f')}  MFU "
                  f"{_fmt(res.get('mfu'), '>6.1%')}  peak {_fmt(res.get('peak_gb'), '>6.1f')} GB  "
                  f"{res['wall_s']:>5.0f} s  {res.get('note', '')}", flush=True)
    by = {r["case"]: r for r in results}
    for a, b in (("packed-sdpa", "full"), ("packed-fa2", "padded-fa2")):
        if by[a]["status"] == by[b]["status"] == "PASS":
            print(f"{a} / {b} supervised tokens/s: {by[a]['sup_tok_s'] / by[b]['sup_tok_s']:.2f}x")
    failed = [r["case"] for r in results if r["status"] == "FAIL"]
    print(f"{len(results) - len(failed)} of {len(results)} cases passed or skipped, {len(failed)} failed "
          f"({', '.join(failed) or 'none'}); {time.perf_counter() - t_all:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
