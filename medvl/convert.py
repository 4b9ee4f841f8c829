"""`medvl convert`: a VLM whose vision tower and projector come from a VL model and whose language model is an
LLM, proven to compute exactly what the LLM computes on text.

    result = convert("Qwen2.5-VL-7B-Instruct", "Qwen2.5-7B-Instruct", "Qwen2.5-VL-7B-Base")

HuatuoGPT-Vision's convert_llm_to_vl.py copied each VL parameter whose name also existed in the LLM. Since
transformers 4.52 the VL model's names are `model.language_model.*` in memory, so only `lm_head` matched and the
"converted" model was the unchanged VL model, silently (upstreams.md 1.7). Here every name is mapped explicitly,
and the command fails unless the decoder was replaced and the result's logits equal the LLM's.

How, in order:
1. Compatibility, before any weight is read: the decoder shape (hidden size, layers, heads, KV heads,
   intermediate size, head dim) and the text model type must agree; every difference is listed at once.
2. Vocabulary (`vocab="resize"`, the default): the result has max(LLM rows, rows the VL tokenizer needs). Rows of
   tokens both tokenizers know come from the LLM; rows of tokens only the VL tokenizer knows (its vision
   specials, when the LLM's tokenizer lacks them) and the VL's padding rows beyond the LLM's come from the VL
   model, so the processor's <|image_pad|> etc. keep the embeddings the VL model was trained with. A token the
   two tokenizers place at different ids is refused (the rows would have to be permuted and the LLM's logits
   would no longer line up). `vocab="refuse"` stops on any vocabulary difference.
   Qwen2.5-7B and Qwen2.5-VL-7B both have 152,064 rows and the same 151,665 tokens: every row comes from the LLM.
3. Tied embeddings follow the LLM: an LLM with tie_word_embeddings (Qwen2.5 0.5B-3B, Qwen3 0.6B-4B) has no
   lm_head on disk, so the result ties too (both config flags set, the VL's lm_head dropped); an untied LLM gives
   an untied result whose lm_head is the LLM's, even if the VL model was tied.
4. Text-config values that change the maths come from the LLM (MATH_KEYS: rope theta and scaling, RMS-norm
   epsilon, max positions, sliding window, activation...); the VL's mRoPE sections stay (they split the rotary
   dimensions between time, height and width and have no text-only counterpart).
5. Weights stream at the safetensors level: each output shard is assembled from memory-mapped inputs and written
   before the next is built, so memory holds one shard (<= max_shard_size), not a model. The output uses the
   names stock transformers writes for the family (its save_pretrained restores the original checkpoint names:
   `model.layers.*` + `visual.*` for Qwen2/2.5-VL, LLaVA and InternVL `language_model.*`; Qwen3-VL was released
   with `model.language_model.*`), so vLLM and older transformers read it too. Inputs may use either layout.
6. Verification in the temporary output: the LLM's and the result's fp32 logits on a text probe must agree to
   1e-4 on every column whose row came from the LLM, and an image prompt must run through the copied processor.
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from medvl.errors import MedvlError
from medvl.families import Family, Layout, detect_family, detect_layout
from medvl.probe import LOGITS_TOL, PROBE_TEXT, is_big, probe_inputs, run_probe
from medvl.progress import NullProgress
from medvl.shards import Weights, parse_size, write_streamed

SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "head_dim")
MATH_KEYS = ("rope_parameters", "rms_norm_eps", "max_position_embeddings", "hidden_act", "sliding_window",
             "use_sliding_window", "max_window_layers", "layer_types", "attention_bias", "attention_dropout")
MROPE_KEYS = ("mrope_section", "mrope_interleaved")  # the VL model's own: how rotary dims split over t/h/w
# The decoder inside each VL text model, by model_type; other families embed a stock text config (LLaVA: qwen2).
TEXT_PAIRS = {"qwen2_vl_text": ("qwen2",), "qwen2_5_vl_text": ("qwen2",), "qwen3_vl_text": ("qwen3",)}
LLM_EMBED, LLM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
                   "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                   "generation_config.json")


@dataclass
class VocabPlan:
    rows: int  # rows of the result's embedding and head
    llm_rows: int
    vl_rows: int
    from_vl: list[int]  # row ids taken from the VL model
    vl_tokens: list[str]  # the VL tokenizer's tokens among them (the other rows are padding)

    @property
    def identical(self) -> bool:
        return self.rows == self.llm_rows == self.vl_rows and not self.from_vl


@dataclass
class ConvertResult:
    out: Path
    family: str
    vl_layout: str  # "current" or "legacy": the names the VL input used
    out_layout: str
    from_llm: int  # tensors
    from_vl: int
    replaced: int  # VL language-model tensors whose values were replaced
    decoder_replaced: int
    dropped: list[str]
    vocab: VocabPlan
    tied: bool
    config_from_llm: list[tuple[str, object, object]]  # (key, VL value, LLM value) for every value that changed
    dtype: str
    shards: int
    bytes: int
    probe_tokens: int
    logits_columns: int
    logits_max_abs_diff: float
    image_tokens: int
    image_generated: str
    seconds: float


def rename(name: str, src: Layout, dst: Layout) -> str:
    """A parameter name from one layout of a family to the other (`model.layers.0...` <-> `model.language_model.
    layers.0...`); names outside every group stay as they are."""
    if src == dst:
        return name
    for group in ("projector", "vision", "head", "language"):
        for prefix, target in zip(getattr(src, group), getattr(dst, group)):
            if name.startswith(prefix):
                return target + name[len(prefix):]
    return name


def llm_name(out_name: str, layout: Layout) -> str:
    """The causal-LM name that fills a VL language-model name: `<language prefix>X` <- `model.X`,
    `<head prefix>weight` <- `lm_head.weight`."""
    for prefix in layout.head:
        if out_name.startswith(prefix):
            return "lm_head." + out_name[len(prefix):]
    for prefix in layout.language:
        if out_name.startswith(prefix):
            return "model." + out_name[len(prefix):]
    raise ValueError(out_name)


# ---------------------------------------------------------------------------------------------------------
# checks

def check_configs(vl_text, llm_text, vl: Path, llm: Path) -> None:
    problems = []
    allowed = TEXT_PAIRS.get(vl_text.model_type, (vl_text.model_type,))
    if llm_text.model_type not in allowed:
        problems.append(f"model_type: the VL model's language model is {vl_text.model_type} "
                        f"(needs an LLM of type {' or '.join(allowed)}), the LLM is {llm_text.model_type}")
    for key in SHAPE_KEYS:
        a, b = _shape_value(vl_text, key), _shape_value(llm_text, key)
        if a != b:
            problems.append(f"{key}: VL {a}, LLM {b}")
    if problems:
        raise MedvlError("the LLM does not fit the VL model's language model:\n  " + "\n  ".join(problems),
                         where=f"--vl {vl}  --llm {llm}",
                         fix="pair models of one generation and size (Qwen2.5-7B-Instruct with Qwen2.5-VL-7B-Instruct, "
                             "Qwen2 with Qwen2-VL, Qwen3 with Qwen3-VL)")


def _shape_value(cfg, key):
    value = getattr(cfg, key, None)
    if key == "head_dim" and value is None:  # configs without it derive it: hidden / heads
        return cfg.hidden_size // cfg.num_attention_heads
    return value


def plan_vocab(vl_tok, llm_tok, vl_rows: int, llm_rows: int, special_ids: dict, policy: str) -> VocabPlan:
    vl_vocab, llm_vocab = vl_tok.get_vocab(), llm_tok.get_vocab()
    moved = [(t, llm_vocab[t], i) for t, i in vl_vocab.items() if t in llm_vocab and llm_vocab[t] != i]
    if moved:
        ex = ", ".join(f"{t!r} (LLM {a}, VL {b})" for t, a, b in sorted(moved, key=lambda m: m[2])[:3])
        raise MedvlError(f"the tokenizers place {len(moved)} shared tokens at different ids, e.g. {ex}",
                         fix="convert only between models of one tokenizer family (Qwen2.5 with Qwen2.5-VL)")
    vl_only = {i: t for t, i in vl_vocab.items() if t not in llm_vocab}
    needed = max([*vl_vocab.values(), *[v for v in special_ids.values() if v is not None]]) + 1
    if needed > vl_rows:
        raise MedvlError(f"the VL tokenizer uses id {needed - 1} but the VL model has {vl_rows} embedding rows",
                         fix="the VL model directory is inconsistent; re-download it")
    rows = max(llm_rows, needed)
    from_vl = sorted(set(vl_only) | set(range(llm_rows, rows)))
    plan = VocabPlan(rows, llm_rows, vl_rows, from_vl, [vl_only[i] for i in from_vl if i in vl_only])
    if policy == "refuse" and not plan.identical:
        extra = ""
        if vl_only:
            names = ", ".join(plan.vl_tokens[:6]) + (" ..." if len(vl_only) > 6 else "")
            extra = f"; the VL tokenizer has {len(vl_only)} tokens the LLM's lacks ({names})"
        raise MedvlError(f"the vocabularies differ: LLM {llm_rows} embedding rows, VL {vl_rows}{extra}",
                         fix=f"pass --vocab resize: {rows} rows, the LLM's where it has the token, the VL model's "
                             f"for the {len(from_vl)} others")
    return plan


@dataclass
class _Out:
    name: str  # output tensor name
    source: str  # "llm" or "vl"
    src: str  # its name in the source
    shape: tuple
    vl_rows_src: str | None = None  # vocabulary tensors: the VL tensor that supplies the VL rows
    replaces: str | None = None  # the VL tensor whose values this one replaces


def vl_embedding(vw: Weights, in_layout: Layout, out_layout: Layout) -> str:
    want = out_layout.language[0] + "embed_tokens.weight"
    found = [n for n in vw.shape if rename(n, in_layout, out_layout) == want]
    if not found:
        raise MedvlError(f"the VL model has no token embedding ({want} or its other-layout name)",
                         fix="--vl must be a checkpoint of a supported VL family saved with save_pretrained")
    return found[0]


def plan_tensors(vw: Weights, lw: Weights, in_layout: Layout, out_layout: Layout, tied: bool,
                 vocab: VocabPlan) -> tuple[list[_Out], list[str]]:
    """Every output tensor with its source; raises listing every tensor that does not line up."""
    plan, dropped, problems, used = [], [], [], set()
    vl_by_out = {rename(n, in_layout, out_layout): n for n in vw.shape}
    vl_embed = vl_embedding(vw, in_layout, out_layout)
    head_out = out_layout.head[0] + "weight"
    for out_name, vl_name in vl_by_out.items():
        group = out_layout.group_of(out_name)
        if group not in ("language", "head"):
            plan.append(_Out(out_name, "vl", vl_name, vw.shape[vl_name]))
            continue
        src = llm_name(out_name, out_layout)
        if src == LLM_HEAD and tied:
            dropped.append(f"{vl_name} (the LLM ties lm_head to its embeddings)")
            continue
        if src not in lw.shape:
            problems.append(f"{vl_name}: the LLM has no {src}")
            continue
        used.add(src)
        a, b = vw.shape[vl_name], lw.shape[src]
        if src in (LLM_EMBED, LLM_HEAD):
            if a[1:] != b[1:]:
                problems.append(f"{src}: VL {list(a)}, LLM {list(b)}")
            plan.append(_Out(out_name, "llm", src, (vocab.rows, *b[1:]), vl_rows_src=vl_name, replaces=vl_name))
        elif a != b:
            problems.append(f"{src}: VL {list(a)}, LLM {list(b)}")
        else:
            plan.append(_Out(out_name, "llm", src, b, replaces=vl_name))
    if not tied and LLM_HEAD in lw.shape and LLM_HEAD not in used:
        # A tied VL model has no lm_head on disk; its head rows are its embedding rows.
        used.add(LLM_HEAD)
        plan.append(_Out(head_out, "llm", LLM_HEAD, (vocab.rows, *lw.shape[LLM_HEAD][1:]), vl_rows_src=vl_embed))
    if not tied and LLM_HEAD not in lw.shape:
        problems.append("lm_head.weight: the LLM has none and does not tie its embeddings")
    if tied and LLM_HEAD in lw.shape:
        used.add(LLM_HEAD)
        dropped.append("lm_head.weight of the LLM (tied: the embeddings serve as the head)")
    unused = [n for n in lw.shape if n not in used]
    if unused:
        problems.append(f"{len(unused)} LLM tensors have no place in the VL model, e.g. {', '.join(unused[:3])}")
    if problems:
        raise MedvlError("the LLM's tensors do not line up with the VL model's language model:\n  "
                         + "\n  ".join(problems[:12])
                         + (f"\n  ... {len(problems) - 12} more" if len(problems) > 12 else ""),
                         fix="pair an LLM with the VL model of the same architecture and size")
    return plan, dropped


def config_from_llm(vl_cfg, llm_cfg, vocab: VocabPlan, tied: bool) -> list[tuple[str, object, object]]:
    """Set the VL text config's maths from the LLM, in place; returns (key, VL value, LLM value) per change."""
    import copy

    vt, lt = vl_cfg.get_text_config(), llm_cfg.get_text_config()
    changes = []
    for key in MATH_KEYS:
        if not (hasattr(lt, key) and hasattr(vt, key)):
            continue
        old, new = getattr(vt, key), copy.deepcopy(getattr(lt, key))
        if key == "rope_parameters" and isinstance(old, dict) and isinstance(new, dict):
            new = {**new, **{k: old[k] for k in MROPE_KEYS if k in old}}
        if new != old:
            changes.append((key, old, new))
            setattr(vt, key, new)
    for key, new in (("vocab_size", vocab.rows), ("tie_word_embeddings", tied)):
        if getattr(vt, key, None) != new:
            changes.append((key, getattr(vt, key, None), new))
        setattr(vt, key, new)
    # transformers ties when either the top-level or the text flag says so (checked on 5.23): set both.
    vl_cfg.tie_word_embeddings = tied
    return changes


# ---------------------------------------------------------------------------------------------------------
# writing

def write_shards(tmp: Path, plan: list[_Out], vw: Weights, lw: Weights, vocab: VocabPlan, dtype, max_bytes: int,
                 progress) -> tuple[int, int]:
    """Write the planned tensors as safetensors shards (+ index when more than one); returns (shards, bytes)."""
    import torch

    vl_idx = torch.tensor(vocab.from_vl, dtype=torch.long)
    entries = {e.name: e for e in plan}

    def build(name: str):
        e = entries[name]
        if e.vl_rows_src is None:
            return (lw if e.source == "llm" else vw).get(e.src).to(dtype)
        t = torch.empty(e.shape, dtype=dtype)  # vocabulary rows from both models
        n = min(vocab.llm_rows, vocab.rows)
        t[:n] = lw.get(e.src)[:n]
        if len(vl_idx):
            lo, hi = vocab.from_vl[0], vocab.from_vl[-1] + 1
            t[vl_idx] = vw.rows(e.vl_rows_src, lo, hi)[vl_idx - lo].to(dtype)
        return t

    return write_streamed(tmp, {e.name: (e.shape, dtype) for e in plan}, build, max_bytes, progress)


def copy_processor_files(vl: Path, tmp: Path) -> list[str]:
    copied = []
    for name in PROCESSOR_FILES:
        if (vl / name).is_file():
            shutil.copy2(vl / name, tmp / name)
            copied.append(name)
    return copied


# ---------------------------------------------------------------------------------------------------------
# the conversion

def convert(vl: str | Path, llm: str | Path, out: str | Path, *, vocab: str = "resize", overwrite: bool = False,
            max_shard_size: str | int = "5GB", progress=None) -> ConvertResult:
    from medvl.atomic import atomic_dir, check_writable_target
    from medvl.models import check_model_weights

    t0 = time.perf_counter()
    progress = progress or NullProgress()
    vl, llm, out = Path(vl), Path(llm), Path(out)
    if vocab not in ("resize", "refuse"):
        raise MedvlError(f"unknown vocabulary policy '{vocab}'", fix="use --vocab resize or --vocab refuse")
    shard_bytes = parse_size(max_shard_size)
    check_writable_target(out, overwrite)
    family = detect_family(vl)
    if not family.is_vision:
        raise MedvlError(f"--vl {vl} is a text-only model ({family.name})", where=str(vl),
                         fix="--vl takes the vision-language model that gives the vision tower")
    llm_family = detect_family(llm)
    if llm_family.is_vision:
        raise MedvlError(f"--llm {llm} is a vision-language model ({llm_family.name})", where=str(llm),
                         fix="--llm takes a text-only causal LM (e.g. Qwen2.5-7B-Instruct)")
    check_model_weights(vl)  # headers only: a truncated download fails here, before transformers is imported
    check_model_weights(llm)
    from transformers import AutoConfig, AutoTokenizer

    vl_cfg, llm_cfg = AutoConfig.from_pretrained(vl), AutoConfig.from_pretrained(llm)
    check_configs(vl_cfg.get_text_config(), llm_cfg.get_text_config(), vl, llm)

    vw, lw = Weights(vl, "--vl"), Weights(llm, "--llm")
    if LLM_EMBED not in lw.shape:
        raise MedvlError(f"the LLM has no {LLM_EMBED}", where=str(llm),
                         fix="--llm must be a causal LM saved with save_pretrained (model.* and lm_head.* tensors)")
    in_layout = detect_layout(vw.shape, family)
    out_layout = family.legacy_layout or family.layout
    tied = bool(getattr(llm_cfg, "tie_word_embeddings", False))
    vl_tok, llm_tok = AutoTokenizer.from_pretrained(vl), AutoTokenizer.from_pretrained(llm)
    vl_embed = vl_embedding(vw, in_layout, out_layout)
    special = {k: getattr(vl_cfg, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                      "vision_end_token_id")}
    vocab_plan = plan_vocab(vl_tok, llm_tok, vw.shape[vl_embed][0], lw.shape[LLM_EMBED][0], special, vocab)
    plan, dropped = plan_tensors(vw, lw, in_layout, out_layout, tied, vocab_plan)
    language = [e for e in plan if e.source == "llm"]
    decoder = [e for e in language if ".layers." in e.name]
    if not decoder:
        raise MedvlError("no decoder tensor of the VL model would be replaced", where=str(vl),
                         fix="report this as a medvl bug with both config.json files")
    dtype = lw.torch_dtype(LLM_EMBED)  # the LLM's precision: casting it would break the exact-logits check
    changes = config_from_llm(vl_cfg, llm_cfg, vocab_plan, tied)
    vl_cfg.dtype = str(dtype).removeprefix("torch.")
    progress.note(f"{family.name}: {len(language)} tensors from the LLM ({len(decoder)} decoder), "
                  f"{len(plan) - len(language)} from the VL model; vocabulary {vocab_plan.rows} rows "
                  f"({len(vocab_plan.from_vl)} from the VL model)")

    with atomic_dir(out, overwrite=overwrite) as tmp:
        shards, size = write_shards(tmp, plan, vw, lw, vocab_plan, dtype, shard_bytes, progress)
        vl_cfg.save_pretrained(tmp)
        copy_processor_files(vl, tmp)
        figures = verify(tmp, llm, family, vocab_plan, tied, vl_tok, progress)
    return ConvertResult(
        out=out, family=family.name, vl_layout="current" if in_layout == family.layout else "legacy",
        out_layout="current" if out_layout == family.layout else "legacy", from_llm=len(language),
        from_vl=len(plan) - len(language), replaced=sum(1 for e in plan if e.replaces),
        decoder_replaced=len(decoder), dropped=dropped, vocab=vocab_plan, tied=tied, config_from_llm=changes,
        dtype=vl_cfg.dtype, shards=shards, bytes=size, seconds=round(time.perf_counter() - t0, 2), **figures)


def verify(path: Path, llm: Path, family: Family, vocab: VocabPlan, tied: bool, vl_tok, progress) -> dict:
    """The converted model equals the LLM on text (fp32 logits) and runs an image prompt; raises otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    from medvl.models import load_processor, model_class

    progress.note("verifying: LLM logits vs converted logits on a text probe, then an image prompt")
    ids = vl_tok(PROBE_TEXT, return_tensors="pt")["input_ids"]
    from_vl = set(vocab.from_vl)
    if any(int(i) in from_vl for i in ids[0]):
        raise MedvlError("the text probe uses a token whose row came from the VL model", fix="report this as a bug")
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32)
        ref = reference(input_ids=ids).logits[0]
        big = is_big(reference)
        del reference  # one model in memory at a time
        if big:
            gc.collect()
        model = model_class(family).from_pretrained(path, dtype=torch.float32).eval()
        got = model(input_ids=ids).logits[0]
    cols = torch.tensor([r for r in range(min(vocab.llm_rows, vocab.rows)) if r not in from_vl])
    diff = float((got[:, cols] - ref[:, cols]).abs().max())
    problems = []
    if not diff < LOGITS_TOL:
        problems.append(f"text logits differ from the LLM's by {diff:.3g} (limit {LOGITS_TOL:g})")
    shared = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if shared != tied:
        problems.append(f"lm_head tied to the embeddings: {shared}, in the LLM: {tied}")
    processor = load_processor(path, family)
    inputs = probe_inputs(processor, family)
    logits, tokens = run_probe(model, inputs, 4)
    if not torch.isfinite(logits).all():
        problems.append("the image prompt gives non-finite logits")
    if problems:
        raise MedvlError("the converted model is not the LLM: " + "; ".join(problems), where=str(llm),
                         fix="nothing was written; report this as a medvl bug with both config.json files")
    image_id = getattr(model.config, "image_token_id", None)
    return dict(probe_tokens=int(ids.shape[1]), logits_columns=len(cols), logits_max_abs_diff=diff,
                image_tokens=int((inputs["input_ids"] == image_id).sum()) if image_id is not None else 0,
                image_generated=processor.tokenizer.decode(tokens))
