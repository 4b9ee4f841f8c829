"""The training data as the loop consumes it: the prepared index, the train/validation split and source weights,
the resumable batch plan, and a DataLoader whose workers encode ahead (plus the keepalive row that keeps every
rank's vision tower in the forward)."""

from __future__ import annotations

from pathlib import Path

from medvl.data.collate import IGNORE, collate
from medvl.engine.packing import resolve_packing
from medvl.errors import MedvlError


def build_data(recipe, family, processor, accelerator):
    """(dataset, training ids, batch plan, validation set or None, how data.packing was resolved)."""
    from medvl.data.dataset import BatchPlan, EncodedDataset, index_prepared
    from medvl.data.turns import check_template

    check_template(processor, family.is_vision, where=f"{recipe.model.base} (its chat template)")
    index = index_prepared([s.path for s in recipe.data.train])
    dataset = EncodedDataset(index, processor, family, loss_mask=recipe.data.loss_mask,
                             max_seq_len=recipe.data.max_seq_len, load_image=load_image)
    lengths = [n if n > 0 else recipe.data.max_seq_len // 2 for n in index.n_tokens]
    if recipe.data.packing is not False and any(n <= 0 for n in index.n_tokens):
        lengths = _measure_lengths(dataset)
    train_ids, val_ids = _split(len(index), recipe)
    train_ids = _apply_weights(train_ids, index, recipe)
    packed, packing_note = resolve_packing(recipe.data.packing, recipe.model.attn_implementation,
                                           [lengths[i] for i in train_ids], recipe.train.micro_batch_size,
                                           recipe.train.seed)
    pack = recipe.data.max_seq_len * recipe.train.micro_batch_size if packed else None
    plan = BatchPlan([lengths[i] for i in train_ids], recipe.train.seed, recipe.train.micro_batch_size, pack,
                     accelerator.num_processes, recipe.train.grad_accum)
    if plan.steps_per_epoch == 0:
        raise MedvlError(
            f"{len(train_ids)} training samples make no full optimizer step for global batch "
            f"{recipe.global_batch}", fix="lower train.micro_batch_size / train.grad_accum, or add data")
    val = None
    if recipe.data.val:
        vindex = index_prepared([recipe.data.val])
        val = (EncodedDataset(vindex, processor, family, loss_mask=recipe.data.loss_mask,
                              max_seq_len=recipe.data.max_seq_len, load_image=load_image), list(range(len(vindex))))
    elif val_ids:
        val = (dataset, val_ids)
    return dataset, train_ids, plan, val, packing_note


def text_tokens_note(dataset, ids: list[int]) -> str:
    """The run header's line on where the text tokens come from (medvl/data/stored_tokens.py)."""
    from medvl.data.collate import expands_from_ids

    n = dataset.stored_count(ids)
    if n == len(ids):
        return f"text tokens: stored by prepare-data for all {n:,} samples"
    if not expands_from_ids(dataset.family):
        return f"text tokens: encoded in the loader ({dataset.family.name}'s processor tokenizes the text itself)"
    why = ("prepared with another tokenizer, chat template, loss mask or library versions"
           if any(dataset.index.text_keys)
           else "the manifest names no text encoding: prepared without --model, or resumed under another one")
    what = f"{len(ids) - n:,} of {len(ids):,} samples" if n else "all samples"
    return (f"text tokens: encoded in the loader for {what} ({why}); prepare-data --model with this model "
            "stores them")


def load_image(path):
    from medvl.data.images import load_image as load  # PIL + DICOM; imported only when a sample has images

    return load(path)


def _split(n: int, recipe) -> tuple[list[int], list[int]]:
    if not recipe.data.val_fraction:
        return list(range(n)), []
    import random

    ids = list(range(n))
    random.Random(recipe.train.seed).shuffle(ids)
    k = max(1, int(n * recipe.data.val_fraction))
    return sorted(ids[k:]), sorted(ids[:k])


def _apply_weights(ids: list[int], index, recipe) -> list[int]:
    """data.train[].weight repeats a source per epoch: 2.0 = twice, 0.5 = a seeded half (the same half every
    epoch, so the mixture is fixed for the run)."""
    import random

    weights = {str(index.roots[k]): 1.0 for k in range(len(index.shards))}
    for src in recipe.data.train:
        weights[str(Path(src.path))] = src.weight
    if all(w == 1.0 for w in weights.values()):
        return ids
    rng = random.Random(recipe.train.seed)
    out = []
    by_source: dict[str, list[int]] = {}
    for i in ids:
        by_source.setdefault(str(index.roots[index.shard_of[i]]), []).append(i)
    for root, members in by_source.items():
        w = weights.get(root, 1.0)
        whole, frac = int(w), w - int(w)
        out += members * whole + rng.sample(members, round(len(members) * frac))
    return out


def _measure_lengths(dataset) -> list[int]:
    out = []
    for i in range(len(dataset)):
        enc = dataset[i]
        out.append(len(enc) if hasattr(enc, "input_ids") else 1)
    return out


def make_loader(dataset, ids, plan, rank, start, total, num_workers, pad_id, pack, keepalive=None):
    import torch

    from medvl.data.dataset import StepBatchSampler

    class _Remapped:  # plan indices are positions in `ids` (the training split)
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return dataset[ids[i]]

    def _collate(encs):
        good = [e for e in encs if hasattr(e, "input_ids")]
        rejected = [e for e in encs if not hasattr(e, "input_ids")]
        return collate_with_keepalive(good, pad_id, pack, keepalive), rejected

    # Its own generator: a DataLoader iterator draws a seed from the global RNG, which would put a resumed run's
    # dropout one draw out of step with the uninterrupted run (LoRA dropout made that visible).
    return torch.utils.data.DataLoader(_Remapped(), batch_sampler=StepBatchSampler(plan, rank, start, total),
                                       collate_fn=_collate, num_workers=num_workers,
                                       generator=torch.Generator().manual_seed(plan.seed + rank),
                                       persistent_workers=False, prefetch_factor=4 if num_workers else None)


def keepalive_sample(processor, family):
    """A one-image sample whose labels are all ignored. Appended to a micro-batch that has no image when every
    rank must run the vision tower (its parameters train under DDP, or ZeRO-3 gathers it): the tower then runs
    inside the same forward, in the same module order, on every rank, and the loss is unchanged."""
    from PIL import Image

    from medvl.data.collate import Encoded, encode_record

    rec = {"id": "__keepalive__", "messages": [{"role": "user", "content": "<image>"},
                                               {"role": "assistant", "content": "."}]}
    enc = encode_record(rec, [Image.new("RGB", (56, 56))], processor, family)
    return Encoded(enc.input_ids, [IGNORE] * len(enc), enc.vision, enc.mm_token_type_ids, 1, 0, "__keepalive__")


def idle_sample(processor, family, keepalive=None):
    """The sample a rank runs when it has nothing to run (every sample of its micro-batch rejected at load time,
    or fewer validation batches than another rank) while other ranks run a forward: under DDP the backward's
    gradient all-reduce, under ZeRO-3 the forward's parameter all-gathers must happen on every rank, in step.
    Its labels are all ignored, so it adds 0 loss and 0 supervised tokens. Vision families: the keepalive row
    (runs the vision tower too); text families: one token."""
    if keepalive is not None:
        return keepalive
    if family.is_vision:
        return keepalive_sample(processor, family)
    from medvl.data.collate import Encoded
    from medvl.models import tokenizer_of

    tok = tokenizer_of(processor)
    token = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
    return Encoded([token], [IGNORE], sample_id="__keepalive__")


def idle_batch(idle, pad_id: int, pack: bool):
    """The micro-batch of `idle_sample` alone (counted as a keepalive row: no sample, no supervised token)."""
    import torch

    batch = collate([idle], pad_id, pack=pack)
    batch["keepalive"] = torch.tensor(1)
    return batch


def collate_with_keepalive(encs, pad_id: int, pack: bool, keepalive=None):
    if keepalive is not None and not any(e.n_images for e in encs):
        encs = encs + [keepalive]
    if not encs:
        return None
    import torch

    batch = collate(encs, pad_id, pack=pack)
    batch["keepalive"] = torch.tensor(int(encs[-1] is keepalive))
    return batch
