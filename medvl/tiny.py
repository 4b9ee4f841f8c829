"""Random tiny models of every family, built offline in well under a second.

Each tiny model is real in every way but size: a byte-level BPE tokenizer trained here on a small medical/VQA
corpus (so chat templates, special tokens and the processor's placeholder expansion behave as with a real
checkpoint), the family's chat template, the family's real processor, and a 2-layer model with random weights,
saved in the standard `save_pretrained` layout and reloadable with `from_pretrained` under HF_HUB_OFFLINE=1.
Tests, the demo and the benchmarks all stand on these.
"""

from __future__ import annotations

from pathlib import Path

from medvl.families import Family, get_family

# Qwen's pre-tokenizer split: contractions, letters, single digits, punctuation runs, newlines, spaces.
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

_CORPUS = """\
You are a helpful assistant. You are a medical imaging assistant.
What is the modality of this image? This is an axial CT scan of the chest. This is a T1-weighted MR image.
Is there a pleural effusion? No. Yes. Is the lesion in the left lung? The right kidney is enlarged.
Please describe this picture. The image shows a chest X-ray with clear lung fields and no consolidation.
Which organ is abnormal in this image? liver, kidney, spleen, heart, lung, brain, bone, colon, pancreas.
Answer with the option's letter from the given choices directly. A. B. C. D. E.
what is the blue shape? what color is the shape? does the image contain a rectangle? is there a triangle?
circle green red gray yes teal black rectangle yellow triangle brown blue no shape color image contain
The patient presents with fever and cough. Pathology slide shows granulomatous inflammation.
ultrasound dermoscopy microscopy fundus photography optical coherence tomography radiograph histology
"""


def _train_bpe(vocab_size: int, specials: list[str]):
    """A byte-level BPE like Qwen's, trained on the corpus above; returns (vocab dict, merges list)."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _family_specials(family: Family) -> tuple[list[str], dict[str, str]]:
    """Special tokens the family's processor and template need, and named ones the tokenizer must expose."""
    chatml = ["<|im_start|>", "<|im_end|>"]
    if family.name in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"):
        qwen = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                "<|video_pad|>"]
        return chatml + qwen, {}
    if family.name == "llava":
        return chatml + ["<image>"], {"image_token": "<image>"}
    if family.name == "internvl":
        names = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"}
        return chatml + list(names.values()), names
    if family.name == "glm4":  # GLM-4's own special tokens (glm-4-9b-chat-hf tokenizer_config.json)
        return ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
                "<|observation|>"], {}
    return chatml, {}


def build_tokenizer(family: Family, vocab_size: int = 600):
    from transformers import Qwen2Tokenizer

    specials, named = _family_specials(family)
    vocab, merges = _train_bpe(vocab_size, specials)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=family.end_of_turn,
                         pad_token="<|endoftext|>", extra_special_tokens=named or None)
    tok.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in named.values()]})
    tok.add_tokens([s for s in named.values()], special_tokens=True)
    tok.chat_template = chat_template(family)
    tok.padding_side = "right"
    return tok


# ---------------------------------------------------------------------------------------------------------
# Chat templates. ChatML for every family here; they differ in the default system prompt and in what one image
# content block becomes. Same conventions as the released checkpoints of each family.

def _image_block(family: Family) -> str:
    return {
        "qwen2-vl": "<|vision_start|><|image_pad|><|vision_end|>",
        "qwen2.5-vl": "<|vision_start|><|image_pad|><|vision_end|>",
        "qwen3-vl": "<|vision_start|><|image_pad|><|vision_end|>",
        "llava": "<image>\n",
        "internvl": "<IMG_CONTEXT>\n",
    }.get(family.name, "")


# glm-4-9b-chat's template (tests/fixtures/real/glm-4-9b-chat-hf) without its tools branch: no system prompt by
# default, `<|assistant|>` as generation prompt, the newline after it produced by the model, no end-of-turn token.
_GLM4_TEMPLATE = ("[gMASK]<sop>{% for item in messages %}{% if item['content'] %}<|{{ item['role'] }}|>"
                  "{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chat_template(family: Family) -> str:
    if family.name == "glm4":
        return _GLM4_TEMPLATE
    image = _image_block(family)
    system = (
        "{% if messages[0].role != 'system' %}<|im_start|>system\n" + family.default_system + "<|im_end|>\n{% endif %}"
        if family.default_system else ""
    )
    return (
        system
        + "{% for message in messages %}<|im_start|>{{ message.role }}\n"
        "{% if message.content is string %}{{ message.content }}"
        "{% else %}{% for block in message.content %}"
        "{% if block.type == 'image' or 'image' in block or 'image_url' in block %}{{ '" + image.replace("\n", "\\n")
        + "' }}{% elif block.type == 'text' %}{{ block.text }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# ---------------------------------------------------------------------------------------------------------
# Model configs: text hidden 64, 2 layers, 4 heads (head_dim 16), 2 KV heads; vision hidden 32, depth 2.
# About 0.2-0.4 M parameters: forward + backward on CPU in tens of milliseconds.

SIZES = {
    # tests: ~0.2-0.4 M parameters, forward+backward in ~10 ms
    "tiny": dict(hidden=64, layers=2, vision_hidden=32, vision_depth=2),
    # the demo: ~2 M parameters, enough capacity to learn easy-vqa's shapes and colours in minutes on CPU
    "small": dict(hidden=192, layers=4, vision_hidden=96, vision_depth=4),
}


def _text_config(tok, size: dict, **extra) -> dict:
    # Token ids set here: the stock configs default to Qwen's real ids (151643...), outside this vocabulary.
    cfg = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=None,
               eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), hidden_size=size["hidden"],
               intermediate_size=2 * size["hidden"], num_hidden_layers=size["layers"],
               # head_dim 16 at every size, so the mRoPE split [4, 2, 2] (= head_dim / 2) always fits
               num_attention_heads=size["hidden"] // 16, num_key_value_heads=size["hidden"] // 32, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
    cfg.update(extra)
    return cfg


def _model_config(family: Family, tok, size: dict):
    import transformers as T

    ids = lambda t: tok.convert_tokens_to_ids(t)  # noqa: E731
    if family.name in ("qwen2-vl", "qwen2.5-vl"):
        # mrope_section halves of head_dim 16 -> 8 = temporal 4 + height 2 + width 2.
        rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2]}
        vh, depth = size["vision_hidden"], size["vision_depth"]
        vision = dict(depth=depth, num_heads=vh // 16, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        if family.name == "qwen2-vl":
            vision.update(embed_dim=vh, hidden_size=size["hidden"], mlp_ratio=2)
            cls = T.Qwen2VLConfig
        else:
            vision.update(hidden_size=vh, out_hidden_size=size["hidden"], intermediate_size=2 * vh, window_size=56,
                          fullatt_block_indexes=[depth - 1])
            cls = T.Qwen2_5_VLConfig
        return cls(text_config=_text_config(tok, size, rope_parameters=rope), vision_config=vision,
                   image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                   vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                   tie_word_embeddings=False)
    if family.name == "qwen3-vl":
        rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
        vh = size["vision_hidden"]
        vision = dict(depth=size["vision_depth"], hidden_size=vh, intermediate_size=2 * vh, num_heads=vh // 16,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=size["hidden"],
                      num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
        return T.Qwen3VLConfig(text_config=_text_config(tok, size, rope_parameters=rope, head_dim=16), vision_config=vision,
                               image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                               vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                               tie_word_embeddings=False)
    vh, depth = size["vision_hidden"], size["vision_depth"]
    text = dict(_text_config(tok, size), model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if family.name == "llava":
        # CLIP 56x56 with patch 14: 16 patches (+1 CLS, dropped by the "default" feature strategy) -> 16 tokens.
        vision = dict(model_type="clip_vision_model", hidden_size=vh, intermediate_size=2 * vh, num_hidden_layers=depth,
                      num_attention_heads=vh // 16, image_size=56, patch_size=14, projection_dim=vh)
        return T.LlavaConfig(text_config=text, vision_config=vision, image_token_id=ids("<image>"),
                             vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=16,
                             tie_word_embeddings=False)
    if family.name == "internvl":
        # 56x56 tiles, patch 14 -> 16 patches, pixel-shuffle 0.5 -> 4 tokens per tile.
        vision = dict(hidden_size=vh, intermediate_size=2 * vh, num_hidden_layers=depth, num_attention_heads=vh // 16,
                      image_size=[56, 56], patch_size=[14, 14], use_mask_token=False)
        return T.InternVLConfig(text_config=text, vision_config=vision, image_token_id=ids("<IMG_CONTEXT>"),
                                image_seq_length=4, downsample_ratio=0.5, vision_feature_layer=-1,
                                tie_word_embeddings=False)
    if family.name == "glm4":
        # GLM-4: half the head dimension rotated (partial_rotary_factor 0.5), fused gate_up_proj, attention bias
        text.update(model_type="glm4", head_dim=16, attention_bias=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})
        return T.Glm4Config(**text)
    return T.Qwen2Config(**text)


def _processor(family: Family, tok):
    import transformers as T

    from medvl.models import image_only_processor_class

    if family.name in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"):
        patch = family.extra["patch_size"]
        factor = patch * 2
        # 4..64 merged tokens per image: a 64x64 easy-vqa image becomes 2x2 = 4 visual tokens.
        image_processor = T.Qwen2VLImageProcessorPil(
            size={"shortest_edge": 4 * factor * factor, "longest_edge": 64 * factor * factor},
            patch_size=patch, merge_size=2, temporal_patch_size=2)
    elif family.name == "llava":
        image_processor = T.CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    elif family.name == "internvl":
        image_processor = T.GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=False,
                                                     max_patches=4, min_patches=1)
    else:
        return tok
    cls = image_only_processor_class(family)
    kwargs = {}
    if family.name == "llava":
        kwargs = dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if family.name == "internvl":
        kwargs = dict(image_seq_length=4)
    return cls(image_processor=image_processor, tokenizer=tok, chat_template=chat_template(family), **kwargs)


def build_tiny(family: str | Family, out_dir: str | Path | None = None, *, seed: int = 0, overwrite: bool = False,
               size: str = "tiny"):
    """Build (model, processor) for a family; if out_dir is given, save both there with save_pretrained
    (atomically: an interrupted build leaves no half-written directory).

    The processor is the tokenizer for text-only families. Weights are random but seeded: the same seed gives
    bit-identical weights on the same machine.
    """
    family = get_family(family) if isinstance(family, str) else family
    if size not in SIZES:
        from medvl.errors import MedvlError

        raise MedvlError(f"unknown tiny model size '{size}'", fix=f"choose one of: {', '.join(SIZES)}")
    tok = build_tokenizer(family)
    config = _model_config(family, tok, SIZES[size])
    eos = tok.convert_tokens_to_ids(family.end_of_turn)
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None:
            cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = tok.pad_token_id, eos, None
    return seeded_model(family, config, tok, eos, _processor(family, tok), seed=seed, out_dir=out_dir,
                        overwrite=overwrite)


def seeded_model(family: Family, config, tok, eos: int, processor, *, seed: int, out_dir: str | Path | None = None,
                 overwrite: bool = False):
    """(model, processor): random weights of the family's model class for `config`, seeded, generating greedily
    and stopping at `eos`; saved with the processor to out_dir (atomically) if given. Tiny and shrunk models
    (medvl/shrink.py) are both made here."""
    import torch
    import transformers as T

    from medvl.models import model_class

    torch.manual_seed(seed)
    cls = model_class(family)
    model = cls.from_config(config) if cls is T.AutoModelForCausalLM else cls(config)  # the auto class has no init
    gen = model.generation_config
    gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen.eos_token_id = eos
    gen.bos_token_id = None
    gen.do_sample = False
    if out_dir is not None:
        from medvl.atomic import atomic_dir

        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
    return model, processor
