"""Time to first token and tokens/s per turn of a 6-turn `Chatbot` conversation with an image in turn 1, with the
conversation's KV cache re-used between turns (medvl.inference) and, for comparison, with every turn prefilled
from scratch. Target: turn-6 time to first token at most 1.5x turn 1's with the cache (exit 1 otherwise).

Greedy, fixed answer length (end-of-turn disabled) so every turn adds the same number of tokens. Each mode runs
`--repeats` times; per turn the best time counts (the least disturbed by other processes on a shared box).

    python -m tests.bench.chat_latency [--family qwen2.5-vl] [--size small] [--image 448] [--tokens 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTIONS = ["What imaging modality is this, and which body region does it show?", "Describe the main finding.",
             "Is there anything abnormal in the left half?", "How confident are you about that?",
             "What would you check next?", "Summarise everything in one sentence for the report."]


def conversation(bot, image: Path, reuse: bool) -> list:
    bot.reset()
    replies = []
    for i, question in enumerate(QUESTIONS):
        if not reuse:
            bot._cache, bot._cache_ids = None, []  # what a chat without cache re-use does every turn
        bot.chat(question, images=[image] if i == 0 else [])
        replies.append(bot.last)
    return replies


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen2.5-vl")
    ap.add_argument("--size", default="small", help="tiny or small (medvl.tiny)")
    ap.add_argument("--image", type=int, default=448, help="side of the square test image, pixels")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per answer")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from PIL import Image

    from medvl.inference import Chatbot, GenerationOptions
    from medvl.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_tiny(args.family, tmp / "model", size=args.size)
        image = tmp / "scan.png"
        ramp = Image.linear_gradient("L").resize((args.image, args.image))
        Image.merge("RGB", [ramp, ramp.rotate(90), ramp.rotate(180)]).save(image)
        bot = Chatbot(tmp / "model", options=GenerationOptions(max_new_tokens=args.tokens))
        bot.eos = []  # every answer exactly --tokens long
        conversation(bot, image, True)  # warm-up: first-call allocations, lazy imports
        best: dict[bool, list] = {}
        for reuse in (True, False):
            runs = [conversation(bot, image, reuse) for _ in range(args.repeats)]
            best[reuse] = [min((r[t] for r in runs), key=lambda x: x.first_token_s) for t in range(len(QUESTIONS))]
        same = [a.text for a in best[True]] == [b.text for b in best[False]]

    print(f"{args.family} {args.size}, {args.image}x{args.image} image in turn 1, {args.tokens} tokens per answer, "
          f"CPU ({torch.get_num_threads()} threads), best of {args.repeats}")
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT ms':>8} {'tok/s':>7} {'| no reuse: TTFT ms':>20} {'tok/s':>7}")
    for t, (a, b) in enumerate(zip(best[True], best[False]), 1):
        print(f"{t:>4} {a.prompt_tokens:>7} {a.reused_tokens:>7} {a.first_token_s * 1e3:>8.1f} {a.tokens_per_s:>7.0f} "
              f"{b.first_token_s * 1e3:>20.1f} {b.tokens_per_s:>7.0f}")
    ratio = best[True][-1].first_token_s / best[True][0].first_token_s
    ratio_off = best[False][-1].first_token_s / best[False][0].first_token_s
    print(f"turn-6 / turn-1 time to first token: {ratio:.2f} with cache re-use (target <= 1.5), {ratio_off:.2f} "
          f"without; answers identical with and without re-use: {same}")
    return 0 if ratio <= 1.5 and same else 1


if __name__ == "__main__":
    sys.exit(main())
