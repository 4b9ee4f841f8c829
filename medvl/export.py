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
import hashlib
import io
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medvl.errors import MedvlError
from medvl.families import Family, detect_family
from medvl.models import tokenizer_of
from medvl.progress import NullProgress

LOGITS_TOL = 1e-4  # fp32 compute, same weights: measured 0.0-5e-6 (merging reorders the LoRA sums)
PROBE_QUESTION = "What is the modality of this image? Please describe this picture."
PROBE_TEXT = "The patient presents with fever and cough. Is there a pleural effusion? No."


# ---------------------------------------------------------------------------------------------------------
# shared with medvl.convert: sizes, the probe image and prompt, running a probe

def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as transformers' max_shard_size), '2GiB' -> 2 * 2**30."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not m or (not m.group(2) and m.group(3)):
        raise MedvlError(f"cannot read the size '{text}'", fix="write it like 5GB, 500MB or 2GiB")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base ** power)


def probe_image():
    """A deterministic 64 x 64 RGB image (two gradients and a flat channel): 4 visual tokens on the tiny Qwen-VL
    processors, a real but cheap image for any processor."""
    from PIL import Image

    ramp = Image.linear_gradient("L").resize((64, 64))
    return Image.merge("RGB", [ramp, ramp.rotate(90), Image.new("L", (64, 64), 128)])


def probe_inputs(processor, family: Family) -> dict:
    """The verification prompt through the checkpoint's own chat template: one image and a question for a VLM,
    the question alone for a text model."""
    if family.is_vision:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROBE_QUESTION}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return dict(processor(text=[text], images=[probe_image()], return_tensors="pt"))
    messages = [{"role": "user", "content": PROBE_QUESTION}]
    text = (processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if processor.chat_template else PROBE_QUESTION)
    return dict(processor([text], return_tensors="pt"))


def run_probe(model, inputs: dict, max_new_tokens: int) -> tuple:
    """(fp32 logits of the prompt [T, V], greedily generated token ids) in the model's own dtype."""
    import torch

    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    return logits, out[0, inputs["input_ids"].shape[1]:].tolist()


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
    """The model weights of an accelerate `save_state` directory, consolidated to one fp32/16-bit state dict.
    Torch files are read weights-only (DeepSpeed's zero_to_fp32 asks for full unpickling; it is overridden), so a
    crafted checkpoint cannot run code here (engine/checkpoint.py: safe_torch_load)."""
    import torch

    from medvl.engine.checkpoint import safe_torch_load
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


# ---------------------------------------------------------------------------------------------------------
# the export

@dataclass
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
    src = resolve_source(source, base)
    for folder in ([src.path] if src.kind != "checkpoint" else []) + ([Path(src.base)] if src.base else []):
        check_model_weights(folder)  # headers only, before torch is even imported (~5 s on a busy machine)
    progress.note(f"exporting a {src.kind} {src.family.name} model from {src.path}")

    import torch

    model, processor = load_pre_export(src)
    model.eval()
    inputs = probe_inputs(processor, src.family)
    pre = run_probe(model, inputs, max_new_tokens)
    merge_diff = None
    if _is_peft(model):  # a LoRA run (its final adapter or a step checkpoint)
        model = model.merge_and_unload()
        merge_diff = float((_logits(model, inputs) - pre[0]).abs().max())
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


def is_big(model) -> bool:
    """Worth a gc.collect after `del` (which costs ~0.25 s in a process holding many objects): above 256 MB."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) > 256 * 2**20


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _logits(model, inputs):
    import torch

    with torch.no_grad():
        return model(**inputs).logits[0].float()


def tensor_hashes(model, dtype=None) -> dict[str, str]:
    """sha256 of every tensor's bytes (in `dtype` if given): equality means bit-identical weights, without
    keeping a second copy of the model."""
    return {name: _sha(t if dtype is None or not t.is_floating_point() else t.to(dtype))
            for name, t in model.state_dict().items()}


def _sha(t) -> str:
    import torch

    t = t.detach().contiguous().cpu()
    if t.dim() == 0:
        t = t.reshape(1)
    # the buffer itself, no bytes copy (an embedding of a 7B model is ~1 GB)
    return hashlib.sha256(t.view(torch.uint8).numpy() if t.numel() else b"").hexdigest()


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
    parity = Parity(dtype, int(inputs["input_ids"].shape[1]),
                    int((inputs["input_ids"] == image_id).sum()) if image_id is not None else 0,
                    float((logits - rounded[0]).abs().max()), LOGITS_TOL, merge_diff,
                    float((logits - pre[0]).abs().max()), float(pre[0].abs().max()), list(pre[1]),
                    list(rounded[1]), list(tokens), len(hashes), different)
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
# model card and self-containment

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


def redact(value, run_dir: Path | None):
    """The run's facts with the run directory's own path replaced by '<run>' (the export outlives it)."""
    if run_dir is None:
        return value
    if isinstance(value, dict):
        return {k: redact(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, run_dir) for v in value]
    if isinstance(value, str):
        for root in {str(run_dir.resolve()), str(run_dir.absolute())}:
            value = value.replace(root, "<run>")
    return value


def _results(run_dir: Path | None) -> list[tuple[str, dict]]:
    if run_dir is None:
        return []
    found = []
    for path in sorted(run_dir.rglob("results.json")):
        try:
            found.append((str(path.relative_to(run_dir)), json.loads(path.read_text())))
        except ValueError:
            continue
    return found


def write_model_card(path: Path, name: str, src: Source, parity: Parity, cls_name: str, dtype: str) -> None:
    from medvl.versions import library_versions

    info = redact(src.run_info, src.run_dir)
    recipe = info.get("recipe") or {}
    if isinstance(recipe.get("output"), dict) and recipe["output"].get("dir"):
        recipe["output"]["dir"] = "<run>"  # also when the recipe gave it as a relative path
    results = [(rel, redact(r, src.run_dir)) for rel, r in _results(src.run_dir)]
    export_facts = {"source_kind": src.kind, "family": src.family.name, "model_class": cls_name, "dtype": dtype,
                    "base_model": src.base, "run": src.run_dir.name if src.run_dir else None,
                    "parity": {**asdict(parity), "generation_match": parity.generation_match},
                    "versions": library_versions(), "training": info, "eval_results": dict(results)}
    (path / "medvl_export.json").write_text(json.dumps(export_facts, indent=2))
    (path / "README.md").write_text(model_card(name, src, info, recipe, results, parity, cls_name, dtype,
                                               library_versions()))


def _hub_id(base: str | None) -> str | None:
    if base and re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not Path(base).exists():
        return base
    return None


def model_card(name, src, info, recipe, results, parity, cls_name, dtype, versions) -> str:
    vision = src.family.is_vision
    hub = _hub_id(src.base)
    lines = ["---", "library_name: transformers",
             f"pipeline_tag: {'image-text-to-text' if vision else 'text-generation'}",
             "tags: [medvl, medical" + (", vision-language" if vision else "") + "]"]
    if hub:
        lines.append(f"base_model: {hub}")
    origin = f"run `{src.run_dir.name}`" if src.run_dir else f"a {src.kind} model directory"
    merged_lora = src.kind == "lora" or info.get("method") in ("lora", "qlora")
    if src.base:
        origin += f" ({'LoRA merged into' if merged_lora else 'fine-tuned from'} `{src.base}`)"
    lines += ["---", "", f"# {name}", "",
              f"A {src.family.name} model ({cls_name}, {dtype}) exported by medvl {versions.get('medvl')} from "
              f"{origin}.", "", "## Training", ""]
    if recipe:
        r, opt, tr = recipe, recipe.get("optim", {}), recipe.get("train", {})
        rows = [("method", r.get("method")), ("base model", r.get("model", {}).get("base")),
                ("steps / epochs", f"{tr.get('max_steps')} / {tr.get('epochs')}"), ("learning rate", opt.get("lr")),
                ("schedule", f"{opt.get('scheduler')}, warmup {opt.get('warmup_steps') or opt.get('warmup_ratio')}"),
                ("micro batch x accumulation", f"{tr.get('micro_batch_size')} x {tr.get('grad_accum')}"),
                ("precision", tr.get("precision")), ("max sequence length", r.get("data", {}).get("max_seq_len"))]
        if r.get("method") in ("lora", "qlora"):
            lo = r.get("lora", {})
            rows.append(("LoRA", f"r {lo.get('r')}, alpha {lo.get('alpha')}, target {lo.get('target')}"))
        lines += ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    else:
        lines.append("No medvl run record (medvl_run.json) came with this model.")
    manifests = info.get("data_manifests") or {}
    lines += ["", "Data manifests (content hash):", ""]
    lines += [f"- `{Path(k).name}`: `{v}`" for k, v in manifests.items()] or ["- none recorded"]
    lines += ["", "## Evaluation", ""]
    if results:
        for rel, res in results:
            for scorer, sres in res.get("scorers", {}).items():
                overall = sres.get("overall", {})
                lines.append(f"- `{rel}` ({scorer}): overall {overall.get('acc', 0):.4f} (n = {overall.get('n')})")
                lines += [f"  - {d}: {a.get('acc', 0):.4f} (n = {a.get('n')})"
                          for d, a in sres.get("datasets", {}).items()]
    else:
        lines.append("No results.json in the run directory.")
    prompt = f"{'an image prompt' if vision else 'a prompt'} of {parity.prompt_tokens} tokens"
    merged = (f"merging the LoRA adapter moved the logits by {parity.merge_max_abs_diff:.3g}; "
              if parity.merge_max_abs_diff is not None else "")
    rounding = "" if dtype == "fp32" else (
        f" Against the fp32 pre-export model, rounding the weights to {dtype} moves the logits by "
        f"{parity.pre_export_max_abs_diff:.3g} (largest logit {parity.logits_scale:.3g}); greedy tokens "
        f"{'identical' if parity.generation_matches_pre_export else 'differ'}.")
    lines += ["", "## Export check", "",
              f"Reloaded with stock transformers ({cls_name}) and compared with the pre-export model on {prompt}, "
              f"fp32 compute: {merged}the reloaded export differs from the pre-export model with {dtype} weights by "
              f"{parity.logits_max_abs_diff:.3g} (limit {parity.tolerance:g}), its {parity.tensors_checked} tensors "
              f"are bit-identical, and its {len(parity.generated_export)} greedy tokens are identical.{rounding}",
              "", "## Versions", "", "| package | training | export |", "|---|---|---|"]
    trained = info.get("versions") or {}
    lines += [f"| {k} | {trained.get(k, '-')} | {v} |" for k, v in versions.items()]
    lines += ["", "## Use", "", "vLLM:", "", "```bash", "vllm serve ./" + name
              + (" --limit-mm-per-prompt '{\"image\": 4}'" if vision else ""), "```", "", "transformers:", "",
              "```python"]
    if vision:
        lines += ["from transformers import AutoModelForImageTextToText, AutoProcessor",
                  f"model = AutoModelForImageTextToText.from_pretrained('./{name}', dtype='auto', device_map='auto')",
                  f"processor = AutoProcessor.from_pretrained('./{name}')  # without torchvision: "
                  "medvl.models.load_processor",
                  "messages = [{'role': 'user', 'content': [{'type': 'image', 'image': 'scan.png'},",
                  "                                         {'type': 'text', 'text': 'What is the modality?'}]}]",
                  "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,",
                  "                                       return_dict=True, return_tensors='pt').to(model.device)"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"model = AutoModelForCausalLM.from_pretrained('./{name}', dtype='auto', device_map='auto')",
                  f"tokenizer = AutoTokenizer.from_pretrained('./{name}')",
                  "messages = [{'role': 'user', 'content': 'What is a pleural effusion?'}]",
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,",
                  "                                       return_tensors='pt').to(model.device)"]
    lines += ["out = model.generate(**inputs, max_new_tokens=256)", "```", ""]
    return "\n".join(lines)
