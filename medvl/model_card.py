"""The model card an export carries: README.md (Hub front matter + what was trained, evaluated and checked) and
medvl_export.json (the same facts as data), with the run directory's own path redacted (the export outlives it).

The front matter is huggingface_hub's ModelCardData, so the Hub reads the same keys it writes itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medvl.export import Parity
    from medvl.resolve import ModelSource


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


def write_model_card(path: Path, name: str, src: ModelSource, parity: Parity, cls_name: str, dtype: str) -> None:
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
    from huggingface_hub import ModelCardData

    vision = src.family.is_vision
    meta = ModelCardData(library_name="transformers", base_model=_hub_id(src.base),
                         pipeline_tag="image-text-to-text" if vision else "text-generation",
                         tags=["medvl", "medical"] + (["vision-language"] if vision else []))
    lines = ["---", meta.to_yaml()]
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
