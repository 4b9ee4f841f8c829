"""The typed training recipe: one YAML file in, one validated `Recipe` out, or one error listing every problem.

    recipe = load_recipe("huatuo_sft_qwen25vl_7b", ["optim.lr=1e-5", "train.max_steps=100"])

A recipe is data: ten sections (model, data, method, lora, freeze, optim, train, distributed, eval, output),
each a pydantic model with extra="forbid" and a docstring per field (`medvl recipes show` and the tests read
them). Loading goes:

1. find the file: an existing path wins, else a bare name ("tiny_cpu" or "tiny_cpu.yaml") is a shipped recipe
   in the `medvl.recipes` package;
2. read the YAML twice: once as data, once as a node tree, so every key has a line number (and duplicate
   keys, which PyYAML silently collapses to the last one, are caught);
3. apply `key.sub=value` overrides to the raw dict, values read as YAML scalars (1e-5, true, null, [a, b]);
4. validate the fields, then the cross-field checks, collecting everything; raise one `RecipeError`.

Public: Recipe (+ its sections), load_recipe, resolve_recipe_path, shipped_recipes, recipe_to_yaml,
recipe_summary, recipe_warnings, RecipeError (.problems: list[Problem]), RESOLUTION_PRESETS.

Precision, decided: `model.dtype` is the dtype the weights are loaded in; `train.precision` is the autocast
(mixed-precision) dtype and defaults to `model.dtype`. Valid pairs are (fp32, fp32|bf16|fp16), (bf16, bf16),
(fp16, fp16) with LoRA/QLoRA only. bf16 weights with bf16 compute is the HuatuoGPT-Vision setup (2 bytes/param);
fp32 weights + bf16 autocast is classic mixed precision (4 bytes/param + fp32 master copy, slower, steadier).

No torch, transformers or peft here: `medvl recipes validate` answers in well under a second.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, ValidationInfo, \
    field_validator, model_validator

from medvl.errors import MedvlError

Family = Literal["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava", "internvl", "causal-lm"]
DType = Literal["bf16", "fp16", "fp32"]
Method = Literal["full", "lora", "qlora"]
Strategy = Literal["ddp", "deepspeed-zero2", "deepspeed-zero3", "fsdp"]
Suite = Literal["vqa-rad", "slake", "pathvqa", "pmc-vqa", "omnimedvqa", "mmmu-medical"]
Reporter = Literal["tensorboard", "wandb", "swanlab"]
ResolutionPreset = Literal["huatuo", "qwen-finetune"]

# (min_pixels, max_pixels) per image. Qwen-VL processors resize so that h*w lies in this range, keeping the
# aspect ratio, with sides multiples of 28 px (Qwen2/2.5-VL: 14 px patches, 2x2 merge = one token per 28x28).
RESOLUTION_PRESETS: dict[str, tuple[int, int]] = {
    # HuatuoGPT-Vision train_vl.py: --max_width 420 --max_height 360 -> 151,200 px <= 192 tokens/image;
    # the floor is qwen-vl-utils' MIN_PIXELS = 4*28*28.
    "huatuo": (4 * 28 * 28, 420 * 360),
    # QwenLM qwen-vl-finetune argument.py defaults: 16..576 tokens/image.
    "qwen-finetune": (16 * 28 * 28, 576 * 28 * 28),
}

# Pixel side of one visual token after the 2x2 merge, for the families that take min/max_pixels (used only for
# a warning; medvl/families.py is the source of truth: Qwen2/2.5-VL patch 14, Qwen3-VL patch 16).
_TOKEN_SIDE_PX = {"qwen2-vl": 28, "qwen2.5-vl": 28, "qwen3-vl": 32}
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


# ---------------------------------------------------------------------------------------------------------
# Sections


class ModelSection(_Section):
    base: str = Field(min_length=1)
    """Model to start from: a local directory (e.g. the output of `medvl convert`) or a hub id."""
    family: Family | None = None
    """Model family; null = detect from config.json `model_type` at load time (never from the directory name)."""
    dtype: DType = "bf16"
    """dtype the weights are loaded in. For qlora: the compute dtype of the 4-bit (NF4) base."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel. flash_attention_2 needs the flash-attn package, a CUDA GPU and bf16/fp16."""
    trust_remote_code: bool = False
    """Run Python code shipped inside the checkpoint. Off: every supported family is native to transformers."""


class DataSource(_Section):
    path: str = Field(min_length=1)
    """A directory written by `medvl prepare-data`."""
    weight: float = Field(1.0, gt=0)
    """Times each sample of this source is seen per epoch: 2.0 = twice, 0.5 = a random half."""


class DataSection(_Section):
    train: list[DataSource] = Field(min_length=1)
    """Prepared-data directories: a path, or {path, weight}. A single path is accepted too."""
    val: str | None = None
    """A prepared-data directory used for eval loss; or use val_fraction."""
    val_fraction: float | None = Field(None, gt=0, lt=1)
    """Fraction of train held out (seeded by train.seed) for eval loss; 0.01 = 1%."""
    max_seq_len: int = Field(4096, ge=16)
    """Tokens per sample, visual tokens included. Longer samples are cut at a turn boundary, never inside an
    image span; a sample whose images alone do not fit is dropped."""
    max_images_per_sample: int = Field(8, ge=1)
    """Samples with more images are dropped (HuatuoGPT-Vision: 8)."""
    resolution: ResolutionPreset | None = None
    """A named (min_pixels, max_pixels) preset: huatuo = 3,136..151,200 px; qwen-finetune = 12,544..451,584 px.
    null = min_pixels/max_pixels below, or the processor's own defaults when those are null too."""
    min_pixels: int | None = Field(None, ge=1)
    """Smallest image area in pixels after resizing (Qwen-VL families). Exclusive with resolution."""
    max_pixels: int | None = Field(None, ge=1)
    """Largest image area in pixels after resizing (Qwen-VL families). Exclusive with resolution."""
    loss_mask: Literal["all", "last"] = "all"
    """Which assistant turns carry loss: all (every assistant turn, as DISC-MedLLM and qwen-vl-finetune do) or
    last (only the final one, as HuatuoGPT-Vision train_vl.py does; earlier turns are context)."""
    packing: bool | Literal["auto"] = False
    """Concatenate samples into rows of micro_batch_size x max_seq_len tokens without padding (attention stays
    within each sample). auto: pack where attention runs per sample (sdpa, flash_attention_2), pad with eager;
    the run header says which."""
    num_workers: int = Field(4, ge=0)
    """DataLoader worker processes per rank; 0 = load in the training process."""

    @field_validator("train", mode="before")
    @classmethod
    def _paths_to_sources(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value

    @property
    def pixel_range(self) -> tuple[int | None, int | None]:
        """(min_pixels, max_pixels) after applying the preset; None = the processor's default."""
        if self.resolution is not None:
            return RESOLUTION_PRESETS[self.resolution]
        return self.min_pixels, self.max_pixels


class LoraSection(_Section):
    r: int = Field(16, ge=1)
    """Adapter rank; higher = more capacity and memory (16-64 is typical)."""
    alpha: float = Field(32, gt=0)
    """Scale: updates are multiplied by alpha/r. Rule of thumb alpha = 2*r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target: str = Field("language", min_length=1)
    """"language" = the family's language-model linear layers (attention + MLP, never the vision tower's
    look-alike names); anything else is a regex full-matched against module names, replacing the groups."""
    include_vision: bool = False
    """Also put adapters on the vision tower's linear layers (target "language" only)."""
    include_projector: bool = False
    """Also put adapters on the vision-to-language projector (target "language" only)."""


class FreezeSection(_Section):
    vision_tower: bool = False
    """Give the vision encoder no trainable parameters (under LoRA: no adapters there either)."""
    projector: bool = False
    """Give the vision-to-language projector (Qwen `visual.merger`) no trainable parameters."""
    language_model: bool = False
    """Give the language model (embeddings, decoder, norm, lm_head) no trainable parameters."""


class OptimSection(_Section):
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate (AdamW). Full fine-tune 1e-6..2e-5; LoRA 1e-4..2e-4."""
    vision_lr: float | None = Field(None, gt=0)
    """Peak learning rate for the vision tower's trainable parameters; null = lr."""
    projector_lr: float | None = Field(None, gt=0)
    """Peak learning rate for the projector's trainable parameters; null = lr."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay, not applied to biases and norm weights."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    warmup_ratio: float | None = Field(0.03, ge=0, lt=1)
    """Linear warmup as a fraction of the total optimizer steps. Setting warmup_steps alone clears this."""
    warmup_steps: int | None = Field(None, ge=0)
    """Linear warmup in optimizer steps; exclusive with warmup_ratio."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Floor of the decay as a fraction of the peak (HuatuoGPT-Vision cosine: 0.15)."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this; null = no clipping."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, from lr down to lr * min_lr_ratio."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value

    @model_validator(mode="after")
    def _steps_replace_default_ratio(self) -> OptimSection:
        # The default warmup_ratio should not collide with a warmup_steps the user wrote; two written values should.
        if self.warmup_steps is not None and "warmup_ratio" not in self.model_fields_set:
            self.warmup_ratio = None
        return self

    def warmup_for(self, total_steps: int) -> int:
        """Warmup length in optimizer steps for a run of total_steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int((self.warmup_ratio or 0.0) * total_steps)


class TrainSection(_Section):
    epochs: float = Field(1, gt=0)
    """Passes over the training data; fractions allowed (0.5 = half)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (and size the schedule to it); null = from epochs."""
    micro_batch_size: int = Field(1, ge=1)
    """Samples per forward pass per process."""
    grad_accum: int = Field(1, ge=1)
    """Forward passes per optimizer step."""
    seed: int = 42
    """Seed for data order, the val split, dropout and LoRA init."""
    precision: DType | None = None
    """Autocast dtype; null = model.dtype. fp32 weights + bf16 = mixed precision (see the module docstring)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto = CUDA when available."""
    gradient_checkpointing: bool = False
    """Recompute language-model activations in backward: ~30% slower steps, far less activation memory."""
    vision_gradient_checkpointing: bool = False
    """The same for the vision tower (matters with many or large images and an unfrozen tower)."""
    log_every: int = Field(10, ge=1)
    """Optimizer steps between metric lines in metrics.jsonl."""
    save_every: int | None = Field(None, ge=1)
    """Optimizer steps between checkpoints; null = only at the end of each epoch and of the run."""
    keep_last: int | None = Field(2, ge=1)
    """Checkpoints kept on disk (oldest deleted first); null = keep all. The final model is always kept."""
    eval_every: int | None = Field(None, ge=1)
    """Optimizer steps between eval-loss passes over the validation data; null = never."""


class DistributedSection(_Section):
    nproc: int = Field(1, ge=1)
    """Processes (GPUs) per node."""
    nnodes: int = Field(1, ge=1)
    """Nodes (machines)."""
    node_rank: int = Field(0, ge=0)
    """This node's index, 0..nnodes-1 (override it per node: distributed.node_rank=1)."""
    master_addr: str = "127.0.0.1"
    """Address of node 0, reachable from every node."""
    master_port: int = Field(29500, ge=1024, le=65535)
    """Free TCP port on node 0 (ports below 1024 need root)."""
    strategy: Strategy = "ddp"
    """ddp replicates everything; deepspeed-zero2 shards optimizer state and gradients; deepspeed-zero3 also
    shards the weights; fsdp = PyTorch's fully sharded data parallel."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON: a path, or a file name in the shipped recipes/deepspeed/; null = zero2.json or zero3.json
    to match the strategy."""

    def deepspeed_config_path(self) -> Path | None:
        """The DeepSpeed JSON this run uses, or None when the strategy is not DeepSpeed."""
        if not self.strategy.startswith("deepspeed-"):
            return None
        shipped = resources.files("medvl.recipes") / "deepspeed"
        if self.deepspeed_config:
            # A file path; else a name shipped in recipes/deepspeed ("zero3.json").
            path = Path(self.deepspeed_config)
            named = shipped / self.deepspeed_config
            return Path(str(named)) if not path.is_file() and named.is_file() else path
        return Path(str(shipped / f"zero{self.strategy[-1]}.json"))


class EvalSection(_Section):
    suites: list[Suite] = Field(default_factory=list)
    """Benchmarks to score: vqa-rad, slake, pathvqa, pmc-vqa, omnimedvqa, mmmu-medical."""
    data: str | None = None
    """Benchmark bundle JSON (HuatuoGPT-Vision medical_multimodel_evaluation_data.json layout)."""
    every: int | None = Field(None, ge=1)
    """Optimizer steps between benchmark runs during training; null = only via `medvl eval`."""
    sample: int | None = Field(None, ge=1)
    """At most this many items per suite (seeded); null = all."""
    max_new_tokens: int = Field(256, ge=1)
    """Generation budget per answer (HuatuoGPT-Vision eval.py: 256)."""


class OutputSection(_Section):
    dir: str = Field("runs/medvl", min_length=1)
    """Run directory: resolved recipe, metrics.jsonl, checkpoints, final model."""
    report_to: list[Reporter] = Field(default_factory=list)
    """Extra metric sinks: tensorboard, wandb, swanlab. metrics.jsonl is always written."""
    overwrite: bool = False
    """Allow starting in a non-empty run directory (its checkpoints are deleted)."""


class Recipe(_Section):
    model: ModelSection
    """What to fine-tune."""
    data: DataSection
    """What to train on, and how samples become tokens."""
    method: Method = "full"
    """full = every unfrozen weight; lora = low-rank adapters; qlora = adapters over a 4-bit NF4 base."""
    lora: LoraSection | None = None
    """Adapter settings for method lora/qlora (defaults filled in when omitted)."""
    freeze: FreezeSection = Field(default_factory=FreezeSection)
    """Parameter groups that get no trainable parameters."""
    optim: OptimSection = Field(default_factory=OptimSection)
    """Optimizer and learning-rate schedule."""
    train: TrainSection = Field(default_factory=TrainSection)
    """Loop length, batch, precision, checkpoints."""
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    """Processes, nodes and sharding."""
    eval: EvalSection = Field(default_factory=EvalSection)
    """Benchmark evaluation."""
    output: OutputSection = Field(default_factory=OutputSection)
    """Where the run goes and who hears about it."""

    _source: str | None = PrivateAttr(None)
    _overrides: tuple[str, ...] = PrivateAttr(())

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        return _empty_sections_to_defaults(data)

    @model_validator(mode="after")
    def _check_and_resolve(self, info: ValidationInfo) -> Recipe:
        # load_recipe defers the checks to report them with line numbers; direct construction checks here.
        if not (info.context or {}).get("defer_checks"):
            problems = cross_check(self)
            if problems:
                raise ValueError("; ".join(f"{p.path}: {p.message}" for p in problems))
        if self.method != "full" and self.lora is None:
            self.lora = LoraSection()
        if self.train.precision is None:
            self.train.precision = self.model.dtype
        return self

    @property
    def world_size(self) -> int:
        return self.distributed.nproc * self.distributed.nnodes

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, all processes together."""
        return self.train.micro_batch_size * self.train.grad_accum * self.world_size

    def batch_arithmetic(self) -> str:
        t, d = self.train, self.distributed
        return (f"{t.micro_batch_size} micro x {t.grad_accum} accum x {d.nproc} proc x {d.nnodes} node"
                f"{'s' if d.nnodes > 1 else ''} = {self.global_batch} samples/step")

    @property
    def source(self) -> str | None:
        """The file this recipe was loaded from (None when built in Python)."""
        return self._source

    @property
    def overrides(self) -> tuple[str, ...]:
        return self._overrides


def _empty_sections_to_defaults(raw: Any) -> Any:
    # A section whose keys are all commented out reads as null in YAML; it means "all defaults", not an error.
    if isinstance(raw, dict):
        return {k: ({} if v is None and k in _SECTIONS and k != "lora" else v) for k, v in raw.items()}
    return raw


_SECTIONS = {name: f.annotation for name, f in Recipe.model_fields.items()
             if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)} | {"lora": LoraSection}


# ---------------------------------------------------------------------------------------------------------
# Cross-field checks. Each takes the recipe (or a partial one whose invalid parts are _INVALID) and yields
# (loc, message) for every problem it finds. recipe_warnings, further down, holds what is legal but suspect.

_INVALID = object()


def _precision(r) -> str:
    return r.train.precision or r.model.dtype


def _check_data(r):
    d = r.data
    if d.val is not None and d.val_fraction is not None:
        yield ("data", "val_fraction"), "set together with data.val; use a val directory or a held-out fraction"
    if d.resolution is not None:
        for key in ("min_pixels", "max_pixels"):
            if getattr(d, key) is not None:
                lo, hi = RESOLUTION_PRESETS[d.resolution]
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
        groups = [f.language_model] if r.model.family == "causal-lm" else [f.vision_tower, f.projector,
                                                                           f.language_model]
        if all(groups):
            yield ("freeze",), "every parameter group is frozen and method is full: nothing would train"
        return
    lora = lora or LoraSection()
    if lora.target != "language":
        try:
            re.compile(lora.target)
        except re.error as exc:
            yield ("lora", "target"), f"not a valid regex ({exc})"
        for key in ("include_vision", "include_projector"):
            if getattr(lora, key):
                yield ("lora", key), "only extends target 'language'; with a regex target, match those modules in it"
        return
    if f.language_model:
        yield ("freeze", "language_model"), "true, but lora.target 'language' puts the adapters there"
    if lora.include_vision and f.vision_tower:
        yield ("freeze", "vision_tower"), "true, but lora.include_vision puts adapters there"
    if lora.include_projector and f.projector:
        yield ("freeze", "projector"), "true, but lora.include_projector puts adapters there"
    if r.model.family == "causal-lm":
        for key in ("include_vision", "include_projector"):
            if getattr(lora, key):
                yield ("lora", key), "a causal-lm has no vision tower or projector"


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


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where (dotted key, YAML line or override) and what."""

    loc: tuple[str | int, ...]
    message: str
    line: int | None = None
    override: str | None = None

    @property
    def path(self) -> str:
        return _dotted(self.loc)

    def __str__(self) -> str:
        where = f"  [override {self.override}]" if self.override else f"  (line {self.line})" if self.line else ""
        return f"{self.path}: {self.message}{where}"


def cross_check(recipe) -> list[Problem]:
    """Every cross-field problem of a validated (or partially validated) recipe."""
    problems = []
    for needs, check in _CHECKS:
        if any(getattr(recipe, n) is _INVALID for n in needs):
            continue
        problems += [Problem(loc, msg) for loc, msg in check(recipe)]
    return problems


def recipe_warnings(recipe: Recipe) -> list[str]:
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


# ---------------------------------------------------------------------------------------------------------
# Loading


class RecipeError(MedvlError):
    """A recipe with one or more problems; `problems` keeps them for callers and tests."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        n = len(problems)
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"recipe {source}: {n} problem{'s' if n != 1 else ''}\n{lines}", where=source,
                         fix=f"edit the keys above, then check again: medvl recipes validate {source}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-5 as a float (YAML 1.1, and so PyYAML, only knows 1.0e-5)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """Block-style sections, but short scalar lists on one line: betas: [0.9, 0.999]."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=all(not isinstance(v, (dict, list)) for v in data)))


def _shipped_dir():
    return resources.files("medvl.recipes")


def shipped_recipes() -> list[tuple[str, str]]:
    """(name, purpose) of every recipe shipped in medvl.recipes; purpose = its first comment line."""
    out = []
    for entry in sorted(_shipped_dir().iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            first = next((ln for ln in entry.read_text().splitlines() if ln.startswith("#")), "#")
            out.append((entry.name[: -len(".yaml")], first.lstrip("#").strip()))
    return out


def resolve_recipe_path(path_or_name: str | Path) -> Path:
    """An existing file as given; else a bare name ("tiny_cpu", "tiny_cpu.yaml") of a shipped recipe."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise MedvlError(f"{path} is a directory, not a recipe file", where=str(path),
                         fix="pass a YAML file, or a shipped recipe name (medvl recipes list)")
    names = [name for name, _ in shipped_recipes()]
    if path.parent == Path("."):
        stem = re.sub(r"\.ya?ml$", "", path.name)
        if stem in names:
            return Path(str(_shipped_dir() / f"{stem}.yaml"))
    close = difflib.get_close_matches(re.sub(r"\.ya?ml$", "", path.name), names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise MedvlError(f"no recipe file {str(path_or_name)!r} and no shipped recipe of that name",
                     where=str(Path.cwd()), fix=f"{hint}shipped recipes: {', '.join(names)}")


def load_recipe(path_or_name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, validate. Raises RecipeError listing every problem (with YAML lines) at once."""
    path = resolve_recipe_path(path_or_name)
    source = str(path)
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.load(text, Loader=_Loader)
        lines, problems = _line_map(yaml.compose(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise RecipeError(source, [Problem((), f"not valid YAML: {exc.problem or exc}", line=line)]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(source, [Problem((), "must be a YAML mapping of sections (model:, data:, train: ...)")])
    origins, override_problems = _apply_overrides(raw, overrides)
    problems += override_problems

    try:
        recipe = Recipe.model_validate(raw, context={"defer_checks": True})
        parts = recipe
    except ValidationError as exc:
        recipe = None
        problems += [Problem(tuple(e["loc"]), _message(e)) for e in exc.errors(include_url=False)]
        parts = _valid_parts(raw)
    problems += cross_check(parts)

    if problems:
        placed = [_place(p, lines, origins) for p in problems]
        # File order reads best; override problems (no line) go last.
        placed.sort(key=lambda p: (p.line is None, p.line or 0))
        raise RecipeError(source, placed)
    recipe._source, recipe._overrides = source, tuple(overrides)
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default spelled out) that load_recipe reads back to an equal Recipe."""
    head = [f"# medvl resolved recipe (from {recipe.source or 'Python'})"]
    if recipe.overrides:
        head.append(f"# overrides: {' '.join(recipe.overrides)}")
    head.append(f"# global batch: {recipe.batch_arithmetic()}")
    body = yaml.dump(recipe.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                     width=120)
    return "\n".join(head) + "\n" + body


def recipe_summary(recipe: Recipe) -> list[tuple[str, str]]:
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


# ---------------------------------------------------------------------------------------------------------
# Helpers for load_recipe: overrides, line numbers, readable messages


def _apply_overrides(raw: dict, overrides) -> tuple[dict[tuple, str], list[Problem]]:
    origins: dict[tuple, str] = {}
    problems: list[Problem] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = tuple(key.strip().split("."))
        if not sep or not all(parts):
            problems.append(Problem(("override",), f"{item!r} is not key.sub=value (e.g. optim.lr=1e-5)",
                                    override=item))
            continue
        node = raw
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                problems.append(Problem(parts[: i + 1], f"is a {type(node[part]).__name__}, not a section, so "
                                        f"{key} cannot be set", override=item))
                break
            node = node[part]
        else:
            try:
                node[parts[-1]] = yaml.load(value, Loader=_Loader)
            except yaml.YAMLError:
                node[parts[-1]] = value  # not YAML (e.g. "a: b: c"): keep the text as a string
            origins[parts] = item
    return origins, problems


def _line_map(node, loc=(), lines=None, problems=None):
    """{loc: 1-based line} for every key and list item, plus duplicate-key problems."""
    if lines is None:
        lines, problems = {(): 1}, []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value in node.value:
            here = loc + (key_node.value,)
            line = key_node.start_mark.line + 1
            if key_node.value in first:
                problems.append(Problem(here, f"duplicate key (first on line {first[key_node.value]}); YAML keeps "
                                        f"only the last one", line=line))
            first.setdefault(key_node.value, line)
            lines[here] = line
            _line_map(value, here, lines, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[loc + (i,)] = item.start_mark.line + 1
            _line_map(item, loc + (i,), lines, problems)
    return lines, problems


def _place(p: Problem, lines: dict[tuple, int], origins: dict[tuple, str]) -> Problem:
    """Attach the YAML line of the deepest key of p.loc in the file, unless an override explains it better
    (it set that key, something under it, or the only part of its section the file does not have)."""
    if p.override or p.line:
        return p
    loc = p.loc
    while loc not in lines:
        loc = loc[:-1]
    best, best_score = None, float(len(loc))
    for oloc, item in origins.items():
        n = min(len(oloc), len(p.loc))
        shared = next((i for i in range(n) if oloc[i] != p.loc[i]), n)
        score = shared + (0.5 if shared == n and shared else 0)
        if score > best_score:
            best, best_score = item, score
    return Problem(p.loc, p.message, override=best) if best else Problem(p.loc, p.message, line=lines[loc])


def _valid_parts(raw: dict) -> types.SimpleNamespace:
    """Each top-level field validated on its own; invalid ones become _INVALID, so cross-checks on the valid
    parts still run and every problem is reported in one go."""
    parts = {}
    raw = _empty_sections_to_defaults(raw)
    for name, field in Recipe.model_fields.items():
        if name not in raw:
            parts[name] = _INVALID if field.is_required() else field.get_default(call_default_factory=True)
            continue
        try:
            parts[name] = TypeAdapter(field.annotation).validate_python(raw[name])
        except ValidationError:
            parts[name] = _INVALID
    return types.SimpleNamespace(**parts)


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "(recipe)"


def _annotation_at(loc: tuple):
    """The type annotation of the field at loc, walking Recipe -> section -> list item; None if unknown."""
    ann: Any = Recipe
    for part in loc:
        ann = _unwrap(ann)
        if isinstance(part, int):
            args = typing.get_args(ann) if typing.get_origin(ann) is list else ()
            ann = args[0] if args else None
        elif isinstance(ann, type) and issubclass(ann, BaseModel) and part in ann.model_fields:
            ann = ann.model_fields[part].annotation
        else:
            return None
    return ann


def _unwrap(ann):
    """Strip Optional: X | None -> X."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return args[0] if len(args) == 1 else ann
    return ann


def _literal_values(ann) -> list[str]:
    if ann is None:
        return []
    if typing.get_origin(ann) is Literal:
        return [str(a) for a in typing.get_args(ann)]
    return [v for a in typing.get_args(ann) for v in _literal_values(a)]


def _message(err: dict) -> str:
    """pydantic's error, reworded for a YAML author, with did-you-mean where it helps."""
    kind, loc, ctx, got = err["type"], tuple(err["loc"]), err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "missing":
        return "required, not set"
    if kind == "literal_error":
        allowed = _literal_values(_annotation_at(loc))
        close = difflib.get_close_matches(str(got), allowed, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{got!r} is not one of {', '.join(allowed)}{hint}"
    if kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound}, got {got!r}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a section (a mapping of keys), got {got!r}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{err['msg'][0].lower()}{err['msg'][1:]}, got {got!r}"


def _unknown_key(loc: tuple) -> str:
    name, parent = str(loc[-1]), _unwrap(_annotation_at(loc[:-1]))
    fields = list(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    # The most common slip is the right key in the wrong section (train.lr for optim.lr).
    elsewhere = [f"{sec}.{name}" for sec, cls in _SECTIONS.items() if name in cls.model_fields]
    if elsewhere:
        return f"unknown key here; did you mean {elsewhere[0]}?"
    if len(loc) == 1:
        return f"unknown section; the sections are: {', '.join(fields)}"
    return f"unknown key; {_dotted(loc[:-1])} takes: {', '.join(fields)}"
