"""Questions/s of `medvl eval`'s batched generation against one-at-a-time generation (as the published eval.py
does: DataLoader batch_size=1), on the same tiny model and items, and whether the greedy answers are identical.

64 items with images of 8 sizes (4..64 visual tokens on the tiny Qwen processor) and questions of 3..14 words,
so prompts differ in length and batches really pad (left). Each mode runs `--repeats` times on a fresh output
directory (no cache hits); the best time counts (the least disturbed by other processes on the box). Exit status
1 if any batched answer differs from the one-at-a-time answer.

    python -m tests.bench.eval_batching [--family qwen2.5-vl] [--size tiny] [--items 64] [--tokens 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Image sizes chosen so the tiny Qwen processor (28-pixel grid, 4..64 merged tokens) gives different visual token
# counts, hence prompts of different lengths inside one batch: left padding is actually exercised. The tests
# (tests/test_eval_generate.py) use these items too.
SIZES = [(56, 56), (180, 120), (84, 140), (200, 200), (64, 96), (120, 60), (150, 150), (70, 210)]
WORDS = "liver kidney spleen heart lung brain bone colon pancreas".split()


def make_items(root: Path, n: int):
    """n items with images of the SIZES and questions of different lengths (3..14 words)."""
    from PIL import Image

    from medvl.evaluate.suites import EvalItem

    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        path = root / f"q{i}.png"
        Image.new("RGB", (w, h), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(path)
        question = "Which organ? " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 12))
        options = tuple(WORDS[(i + k) % len(WORDS)] for k in range(2 + i % 3))
        items.append(EvalItem(i + 1, "VQA-RAD_test", "", question, options, options[0], (str(path),)))
    return items


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen2.5-vl")
    parser.add_argument("--size", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per answer (tiny models never stop)")
    parser.add_argument("--batch-sizes", default="8,16,32")
    parser.add_argument("--repeats", type=int, default=3)
    # One thread by default on CPU: the tiny model's 64-wide matmuls gain nothing from more, and on a shared
    # box OpenMP spin-waiting made one-at-a-time timings swing 10x between runs.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()

    import torch

    from medvl.evaluate.generate import Generator, answer_items, make_decoding
    from medvl.families import get_family
    from medvl.tiny import build_tiny

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    family = get_family(args.family)
    model, processor = build_tiny(family, size=args.size)
    model.to(device).eval()
    gen = Generator(model, processor, family, make_decoding("greedy", max_new_tokens=args.tokens), device=device)
    n_params = sum(p.numel() for p in model.parameters())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        items = make_items(tmp, args.items)
        answer_items(gen, items[:8], tmp / "warmup", batch_size=8)  # first-call allocations, lazy imports

        def timed(batch_size: int):
            best, outputs = float("inf"), None
            for r in range(args.repeats):
                t0 = time.perf_counter()
                got = answer_items(gen, items, tmp / f"b{batch_size}-{r}", batch_size=batch_size).outputs
                best = min(best, time.perf_counter() - t0)
                assert outputs is None or got == outputs, "greedy answers changed between repeats"
                outputs = got
            return best, outputs

        print(f"eval batching: {args.family} ({args.size}, {n_params / 1e6:.2f} M params, fp32) on {device}, "
              f"{args.items} items, {args.tokens} new tokens each, {torch.get_num_threads()} CPU thread(s), "
              f"best of {args.repeats}")
        base_s, base = timed(1)
        print(f"  {'one at a time (published)':<28} {args.items / base_s:8.1f} questions/s  {base_s:6.2f} s")
        ok = True
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            secs, outputs = timed(bs)
            same = outputs == base
            ok &= same
            differ = sum(outputs[t] != base[t] for t in base)
            print(f"  {f'batched, {bs} per batch':<28} {args.items / secs:8.1f} questions/s  {secs:6.2f} s  "
                  f"x{base_s / secs:4.1f}  answers {'identical' if same else f'DIFFER on {differ} items'}")
        distinct = len(set(base.values()))
        print(f"  {distinct} distinct answers of {args.items} (identical answers are not a degenerate model's)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
