"""Text token ids that prepare-data stores with each record, so training does not render and tokenize again.

`medvl prepare-data --model M` already renders every sample with M's chat template and tokenizes it, to measure
its exact length. For the models whose inputs can be built from those ids alone (text-only models and the
Qwen-VL families: `collate.expands_from_ids`) it keeps the result in the record:

    "meta": {..., "tokens": {"ids": "nFACAGgDAA8B...", "train": [[41, 47], [80, 86]]}}

`ids` is the rendered conversation's tokens with each image still one placeholder token, as 3-byte
little-endian integers in base64: 4 characters a token (JSON numbers took 7 for Qwen's 152k vocabulary, and a
1M-sample caption dataset would carry gigabytes of them); `train` lists the [start, end) token ranges whose
labels are the ids themselves (everything else is -100). The loader then only loads the images and expands
their placeholders: on the benchmark's short VQA samples a sample took 0.45 ms instead of 0.65 ms.

Stored ids are only trusted when they were made by the same encoding: the manifest records `text_encoding_key`,
a hash of the tokenizer (its serialisation without the padding/truncation state a call leaves behind, and its
split_special_tokens switch), both chat templates, bos/eos, the family, the loss mask, the transformers /
tokenizers / jinja2 versions that render and tokenize, and this module's version. The training run computes its
own key and, on any difference, encodes in the loader as before and says so in its header. A record cut for
max_seq_len at training time is re-encoded (the stored ids are for the record as prepared).
"""

from __future__ import annotations

import base64
import hashlib
import json

from medvl.data.collate import IGNORE, expands_from_ids
from medvl.families import Family
from medvl.models import tokenizer_of

# Part of the key: bumped whenever medvl's text encoding (turns.py's spans, the eos rule, labels_from_spans)
# changes, so data prepared by an older medvl is re-encoded instead of trusted.
VERSION = 1


def text_encoding_key(processor, family: Family, loss_mask: str) -> str | None:
    """A hash of everything that decides a record's text ids and labels, or None where ids are not stored for
    this model (LLaVA/InternVL processors tokenize in the loader; a tokenizer without a serialisable backend)."""
    if not expands_from_ids(family):
        return None
    tok = tokenizer_of(processor)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    from medvl.versions import library_versions

    versions = library_versions(("transformers", "tokenizers", "jinja2"))
    parts = {"version": VERSION, "family": family.name, "loss_mask": loss_mask,
             "template": getattr(processor, "chat_template", None), "tok_template": getattr(tok, "chat_template", None),
             "bos": tok.bos_token, "eos": tok.eos_token, "image_token": family.image_token,
             "split_special_tokens": bool(getattr(tok, "split_special_tokens", False)),
             "libraries": {k: versions.get(k) for k in ("transformers", "tokenizers", "jinja2")}}
    # The serialisation also holds the padding/truncation a batched call leaves set on the backend (and that
    # save_pretrained writes out): state, not encoding, which made the same tokenizer hash differently
    serial = json.loads(backend.to_str())
    serial.pop("padding", None)
    serial.pop("truncation", None)
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    h.update(json.dumps(serial, sort_keys=True).encode())  # vocabulary, merges, normalizer, added tokens
    return h.hexdigest()[:24]


def to_stored(ids: list[int], labels: list[int]) -> dict | None:
    """The record's `meta.tokens`: ids and the [start, end) ranges that are trained (None: an id over 24 bits,
    which no released vocabulary has; such a record is encoded in the loader)."""
    import numpy as np

    a = np.asarray(ids, dtype=np.int64)
    if a.size and (a.min() < 0 or a.max() >= 1 << 24):
        return None
    packed = a.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    ranges, start = [], None
    for i, lab in enumerate(labels):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            ranges.append([start, i])
            start = None
    if start is not None:
        ranges.append([start, len(labels)])
    return {"ids": base64.b64encode(packed).decode("ascii"), "train": ranges}


def from_stored(tokens: dict) -> tuple[list[int], list[int]]:
    """(ids, labels) from a record's `meta.tokens`."""
    import numpy as np

    raw = np.frombuffer(base64.b64decode(tokens["ids"]), dtype=np.uint8).reshape(-1, 3).astype(np.uint32)
    ids = (raw[:, 0] | raw[:, 1] << 8 | raw[:, 2] << 16).tolist()
    labels = [IGNORE] * len(ids)
    for s, e in tokens["train"]:
        labels[s:e] = ids[s:e]
    return ids, labels
