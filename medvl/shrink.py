"""A shrunk copy of a real checkpoint, built from its small files alone (no weights, no download).

Given a directory holding a checkpoint's `config.json`, `tokenizer_config.json`, chat template and processor
files, `build_shrunk` writes a model that is that checkpoint in every way but size: the same model class and
config keys (feature layers, projector, rope kind, tied head or not), the real special tokens with their roles
(bos, eos, pad, image placeholder), the real chat template, the real processor class with the real
normalisation, and widths cut to those of medvl.tiny (text hidden 64, 2 layers; vision hidden 32, 2 layers;
56-pixel images). The vocabulary is medvl.tiny's byte-level BPE plus the real added tokens, and every token id
the config names (image token, eos list, ...) is remapped to the new id of the same token.

This is how tests run the whole recipe (prepare-data, train, eval, export, reload) on each real checkpoint's
format without its 2-20 GB of weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from medvl.errors import MedvlError
from medvl.families import Family, family_for_model_type

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_window_layers=2, max_position_embeddings=2048)
VISION = dict(hidden_size=32, embed_dim=32, intermediate_size=64, num_hidden_layers=2, depth=2, num_attention_heads=2,
              num_heads=2, out_hidden_size=64, projection_dim=32, num_position_embeddings=64)
IMAGE_PX = 56  # CLIP / InternViT input side: 4 x 4 patches of 14
_TOKEN_KEY = re.compile(r"(^|_)(token_id|token_index|token_ids)$")


def read_real_files(real_dir: str | Path) -> dict:
    """The small files of a checkpoint directory, parsed; missing optional ones are None."""
    real_dir = Path(real_dir)

    def load(name):
        p = real_dir / name
        return json.loads(p.read_text()) if p.is_file() else None

    files = {k: load(f"{k}.json") for k in ("config", "tokenizer_config", "preprocessor_config", "processor_config")}
    if files["config"] is None or files["tokenizer_config"] is None:
        raise MedvlError(f"{real_dir} needs at least config.json and tokenizer_config.json", where=str(real_dir))
    template = (load("chat_template.json") or {}).get("chat_template")
    if (real_dir / "chat_template.jinja").is_file():
        template = (real_dir / "chat_template.jinja").read_text()
    files["chat_template"] = template or files["tokenizer_config"].get("chat_template")
    return files


def _added_tokens(tc: dict) -> list[tuple[int, str, bool]]:
    return sorted((int(i), t["content"], bool(t.get("special"))) for i, t in tc.get("added_tokens_decoder", {}).items())


def shrunk_tokenizer(files: dict, family: Family):
    """medvl.tiny's BPE with the real added tokens (in id order), the real bos/eos/pad/unk, the real template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    from medvl.tiny import _train_bpe

    tc = files["tokenizer_config"]
    vocab, merges = _train_bpe(600, [])
    named = dict(tc.get("extra_special_tokens") or {})
    if family.name == "llava":
        named.setdefault("image_token", family.image_token)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None, pad_token=None,
                         extra_special_tokens=named or None)
    wanted = [(name, special) for _, name, special in _added_tokens(tc)]
    wanted += [(name, True) for name in named.values() if name not in {n for n, _ in wanted}]
    for name, special in wanted:
        if name not in tok.get_vocab():
            tok.add_tokens([AddedToken(name, special=special, normalized=False)], special_tokens=special)
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = tc.get(role)
        value = value.get("content") if isinstance(value, dict) else value
        if value:
            setattr(tok, role, value)
    tok.add_bos_token = bool(tc.get("add_bos_token", False))  # llava-1.5 (Llama): <s> before every sequence
    tok.chat_template = files["chat_template"]
    tok.padding_side = "right"
    return tok


def _remap_ids(node, id_to_name: dict[int, str], tok):
    """Every `*_token_id(s)` / `*_token_index` in a config tree, from the real id to the shrunk id of its token."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if _TOKEN_KEY.search(k) and v is not None and not isinstance(v, (dict, bool)):
                ids = [tok.convert_tokens_to_ids(id_to_name[i]) for i in (v if isinstance(v, list) else [v])
                       if i in id_to_name]
                out[k] = (ids if isinstance(v, list) else ids[0]) if ids else None
            else:
                out[k] = _remap_ids(v, id_to_name, tok)
        return out
    return node


def _shrink_rope(text: dict) -> None:
    """mRoPE sections are halves of the head dimension: rescale them to the shrunk head_dim 16 (sum 8)."""
    for key in ("rope_scaling", "rope_parameters"):
        rope = text.get(key)
        if isinstance(rope, dict) and rope.get("mrope_section"):
            sec = rope["mrope_section"]
            scaled = [max(1, round(s * 8 / sum(sec))) for s in sec]
            scaled[0] += 8 - sum(scaled)
            rope["mrope_section"] = scaled


def shrunk_config(files: dict, family: Family, tok) -> dict:
    raw = json.loads(json.dumps(files["config"]))
    id_to_name = {i: name for i, name, _ in _added_tokens(files["tokenizer_config"])}
    raw = _remap_ids(raw, id_to_name, tok)
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    text.update(TEXT, vocab_size=len(tok))
    if "vocab_size" in raw:
        raw["vocab_size"] = len(tok)
    if "head_dim" in text or text.get("model_type") in ("qwen3_vl_text",):
        text["head_dim"] = 16
    text.pop("layer_types", None)  # per-layer lists sized for the real depth
    _shrink_rope(text)
    _shrink_rope(raw)
    vision = raw.get("vision_config")
    if isinstance(vision, dict):
        for k, v in VISION.items():
            if k in vision:
                vision[k] = v
        if raw["model_type"] == "qwen2_vl":
            vision["hidden_size"] = TEXT["hidden_size"]  # Qwen2-VL's merger maps embed_dim to the LM width
        if "out_hidden_size" in vision:
            vision["out_hidden_size"] = TEXT["hidden_size"]
        if "fullatt_block_indexes" in vision:
            vision["fullatt_block_indexes"] = [1]
        if "deepstack_visual_indexes" in vision:
            vision["deepstack_visual_indexes"] = [0]
        if "image_size" in vision:
            vision["image_size"] = [IMAGE_PX, IMAGE_PX] if isinstance(vision["image_size"], list) else IMAGE_PX
    if family.name == "internvl":
        raw["image_seq_length"] = (IMAGE_PX // 14) ** 2 // 4  # pixel shuffle 0.5: 16 patches -> 4 tokens
    elif family.name == "llava" and "image_seq_length" in raw:
        raw["image_seq_length"] = (IMAGE_PX // 14) ** 2
    return raw


def _shrunk_processor(files: dict, family: Family, tok):
    import transformers as T

    from medvl.models import image_only_processor_class

    if not family.is_vision:
        return tok
    pre = files["preprocessor_config"] or {}
    norm = {k: pre[k] for k in ("image_mean", "image_std") if k in pre}
    if family.mrope:
        patch, merge = pre.get("patch_size", family.extra["patch_size"]), pre.get("merge_size", 2)
        factor = patch * merge
        # 4..64 merged tokens per image, as medvl.tiny
        size = {"shortest_edge": 4 * factor * factor, "longest_edge": 64 * factor * factor}
        ip = T.Qwen2VLImageProcessorPil(size=size, patch_size=patch, merge_size=merge,
                                        temporal_patch_size=pre.get("temporal_patch_size", 2), **norm)
    elif family.name == "llava":
        ip = T.CLIPImageProcessorPil(size={"shortest_edge": IMAGE_PX},
                                     crop_size={"height": IMAGE_PX, "width": IMAGE_PX}, **norm)
    else:
        ip = T.GotOcr2ImageProcessorPil(size={"height": IMAGE_PX, "width": IMAGE_PX}, crop_to_patches=False,
                                        max_patches=4, min_patches=1, **norm)
    kwargs = {k: v for k, v in (files["processor_config"] or {}).items() if k != "processor_class"}
    if family.name == "internvl":
        kwargs["image_seq_length"] = (IMAGE_PX // 14) ** 2 // 4
    return image_only_processor_class(family)(image_processor=ip, tokenizer=tok, chat_template=files["chat_template"],
                                              **kwargs)


def build_shrunk(real_dir: str | Path, out_dir: str | Path | None = None, *, seed: int = 0, overwrite: bool = False):
    """(model, processor) shrunk from a real checkpoint's small files; saved to out_dir (atomically) if given.
    The processor keeps the real files' quirks (HuatuoGPT-Vision-7B-hf's `patch_size: null`): loading it back
    goes through medvl.models.load_processor exactly as the real checkpoint would."""
    from medvl.engine.dryrun import config_from_dict
    from medvl.tiny import seeded_model

    files = read_real_files(real_dir)
    family = family_for_model_type(files["config"]["model_type"])
    tok = shrunk_tokenizer(files, family)
    config = config_from_dict(shrunk_config(files, family, tok))
    eos = getattr(config.get_text_config(), "eos_token_id", None) or tok.eos_token_id
    return seeded_model(family, config, tok, eos, _shrunk_processor(files, family, tok), seed=seed, out_dir=out_dir,
                        overwrite=overwrite)
