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

import gc
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from medvl.errors import MedvlError
from medvl.families import Family
from medvl.models import tokenizer_of
from medvl.probe import LOGITS_TOL, is_big, probe_inputs, prompt_logits, run_probe, tensor_hashes
from medvl.model_card import write_model_card
from medvl.progress import NullProgress
from medvl.resolve import ModelSource, load_source, resolve_model
from medvl.shards import parse_size



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
    from medvl.atomic import atomic_dir, check_writable_target
    from medvl.models import DTYPES, check_model_weights

    t0 = time.perf_counter()
    progress = progress or NullProgress()
    if dtype not in DTYPES:
        raise MedvlError(f"unknown dtype '{dtype}'", fix=f"use one of {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    out = Path(out)
    check_writable_target(out, overwrite)  # before minutes of loading, not after
    src = resolve_model(source, base=base)
    for folder in ([src.path] if src.kind != "checkpoint" else []) + ([src.base_dir] if src.base_dir else []):
        check_model_weights(folder)  # headers only, before torch is even imported (~5 s on a busy machine)
    progress.note(f"exporting a {src.kind} {src.family.name} model from {src.path}")

    import torch

    model, processor = load_source(src, dtype="fp32")  # LoRA: the PeftModel, merged below
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


def carry_video_config(path: Path, src: ModelSource) -> None:
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
