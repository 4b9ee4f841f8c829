"""One prepared sample, exactly as the trainer will feed it: token by token, with what is trained marked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medvl.errors import MedvlError
from medvl.models import tokenizer_of


@dataclass
class Inspection:
    sample_id: str
    location: str
    spans: list[tuple[str, str]]  # (text, kind): kind is "context", "trained" or "image"
    n_tokens: int
    n_trained: int
    image_tokens: list[int]  # per image
    repairs: list[str] = field(default_factory=list)
    rejected: str | None = None


def inspect_sample(data_dir: str | Path, index: int, model: str, *, loss_mask: str = "all") -> Inspection:
    from medvl.data.collate import IGNORE, Rejected, encode_record
    from medvl.data.dataset import index_prepared
    from medvl.data.images import load_image
    from medvl.families import detect_family
    from medvl.models import load_processor

    idx = index_prepared([data_dir])
    if not 0 <= index < len(idx):
        raise MedvlError(f"sample index {index} is out of range", where=str(data_dir),
                         fix=f"choose 0..{len(idx) - 1}")
    rec = idx.read(index)
    family = detect_family(model)
    processor = load_processor(model, family)
    images = [load_image(p) for p in idx.image_paths(index, rec)]
    enc = encode_record(rec, images, processor, family, loss_mask=loss_mask)
    meta = rec.get("meta", {})
    if isinstance(enc, Rejected):
        return Inspection(rec["id"], meta.get("location", ""), [], 0, 0, [], meta.get("repairs", []), enc.message)
    tok = tokenizer_of(processor)
    image_id = tok.convert_tokens_to_ids(family.image_token) if family.image_token else None
    spans: list[tuple[str, str]] = []
    image_tokens: list[int] = []
    prev_image = False
    for t, label in zip(enc.input_ids, enc.labels):
        kind = "image" if t == image_id else ("trained" if label != IGNORE else "context")
        if kind == "image":
            if not prev_image:
                image_tokens.append(0)
            image_tokens[-1] += 1
        prev_image = kind == "image"
        text = tok.decode([t]) if kind != "image" else "▒"
        if spans and spans[-1][1] == kind:
            spans[-1] = (spans[-1][0] + text, kind)
        else:
            spans.append((text, kind))
    return Inspection(rec["id"], meta.get("location", ""), spans, len(enc), enc.n_supervised, image_tokens,
                      meta.get("repairs", []))
