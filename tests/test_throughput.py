"""Model FLOPs utilisation: FLOPs per token from the model, peaks only where they are known."""

import pytest
import torch

from medvl.plan import Plan, apply_plan
from medvl.engine.throughput import flops_per_token, mfu, peak_flops
from medvl.families import get_family
from medvl.models import load_model


def test_flops_per_token_full_and_lora(tiny_dir):
    fam = get_family("qwen2.5-vl")
    model = load_model(tiny_dir("qwen2.5-vl"))
    lm = model.model.language_model
    n = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    full = apply_plan(model, fam, Plan({g: "full" for g in ("vision", "projector", "language", "head")}, {}))
    assert flops_per_token(full, fam) == 6 * n  # vision tower and input embedding left out
    lora = apply_plan(load_model(tiny_dir("qwen2.5-vl")), fam,
                      Plan({"language": "lora", "head": "frozen", "vision": "frozen", "projector": "frozen"}, {}))
    adapters = sum(p.numel() for name, p in lora.named_parameters() if "lora_" in name)
    assert flops_per_token(lora, fam) == 4 * (n + adapters) + 2 * adapters


def test_mfu_only_where_the_peak_is_known():
    assert peak_flops(torch.device("cpu"), "bf16", "bf16") is None
    assert mfu(6e9, 1000.0, None) is None
    # 7B full fine-tuning at 3,000 tokens/s on one 989 TFLOP/s device: 6 x 7e9 x 3000 / 989e12 = 12.7 %
    assert mfu(6 * 7e9, 3000.0, 989e12) == pytest.approx(0.1274, abs=1e-4)
    assert mfu(6 * 7e9, 6000.0, 989e12, world=2) == pytest.approx(0.1274, abs=1e-4)
