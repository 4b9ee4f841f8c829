"""Loading a checkpoint of any supported family: the model class, the processor, the dtype.

Processors of the Qwen-VL and InternVL families carry a video processor, and transformers cannot build one
without torchvision (which has no CPU build to pair with our pinned torch). On such machines medvl loads an
image-only subclass of the family's processor: same tokenizer, same image processor, same placeholder
expansion, no video. Where torchvision imports, the stock processor is used.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

from medvl.errors import MedvlError
from medvl.families import Family, detect_family, get_family

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # medvl name -> torch name; the one table


def tokenizer_of(processor):
    """The tokenizer inside a processor; text-only families use the tokenizer itself as their processor."""
    return getattr(processor, "tokenizer", processor)


def unwrap_model(model):
    """The transformers model under the wrappers training puts around it: DDP and DeepSpeed's engine (`.module`),
    then peft (`get_base_model`). By type: a DeepSpeedEngine forwards unknown attributes (get_output_embeddings)
    to the model, yet its own `config` is DeepSpeed's, so asking "does it look like a model" stops too early."""
    import sys

    import torch

    wrappers = (torch.nn.parallel.DistributedDataParallel,)
    # Only when DeepSpeed is loaded: no model can be inside its engine otherwise, and importing it costs seconds.
    engine = getattr(sys.modules.get("deepspeed.runtime.engine"), "DeepSpeedEngine", None)
    if engine is not None:
        wrappers += (engine,)
    while isinstance(model, wrappers):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.cache
def torchvision_usable() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # a CUDA-linked torchvision next to CPU torch fails at import with a RuntimeError
        return False
    return True


def image_only_processor_class(family: Family):
    """The family's processor class, minus the video processor where that one cannot be built.

    ProcessorMixin derives the processor's parts from its __init__ signature, so a subclass whose __init__ has
    no `video_processor` parameter is a processor of (image_processor, tokenizer) only.
    """
    return _image_only_class(family.processor_class) if family.has_video_processor else _stock_class(family)


def _stock_class(family: Family):
    import transformers as T

    return getattr(T, family.processor_class)


@functools.cache
def _image_only_class(processor_class: str):
    import transformers as T

    base = getattr(T, processor_class)
    # transformers reads a processor's accepted arguments from __init__.__code__, so each variant spells its
    # parameters out; InternVL's image_seq_length must survive a save/load round trip.
    if processor_class == "InternVLProcessor":
        def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                     **kwargs):
            kwargs.pop("video_processor", None)
            base.__init__(self, image_processor=image_processor, tokenizer=tokenizer, image_seq_length=image_seq_length,
                          chat_template=chat_template, **kwargs)
    else:
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            kwargs.pop("video_processor", None)
            base.__init__(self, image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                          **kwargs)

    # Same class name as the base: processor_config.json then names the stock class, so a saved or exported
    # directory loads with stock transformers (AutoProcessor) on a machine that has torchvision.
    return type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__,
                                         "__doc__": f"{base.__name__} without the video processor."})


def load_processor(path: str | Path, family: Family | None = None):
    """Processor (or tokenizer, for text-only families) of a local checkpoint directory or hub id."""
    family = family or detect_family(path)
    if not family.is_vision:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    if family.has_video_processor and torchvision_usable():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)
    processor = image_only_processor_class(family).from_pretrained(path)
    if family.name == "llava":
        _complete_llava_processor(processor, path)
    return processor


def _complete_llava_processor(processor, path) -> None:
    """Fill the visual-token settings a LLaVA processor_config.json left out from the model's own config.

    HuatuoGPT-Vision-7B-hf ships `patch_size: null` (the 34B-hf no processor_config.json at all): the processor
    then leaves `<image>` as one token and the model finds 1 image token where it expects 576. CLIP-L/14 at 336 px
    gives 24 x 24 patches plus a CLS token that the "default" feature strategy drops: 576."""
    if getattr(processor, "patch_size", 0) is not None:
        return
    from medvl.families import read_config

    cfg = read_config(path)
    vision = cfg.get("vision_config") or {}
    processor.patch_size = vision.get("patch_size", 14)
    processor.vision_feature_select_strategy = cfg.get("vision_feature_select_strategy", "default")
    # CLIP prepends a CLS token (one additional token); SigLIP towers have none
    processor.num_additional_image_tokens = 1 if vision.get("model_type", "clip_vision_model").startswith("clip") else 0


def model_class(family: Family):
    import transformers as T

    return getattr(T, family.model_class)


def apply_resolution(processor, family: Family, min_pixels: int | None, max_pixels: int | None) -> None:
    """Set the per-image pixel range on a Qwen-VL image processor (the only families with a variable number of
    visual tokens per image); the same range then holds in training, eval and chat."""
    if not family.mrope or (min_pixels is None and max_pixels is None):
        return
    ip = processor.image_processor
    size = dict(ip.size)
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    ip.size = size


# Weight files a save_pretrained folder may hold, in transformers' order of preference.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
_SAFETENSORS_MAX_HEADER = 100 * 2**20  # the format's own limit (safetensors refuses larger headers)


def check_weight_file(path: Path) -> None:
    """One weight file is complete and of the format its name says, read from its header only (no torch).

    A safetensors file is an 8-byte header length, a JSON header giving every tensor's byte range, then the
    data: a truncated file ends before the last range, random bytes give an absurd length or invalid JSON.
    A .bin file is a torch zip archive, whose directory sits at the end (a truncated one is no longer a zip).
    """
    import struct
    import zipfile

    path = Path(path)
    fix = "copy or download the model again (compare the file size with its source)"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if path.suffix == ".safetensors":
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if not 0 < n <= min(_SAFETENSORS_MAX_HEADER, size - 8):
                    raise MedvlError(f"{path} is not a safetensors file (header length {n}, file {size} bytes)",
                                     where=str(path), fix=fix)
                try:
                    header = json.loads(f.read(n))
                    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                              default=0)
                except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                    raise MedvlError(f"{path} has a corrupt safetensors header", where=str(path), fix=fix) from None
                if 8 + n + end > size:
                    raise MedvlError(f"{path} is truncated: its header describes {8 + n + end} bytes, the file has "
                                     f"{size}", where=str(path), fix=fix)
            elif path.suffix == ".bin" and not zipfile.is_zipfile(f):
                raise MedvlError(f"{path} is truncated or not a torch weight file (not a zip archive)",
                                 where=str(path), fix=fix)
    except OSError as exc:
        raise MedvlError(f"cannot read the weight file {path}: {exc.strerror or exc}", where=str(path),
                         fix="check that the file exists and is readable by you") from None


def check_model_weights(path: str | Path) -> None:
    """A local model folder holds complete weights (every shard of its index, each whole); hub ids pass through.
    Called before transformers reads a folder, whose own errors for these cases are tracebacks."""
    root = Path(path)
    if not root.is_dir():
        return
    present = [name for name in WEIGHT_FILES if (root / name).is_file()]
    if not present:
        raise MedvlError(f"the model folder {root} holds no weights (none of {', '.join(WEIGHT_FILES[:3])}, ...)",
                         where=str(root), fix="copy the weight files next to config.json, or point at the folder "
                                              "that has them (an interrupted download leaves only the configs)")
    name = present[0]
    if name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads((root / name).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MedvlError(f"cannot read the shard index {root / name}: {exc}", where=str(root / name),
                             fix="copy or download the model again") from None
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise MedvlError(f"{len(missing)} of {len(shards)} weight shards listed in {name} are missing "
                             f"(e.g. {missing[0]})", where=str(root / missing[0]),
                             fix="copy or download the missing shards")
        for shard in shards:
            check_weight_file(root / shard)
    else:
        check_weight_file(root / name)


def load_model(path: str | Path, family: Family | str | None = None, *, dtype: str = "fp32",
               attn_implementation: str | None = None, trust_remote_code: bool = False, device_map=None,
               quantize_4bit: bool = False):
    """The model of a checkpoint, as its family's class. `trust_remote_code` stays off unless asked for."""
    import torch

    if isinstance(family, str):
        family = get_family(family)
    family = family or detect_family(path)
    if dtype not in DTYPES:
        raise MedvlError(f"unknown dtype '{dtype}'", fix=f"use one of {', '.join(DTYPES)}")
    kwargs = dict(dtype=getattr(torch, DTYPES[dtype]), trust_remote_code=trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantize_4bit:  # QLoRA: NF4 base weights, compute in the chosen dtype
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
    check_model_weights(path)
    try:
        return model_class(family).from_pretrained(path, **kwargs)
    except ImportError as exc:
        if "flash_attn" in str(exc) or "flash_attention" in str(exc):
            raise MedvlError(f"flash attention was asked for but is not usable here: {exc}",
                             fix="set model.attn_implementation: sdpa, or install flash-attn on a CUDA machine "
                                 "(`medvl doctor` shows what is available)") from None
        raise
