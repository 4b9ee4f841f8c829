"""`medvl export`: a training run becomes a model directory that stock transformers and vLLM load as they load
the base model, with proof that it computes what the run's model computed.

    result = export("runs/sft", "models/med-qwen25vl", dtype="bf16")

Accepted sources: a run directory (its `final/`), a `final/` directory, a LoRA adapter directory (merged into
the base named in adapter_config.json / medvl_run.json, or `base=`), a plain save_pretrained directory, or a
step checkpoint `RUN/checkpoints/step-N/` (accelerate state: model.safetensors, or DeepSpeed ZeRO shards
consolidated with deepspeed's zero_to_fp32; the model is rebuilt from `RUN/recipe.yaml`).

Order: load the pre-export model in fp32 (LoRA: the PeftModel) -> run the probe (an image prompt: logits and a
short greedy generation) -> merge -> cast -> save shards + processor + chat template + generation config into a
temporary directory -> reload it with stock transformers (AutoModelForImageTextToText / AutoModelForCausalLM) and
rerun the probe -> compare -> model card -> check nothing points back into the run -> rename into place. Any
failure removes the temporary directory (medvl.atomic), so there is never a half-written export.

Parity is a chain of exact checks, each fp32 compute, each max |logit diff| < 1e-4 with identical greedy tokens:
  pre-export model (LoRA: the PeftModel) == merged model             (the merge changed nothing)
  merged model, weights rounded to the export dtype == reloaded export   (the files hold exactly those weights,
                                                                       also checked bit by bit: sha256 per tensor)
The one step that is not exact, rounding fp32 weights to bf16/fp16, is measured and reported (reloaded export vs
the fp32 pre-export model), not judged: it is a property of the dtype, not of the export. On the tiny random
models it is 0.5-1 % of the largest logit in bf16 and ~0.1 % in fp16, up to ~9 % when a large random LoRA delta
is merged (qwen2-vl); fp32 exports have no rounding step, so there the export equals the pre-export model.
Everything runs in fp32 so the checks stay exact on CPU; a half-precision export is upcast exactly for them.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from medvl.errors import MedvlError
from medvl.families import Family, detect_family
from medvl.models import tokenizer_of
from medvl.probe import LOGITS_TOL, is_big, probe_inputs, prompt_logits, run_probe, tensor_hashes
from medvl.model_card import write_model_card
from medvl.progress import NullProgress
from medvl.shards import parse_size



# ---------------------------------------------------------------------------------------------------------
# what is being exported

@dataclass
class Source:
    kind: str  # "full" (a save_pretrained model), "lora" (adapter + base), "checkpoint" (accelerate state)
    path: Path  # the directory holding the weights
    family: Family
    run_dir: Path | None = None
    base: str | None = None
    run_info: dict = field(default_factory=dict)  # medvl_run.json, when there is one


def _is_run_dir(path: Path) -> bool:
    return (path / "final").is_dir() and ((path / "recipe.yaml").is_file() or (path / "metrics.jsonl").is_file())


def resolve_source(path: str | Path, base: str | None = None) -> Source:
    path = Path(path)
    if not path.is_dir():
        raise MedvlError(f"{path} is not a directory", where=str(path),
                         fix="give a run directory, its final/ directory, a LoRA adapter or a model directory")
    if _is_run_dir(path):
        path = path / "final"
    run_dir = path.parent if _is_run_dir(path.parent) else None
    info = json.loads((path / "medvl_run.json").read_text()) if (path / "medvl_run.json").is_file() else {}
    if (path / "trainer_state.json").is_file():
        run_dir = path.parent.parent
        if not (run_dir / "recipe.yaml").is_file():
            raise MedvlError(f"checkpoint {path.name} has no recipe.yaml two levels up", where=str(run_dir),
                             fix="export the run directory, or a checkpoint inside RUN/checkpoints/")
        from medvl.config import load_recipe

        recipe = load_recipe(run_dir / "recipe.yaml")
        base = base or recipe.model.base
        family = _family_of_base(base, recipe.model.family)
        return Source("checkpoint", path, family, run_dir, base, {"recipe": json.loads(recipe.model_dump_json()),
                                                                   "method": recipe.method, "base_model": base})
    if (path / "adapter_config.json").is_file():
        adapter = json.loads((path / "adapter_config.json").read_text())
        base = base or adapter.get("base_model_name_or_path") or info.get("base_model")
        if not base:
            raise MedvlError("the adapter does not name its base model", where=str(path / "adapter_config.json"),
                             fix="pass --base PATH_OR_HUB_ID")
        return Source("lora", path, _family_of_base(base, None), run_dir, base, info)
    if (path / "config.json").is_file():
        return Source("full", path, detect_family(path), run_dir, info.get("base_model"), info)
    raise MedvlError(f"{path} holds no model: no config.json, adapter_config.json or trainer_state.json",
                     where=str(path), fix="point at a run directory, RUN/final, a LoRA adapter or a model directory")


def _family_of_base(base: str, family_name: str | None) -> Family:
    from medvl.families import get_family

    if family_name:
        return get_family(family_name)
    if not Path(base).is_dir():
        raise MedvlError(f"the base model {base} is not a local directory", where=base,
                         fix="download it first (huggingface-cli download ...) and pass --base PATH")
    return detect_family(base)


def load_pre_export(src: Source):
    """(model in fp32 exactly as the run left it — a PeftModel for LoRA —, processor)."""
    from medvl.models import apply_resolution, load_model, load_processor

    if src.kind == "full":
        return load_model(src.path, src.family, dtype="fp32"), _processor(src, src.path)
    if src.kind == "lora":
        from peft import PeftModel

        base = load_model(src.base, src.family, dtype="fp32")
        return PeftModel.from_pretrained(base, str(src.path)), _processor(src, src.path)
    from medvl.config import load_recipe
    from medvl.engine.params import apply_plan
    from medvl.engine.setup import plan_from_recipe

    recipe = load_recipe(src.run_dir / "recipe.yaml")
    model = apply_plan(load_model(src.base, src.family, dtype="fp32"), src.family,
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
                         where=str(src.path), fix="export RUN/final instead, or check model.base in recipe.yaml")
    processor = load_processor(src.base, src.family)
    apply_resolution(processor, src.family, *recipe.data.pixel_range)
    return model, processor


def _tied(model) -> bool:
    cfg = model.config
    return bool(getattr(cfg, "tie_word_embeddings", False)
                or getattr(cfg.get_text_config(), "tie_word_embeddings", False))


def _processor(src: Source, path: Path):
    from medvl.models import load_processor

    if (path / "tokenizer_config.json").is_file():
        return load_processor(path, src.family)
    if src.base:
        return load_processor(src.base, src.family)
    raise MedvlError(f"{path} has no tokenizer or processor", where=str(path),
                     fix="save the processor next to the weights (processor.save_pretrained)")


def checkpoint_state_dict(ckpt: Path) -> dict:
    """The model weights of an accelerate `save_state` directory, consolidated to one fp32/16-bit state dict."""
    import torch

    if (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(ckpt / "model.safetensors")
    for name in ("pytorch_model.bin", "pytorch_model_fsdp.bin"):  # accelerate's names (FSDP: full state dict)
        if (ckpt / name).is_file():
            return torch.load(ckpt / name, map_location="cpu", weights_only=True)
    tags = sorted(p.name for p in ckpt.iterdir() if p.is_dir() and any(p.glob("*model_states.pt")))
    if tags:
        # DeepSpeed ZeRO: accelerate saves under tag "pytorch_model"; zero_to_fp32 merges the partitions.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tag = (ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else tags[0]
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress; the library does not
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    raise MedvlError(f"no model weights in checkpoint {ckpt.name}", where=str(ckpt),
                     fix="expected model.safetensors, pytorch_model.bin, pytorch_model_fsdp.bin or DeepSpeed "
                         "ZeRO shards (FSDP sharded state dicts are not read: train with FULL_STATE_DICT)")


# ---------------------------------------------------------------------------------------------------------
# the export

@dataclass(kw_only=True)
class Parity:
    dtype: str
    prompt_tokens: int
    image_tokens: int
    logits_max_abs_diff: float  # reloaded export vs the pre-export model with its weights in the export dtype
    tolerance: float
    merge_max_abs_diff: float | None  # LoRA: merged model vs the PeftModel
    pre_export_max_abs_diff: float  # reloaded export vs the fp32 pre-export model: the dtype's rounding (fp32: 0)
    logits_scale: float  # max |pre-export logit|, to read the figure above against
    generated_pre_export: list[int]
    generated_rounded: list[int]  # the pre-export model with its weights in the export dtype
    generated_export: list[int]
    tensors_checked: int
    tensors_different: list[str]

    @property
    def generation_match(self) -> bool:
        """The export generates what the pre-export model generates with the same weights (required)."""
        return self.generated_rounded == self.generated_export

    @property
    def generation_matches_pre_export(self) -> bool:
        """... and what the fp32 pre-export model generates (always so in fp32; rounding may flip a near-tie)."""
        return self.generated_pre_export == self.generated_export


@dataclass
class ExportResult:
    out: Path
    kind: str
    family: str
    model_class: str
    dtype: str
    base: str | None
    files: list[str]
    shards: int
    bytes: int
    parity: Parity
    generated_text: str
    seconds: float


def export(source: str | Path, out: str | Path, *, dtype: str = "bf16", max_shard_size: str | int = "5GB",
           overwrite: bool = False, base: str | None = None, max_new_tokens: int = 8,
           progress=None) -> ExportResult:
    import torch

    from medvl.atomic import atomic_dir, check_writable_target
    from medvl.models import DTYPES

    t0 = time.perf_counter()
    progress = progress or NullProgress()
    if dtype not in DTYPES:
        raise MedvlError(f"unknown dtype '{dtype}'", fix=f"use one of {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    out = Path(out)
    check_writable_target(out, overwrite)  # before minutes of loading, not after
    src = resolve_source(source, base)
    progress.note(f"exporting a {src.kind} {src.family.name} model from {src.path}")

    model, processor = load_pre_export(src)
    model.eval()
    inputs = probe_inputs(processor, src.family)
    pre = run_probe(model, inputs, max_new_tokens)
    merge_diff = None
    if _is_peft(model):  # a LoRA run (its final adapter or a step checkpoint)
        model = model.merge_and_unload()
        merge_diff = float((prompt_logits(model, inputs) - pre[0]).abs().max())
        if not merge_diff < LOGITS_TOL:
            raise MedvlError(f"merging the LoRA adapter changed the logits by {merge_diff:.3g} (fp32, limit "
                             f"{LOGITS_TOL:g})", where=str(src.path), fix="report this as a medvl bug")
    torch_dtype = getattr(torch, DTYPES[dtype])
    with torch.no_grad():  # round the weights to the export dtype but keep fp32 compute (and fp32 buffers such
        for p in model.parameters():  # as rotary inv_freq, which a reload recomputes in fp32)
            p.data = p.data.to(torch_dtype).float()
    rounded = run_probe(model, inputs, max_new_tokens)
    model.to(torch_dtype)  # exact: the values are representable
    hashes = tensor_hashes(model)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        progress.note(f"writing {dtype} safetensors shards of at most {max_shard_size}")
        model.save_pretrained(tmp, max_shard_size=shard_bytes)
        processor.save_pretrained(tmp)
        write_preprocessor_config(tmp, processor)
        carry_video_config(tmp, src)
        big = is_big(model)
        del model  # one copy in memory at a time: the reload comes next
        if big:
            gc.collect()
        parity, text, cls_name = verify_export(tmp, src.family, dtype, inputs, pre, rounded, hashes,
                                               max_new_tokens, merge_diff)
        progress.note(f"parity: max |logit diff| {parity.logits_max_abs_diff:.3g} (limit {parity.tolerance:g}), "
                      f"{len(parity.generated_export)} greedy tokens identical")
        write_model_card(tmp, out.name, src, parity, cls_name, dtype)
        check_self_contained(tmp, [p for p in (src.run_dir, src.path) if p is not None])
        files = sorted(p.name for p in tmp.iterdir())
        shards = [p for p in tmp.iterdir() if p.suffix == ".safetensors"]
        size = sum(p.stat().st_size for p in shards)
    return ExportResult(out, src.kind, src.family.name, cls_name, dtype, src.base, files, len(shards), size,
                        parity, text, round(time.perf_counter() - t0, 2))


def write_preprocessor_config(path: Path, processor) -> None:
    """transformers 5 keeps the image processor's settings inside processor_config.json; serving stacks built on
    transformers 4 (vLLM releases among them) and the published checkpoints read preprocessor_config.json. Write
    both: the same settings, so either reader gets the resolution the model was trained at."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None and not (path / "preprocessor_config.json").exists():
        image_processor.save_pretrained(path)


def carry_video_config(path: Path, src: Source) -> None:
    """medvl saves Qwen-VL / InternVL processors without their video processor (it needs torchvision), but stock
    AutoProcessor on a machine with torchvision (vLLM's) builds one and needs its config: copy it from the source
    or the base when either has it."""
    name = "video_preprocessor_config.json"
    if not src.family.has_video_processor or (path / name).exists():
        return
    for d in (src.path, Path(src.base) if src.base else None):
        if d is not None and (d / name).is_file():
            shutil.copy2(d / name, path / name)
            return


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def stock_class(family: Family):
    """The class a user of stock transformers would load the export with (no medvl code involved)."""
    import transformers as T

    return T.AutoModelForImageTextToText if family.is_vision else T.AutoModelForCausalLM


def verify_export(path: Path, family: Family, dtype: str, inputs: dict, pre: tuple, rounded: tuple, hashes,
                  max_new_tokens: int, merge_diff: float | None):
    """Reload `path` the way a user would and compare it with the pre-export model; raise if it differs.
    `pre` / `rounded`: (logits, greedy tokens) of the pre-export model in fp32 / with export-dtype weights."""
    import torch

    from medvl.models import DTYPES, load_processor

    # fp32: the stored bf16/fp16 values upcast exactly, and the compute matches the references'
    model = stock_class(family).from_pretrained(path, dtype=torch.float32)
    model.eval()
    processor = load_processor(path, family)
    again = probe_inputs(processor, family)
    if not torch.equal(again["input_ids"], inputs["input_ids"]):
        raise MedvlError("the exported processor encodes the probe prompt differently from the source one",
                         where=str(path), fix="report this as a medvl bug")
    got = tensor_hashes(model, getattr(torch, DTYPES[dtype]))
    different = sorted(k for k in hashes if got.get(k) != hashes[k]) + sorted(set(got) - set(hashes))
    logits, tokens = run_probe(model, again, max_new_tokens)
    image_id = getattr(model.config, "image_token_id", None)
    parity = Parity(
        dtype=dtype, prompt_tokens=int(inputs["input_ids"].shape[1]),
        image_tokens=int((inputs["input_ids"] == image_id).sum()) if image_id is not None else 0,
        logits_max_abs_diff=float((logits - rounded[0]).abs().max()), tolerance=LOGITS_TOL,
        merge_max_abs_diff=merge_diff, pre_export_max_abs_diff=float((logits - pre[0]).abs().max()),
        logits_scale=float(pre[0].abs().max()), generated_pre_export=list(pre[1]),
        generated_rounded=list(rounded[1]), generated_export=list(tokens), tensors_checked=len(hashes),
        tensors_different=different)
    problems = []
    if different:
        problems.append(f"{len(different)} of {len(hashes)} tensors differ from the model in memory "
                        f"(e.g. {', '.join(different[:3])})")
    if not parity.logits_max_abs_diff < LOGITS_TOL:
        problems.append(f"logits differ by {parity.logits_max_abs_diff:.3g} (limit {LOGITS_TOL:g}, fp32 compute)")
    if not parity.generation_match:
        problems.append(f"greedy generation differs: {rounded[1]} before, {tokens} after")
    if problems:
        raise MedvlError("the exported model does not reproduce the pre-export model: " + "; ".join(problems),
                         where=str(path), fix="nothing was written; report this as a medvl bug with the command")
    tok = tokenizer_of(processor)
    return parity, tok.decode(tokens), type(model).__name__


# ---------------------------------------------------------------------------------------------------------
# self-containment (the model card: medvl/model_card.py)

def check_self_contained(path: Path, forbidden: list[Path]) -> None:
    """No file of the export may name the run or source directory (it will move or be deleted)."""
    needles = {str(q).encode() for p in forbidden for q in (p.absolute(), p.resolve())}
    for f in sorted(path.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            hit = next((n for n in needles if n in data), None)
            if hit:
                raise MedvlError(f"exported file {f.name} refers to {hit.decode()}", where=f.name,
                                 fix="report this as a medvl bug: an export must not point back into the run")
