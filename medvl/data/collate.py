"""From a normalized record to model inputs: chat template, loss mask, image-safe truncation, packing.

Loss mask. The record says which assistant turns are trainable (`train`); the policy picks among them:
`all` trains every trainable assistant turn (medvl's default), `last` only the last one (HuatuoGPT-Vision's
`train_vl.py`). A trained span is the assistant's content plus its end-of-turn token, never the role prefix and
never the newline after the end of turn. Both are read off the checkpoint's own chat template, for any template
(medvl/data/turns.py); a template where they cannot be found is refused before the first sample.
Character spans become token labels through the tokenizer's offsets; the processor then expands each image
placeholder into its visual tokens, and `align_labels` walks both sequences so the labels follow.

Truncation never cuts inside an image: a sample longer than `max_seq_len` loses whole trailing turns (and the
images those turns held); if not even the first exchange fits, the sample is rejected with its reason.

Packing: several samples in one row with positions restarting at 0 per sample. transformers turns restarting
position ids into a block-diagonal causal mask (no attention across samples); the Qwen-VL families get their 3-D
mRoPE ids computed per sample and stacked under a row of 1-D text positions (the 4-row form their forward takes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medvl.data.qwen_pixels import qwen_pixels
# TemplateError and to_template_messages are imported from here by callers (eval, tests)
from medvl.data.schema import IMAGE_PLACEHOLDER
from medvl.data.turns import (TemplateError, check_template, to_template_messages,  # noqa: F401
                              trained_turns)
from medvl.data.turns import render_with_spans as _render_with_spans
from medvl.families import Family
from medvl.models import tokenizer_of, unwrap_model

IGNORE = -100
# Keys whose second dimension is the token sequence; everything else the processor returns is per image.
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    vision: dict = field(default_factory=dict)  # per-image tensors (pixel_values, image_grid_thw, ...)
    mm_token_type_ids: list[int] | None = None
    n_images: int = 0
    dropped_turns: int = 0
    sample_id: str = ""

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Rejected:
    sample_id: str
    reason: str  # a short code: too_long, no_supervised_tokens, template
    message: str


# ---------------------------------------------------------------------------------------------------------
# chat template -> text + trained character spans: medvl/data/turns.py, from the checkpoint's own template

def render_with_spans(template_owner, messages: list[dict], family: Family, loss_mask: str = "all"):
    """(text, [(start, end) character spans to train]); raises TemplateError (a ValueError) when the template
    does not let the spans be found for this conversation."""
    return _render_with_spans(template_owner, messages, family.is_vision, loss_mask)


def labels_from_spans(offsets, input_ids: list[int], spans) -> list[int]:
    labels = [IGNORE] * len(input_ids)
    j = 0
    for t, (s, e) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j < len(spans) and s >= spans[j][0] and e <= spans[j][1] and e > s:
            labels[t] = input_ids[t]
    return labels


def align_labels(expanded: list[int], plain: list[int], plain_labels: list[int]) -> list[int]:
    """Labels for the processor's sequence, where each image placeholder became a run of visual tokens
    (and, for InternVL, <img> ... </img> around it). Inserted tokens are never trained."""
    out, j = [], 0
    for tok in expanded:
        if j < len(plain) and tok == plain[j]:
            out.append(plain_labels[j])
            j += 1
        else:
            out.append(IGNORE)
    if j != len(plain):
        raise ValueError(f"processor output does not contain the tokenized text ({j}/{len(plain)} tokens matched)")
    return out


# ---------------------------------------------------------------------------------------------------------
# one record -> Encoded, with image-safe truncation

def encode_text(messages, processor, family: Family, loss_mask: str, *, labels: bool = True):
    """(rendered text, its token ids, labels): the chat template and the loss mask, before any image is expanded
    (each image is still its one placeholder token). labels=False: None for them, and no offsets computed."""
    text, spans = render_with_spans(processor, messages, family, loss_mask)
    plain = tokenizer_of(processor)(text, add_special_tokens=False, return_offsets_mapping=labels)
    ids = plain["input_ids"]
    return text, ids, labels_from_spans(plain["offset_mapping"], ids, spans) if labels else None


def expands_from_ids(family: Family) -> bool:
    """Whether a sample's model inputs can be built from its text token ids alone (no rendered text): text-only
    models, and the Qwen-VL families, whose image tokens expand by a rule (`_expand_qwen_images`). LLaVA and
    InternVL go through their processor, which tokenizes the text itself."""
    return not family.is_vision or family.mrope


def _encode_once(messages, images, processor, family: Family, loss_mask: str, sample_id: str,
                 stored: tuple[list[int], list[int]] | None = None) -> Encoded:
    """`stored`: these messages' (ids, labels) as prepare-data wrote them (`text_encoding_key` matched)."""
    text = None
    if stored is not None and expands_from_ids(family):
        plain_ids, labels = stored
    else:
        text, plain_ids, labels = encode_text(messages, processor, family, loss_mask)
    if not family.is_vision:
        return Encoded(list(plain_ids), labels, sample_id=sample_id)
    if family.mrope:
        enc = _expand_qwen_images(plain_ids, labels, images, processor, family, sample_id)
        if enc is not None:
            return enc
        if text is None:  # the processor reports what the rule could not handle (placeholders vs images)
            text, plain_ids, labels = encode_text(messages, processor, family, loss_mask)
    out = processor(text=[text], images=images or None, return_tensors="pt", add_special_tokens=False)
    ids = out["input_ids"][0].tolist()
    enc = Encoded(ids, align_labels(ids, plain_ids, labels), n_images=len(images), sample_id=sample_id)
    if "mm_token_type_ids" in out:
        enc.mm_token_type_ids = out["mm_token_type_ids"][0].tolist()
    enc.vision = {k: v for k, v in out.items() if k not in TOKEN_KEYS} if images else {}
    return enc


def _expand_qwen_images(plain_ids, plain_labels, images, processor, family: Family, sample_id: str):
    """The Qwen-VL processors' own result without their text pass: the image processor alone, then each image
    token of the already tokenized text repeated grid_t x grid_h x grid_w / merge_size^2 times (the rule of
    Qwen2/2.5/3-VL's processors; tests/test_collate.py checks equality with the processor on every Qwen family).
    The processor would re-tokenize the whole text, merge its keyword defaults and build the token types again:
    a short VQA sample (one 64x64 image) on the tiny model encodes in 0.25 ms instead of 0.72 ms, 0.10 ms of it
    saved by qwen_pixels (bit-exact) standing in for the image processor's call. None: take the processor path
    (an unexpected processor, or placeholders that do not match the images, which the processor reports)."""
    ip = getattr(processor, "image_processor", None)
    merge = getattr(ip, "merge_size", None)
    image_id = tokenizer_of(processor).convert_tokens_to_ids(family.image_token)
    if merge is None or not isinstance(image_id, int) or plain_ids.count(image_id) != len(images):
        return None
    if not images:  # a text-only sample: what the processor returns for it (its ids, all-zero token types)
        return Encoded(list(plain_ids), list(plain_labels), {}, [0] * len(plain_ids), 0, sample_id=sample_id)
    vision = qwen_pixels(ip, images) or ip(images=images, return_tensors="pt")
    grid = vision.get("image_grid_thw")
    if grid is None or len(grid) != len(images):
        return None
    counts = iter((grid.prod(-1) // (merge * merge)).tolist())
    ids, labels = [], []
    for tok, lab in zip(plain_ids, plain_labels):
        if tok == image_id:  # as align_labels would: the first copy keeps the placeholder's label
            n = next(counts)
            ids += [image_id] * n
            labels += [lab] + [IGNORE] * (n - 1)
        else:
            ids.append(tok)
            labels.append(lab)
    return Encoded(ids, labels, dict(vision), [int(t == image_id) for t in ids], len(images), sample_id=sample_id)


def _cut_points(messages: list[dict]) -> list[int]:
    """Prefix lengths that end on an assistant turn, longest first."""
    return [i + 1 for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "assistant"]


def encode_record(record: dict, images: list, processor, family: Family, *, loss_mask: str = "all",
                  max_seq_len: int | None = None, stored: tuple[list[int], list[int]] | None = None
                  ) -> Encoded | Rejected:
    """Encode one normalized record (images already loaded as PIL, in placeholder order). `stored`: the text
    (ids, labels) prepare-data wrote for the record (medvl/data/stored_tokens.py), used for its longest trainable
    prefix, the one prepare-data measured; a cut made here for max_seq_len is encoded afresh."""
    messages, sample_id = record["messages"], str(record.get("id", ""))
    try:
        for n_dropped, cut in enumerate(_cut_points(messages)):
            kept = messages[:cut]
            if not trained_turns(kept, loss_mask):
                break
            n_img = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in kept)
            enc = _encode_once(kept, images[:n_img], processor, family, loss_mask, sample_id,
                               stored if n_dropped == 0 else None)
            if max_seq_len is None or len(enc) <= max_seq_len:
                enc.dropped_turns = len(messages) - cut
                if enc.n_supervised == 0:
                    return Rejected(sample_id, "no_supervised_tokens", "no token is trained in this sample")
                return enc
            last_len = len(enc)
    except ValueError as exc:
        return Rejected(sample_id, "template", str(exc))
    if not trained_turns(messages, loss_mask):
        return Rejected(sample_id, "no_supervised_tokens", "no trainable assistant turn")
    return Rejected(sample_id, "too_long",
                    f"even the first exchange is {last_len} tokens, over max_seq_len={max_seq_len}; "
                    "raise data.max_seq_len or lower the image resolution (max_pixels)")


# ---------------------------------------------------------------------------------------------------------
# batches

def collate(samples: list[Encoded], pad_id: int, *, pack: bool = False) -> dict:
    """A padded batch (right padding) or, with pack=True, one row holding every sample back to back.

    The token tables are filled in numpy and shared with torch: torch.tensor() on nested lists of Python ints
    took 36 us per 8 x 51 table, 0.15 ms of a batch's 0.19 ms collate."""
    import numpy as np
    import torch

    def table(field: str, fill: int) -> torch.Tensor:
        rows = [getattr(s, field) for s in samples]
        if pack:
            return torch.from_numpy(np.fromiter((t for r in rows for t in r), np.int64, total)[None])
        out = np.full((len(samples), width), fill, dtype=np.int64)
        for r, xs in enumerate(rows):
            out[r, :len(xs)] = xs
        return torch.from_numpy(out)

    lens = [len(s) for s in samples]
    total, width = sum(lens), max(lens)
    batch: dict = {"input_ids": table("input_ids", pad_id), "labels": table("labels", IGNORE)}
    if pack:
        batch["position_ids"] = torch.from_numpy(np.concatenate([np.arange(n, dtype=np.int64) for n in lens])[None])
    else:
        mask = np.zeros((len(samples), width), dtype=np.int64)
        for r, n in enumerate(lens):
            mask[r, :n] = 1
        batch["attention_mask"] = torch.from_numpy(mask)
    if samples[0].mm_token_type_ids is not None:
        batch["mm_token_type_ids"] = table("mm_token_type_ids", 0)
    keys = sorted({k for s in samples for k in s.vision})
    for k in keys:
        batch[k] = torch.cat([s.vision[k] for s in samples if k in s.vision], dim=0)
    batch["seq_lens"] = torch.tensor(lens)
    batch["images_per_sample"] = torch.tensor([s.n_images for s in samples])
    return batch


def packed_mrope_position_ids(model, batch: dict):
    """4-row position ids (text; temporal, height, width) for a packed Qwen-VL row, each sample from 0.

    One get_rope_index call over the whole row, then each sample's start position subtracted: the index runs
    on from one sample to the next (every sample opens with a text token, at the same position in all three
    rows), so the difference is exactly the sample's own positions; per-sample calls cost ~7 % of a packed
    step of the tiny model."""
    import torch

    inner = unwrap_model(model)
    ids, lens = batch["input_ids"], batch["seq_lens"]
    n = ids.shape[1]
    if int(batch["images_per_sample"].sum()):
        pos, _ = inner.model.get_rope_index(ids, mm_token_type_ids=batch["mm_token_type_ids"],
                                            image_grid_thw=batch["image_grid_thw"], attention_mask=torch.ones_like(ids))
    else:
        pos = torch.arange(n, device=ids.device).view(1, 1, n).expand(3, 1, n)
    starts = torch.nn.functional.pad(lens.cumsum(0), (1, 0))[:-1].to(ids.device)
    sample_of = torch.repeat_interleave(torch.arange(len(lens), device=ids.device), lens.to(ids.device))
    text = (torch.arange(n, device=ids.device) - starts[sample_of]).view(1, 1, n)
    pos = pos.to(text.dtype) - pos[0, 0, starts].to(text.dtype)[sample_of].view(1, 1, n)
    return torch.cat([text, pos], dim=0)


def model_inputs(model, family: Family, batch: dict) -> dict:
    """The keyword arguments for model(**...): drops bookkeeping keys, builds packed mRoPE positions."""
    kwargs = {k: v for k, v in batch.items() if k not in ("seq_lens", "images_per_sample", "labels", "keepalive")}
    # No KV cache in training; with one, transformers also skips packed-sequence detection and packed samples
    # would attend to each other.
    kwargs["use_cache"] = False
    if "position_ids" in kwargs:
        # A packed row: its sample boundaries, which flash_attention_2 (varlen) and medvl's per-sample sdpa
        # (medvl.engine.packing) read; plain sdpa/eager ignore them and mask by the restarting positions.
        kwargs.update(varlen_kwargs(batch["seq_lens"]))
        if family.mrope:
            kwargs["position_ids"] = packed_mrope_position_ids(model, batch)
    return kwargs


def varlen_kwargs(seq_lens) -> dict:
    """The keywords transformers forwards to the attention function for a packed row (cumulative lengths)."""
    import torch

    cu = torch.nn.functional.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
    n = int(seq_lens.max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": n, "max_length_k": n}




def padding_waste(lengths: list[int], micro_batch: int, pack_budget: int | None = None) -> float:
    """Fraction of token slots that are padding: padded batches of `micro_batch` in order, or packed rows of at
    most `pack_budget` tokens (greedy, in order)."""
    if not lengths:
        return 0.0
    if pack_budget is None:
        slots = sum(max(lengths[i:i + micro_batch]) * len(lengths[i:i + micro_batch])
                    for i in range(0, len(lengths), micro_batch))
        return 1 - sum(lengths) / slots
    rows, used = [], 0
    for n in lengths:
        if used and used + n > pack_budget:
            rows.append(used)
            used = 0
        used += n
    rows.append(used)
    # Packed rows are padding-free: a row is exactly its tokens. Waste appears only if rows are padded to the
    # longest row of a micro-batch of `micro_batch` rows.
    slots = sum(max(rows[i:i + micro_batch]) * len(rows[i:i + micro_batch]) for i in range(0, len(rows), micro_batch))
    return 1 - sum(rows) / slots


# ---------------------------------------------------------------------------------------------------------
# exact lengths without pixels (prepare-data)

def visual_token_counts(processor, family: Family, image_sizes: list[tuple[int, int]]) -> list[int]:
    """Tokens each image becomes, from its (width, height) alone, by the processor's own resize and tiling
    math (the resolution policy set on it included): exact, and no pixel is decoded or processed."""
    if not image_sizes:
        return []
    data = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in image_sizes])
    return [int(n) for n in data.num_image_tokens]


def measure(record: dict, image_sizes: list[tuple[int, int]], processor, family: Family, *,
            loss_mask: str = "all", max_seq_len: int | None = None, keep_text: bool = True):
    """(kept messages, n_tokens, visual tokens per kept image, (text ids, labels) of the kept messages, or None
    without keep_text) for a record, or a Rejected.

    The same rule as encode_record: drop whole trailing turns (and their images) until it fits."""
    check_template(processor, family.is_vision)  # MedvlError once, before any sample, for an unusable template
    messages = record["messages"]
    visual = visual_token_counts(processor, family, image_sizes) if family.is_vision else []
    last_len = None
    try:
        for cut in _cut_points(messages):
            kept = messages[:cut]
            if not trained_turns(kept, loss_mask):
                break
            # labels (from offsets) only for prepare-data to store (stored_tokens.py)
            _, ids, labels = encode_text(kept, processor, family, loss_mask, labels=keep_text)
            n_img = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in kept)
            n = len(ids) - n_img + sum(visual[:n_img])
            if max_seq_len is None or n <= max_seq_len:
                return kept, n, visual[:n_img], (ids, labels) if keep_text else None
            last_len = n
    except ValueError as exc:
        return Rejected(str(record.get("id", "")), "template", str(exc))
    if last_len is None:
        return Rejected(str(record.get("id", "")), "no_supervised_tokens", "no trainable assistant turn")
    return Rejected(str(record.get("id", "")), "too_long",
                    f"even the first exchange is {last_len} tokens, over max_seq_len={max_seq_len}; raise "
                    "--max-seq-len or lower the image resolution (--max-pixels)")
