"""Model FLOPs utilisation: the fraction of the device's peak that the training step's useful FLOPs reach.

FLOPs per input token (the convention of Megatron/PaLM MFU, attention scores left out: at 2,048 tokens they add
~6 % on a 7B model): forward 2 x N, backward through the activations 2 x N, weight gradients 2 x trainable, with
N the parameters that every token passes through (the language model without its input embedding; the vision
tower's FLOPs are left out, as the peers' MFU figures do). Full fine-tuning: 6 x N. LoRA: ~4 x N.

Peaks are the dense bf16/fp16 tensor-core figures of the vendor data sheets; MFU is reported only for a
16-bit run on a device in this table (never a guess: fp32/TF32 and unknown devices get no MFU).
"""

from __future__ import annotations

# dense bf16 TFLOP/s, no sparsity; matched against torch.cuda.get_device_name() in order
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("A6000", 155.0), ("V100", 125.0),
)


def flops_per_token(model, family) -> float:
    """Training FLOPs per input token of the language model (forward + backward), see the module docstring."""
    from medvl.plan import group_of

    through = trainable = 0
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    skip = {id(p) for p in embed.parameters()} if embed is not None else set()
    for name, p in model.named_parameters():
        if group_of(name, family) not in ("language", "head") or id(p) in skip:
            continue
        n = getattr(p, "ds_numel", p.numel())
        through += n
        trainable += n if p.requires_grad else 0
    return 4.0 * through + 2.0 * trainable


def peak_flops(device, precision: str, model_dtype: str) -> float | None:
    """The device's dense 16-bit peak in FLOP/s, or None where MFU would not be meaningful."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    if precision == "fp32" and model_dtype == "fp32":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in name), None)


def mfu(flops_token: float, input_tokens_per_s: float, peak: float | None, world: int = 1) -> float | None:
    """Model FLOPs utilisation (0..1) over `world` devices, or None when the peak is unknown."""
    if not peak:
        return None
    return round(flops_token * input_tokens_per_s / (peak * world), 4)
