"""The supported model families: one explicit table.

A family is detected from `config.json`'s `model_type`, never from a directory name (HuatuoGPT-Vision's
`cli.py` picked the class by a substring of the path, so a renamed directory broke loading).

For each family the table says which transformers class holds the model, how to build its processor, where
its vision tower / projector / language model live in the parameter names (both the layout transformers uses
since 4.52, `model.language_model.*`, and the older one, `model.*` + `visual.*`) and which LoRA targets stay inside
the language model. How a chat turn is laid out and ends is *not* in this table: training reads it off each
checkpoint's own chat template (medvl/data/turns.py), since one family holds checkpoints with different templates
(llava-1.5-hf `USER:/ASSISTANT:`, HuatuoGPT-Vision-hf `<|user|>/<|assistant|>`, ChatML on Qwen2 backbones).
This module imports nothing heavy: completion and the recipe checker read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from medvl.errors import MedvlError


@dataclass(frozen=True)
class Layout:
    """Parameter-name prefixes of each group. A name belongs to the first group whose prefix matches, checked
    projector first (the Qwen merger sits *inside* `visual`)."""

    vision: tuple[str, ...]
    projector: tuple[str, ...]
    language: tuple[str, ...]
    head: tuple[str, ...] = ("lm_head.",)

    def group_of(self, name: str) -> str:
        for group in ("projector", "vision", "head", "language"):
            if name.startswith(getattr(self, group)):
                return group
        return "other"


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    model_class: str  # transformers class name
    processor_class: str | None  # None: text-only, the tokenizer is the processor
    has_video_processor: bool  # its stock processor cannot be built without torchvision
    layout: Layout
    legacy_layout: Layout | None  # pre-4.52 checkpoints; None where the family is newer than that
    image_token: str | None  # the token the processor expands into visual tokens
    end_of_turn: str  # the end of turn of the template medvl.tiny writes (a real checkpoint's comes from its template)
    default_system: str | None  # what medvl.tiny's template inserts when no system turn is given
    mrope: bool = False  # 3-D rotary position ids (Qwen-VL): packing must build them per sample
    notes: str = ""
    # LoRA on the language model only: a plain ["q_proj", ...] list also wraps the Qwen vision blocks'
    # gate/up/down projections (6 extra modules on the tiny model; see environment.md section 5).
    lora_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # extra: LoRA module names of the vision tower / projector, patch geometry, and `reference`: the hub id of
    # the checkpoint whose real files are in tests/fixtures/real (a dry run plans from its cached config when the
    # recipe's base does not exist yet)
    extra: dict = field(default_factory=dict)

    @property
    def is_vision(self) -> bool:
        return self.processor_class is not None

    def lora_regex(self, *, vision: bool = False, projector: bool = False) -> str:
        """A peft `target_modules` regex: the language model's linear layers, optionally the vision tower's and
        the projector's (their own module names, which differ per family)."""
        escaped = "|".join(p.rstrip(".").replace(".", r"\.") for p in self.layout.language)
        parts = [rf"(?:{escaped})\..*\.(?:{'|'.join(self.lora_modules)})"]
        if vision and self.extra.get("vision_lora"):
            vis = "|".join(p.rstrip(".").replace(".", r"\.") for p in self.layout.vision)
            parts.append(rf"(?:{vis})\..*\.(?:{'|'.join(self.extra['vision_lora'])})")
        if projector and self.extra.get("projector_lora"):
            proj = "|".join(p.rstrip(".").replace(".", r"\.") for p in self.layout.projector)
            parts.append(rf"(?:{proj})(?:\..*)?\.(?:{'|'.join(self.extra['projector_lora'])})")
        return "^(?:" + "|".join(parts) + ")$"


_CHATML_END = "<|im_end|>"
_QWEN_SYSTEM = "You are a helpful assistant."

_QWEN_VL_LAYOUT = Layout(vision=("model.visual.",), projector=("model.visual.merger.",),
                         language=("model.language_model.",))
_QWEN_VL_LEGACY = Layout(vision=("visual.",), projector=("visual.merger.",), language=("model.",))
_HF_VLM_LAYOUT = Layout(vision=("model.vision_tower.",), projector=("model.multi_modal_projector.",),
                        language=("model.language_model.",))
_HF_VLM_LEGACY = Layout(vision=("vision_tower.",), projector=("multi_modal_projector.",),
                        language=("language_model.model.",), head=("language_model.lm_head.",))

FAMILIES: dict[str, Family] = {
    "qwen2-vl": Family(
        name="qwen2-vl", model_types=("qwen2_vl",), model_class="Qwen2VLForConditionalGeneration",
        processor_class="Qwen2VLProcessor",
        has_video_processor=True, layout=_QWEN_VL_LAYOUT, legacy_layout=_QWEN_VL_LEGACY,
        image_token="<|image_pad|>", end_of_turn=_CHATML_END, default_system=_QWEN_SYSTEM, mrope=True,
        extra={"vision_lora": ("qkv", "attn.proj", "fc1", "fc2"), "projector_lora": ("mlp.0", "mlp.2"),
               "patch_size": 14, "merge_size": 2, "reference": "Qwen/Qwen2-VL-7B-Instruct"},
    ),
    "qwen2.5-vl": Family(
        name="qwen2.5-vl", model_types=("qwen2_5_vl",), model_class="Qwen2_5_VLForConditionalGeneration",
        processor_class="Qwen2_5_VLProcessor",
        has_video_processor=True, layout=_QWEN_VL_LAYOUT, legacy_layout=_QWEN_VL_LEGACY,
        image_token="<|image_pad|>", end_of_turn=_CHATML_END, default_system=_QWEN_SYSTEM, mrope=True,
        notes="HuatuoGPT-Vision-7B-Qwen2.5VL; the recipe this tool follows.",
        extra={"vision_lora": ("qkv", "attn.proj", "gate_proj", "up_proj", "down_proj"),
               "projector_lora": ("mlp.0", "mlp.2"), "patch_size": 14, "merge_size": 2,
               "reference": "Qwen/Qwen2.5-VL-7B-Instruct"},
    ),
    "qwen3-vl": Family(
        name="qwen3-vl", model_types=("qwen3_vl",), model_class="Qwen3VLForConditionalGeneration",
        processor_class="Qwen3VLProcessor",
        has_video_processor=True,
        layout=Layout(vision=("model.visual.",),
                      projector=("model.visual.merger.", "model.visual.deepstack_merger_list."),
                      language=("model.language_model.",)),
        legacy_layout=None,  # Qwen3-VL arrived after the 4.52 re-layout
        image_token="<|image_pad|>", end_of_turn=_CHATML_END, default_system=None, mrope=True,
        extra={"vision_lora": ("qkv", "attn.proj", "linear_fc1", "linear_fc2"),
               "projector_lora": ("linear_fc1", "linear_fc2"), "patch_size": 16, "merge_size": 2,
               "reference": "Qwen/Qwen3-VL-8B-Instruct"},
    ),
    "llava": Family(
        name="llava", model_types=("llava",), model_class="LlavaForConditionalGeneration",
        processor_class="LlavaProcessor",
        has_video_processor=False, layout=_HF_VLM_LAYOUT, legacy_layout=_HF_VLM_LEGACY,
        image_token="<image>", end_of_turn=_CHATML_END, default_system=None,
        notes="transformers LlavaForConditionalGeneration: llava-1.5-hf, and HuatuoGPT-Vision-7B-hf / -34B-hf "
              "(Qwen2 / Yi backbones, `<|user|>`/`<|assistant|>` template, eos `<|endoftext|>`).",
        extra={"vision_lora": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
               "projector_lora": ("linear_1", "linear_2"), "reference": "llava-hf/llava-1.5-7b-hf"},
    ),
    "internvl": Family(
        name="internvl", model_types=("internvl",), model_class="InternVLForConditionalGeneration",
        processor_class="InternVLProcessor",
        has_video_processor=True, layout=_HF_VLM_LAYOUT, legacy_layout=_HF_VLM_LEGACY,
        image_token="<IMG_CONTEXT>", end_of_turn=_CHATML_END, default_system=None,
        notes="transformers InternVLForConditionalGeneration (the -hf checkpoints), not the remote-code chat model.",
        extra={"vision_lora": ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2"),
               "projector_lora": ("linear_1", "linear_2"), "reference": "OpenGVLab/InternVL3-1B-hf"},
    ),
    "causal-lm": Family(
        name="causal-lm", model_types=("qwen2", "qwen3", "llama"), model_class="AutoModelForCausalLM",
        processor_class=None, has_video_processor=False,
        layout=Layout(vision=(), projector=(), language=("model.",)), legacy_layout=None,
        image_token=None, end_of_turn=_CHATML_END, default_system=None,
        notes="text-only medical dialogue SFT (DISC-MedLLM style); Qwen2/2.5/3 and Llama checkpoints.",
        extra={"reference": "Qwen/Qwen2.5-7B-Instruct"},
    ),
    "glm4": Family(
        name="glm4", model_types=("glm", "glm4"), model_class="AutoModelForCausalLM",
        processor_class=None, has_video_processor=False,
        layout=Layout(vision=(), projector=(), language=("model.",)), legacy_layout=None,
        image_token=None, end_of_turn="<|endoftext|>", default_system=None,
        notes="GLM-4 text models in transformers form: glm-4-9b-chat-hf (`glm`) and GLM-4-0414 (`glm4`); "
              "`[gMASK]<sop><|user|>\\n...<|assistant|>\\n...` template.",
        # GLM fuses the MLP's gate and up projections into one gate_up_proj
        lora_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
        extra={"reference": "THUDM/glm-4-9b-chat-hf"},
    ),
}

# Checkpoints in their original, remote-code form: what they are and which transformers form to use instead.
ORIGINAL_FORMS = {
    "llava_qwen2": "HuatuoGPT-Vision-7B in its original LLaVA (remote-code) form; use the transformers form "
                   "FreedomIntelligence/HuatuoGPT-Vision-7B-hf",
    "llava_llama": "a LLaVA checkpoint in its original training-repo form (e.g. HuatuoGPT-Vision-34B); use the "
                   "transformers form (FreedomIntelligence/HuatuoGPT-Vision-34B-hf, llava-hf/llava-1.5-7b-hf)",
    "internvl_chat": "InternVL in its remote-code chat form; use the transformers conversion, e.g. "
                     "OpenGVLab/InternVL3-1B-hf",
    "chatglm": "GLM-4 in its remote-code form (THUDM/glm-4-9b-chat); use the transformers form THUDM/glm-4-9b-chat-hf",
}

FAMILY_NAMES = tuple(FAMILIES)


def family_for_model_type(model_type: str) -> Family:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    if model_type in ORIGINAL_FORMS:
        raise MedvlError(f"model_type '{model_type}' is {ORIGINAL_FORMS[model_type].split(';')[0]}, which needs "
                         "remote code and is not supported", fix=ORIGINAL_FORMS[model_type].split("; ", 1)[1])
    supported = ", ".join(f"{t} ({f.name})" for f in FAMILIES.values() for t in f.model_types)
    raise MedvlError(
        f"model_type '{model_type}' is not a supported family",
        fix=f"supported model types: {supported}. Remote-code models (e.g. the original InternVL chat model) "
            "are not supported; use their transformers '-hf' conversion.",
    )


def read_config(model_dir: str | Path) -> dict:
    """config.json of a local directory, or of a hub id already in the Hugging Face cache (read from the cache;
    with HF_HUB_OFFLINE=1 nothing is fetched)."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        cfg_path = _cached_config(str(model_dir))
    try:
        cfg = json.loads(cfg_path.read_text())
        cfg["model_type"]
    except (ValueError, KeyError, TypeError) as exc:
        raise MedvlError(f"config.json has no readable model_type ({exc})", where=str(cfg_path)) from None
    return cfg


def detect_family(model_dir: str | Path) -> Family:
    """Family of a checkpoint from its config.json `model_type` (a local directory or a cached hub id)."""
    return family_for_model_type(read_config(model_dir)["model_type"])


def _cached_config(model: str) -> Path:
    """config.json of a hub id from the local Hugging Face cache only: detection never waits on the network (a
    mistyped local path such as `runs/x` also looks like a hub id)."""
    looks_like_repo = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if looks_like_repo:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
        if isinstance(found, str):
            return Path(found)
        # `demo-out/tiny-qwen2.5-vl` (tiny_cpu's base, relative to the current directory) looks like a hub id
        # too: the hint covers both readings.
        raise MedvlError(f"'{model}' is neither a local directory (looked for {Path(model).absolute()}) nor a "
                         "model in the Hugging Face cache", where=model,
                         fix=f"a local folder: run from the directory that holds it, or give its absolute path "
                             f"(shipped recipes expect `medvl demo` to have built demo-out/ here); a hub id: "
                             f"download it first with `hf download {model}`")
    raise MedvlError(f"no config.json in {model}", where=str(model),
                     fix="point at a directory saved with save_pretrained (it holds config.json and weights), "
                         "or a hub id such as Qwen/Qwen2.5-VL-7B-Instruct that is in the Hugging Face cache")


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, FAMILY_NAMES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise MedvlError(f"unknown model family '{name}'", fix=f"{hint}choose one of: {', '.join(FAMILY_NAMES)}") from None


def detect_layout(param_names, family: Family) -> Layout:
    """Which of the family's two layouts a set of parameter names uses (a checkpoint on disk may be either;
    transformers 5 even writes Qwen2/2.5-VL, LLaVA and InternVL back in the old names when it saves).

    Names are counted against every group prefix of each layout; a name that matches a current prefix never
    counts as legacy (the legacy language prefix `model.` also matches the current `model.visual.`)."""
    if family.legacy_layout is None:
        return family.layout
    cur, old = family.layout, family.legacy_layout
    current_prefixes = cur.vision + cur.projector + cur.language
    legacy_prefixes = old.vision + old.projector + old.language
    names = list(param_names)
    current = sum(1 for n in names if n.startswith(current_prefixes))
    legacy = sum(1 for n in names if n.startswith(legacy_prefixes) and not n.startswith(current_prefixes))
    return cur if current >= legacy else old
