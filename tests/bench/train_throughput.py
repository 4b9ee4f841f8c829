"""Training throughput of the tiny CPU recipe, packing off vs on: supervised tokens/s, samples/s, peak RSS,
and the padding waste of each layout on the same data.

    python -m tests.bench.train_throughput [STEPS]

Data: 2,000 easy-vqa questions (64x64 images -> 4 visual tokens) with answers padded out to varied lengths
(1-40 words), so sample lengths spread like real VQA data; micro-batch 8 padded vs rows of 8 x 256 tokens packed.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path


def make_raw(root: Path) -> Path:
    import easy_vqa

    q, a, ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    rng = random.Random(0)
    recs = []
    for i in range(2000):
        filler = " ".join(rng.choice(["the", "shape", "is", "clearly", "visible", "here"])
                          for _ in range(rng.randint(0, 40)))
        recs.append({"id": i, "image": [paths[ids[i]]], "conversations": [
            {"from": "human", "value": "<image>\n" + q[i]}, {"from": "gpt", "value": f"{a[i]}. {filler}".strip()}]})
    path = root / "raw.json"
    path.write_text(json.dumps(recs))
    return path


def run(steps: int) -> None:
    from medvl.config import load_recipe
    from medvl.data.collate import padding_waste
    from medvl.data.dataset import index_prepared
    from medvl.data.prepare import prepare
    from medvl.engine.train import train
    from medvl.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny("qwen2.5-vl", root / "tiny")
        import easy_vqa

        images = str(Path(next(iter(easy_vqa.get_train_image_paths().values()))).parent)
        prepare([make_raw(root)], root / "data", model=str(root / "tiny"), max_seq_len=256,
                min_pixels=3136, max_pixels=12544, image_root=[images])  # absolute paths: name their folder
        lengths = list(index_prepared([root / "data"]).n_tokens)
        print(f"samples {len(lengths)}, tokens/sample mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}")
        print(f"padding waste: padded micro-batch 8 {padding_waste(lengths, 8):.1%}, "
              f"packed rows of 8x256 tokens {padding_waste(lengths, 1, pack_budget=8 * 256):.1%}")
        print(f"{'layout':>8} {'steps':>6} {'sup. tokens/s':>14} {'samples/s':>10} {'input tok/s':>13} {'peak RSS':>9}")
        for packing in (False, True):
            out = root / f"run-{packing}"
            recipe = load_recipe("tiny_cpu", [f"model.base={root / 'tiny'}", f"data.train=[{root / 'data'}]",
                                              f"output.dir={out}", f"train.max_steps={steps}", "train.save_every=null",
                                              "train.eval_every=null", "data.val_fraction=null",
                                              f"data.packing={str(packing).lower()}", "train.log_every=1000"])
            res = train(recipe)
            events = [json.loads(line) for line in open(out / "metrics.jsonl")]
            last = [e for e in events if e["kind"] == "train"][-1]
            end = next(e for e in events if e["kind"] == "end")
            # input tokens: prompt + image + answer tokens the model processed, padding excluded
            print(f"{'packed' if packing else 'padded':>8} {res.steps:>6} {last['tokens_per_s']:>14.0f} "
                  f"{last['samples_per_s']:>10.1f} {last['input_tokens_per_s']:>13.0f} {last['memory_gb'] * 1024:>6.0f} MB  "
                  f"(wall {end['wall_s']} s)")


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
