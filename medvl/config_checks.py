"""What a validated recipe means beyond its fields: cross-field checks, warnings, and a one-screen summary.

    problems = cross_check(recipe)     # [Problem(loc, message)], errors: load_recipe refuses the recipe
    recipe_warnings(recipe)            # ["dotted.path: message"], legal but probably not what was meant
    recipe_summary(recipe)             # [(label, line)] for `medvl recipes validate` and run headers

The checks read sections by attribute only, so they run on a partially valid recipe too (see cross_check).
No torch, transformers or pydantic models here; the schema lives in medvl.config.
"""

from __future__ import annotations

import re

from medvl.config_yaml import Problem
from medvl.families import FAMILIES

TEXT_FAMILIES = tuple(n for n, f in FAMILIES.items() if not f.is_vision)  # no vision tower or projector

# Pixel side of one visual token after the merge, for the families that take min/max_pixels (only for a
# warning): patch_size x merge_size from the family table (Qwen2/2.5-VL 14 x 2 = 28, Qwen3-VL 16 x 2 = 32).
_TOKEN_SIDE_PX = {f.name: f.extra["patch_size"] * f.extra["merge_size"] for f in FAMILIES.values()
                  if "patch_size" in f.extra}
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


class CrossCheckError(ValueError):
    """Raised by Recipe's validator; pydantic keeps it in the error's ctx["error"], so load_recipe gets the
    Problems back with their keys (a ValueError, so direct construction raises pydantic's ValidationError)."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in problems))


# Cross-field checks. Each takes the recipe (or a partial one whose invalid parts are INVALID) and yields
# (loc, message) for every problem it finds. recipe_warnings, further down, holds what is legal but suspect.

INVALID = object()


def _precision(r) -> str:
    return r.train.precision or r.model.dtype


def _check_data(r):
    d = r.data
    if d.val is not None and d.val_fraction is not None:
        yield ("data", "val_fraction"), "set together with data.val; use a val directory or a held-out fraction"
    if d.resolution is not None:
        for key in ("min_pixels", "max_pixels"):
            if getattr(d, key) is not None:
                lo, hi = d.pixel_range
                yield ("data", key), (f"set together with data.resolution {d.resolution!r} (= {lo:,}..{hi:,} px); "
                                      f"remove one of them")
    if d.min_pixels is not None and d.max_pixels is not None and d.min_pixels > d.max_pixels:
        yield ("data", "min_pixels"), f"{d.min_pixels:,} is larger than data.max_pixels {d.max_pixels:,}"
    seen: dict[str, int] = {}
    for i, src in enumerate(d.train):
        if src.path in seen:
            yield ("data", "train", i, "path"), (f"same directory as data.train[{seen[src.path]}]; "
                                                 f"to upsample it use one entry with weight: 2")
        seen.setdefault(src.path, i)


def _check_optim(r):
    o = r.optim
    if o.warmup_ratio is not None and o.warmup_steps is not None:
        yield ("optim", "warmup_steps"), "set together with optim.warmup_ratio; keep one (the other = null)"


def _check_precision(r):
    dtype, prec = r.model.dtype, _precision(r)
    if {dtype, prec} == {"bf16", "fp16"}:
        yield ("train", "precision"), (f"{prec} compute over {dtype} weights mixes the two 16-bit formats; "
                                       f"use the same for both, or model.dtype: fp32")
    elif dtype != "fp32" and prec == "fp32":
        yield ("train", "precision"), (f"fp32 over {dtype} weights still computes in {dtype}; "
                                       f"for fp32 training set model.dtype: fp32")
    if dtype == "fp16" and r.method == "full":
        yield ("model", "dtype"), ("fp16 weights cannot be fully fine-tuned (updates underflow; the grad scaler "
                                   "refuses fp16 gradients); use bf16, or fp32 with train.precision: fp16")
    if r.method == "qlora" and dtype == "fp32":
        yield ("model", "dtype"), "qlora computes in bf16 or fp16 over its 4-bit base; use bf16 (fp16 before Ampere)"
    if r.model.attn_implementation == "flash_attention_2" and prec == "fp32":
        yield ("model", "attn_implementation"), "flash_attention_2 runs only in bf16/fp16; use sdpa for fp32"


def _check_device(r):
    if r.train.device != "cpu":
        return
    if r.model.attn_implementation == "flash_attention_2":
        yield ("model", "attn_implementation"), "flash_attention_2 needs CUDA, but train.device is cpu; use sdpa"
    if r.method == "qlora":
        yield ("method",), "qlora's 4-bit kernels (bitsandbytes) need CUDA, but train.device is cpu"


def _check_method(r):
    f, lora = r.freeze, r.lora
    if r.method == "full":
        if lora is not None:
            yield ("lora",), "set, but method is full; set method: lora (or qlora), or delete the lora section"
        groups = [f.language_model] if r.model.family in TEXT_FAMILIES else [f.vision_tower, f.projector,
                                                                           f.language_model]
        if all(groups):
            yield ("freeze",), "every parameter group is frozen and method is full: nothing would train"
        return
    target = lora.target if lora is not None else "language"  # an omitted lora section = its defaults
    if target != "language":
        try:
            re.compile(target)
        except re.error as exc:
            yield ("lora", "target"), f"not a valid regex ({exc})"
        for key in ("include_vision", "include_projector"):
            if getattr(lora, key):
                yield ("lora", key), "only extends target 'language'; with a regex target, match those modules in it"
        return
    if f.language_model:
        yield ("freeze", "language_model"), "true, but lora.target 'language' puts the adapters there"
    if lora is None:
        return
    if lora.include_vision and f.vision_tower:
        yield ("freeze", "vision_tower"), "true, but lora.include_vision puts adapters there"
    if lora.include_projector and f.projector:
        yield ("freeze", "projector"), "true, but lora.include_projector puts adapters there"
    if r.model.family in TEXT_FAMILIES:
        for key in ("include_vision", "include_projector"):
            if getattr(lora, key):
                yield ("lora", key), f"a {r.model.family} model has no vision tower or projector"


def _check_eval(r):
    e = r.eval
    if e.every is not None:
        if e.data is None:
            yield ("eval", "data"), "required when eval.every is set: the benchmark bundle JSON"
        if not e.suites:
            yield ("eval", "suites"), "empty, but eval.every is set; name at least one suite"
    for i, name in enumerate(e.suites):
        if name in e.suites[:i]:
            yield ("eval", "suites", i), f"{name!r} is listed twice"


def _check_val(r):
    if r.train.eval_every is not None and r.data.val is None and r.data.val_fraction is None:
        yield ("train", "eval_every"), "needs validation data; set data.val or data.val_fraction"


def _check_distributed(r):
    d = r.distributed
    if d.node_rank >= d.nnodes:
        yield ("distributed", "node_rank"), f"{d.node_rank}, but nnodes is {d.nnodes} (ranks 0..{d.nnodes - 1})"
    if d.nnodes > 1 and d.master_addr in _LOOPBACK:
        yield ("distributed", "master_addr"), (f"{d.master_addr!r} is not reachable from other nodes; "
                                               f"set node 0's address")
    if d.deepspeed_config is not None and not d.strategy.startswith("deepspeed-"):
        yield ("distributed", "deepspeed_config"), f"set, but strategy is {d.strategy}; it would be ignored"


# (sections each check reads, the check). Explicit list; a check is skipped when one of its sections is invalid.
_CHECKS = [
    (("data",), _check_data),
    (("optim",), _check_optim),
    (("model", "train", "method"), _check_precision),
    (("model", "train", "method"), _check_device),
    (("model", "method", "lora", "freeze"), _check_method),
    (("eval",), _check_eval),
    (("data", "train"), _check_val),
    (("distributed",), _check_distributed),
]


def cross_check(recipe) -> list[Problem]:
    """Every cross-field problem of a validated recipe, or of a partial one (a namespace whose invalid fields
    are INVALID: the checks on the valid parts still run, so every problem is reported in one go)."""
    problems = []
    for needs, check in _CHECKS:
        if any(getattr(recipe, n) is INVALID for n in needs):
            continue
        problems += [Problem(loc, msg) for loc, msg in check(recipe)]
    return problems


def recipe_warnings(recipe) -> list[str]:
    """Settings that are legal but probably not what was meant, as "dotted.path: message" lines."""
    out = []
    r, o, f = recipe, recipe.optim, recipe.freeze
    lora = r.lora if r.method != "full" else None
    if r.distributed.strategy.startswith("deepspeed-") and r.world_size == 1:
        out.append("distributed.strategy: ZeRO shards over processes; with 1 process it saves no memory (use ddp)")
    # A group's own lr is dead when the group has nothing to train.
    vision_trains = (not f.vision_tower) if lora is None else (lora.include_vision or lora.target != "language")
    projector_trains = (not f.projector) if lora is None else (lora.include_projector or lora.target != "language")
    if o.vision_lr is not None and not vision_trains:
        out.append("optim.vision_lr: set, but the vision tower has no trainable parameters")
    if o.projector_lr is not None and not projector_trains:
        out.append("optim.projector_lr: set, but the projector has no trainable parameters")
    if r.method == "full" and o.lr > 1e-4:
        out.append(f"optim.lr: {o.lr:g} is a LoRA-scale rate; full fine-tuning of a pretrained model uses "
                   f"1e-6..2e-5 and often diverges above ~1e-4")
    if r.method != "full" and o.lr < 1e-5:
        out.append(f"optim.lr: {o.lr:g} is a full-fine-tune rate; LoRA usually needs 1e-4..2e-4")
    if o.scheduler == "constant" and o.min_lr_ratio > 0:
        out.append("optim.min_lr_ratio: ignored by the constant scheduler")
    for key in ("save_every", "eval_every"):
        every = getattr(r.train, key)
        if every is not None and r.train.max_steps is not None and every > r.train.max_steps:
            out.append(f"train.{key}: {every} is beyond train.max_steps {r.train.max_steps}: it never happens")
    side = _TOKEN_SIDE_PX.get(r.model.family or "")
    max_px = r.data.pixel_range[1]
    if side and max_px:
        per_image = max_px // (side * side)
        total = per_image * r.data.max_images_per_sample
        if total >= r.data.max_seq_len:
            out.append(f"data.max_seq_len: {r.data.max_images_per_sample} images x {per_image} tokens = {total:,} "
                       f"visual tokens >= {r.data.max_seq_len:,}: samples with that many images cannot fit")
    return out


def recipe_summary(recipe) -> list[tuple[str, str]]:
    """(label, one line) pairs describing what a recipe will do; for `medvl recipes validate` and run headers."""
    r, d, o, t = recipe, recipe.data, recipe.optim, recipe.train
    if r.method == "full":
        groups = [g for g, frozen in (("vision tower", r.freeze.vision_tower), ("projector", r.freeze.projector),
                                      ("language model", r.freeze.language_model)) if not frozen]
        method = f"full: trains {', '.join(groups)}"
    else:
        lo = r.lora
        where = lo.target if lo.target != "language" else "+".join(
            ["language"] + ["vision"] * lo.include_vision + ["projector"] * lo.include_projector)
        method = f"{r.method}: r {lo.r}, alpha {lo.alpha:g}, dropout {lo.dropout:g} on {where}"
    px = [f"{v:,}" if v else "default" for v in d.pixel_range]
    pixels = (f"{d.resolution} " if d.resolution else "") + (f"{px[0]}..{px[1]} px" if any(d.pixel_range)
                                                               else "processor-default size")
    val = d.val or (f"{d.val_fraction:g} of train" if d.val_fraction else "none")
    warm = f"{o.warmup_steps} steps" if o.warmup_steps is not None else f"{o.warmup_ratio or 0:g} of steps"
    length = f"{t.max_steps} steps max" if t.max_steps else f"{t.epochs:g} epoch(s)"
    saves = f"save every {t.save_every}" if t.save_every else "save per epoch"
    return [
        ("model", f"{r.model.base} ({r.model.family or 'family from config.json'}, {r.model.dtype}, "
                  f"{r.model.attn_implementation})"),
        ("method", method),
        ("data", f"{len(d.train)} source(s), val {val}, {d.max_seq_len} tokens, <= {d.max_images_per_sample} "
                 f"images at {pixels}, loss on {d.loss_mask} assistant turn(s)"),
        ("optim", f"lr {o.lr:g}, {o.scheduler} to {o.min_lr_ratio:g}x, warmup {warm}, wd {o.weight_decay:g}, "
                  f"clip {o.max_grad_norm if o.max_grad_norm is not None else 'off'}"),
        ("batch", r.batch_arithmetic()),
        ("run", f"{length}, {t.precision} on {t.device}, {r.distributed.strategy}, {saves}, out {r.output.dir}"),
    ]


