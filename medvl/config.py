"""The typed training recipe: one YAML file in, one validated `Recipe` out, or one error listing every problem.

    recipe = load_recipe("huatuo_sft_qwen25vl_7b", ["optim.lr=1e-5", "train.max_steps=100"])

A recipe is data: ten sections (model, data, method, lora, freeze, optim, train, distributed, eval, output),
each a pydantic model with extra="forbid" and a docstring per field (`medvl recipes show` and the tests read
them). Loading goes:

1. find the file: an existing path wins, else a bare name ("tiny_cpu" or "tiny_cpu.yaml") is a shipped recipe
   in the `medvl.recipes` package;
2. read the YAML with a line number for every key, apply `key.sub=value` overrides (medvl/config_yaml.py:
   the general YAML + reworded-pydantic-errors layer);
3. validate the fields, then the cross-field checks (medvl/config_checks.py, which Recipe's own validator
   runs), collecting everything; raise one `RecipeError`.

Public: Recipe (+ its sections), load_recipe, resolve_recipe_path, shipped_recipes, recipe_to_yaml,
recipe_summary, recipe_warnings (from config_checks), RecipeError (.problems: list[Problem]), RESOLUTION_PRESETS.

Precision, decided: `model.dtype` is the dtype the weights are loaded in; `train.precision` is the autocast
(mixed-precision) dtype and defaults to `model.dtype`. Valid pairs are (fp32, fp32|bf16|fp16), (bf16, bf16),
(fp16, fp16) with LoRA/QLoRA only. bf16 weights with bf16 compute is the HuatuoGPT-Vision setup (2 bytes/param);
fp32 weights + bf16 autocast is classic mixed precision (4 bytes/param + fp32 master copy, slower, steadier).

No torch, transformers or peft here: `medvl recipes validate` answers in well under a second.
"""

from __future__ import annotations

import difflib
import re
import shlex
import types
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, field_validator, \
    model_validator

from medvl.config_checks import INVALID, TEXT_FAMILIES, CrossCheckError, cross_check, recipe_summary, \
    recipe_warnings
from medvl.config_yaml import Dumper, Problem, YamlSyntax, apply_overrides, place, read_yaml, reword
from medvl.errors import MedvlError
from medvl.families import FAMILY_NAMES
from medvl.models import DTYPES

__all__ = [
    "RESOLUTION_PRESETS", "DataSection", "DataSource", "DistributedSection", "EvalSection", "FreezeSection",
    "LoraSection", "ModelSection", "OptimSection", "OutputSection", "Problem", "Recipe", "RecipeError",
    "TEXT_FAMILIES", "TrainSection", "load_recipe", "recipe_summary", "recipe_to_yaml", "recipe_warnings", "resolve_recipe_path",
    "shipped_recipes",
]

# The family names come from the family table (medvl/families.py), the one list of supported families.
FamilyName = Literal[FAMILY_NAMES]  # type: ignore[valid-type]
DType = Literal[tuple(DTYPES)]  # type: ignore[valid-type]
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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


# ---------------------------------------------------------------------------------------------------------
# Sections


class ModelSection(_Section):
    base: str = Field(min_length=1)
    """Model to start from: a local directory (e.g. the output of `medvl convert`) or a hub id."""
    family: FamilyName | None = None
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
    def _check_and_resolve(self) -> Recipe:
        # The one place a whole recipe is cross-checked; load_recipe unpacks the Problems (with their keys) from
        # the CrossCheckError that pydantic keeps in the error's ctx.
        problems = cross_check(self)
        if problems:
            raise CrossCheckError(problems)
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
        return {k: ({} if v is None and k in _SECTIONS else v) for k, v in raw.items()}
    return raw


# Required-or-defaulted sections only: lora is Optional, so `lora:` left empty still means "no lora section".
_SECTIONS = {name: f.annotation for name, f in Recipe.model_fields.items()
             if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}


# ---------------------------------------------------------------------------------------------------------
# Loading


class RecipeError(MedvlError):
    """A recipe with one or more problems; `problems` keeps them for callers and tests."""

    def __init__(self, source: str, problems: list[Problem], overrides: list[str] | tuple[str, ...] = ()):
        self.source = source
        self.problems = problems
        n = len(problems)
        lines = "\n".join(f"  {p}" for p in problems)
        # The check-again command repeats the overrides: without them it validates a different recipe.
        again = shlex.join(["medvl", "recipes", "validate", source, *overrides])
        in_overrides = sum(p.override is not None for p in problems)
        if in_overrides == n:
            what = "fix the overrides above (command line)"
        elif in_overrides:
            what = f"edit the keys above in {source} and fix the overrides marked [override ...] (command line)"
        else:
            what = f"edit the keys above in {source}"
        super().__init__(f"recipe {source}: {n} problem{'s' if n != 1 else ''}\n{lines}", where=source,
                         fix=f"{what}, then check again: {again}")


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
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:  # unreadable, a directory, or not text (a binary file)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise MedvlError(f"cannot read the recipe {path}: {why}", where=str(path),
                         fix="give a readable YAML recipe file, or a shipped recipe name (`medvl recipes list`)"
                         ) from None
    try:
        raw, lines, problems = read_yaml(text)
    except YamlSyntax as exc:
        raise RecipeError(source, [exc.problem]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(source, [Problem((), "must be a YAML mapping of sections (model:, data:, train: ...)")])
    origins, override_problems = apply_overrides(raw, overrides)
    problems += override_problems

    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        recipe = None
        errors = exc.errors(include_url=False)
        crossed = [e["ctx"]["error"] for e in errors if isinstance((e.get("ctx") or {}).get("error"), CrossCheckError)]
        if crossed:  # every field valid: the validator's cross-checks are the only errors
            problems += crossed[0].problems
        else:  # Recipe's validator did not run: cross-check the valid parts, so everything shows in one go
            problems += [Problem(tuple(e["loc"]), reword(e, Recipe)) for e in errors]
            problems += cross_check(_valid_parts(raw))

    if problems:
        placed = [place(p, lines, origins) for p in problems]
        # File order reads best; override problems (no line) go last.
        placed.sort(key=lambda p: (p.line is None, p.line or 0))
        raise RecipeError(source, placed, overrides)
    recipe._source, recipe._overrides = source, tuple(overrides)
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default spelled out) that load_recipe reads back to an equal Recipe."""
    head = [f"# medvl resolved recipe (from {recipe.source or 'Python'})"]
    if recipe.overrides:
        head.append(f"# overrides: {' '.join(recipe.overrides)}")
    head.append(f"# global batch: {recipe.batch_arithmetic()}")
    body = yaml.dump(recipe.model_dump(mode="json"), Dumper=Dumper, sort_keys=False, allow_unicode=True,
                     width=120)
    return "\n".join(head) + "\n" + body


def _valid_parts(raw: dict) -> types.SimpleNamespace:
    """Each top-level field validated on its own; invalid ones become INVALID, so cross-checks on the valid
    parts still run and every problem is reported in one go."""
    parts = {}
    raw = _empty_sections_to_defaults(raw)
    for name, field in Recipe.model_fields.items():
        if name not in raw:
            parts[name] = INVALID if field.is_required() else field.get_default(call_default_factory=True)
            continue
        try:
            parts[name] = TypeAdapter(field.annotation).validate_python(raw[name])
        except ValidationError:
            parts[name] = INVALID
    return types.SimpleNamespace(**parts)
