"""Prepared data at training time: an index over the shards, encoding in DataLoader workers, and a batch plan
that every rank can compute alone and resume from any step.

The index keeps (shard, byte offset, token length) per sample, about 20 bytes each, so a million samples cost
~20 MB, not the records themselves. A sample is read, its images decoded and encoded only when a worker needs it.

The batch plan is a pure function of (lengths, seed, epoch, micro-batch size or packing budget, world size):
each rank takes its own slice, and resuming means starting the plan at the saved position, so a resumed run
sees exactly the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import random
from array import array
from dataclasses import dataclass
from pathlib import Path

from medvl.errors import MedvlError

SHARD_GLOB = "data-*.jsonl"


@dataclass
class SampleIndex:
    shards: list[Path]
    shard_of: array  # uint16 per sample
    offset: array  # uint64 byte offset per sample
    n_tokens: array  # int32 per sample, -1 when unknown
    roots: list[Path]  # per shard: the prepared directory (image paths are relative to it)

    def __len__(self) -> int:
        return len(self.offset)

    def read(self, i: int) -> dict:
        with open(self.shards[self.shard_of[i]], "rb") as f:
            f.seek(self.offset[i])
            return json.loads(f.readline())


def index_prepared(dirs: list[str | Path]) -> SampleIndex:
    shards, roots = [], []
    shard_of, offset, n_tokens = array("H"), array("Q"), array("i")
    for d in map(Path, dirs):
        files = sorted(d.glob(SHARD_GLOB))
        if not files:
            raise MedvlError(f"no prepared data in {d} (no {SHARD_GLOB} files)", where=str(d),
                             fix=f"run `medvl prepare-data RAW_DATA --out {d}` first, or fix data.train in the recipe")
        for path in files:
            k = len(shards)
            shards.append(path)
            roots.append(d)
            pos = 0
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        shard_of.append(k)
                        offset.append(pos)
                        meta = json.loads(line).get("meta") or {}
                        n_tokens.append(int(meta.get("n_tokens", -1)))
                    pos += len(line)
    return SampleIndex(shards, shard_of, offset, n_tokens, roots)


class EncodedDataset:
    """Map-style dataset: index i -> Encoded (or Rejected, which the collate step drops and counts)."""

    def __init__(self, index: SampleIndex, processor, family, *, loss_mask: str, max_seq_len: int | None,
                 load_image):
        self.index, self.processor, self.family = index, processor, family
        self.loss_mask, self.max_seq_len, self.load_image = loss_mask, max_seq_len, load_image

    def __len__(self) -> int:
        return len(self.index)

    def record(self, i: int) -> dict:
        return self.index.read(i)

    def __getitem__(self, i: int):
        from medvl.data.collate import encode_record

        rec = self.index.read(i)
        if rec.get("images") and not self.family.is_vision:
            from medvl.data.collate import Rejected

            return Rejected(str(rec.get("id", i)), "images_for_text_model",
                            f"{len(rec['images'])} image(s) but {self.family.name} is a text-only model")
        # image_root is a str in the JSON line; relative paths (every real dataset's `images/...`) join onto it
        root = Path(rec.get("image_root") or self.index.roots[self.index.shard_of[i]])
        images = [self.load_image(p if Path(p).is_absolute() else root / p) for p in rec.get("images", [])]
        return encode_record(rec, images, self.processor, self.family, loss_mask=self.loss_mask,
                             max_seq_len=self.max_seq_len)


# ---------------------------------------------------------------------------------------------------------
# the batch plan

def epoch_batches(lengths, *, seed: int, epoch: int, micro_batch: int, pack_budget: int | None) -> list[list[int]]:
    """All micro-batches of one epoch (for all ranks together), in order.

    Padded: a seeded shuffle cut into groups of `micro_batch`. Packed: a seeded shuffle, then first-fit into
    rows of at most `pack_budget` tokens; each row is one micro-batch (the engine sets the budget to
    micro_batch_size x max_seq_len, the token count of a full padded micro-batch).
    """
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if pack_budget is None:
        return [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        n = lengths[i]
        # first fit among the last few open rows keeps it O(n) and the order close to the shuffle
        for r in range(max(0, len(rows) - 8), len(rows)):
            if used[r] + n <= pack_budget:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    return rows


@dataclass
class Plan:
    """Which micro-batch each rank takes at each optimizer step, across epochs, resumable by step."""

    lengths: list[int]
    seed: int
    micro_batch: int
    pack_budget: int | None
    world: int
    grad_accum: int

    def __post_init__(self):
        self._cache: dict[int, list[list[int]]] = {}

    def _epoch(self, e: int) -> list[list[int]]:
        if e not in self._cache:
            self._cache = {e: epoch_batches(self.lengths, seed=self.seed, epoch=e, micro_batch=self.micro_batch,
                                            pack_budget=self.pack_budget)}
        return self._cache[e]

    @property
    def steps_per_epoch(self) -> int:
        # Every rank must take the same number of steps: the last partial window of an epoch is dropped.
        return len(self._epoch(0)) // (self.world * self.grad_accum)

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The grad_accum micro-batches rank `rank` runs at optimizer step `step` (0-based, across epochs)."""
        spe = self.steps_per_epoch
        epoch, s = divmod(step, spe)
        batches = self._epoch(epoch)
        base = s * self.world * self.grad_accum
        return [batches[base + m * self.world + rank] for m in range(self.grad_accum)]

    def dropped_per_epoch(self) -> int:
        batches = self._epoch(0)
        return sum(len(b) for b in batches[self.steps_per_epoch * self.world * self.grad_accum:])


class StepBatchSampler:
    """A torch batch sampler over the plan, from a start step: DataLoader workers then encode ahead."""

    def __init__(self, plan: Plan, rank: int, start_step: int, total_steps: int):
        self.plan, self.rank, self.start, self.total = plan, rank, start_step, total_steps

    def __iter__(self):
        for step in range(self.start, self.total):
            yield from self.plan.micro_batches(step, self.rank)

    def __len__(self) -> int:
        return (self.total - self.start) * self.plan.grad_accum
