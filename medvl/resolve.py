"""What model is this path: the one resolver (and loader) behind chat, eval and export.

    src = resolve_model("runs/sft")                       # -> ModelSource(kind="full" | "lora" | "checkpoint")
    model, processor = load_source(src, dtype="fp32")     # LoRA stays a PeftModel: applied, never merged here

Accepted, in the order they are recognised:
- a run directory (`RUN/final/` holds the model or adapter; a run without `final/` yet stands for its newest
  complete checkpoint `RUN/checkpoints/step-N/`);
- a step checkpoint (`trainer_state.json`: accelerate state with the trainable weights, or DeepSpeed ZeRO
  shards; the model is rebuilt from `RUN/recipe.yaml` and the checkpoint's weights loaded over it);
- a LoRA adapter directory (`adapter_config.json`), over the base named by `base=` (eval's --model, chat's MODEL
  with --adapter, export's --base), else its adapter_config.json, else medvl_run.json;
- a save_pretrained directory (`config.json`): a medvl export, a converted model, a downloaded checkpoint;
- a hub id already in the Hugging Face cache (`Qwen/Qwen2.5-VL-7B-Instruct`): its cached snapshot, offline.

The family always comes from config.json's `model_type` (medvl.families), never from a name. Nothing heavy is
imported until `load_source`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from medvl.errors import MedvlError
from medvl.families import Family, detect_family, get_family

KINDS = ("full", "lora", "checkpoint")


@dataclass
class ModelSource:
    kind: str  # "full" (a save_pretrained model), "lora" (adapter + base), "checkpoint" (accelerate state)
    path: Path  # the directory holding the weights: the model, the adapter, or the checkpoint
    family: Family
    run_dir: Path | None = None
    base: str | None = None  # the base as named (path or hub id); for "full", the run's base model if recorded
    base_dir: Path | None = None  # the base's local directory (lora / checkpoint)
    run_info: dict = field(default_factory=dict)  # medvl_run.json, when there is one

    @property
    def adapter(self) -> Path | None:
        return self.path if self.kind == "lora" else None

    @property
    def model_dir(self) -> Path:
        """The directory whose config.json / weights the model class loads first."""
        return self.path if self.kind == "full" else self.base_dir

    @property
    def processor_dir(self) -> Path:
        """medvl's training saves the processor (with the run's resolution applied) next to the weights."""
        if any((self.path / n).is_file() for n in ("tokenizer_config.json", "processor_config.json")):
            return self.path
        if self.base_dir is not None:
            return self.base_dir
        if self.base and Path(self.base).is_dir():  # a full fine-tune saved without its processor
            return Path(self.base)
        raise MedvlError(f"{self.path} has no tokenizer or processor", where=str(self.path),
                         fix="save the processor next to the weights (processor.save_pretrained)")

    @property
    def name(self) -> str:
        """A short name for status lines: the run's directory, else the model's ("final" says nothing)."""
        base = self.run_dir.name if self.run_dir is not None else self.path.name
        if self.kind == "checkpoint":
            return f"{base}/{self.path.name}"
        return base + (" (LoRA)" if self.kind == "lora" else "")

    def describe(self) -> str:
        what = {"full": "model", "lora": "LoRA adapter", "checkpoint": "checkpoint"}[self.kind]
        over = f" over {self.base}" if self.kind != "full" and self.base else ""
        return f"{self.family.name} {what} {self.path}{over}"


def is_run_dir(path: Path) -> bool:
    return (path / "final").is_dir() and ((path / "recipe.yaml").is_file() or (path / "metrics.jsonl").is_file())


def resolve_model(model: str | Path | None, *, adapter: str | Path | None = None,
                  base: str | Path | None = None) -> ModelSource:
    """`model` alone: anything in the module docstring. With `adapter`: that adapter over `model` (a model passed
    with an adapter is its base). `base` overrides the base an adapter or checkpoint names."""
    if adapter is not None:
        src = _resolve_path(Path(adapter), base if base is not None else model)
        if src.kind != "lora":
            raise MedvlError(f"{adapter} holds no LoRA adapter (no adapter_config.json, here or in final/)",
                             where=str(adapter), fix="pass the run directory or the folder with adapter_config.json")
        return src
    if model is None:
        raise MedvlError("no model given", fix="pass a model directory, a medvl run directory or a cached hub id")
    path = Path(model)
    if not path.exists():
        from medvl.families import _cached_config

        snapshot = _cached_config(str(model)).parent  # a hub id in the cache, or a clear "not found"
        return ModelSource("full", snapshot, detect_family(snapshot))
    if not path.is_dir():
        raise MedvlError(f"{path} is not a directory", where=str(path),
                         fix="give a run directory, its final/ directory, a LoRA adapter or a model directory")
    return _resolve_path(path, base)


def _resolve_path(path: Path, base) -> ModelSource:
    if not path.is_dir():
        raise MedvlError(f"{path} {'is not a directory' if path.exists() else 'does not exist'}", where=str(path),
                         fix="give a run directory, its final/ directory, a LoRA adapter or a model directory")
    if (path / "final").is_dir() and any((path / "final" / m).is_file()
                                         for m in ("config.json", "adapter_config.json")):
        path = path / "final"
    elif not _has_model(path):
        from medvl.checkpoint_files import list_checkpoints

        found = list_checkpoints(path)
        if found:  # a run still training (or killed before final/): its newest complete checkpoint
            path = found[-1]
    run_dir = path.parent if is_run_dir(path.parent) else None
    info = json.loads((path / "medvl_run.json").read_text()) if (path / "medvl_run.json").is_file() else {}
    if (path / "trainer_state.json").is_file():
        run_dir = path.parent.parent
        if not (run_dir / "recipe.yaml").is_file():
            raise MedvlError(f"checkpoint {path.name} has no recipe.yaml two levels up", where=str(run_dir),
                             fix="use the run directory, or a checkpoint inside RUN/checkpoints/")
        from medvl.config import load_recipe

        recipe = load_recipe(run_dir / "recipe.yaml")
        named = str(base) if base is not None else recipe.model.base
        base_dir = _base_dir(named, path)
        family = get_family(recipe.model.family) if recipe.model.family else detect_family(base_dir)
        return ModelSource("checkpoint", path, family, run_dir, named, base_dir,
                           {"recipe": json.loads(recipe.model_dump_json()), "method": recipe.method,
                            "base_model": named})
    if (path / "adapter_config.json").is_file():
        cfg = json.loads((path / "adapter_config.json").read_text())
        named = str(base) if base is not None else (cfg.get("base_model_name_or_path") or info.get("base_model"))
        if not named:
            raise MedvlError("the adapter does not name its base model", where=str(path / "adapter_config.json"),
                             fix="pass the base model: `--base PATH` (export) or as MODEL / --model (chat, eval)")
        base_dir = _base_dir(named, path)
        return ModelSource("lora", path, detect_family(base_dir), run_dir, named, base_dir, info)
    if (path / "config.json").is_file():
        return ModelSource("full", path, detect_family(path), run_dir, info.get("base_model"), None, info)
    raise MedvlError(f"{path} holds no model: no config.json, adapter_config.json or trainer_state.json "
                     "(here or in final/ or checkpoints/)", where=str(path),
                     fix="point at a run directory, RUN/final, a LoRA adapter, a model directory or a cached hub id")


def _has_model(path: Path) -> bool:
    return any((path / m).is_file() for m in ("config.json", "adapter_config.json", "trainer_state.json"))


def _base_dir(named: str, weights: Path) -> Path:
    """The local directory of an adapter's / checkpoint's base: a model directory, a run (its final/), or a hub
    id in the cache."""
    path = Path(named)
    for candidate in (path, path / "final"):
        if (candidate / "config.json").is_file():
            return candidate
    if not path.exists():
        from huggingface_hub import try_to_load_from_cache

        looks_like_repo = named.count("/") == 1 and not named.startswith((".", "/", "~"))
        found = try_to_load_from_cache(named, "config.json") if looks_like_repo else None
        if isinstance(found, str):
            return Path(found).parent
    raise MedvlError(f"the base model {named} is not a local directory (nor a model in the Hugging Face cache)",
                     where=str(weights),
                     fix="pass the base checkpoint: `--base PATH` (export), --model BASE_DIR (eval), MODEL with "
                         "--adapter (chat)")


# ---------------------------------------------------------------------------------------------------------
# default model (chat with no MODEL)


def newest_finished_run(root: str | Path = "runs") -> Path | None:
    """The run under `root` whose final/ was written last (a finished run always has final/)."""
    root = Path(root)
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if p.is_dir() and is_run_dir(p)]
    return max(runs, key=lambda p: (p / "final").stat().st_mtime_ns, default=None)


def default_model(cwd: str | Path = ".") -> tuple[str, str]:
    """(model, why it was chosen): $MEDVL_MODEL, else the newest finished run under ./runs, else the demo's run."""
    env = os.environ.get("MEDVL_MODEL")
    if env:
        return env, "from $MEDVL_MODEL"
    cwd = Path(cwd)
    run = newest_finished_run(cwd / "runs")
    if run is not None:
        return str(run), "the newest finished run under ./runs"
    if is_run_dir(cwd / "demo-out" / "run"):
        return str(cwd / "demo-out" / "run"), "the model `make demo` trained"
    raise MedvlError("no model given and none found", where=str(cwd.resolve()),
                     fix="pass one: `medvl chat MODEL` (a run directory, a model directory or a cached hub id), "
                         "or set MEDVL_MODEL; with no MODEL medvl looks for ./runs/*/final and ./demo-out/run")


# ---------------------------------------------------------------------------------------------------------
# loading


def resolve_dtype(dtype: str) -> str:
    """'auto' -> bf16 on a CUDA GPU that supports it, else fp32 (CPU bf16 matmuls are slow and noisier). An
    unknown name fails here, before minutes of loading."""
    from medvl.models import DTYPES

    if dtype != "auto":
        if dtype not in DTYPES:
            raise MedvlError(f"unknown dtype '{dtype}'", where="--dtype", fix=f"use auto, {', '.join(DTYPES)}")
        return dtype
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def resolve_device(device: str | None):
    """A torch.device for `--device` (None: cuda when there is a GPU, else cpu), checked before loading: a
    misspelt name or a GPU this machine lacks is a clear error, not an exception from torch mid-load."""
    import torch

    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise MedvlError(f"unknown device '{device}'", where="--device",
                         fix="use cpu, cuda or cuda:N (N counts the GPUs from 0)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise MedvlError(f"--device {device}: this machine has no usable CUDA GPU", where="--device",
                             fix="use --device cpu, or run on a machine with a GPU (`medvl doctor` says what torch "
                                 "sees)")
        if dev.index is not None and dev.index >= count:
            raise MedvlError(f"--device {device}: there is no GPU {dev.index} (this machine has {count})",
                             where="--device", fix=f"use cuda:0 to cuda:{count - 1}")
    return dev


def load_source(src: ModelSource, *, dtype: str = "fp32"):
    """(model exactly as the run left it, processor) on the CPU in `dtype`; a LoRA adapter is applied over its
    base as a PeftModel (never merged: export merges, chat and eval keep it separate)."""
    from medvl.models import apply_resolution, load_model, load_processor

    dtype = resolve_dtype(dtype)
    if src.kind == "full":
        return load_model(src.path, src.family, dtype=dtype), load_processor(src.processor_dir, src.family)
    if src.kind == "lora":
        from peft import PeftModel

        base = load_model(src.base_dir, src.family, dtype=dtype)
        try:
            model = PeftModel.from_pretrained(base, str(src.path))
        except (RuntimeError, ValueError, KeyError) as exc:  # size mismatch, missing target modules
            raise MedvlError(f"the adapter does not fit the base model {src.base}: {str(exc).splitlines()[0][:300]}",
                             where=str(src.path),
                             fix="pass the base checkpoint the adapter was trained on") from None
        return model, load_processor(src.processor_dir, src.family)
    from medvl.config import load_recipe
    from medvl.plan import apply_plan, plan_from_recipe

    recipe = load_recipe(src.run_dir / "recipe.yaml")
    model = apply_plan(load_model(src.base_dir, src.family, dtype=dtype), src.family,
                       plan_from_recipe(recipe, src.family))
    state = checkpoint_state_dict(src.path)
    result = model.load_state_dict(state, strict=False)
    tied = {k for k in result.missing_keys if k.endswith("lm_head.weight")} if _tied(model) else set()
    # Checkpoints hold only what trains (engine/checkpoint.py); frozen weights come from the base model.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = (set(result.missing_keys) & trainable) - tied
    if missing or result.unexpected_keys:
        raise MedvlError(f"checkpoint {src.path.name} does not match the model its recipe builds: "
                         f"{len(missing)} trainable tensors missing (e.g. {sorted(missing)[:2]}), "
                         f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})",
                         where=str(src.path), fix="use RUN/final instead, or check model.base in recipe.yaml")
    processor = load_processor(src.base_dir, src.family)
    apply_resolution(processor, src.family, *recipe.data.pixel_range)
    return model, processor


def _tied(model) -> bool:
    cfg = model.config
    return bool(getattr(cfg, "tie_word_embeddings", False)
                or getattr(cfg.get_text_config(), "tie_word_embeddings", False))


def checkpoint_state_dict(ckpt: Path) -> dict:
    """The model weights of an accelerate `save_state` directory, consolidated to one fp32/16-bit state dict.
    Torch files are read weights-only (DeepSpeed's zero_to_fp32 asks for full unpickling; it is overridden), so a
    crafted checkpoint cannot run code here (medvl/checkpoint_files.py: safe_torch_load)."""
    import torch

    from medvl.checkpoint_files import safe_torch_load
    from medvl.models import check_weight_file

    if (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file

        check_weight_file(ckpt / "model.safetensors")
        return load_file(ckpt / "model.safetensors")
    for name in ("pytorch_model.bin", "pytorch_model_fsdp.bin"):  # accelerate's names (FSDP: full state dict)
        if (ckpt / name).is_file():
            with safe_torch_load(ckpt / name):
                return torch.load(ckpt / name, map_location="cpu", weights_only=True)
    tags = sorted(p.name for p in ckpt.iterdir() if p.is_dir() and any(p.glob("*model_states.pt")))
    if tags:
        # DeepSpeed ZeRO: accelerate saves under tag "pytorch_model"; zero_to_fp32 merges the partitions.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tag = (ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else tags[0]
        with contextlib.redirect_stdout(io.StringIO()), safe_torch_load(ckpt):  # it prints; the library does not
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    raise MedvlError(f"no model weights in checkpoint {ckpt.name}", where=str(ckpt),
                     fix="expected model.safetensors, pytorch_model.bin, pytorch_model_fsdp.bin or DeepSpeed "
                         "ZeRO shards (FSDP sharded state dicts are not read: train with FULL_STATE_DICT)")
