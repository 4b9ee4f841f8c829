"""Peak memory of one forward + backward, plain loss (full-vocabulary logits, medvl before the chunked loss) vs
the chunked loss, at Qwen's 151,936-token vocabulary; each measurement in a fresh process (peak RSS).

    python -m tests.bench.loss_memory [SEQ ...]        (default: 2048 4096)

Exit status 1 when the chunked peak at the longest sequence is over half the plain one.

Model: a 2-layer Qwen2 causal LM, hidden 64, fp32, random weights, so the logits dominate as they do for a
real model's loss; every token supervised (text SFT, the worst case for the loss).
"""

from __future__ import annotations

import json
import subprocess
import sys

VOCAB = 151936


def child(seq: int, chunk: int | None) -> dict:
    import resource

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from medvl.engine.loss import token_loss_sum
    from medvl.families import get_family

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    ids = torch.randint(0, VOCAB, (1, seq))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
             "seq_lens": torch.tensor([seq]), "images_per_sample": torch.tensor([0])}
    base = reset_peak_rss()
    loss = token_loss_sum(model, get_family("causal-lm"), batch, chunk_tokens=chunk)
    loss.backward()
    peak = peak_rss()
    return {"seq": seq, "chunk": chunk, "peak_gb": peak / 2**20, "step_gb": (peak - base) / 2**20,
            "loss": float(loss.detach())}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(key + ":")))


def reset_peak_rss() -> int:
    """Restart the peak-RSS count from now (Linux: VmHWM, reset by clear_refs 5) and return the current RSS in
    KiB. ru_maxrss cannot be reset: a peak reached while importing torch and building the model hid part of
    the step's own, which then read 0.41 GiB in one run of tests/test_loss_memory.py; reset: 0.82-0.83 in three."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss() -> int:
    """Peak RSS in KiB since reset_peak_rss()."""
    try:
        return _status_kib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(seq: int, chunk: int | None) -> dict:
    code = f"import json; from tests.bench.loss_memory import child; print(json.dumps(child({seq}, {chunk})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(seqs: list[int]) -> list[dict]:
    from medvl.engine.loss import CHUNK_TOKENS

    rows = []
    print(f"{'seq':>6} {'plain (before) GB':>18} {'chunked GB':>11} {'ratio':>6}   "
          f"(peak RSS of the process; vocab {VOCAB})")
    for seq in seqs:
        plain, chunked = measure(seq, None), measure(seq, CHUNK_TOKENS)
        if abs(plain["loss"] - chunked["loss"]) > 1e-4 * abs(plain["loss"]):
            raise SystemExit(f"losses differ at seq {seq}: {plain['loss']} vs {chunked['loss']}")
        ratio = chunked["peak_gb"] / plain["peak_gb"]
        print(f"{seq:>6} {plain['peak_gb']:>18.2f} {chunked['peak_gb']:>11.2f} {ratio:>6.2f}")
        rows.append({"seq": seq, "plain_gb": plain["peak_gb"], "chunked_gb": chunked["peak_gb"], "ratio": ratio})
    return rows


TARGET_RATIO = 0.5  # issue 15: peak at seq 4096 at most half the plain loss's


if __name__ == "__main__":
    rows = run([int(a) for a in sys.argv[1:]] or [2048, 4096])
    if rows[-1]["ratio"] > TARGET_RATIO:
        raise SystemExit(f"chunked/plain peak {rows[-1]['ratio']:.2f} at seq {rows[-1]['seq']}: over {TARGET_RATIO}")
