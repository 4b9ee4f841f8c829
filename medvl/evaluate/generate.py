"""Answering evaluation items: batched, length-grouped, sharded, resumable generation.

Batching. Prompts are left-padded (a decoder appends new tokens at the right end, so every row's last real
token must sit in the last column), then grouped by length: sorted longest first and cut into batches, so a
batch pads only to its own longest prompt and an out-of-memory batch shows up in the first seconds, not after
an hour. Lengths are exact and pixel-free: text tokens plus each image's visual tokens from its header size by
the processor's own resize math (`medvl.data.collate.visual_token_counts`). With left padding and the attention
mask, a batched greedy answer is the answer the prompt gets alone: equal on every family in fp32 on CPU
(tests/test_eval_generate.py, tests/bench/eval_batching.py). On a GPU in bf16 another batch shape may pick other
kernels, so a near tie (two logits within bf16 rounding) can still flip: a re-batched run can differ there.

Sharding. Under `accelerate launch`, rank r takes todo[r::world] of the length-sorted list (so every rank gets
the same mix of long and short prompts); the caller gathers and `merge_shards` proves no item was lost or
answered twice. Upstream's DataLoader pads the last shard by repeating items instead, then de-duplicates by id.

Cache. Every answered item is appended, flushed, to `predictions.partial.jsonl` in the output directory (rank r
of a multi-process run writes `predictions.partial.rank{r}.jsonl`), keyed by test_id and a fingerprint of the
model (path + weight-file sizes and mtimes), the adapter, the decoding settings and the item's full rendered
prompt and image paths. A re-run reads every partial file, skips items whose key matches and answers the rest:
an interrupted run continues where it stopped, a changed model or prompt is never served stale answers.

Decoding. Both modes are spelled out here in full instead of inheriting the checkpoint's generation_config.json
(instruct checkpoints often turn sampling on there, with their own temperature and repetition penalty): the same
flags give the same decoding on every checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medvl.errors import MedvlError
from medvl.evaluate.suites import EvalItem, build_prompt
from medvl.families import Family
from medvl.models import tokenizer_of
from medvl.progress import NullProgress, ProgressSink
from medvl.resolve import ModelSource, load_source, resolve_dtype, resolve_model

DECODINGS = ("greedy", "huatuo")
# HuatuoGPT-Vision eval.py: --max_new_tokens 256 (overriding its chatbot's 512); the answer is one letter, and
# generation stops at the end-of-turn token, so the budget only costs time on a model that rambles.
PUBLISHED_MAX_NEW_TOKENS = 256
PUBLISHED_SEED = 42  # eval.py: set_seed(42), once
PARTIAL = "predictions.partial.jsonl"


# ---------------------------------------------------------------------------------------------------------
# decoding settings


@dataclass(frozen=True)
class Decoding:
    name: str  # greedy | huatuo
    max_new_tokens: int = PUBLISHED_MAX_NEW_TOKENS
    seed: int = PUBLISHED_SEED

    @property
    def sampling(self) -> bool:
        return self.name == "huatuo"

    def generation_kwargs(self) -> dict:
        # min_new_tokens=1 as the published chatbot: an immediate end-of-turn would be an empty answer.
        kwargs = dict(max_new_tokens=self.max_new_tokens, min_new_tokens=1, num_beams=1)
        if self.sampling:
            # HuatuoGPT-Vision cli.py gen_kwargs; top_k 50 / top_p 1.0 are the transformers defaults it relied on.
            # Batched, the penalty also sees a padded row's pad tokens (upstream ran batch 1, no padding): the
            # pad token's logit is divided by 1.2 there. Sampled answers are seeded, not batch-independent.
            kwargs.update(do_sample=True, temperature=0.2, repetition_penalty=1.2, top_k=50, top_p=1.0)
        else:
            kwargs.update(do_sample=False, repetition_penalty=1.0)
        return kwargs

    def as_dict(self) -> dict:
        return {**asdict(self), **self.generation_kwargs()}


def make_decoding(name: str = "greedy", *, max_new_tokens: int | None = None, seed: int = PUBLISHED_SEED) -> Decoding:
    if name not in DECODINGS:
        raise MedvlError(f"unknown decoding '{name}'", fix=f"use one of: {', '.join(DECODINGS)} "
                         "(greedy: deterministic; huatuo: the published sampling, temperature 0.2, seeded)")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise MedvlError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    return Decoding(name, max_new_tokens or PUBLISHED_MAX_NEW_TOKENS, seed)


# ---------------------------------------------------------------------------------------------------------
# sharding and batching (pure Python)


def shard(items: Sequence, rank: int, world: int) -> list:
    """Rank `rank`'s share of `items`: every world-th item starting at rank (no padding, no repeats)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    return list(items[rank::world])


def merge_shards(parts: Iterable[Mapping[int, str]], expected: Iterable[int]) -> dict[int, str]:
    """Per-rank {test_id: output} -> one dict in `expected` order; raises if an id is answered twice or never."""
    merged: dict[int, str] = {}
    twice = []
    for part in parts:
        for test_id, output in part.items():
            if test_id in merged:
                twice.append(test_id)
            merged[test_id] = output
    expected = list(expected)
    lost = [t for t in expected if t not in merged]
    extra = sorted(set(merged) - set(expected))
    if twice or lost or extra:
        raise RuntimeError(f"sharded generation is inconsistent: answered twice {twice[:10]}, lost {lost[:10]}, "
                           f"unexpected {extra[:10]}")
    return {t: merged[t] for t in expected}


def plan_batches(lengths: Mapping[int, int], batch_size: int) -> list[list[int]]:
    """test_id -> prompt length  =>  batches of ids, longest prompts first; ties keep test_id order."""
    if batch_size < 1:
        raise MedvlError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(lengths, key=lambda t: (-lengths[t], t))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------------------------------------
# the answer cache


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:20]


class AnswerCache:
    """Append-only JSONL of answered items in `out_dir`, one file per rank; reads every rank's file."""

    def __init__(self, out_dir: str | Path, rank: int = 0):
        self.dir = Path(out_dir)
        self.path = self.dir / (PARTIAL if rank == 0 else PARTIAL.replace(".jsonl", f".rank{rank}.jsonl"))
        self._file = None

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("predictions.partial*.jsonl"))

    def load(self, keys: Mapping[int, str]) -> dict[int, str]:
        """{test_id: output} for every cached answer whose key matches `keys[test_id]`."""
        found: dict[int, str] = {}
        for path in self.files():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        test_id, key, output = int(row["test_id"]), row["key"], row["output"]
                    except (ValueError, KeyError, TypeError):
                        continue  # the line an interrupted write cut short, or a foreign line
                    if keys.get(test_id) == key:
                        found[test_id] = output
        return found

    def append(self, rows: Iterable[tuple[int, str, str]]) -> None:
        if self._file is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+", encoding="utf-8")
            # A run killed mid-line leaves no trailing newline: start on a fresh line so the next record parses.
            self._file.seek(0, os.SEEK_END)
            if self._file.tell():
                self._file.seek(self._file.tell() - 1)
                if self._file.read(1) != "\n":
                    self._file.write("\n")
        for test_id, key, output in rows:
            self._file.write(json.dumps({"test_id": test_id, "key": key, "output": output}, ensure_ascii=False)
                             + "\n")
        self._file.flush()  # per batch: a kill loses at most the batch in flight

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------------------------------------------
# the model side


@dataclass(frozen=True)
class Target:
    """What is evaluated: a base checkpoint, optionally a LoRA adapter (or a step checkpoint's trainable weights)
    on top, never merged. Resolved by medvl.resolve, the one resolver chat and export use too."""

    base: Path
    family: Family
    adapter: Path | None = None
    processor_dir: Path | None = None  # where the processor is read: the adapter's run saves it there
    source: ModelSource | None = field(default=None, compare=False)

    def fingerprint(self) -> dict:
        return {"base": _dir_identity(self.base),
                "adapter": _dir_identity(self.adapter) if self.adapter else None}


def _dir_identity(path: Path) -> dict:
    """Path plus size and mtime of each weight file: retraining into the same directory invalidates the cache."""
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    return {"path": str(path.resolve()),
            "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]}


def resolve_target(model: str | Path | None, adapter: str | Path | None = None) -> Target:
    """--model / --adapter -> Target (medvl.resolve.resolve_model): a run directory stands for its `final/`; a
    LoRA directory passed as --model is an adapter over the base its config names; --model with --adapter is
    the adapter's base."""
    if model is None and adapter is None:
        raise MedvlError("nothing to evaluate", fix="pass --model MODEL_DIR (and optionally --adapter LORA_DIR)")
    src = resolve_model(model, adapter=adapter)
    if src.kind == "full":
        return Target(src.path, src.family, source=src)
    has_processor = src.processor_dir == src.path
    return Target(src.base_dir, src.family, src.path, src.path if has_processor else None, source=src)


@dataclass
class Prompt:
    test_id: int
    text: str  # the chat-templated prompt, generation prompt included
    images: tuple[str, ...]  # the images the model sees (none for a text-only model)
    key: str = ""  # cache key
    length: int = 0  # tokens, visual tokens included


class Generator:
    """A loaded model + processor that answers batches of prompts with one decoding."""

    def __init__(self, model, processor, family: Family, decoding: Decoding, *, fingerprint: Mapping | None = None,
                 device=None):
        from transformers import GenerationConfig

        self.model, self.processor, self.family, self.decoding = model, processor, family, decoding
        self.device = device if device is not None else next(model.parameters()).device
        self.tokenizer = tokenizer_of(processor)
        self.tokenizer.padding_side = "left"  # see the module docstring: new tokens go after the last column
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        from medvl.data.turns import stop_token_ids

        eos = stop_token_ids(model, processor, family.is_vision)
        self.generation_config = GenerationConfig(**decoding.generation_kwargs(), eos_token_id=eos,
                                                  pad_token_id=self.tokenizer.pad_token_id, bos_token_id=None)
        self._run_key = _digest(json.dumps({"target": dict(fingerprint or {}), "decoding": decoding.as_dict()},
                                           sort_keys=True, default=str))
        self.oom_splits = 0

    @classmethod
    def load(cls, target: Target, decoding: Decoding, *, dtype: str = "auto", device=None) -> Generator:
        import torch

        dtype = resolve_dtype(dtype)
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, processor = load_source(target.source or resolve_model(target.base, adapter=target.adapter),
                                       dtype=dtype)  # an adapter stays separate, never merged
        model.to(device).eval()
        return cls(model, processor, target.family, decoding, device=device,
                   fingerprint={**target.fingerprint(), "dtype": dtype})

    # -- prompts

    def prompt(self, item: EvalItem) -> Prompt:
        """The published prompt through the family's chat template: one user turn, its images first."""
        from medvl.data.schema import IMAGE_PLACEHOLDER
        from medvl.data.turns import render_prompt

        images = item.images if self.family.is_vision else ()
        # A literal "<image>" in a question would become a placeholder without an image; the published chatbot
        # deletes it from user text too (input_moderation).
        query = build_prompt(item).replace(IMAGE_PLACEHOLDER, "")
        messages = [{"role": "user", "content": IMAGE_PLACEHOLDER * len(images) + query}]
        text = render_prompt(self.processor, messages, self.family.is_vision)
        return Prompt(item.test_id, text, tuple(images), _digest(self._run_key, text, *images))

    def measure(self, prompts: Sequence[Prompt]) -> None:
        """Fill each prompt's exact length: its text tokens, each image placeholder counted as its visual tokens."""
        from medvl.data.collate import visual_token_counts

        if not prompts:
            return
        counts = self.tokenizer([p.text for p in prompts], add_special_tokens=False)["input_ids"]
        for prompt, ids in zip(prompts, counts):
            visual = visual_token_counts(self.processor, self.family, [_image_size(p) for p in prompt.images])
            prompt.length = len(ids) - len(visual) + sum(visual)

    # -- generation

    def generate(self, prompts: Sequence[Prompt]) -> list[str]:
        """Answers for one batch, in order: new tokens only, special tokens skipped, stripped."""
        import torch

        try:
            return self._generate(prompts)
        except torch.cuda.OutOfMemoryError:
            if len(prompts) == 1:
                raise MedvlError("out of GPU memory on a single prompt", where=f"test_id {prompts[0].test_id}",
                                 fix="use a smaller dtype (--dtype bf16) or a lower image resolution") from None
            # Halving keeps greedy answers the same (left padding makes them batch-independent) and lets a long
            # sorted-first batch get through instead of ending the run.
            torch.cuda.empty_cache()
            self.oom_splits += 1
            half = len(prompts) // 2
            return self.generate(prompts[:half]) + self.generate(prompts[half:])

    def _generate(self, prompts: Sequence[Prompt]) -> list[str]:
        import torch

        from medvl.inference import encode_left_padded

        images = [_load_image(path) for p in prompts for path in p.images] if self.family.is_vision else []
        batch = encode_left_padded(self.processor, self.tokenizer, self.family, [p.text for p in prompts], images)
        batch = batch.to(self.device)
        if self.decoding.sampling:
            # Seeded per batch from its items: the same items in the same batches sample the same answers.
            torch.manual_seed(int(_digest(str(self.decoding.seed), *map(str, (p.test_id for p in prompts)))[:15], 16))
        with torch.inference_mode():
            out = self.model.generate(**batch, generation_config=self.generation_config)
        new = out[:, batch["input_ids"].shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def _load_image(path: str):
    from medvl.data.images import load_image  # PIL for common formats, pydicom for DICOM

    return load_image(path)


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) the model will see, reading only the header where the format allows."""
    from PIL import Image

    from medvl.data.images import is_dicom, probe_image

    if is_dicom(path):
        info = probe_image(path)
        return info.width, info.height
    with Image.open(path) as im:
        # EXIF orientation 5-8 swaps the sides; load_image applies it before the processor sees the image.
        orientation = im.getexif().get(0x0112, 1)
        return (im.height, im.width) if orientation in (5, 6, 7, 8) else im.size


# ---------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class Answers:
    outputs: dict[int, str]  # this rank's new answers
    cached: dict[int, str]  # answers found in the cache (every rank sees the same)
    generated_s: float = 0.0
    batches: int = 0
    notes: list[str] = field(default_factory=list)


def answer_items(generator: Generator, items: Sequence[EvalItem], out_dir: str | Path, *, batch_size: int = 8,
                 rank: int = 0, world: int = 1, progress: ProgressSink | None = None,
                 barrier: Callable[[], None] = lambda: None) -> Answers:
    """Answer every item not already in the cache; this rank answers its shard and appends it to its file."""
    progress = progress or NullProgress()
    prompts = {it.test_id: generator.prompt(it) for it in items}
    cache = AnswerCache(out_dir, rank)
    cached = cache.load({t: p.key for t, p in prompts.items()})
    barrier()  # every rank has read the cache before any rank appends: all compute the same todo list
    todo = [prompts[t] for t in prompts if t not in cached]
    generator.measure(todo)
    todo.sort(key=lambda p: (-p.length, p.test_id))
    mine = {p.test_id: p for p in shard(todo, rank, world)}
    batches = plan_batches({t: p.length for t, p in mine.items()}, batch_size)
    answers = Answers({}, cached)
    if cached:
        progress.note(f"{len(cached)} of {len(prompts)} items already answered in {out_dir}: skipped")
    progress.start("generating", total=len(mine))
    t0 = time.perf_counter()
    try:
        for ids in batches:
            batch = [mine[t] for t in ids]
            outputs = generator.generate(batch)
            cache.append((p.test_id, p.key, out) for p, out in zip(batch, outputs))
            answers.outputs.update(zip(ids, outputs))
            answers.batches += 1
            progress.advance(len(batch))
    finally:
        cache.close()
        progress.finish()
    answers.generated_s = time.perf_counter() - t0
    if generator.oom_splits:
        answers.notes.append(f"{generator.oom_splits} batch(es) split in half after running out of GPU memory")
    return answers
