"""Learning-rate schedule: linear warmup, then cosine (or linear, or constant) down to a floor.

HuatuoGPT-Vision: 5 % warmup, cosine to 0.15x the peak. The multiplier is a pure function of the step, so a
resumed run lands on exactly the same learning rate.
"""

from __future__ import annotations

import math


def lr_multiplier(step: int, *, total: int, warmup: int, kind: str = "cosine", floor: float = 0.0) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(groups: list[dict], *, betas=(0.9, 0.999), eps: float = 1e-8):
    import torch

    # Fused AdamW: one kernel for all updates, on CUDA and (torch >= 2.4) on CPU, where it measured 1.2 ms vs
    # 4.0 ms per step (foreach) for the tiny Qwen2.5-VL's 57 tensors; transformers' Trainer defaults to it too.
    dtypes = {p.dtype for g in groups for p in g["params"]}
    fused = {"fused": True} if groups and dtypes <= {torch.float32, torch.bfloat16, torch.float16} else {}
    return torch.optim.AdamW(groups, betas=tuple(betas), eps=eps, **fused)


def build_scheduler(optimizer, *, total: int, warmup: int, kind: str, floor: float):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total=total, warmup=warmup, kind=kind, floor=floor))
