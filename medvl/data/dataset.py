"""Prepared data at training time: an index over the shards, encoding in DataLoader workers, and a batch plan
that every rank can compute alone and resume from any step.

The index keeps (shard, byte offset, token length) per sample, about 20 bytes each, so a million samples cost
~20 MB, not the records themselves. A sample is read, its images decoded and encoded only when a worker needs it.

Before anything is indexed, each prepared directory is verified against its manifest (`verify_prepared`): an
interrupted prepare-data (no manifest), a missing or extra shard, a shard whose record count or SHA-256 differs
from the manifest (truncated, edited) or a corrupt manifest is a clear error before step 1, not a crash at the
final save. The SHA-256 is computed on the bytes the index reads anyway. Image paths are re-checked against the
manifest's `image_roots` (paths.py): lexically for every sample at load, in full when an image is opened.

The batch plan is a pure function of (lengths, seed, epoch, micro-batch size or packing budget, world size,
gradient accumulation; a packed epoch after the first is fitted to epoch 0's count of rows):
each rank takes its own slice, and resuming means starting the plan at the saved position, so a resumed run
sees exactly the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from array import array
from dataclasses import dataclass
from pathlib import Path

from medvl.data.paths import allowed_resolved_path, path_problem, resolve_data_path
from medvl.errors import MedvlError

SHARD_GLOB = "data-*.jsonl"
MANIFEST_VERSION = 2  # the version prepare.py writes; 1 had no per-shard hashes to verify against


@dataclass
class SampleIndex:
    shards: list[Path]
    shard_of: array  # uint16 per sample
    offset: array  # uint64 byte offset per sample
    n_tokens: array  # int32 per sample, -1 when unknown
    roots: list[Path]  # per shard: the prepared directory (image paths without an image_root resolve in it)
    image_roots: list[tuple[str, ...]] = ()  # per shard: the folders its images may be opened in (manifest)
    text_keys: list[str | None] = ()  # per shard: the key its records' meta.tokens were made under (stored_tokens.py)

    def __len__(self) -> int:
        return len(self.offset)

    def read(self, i: int) -> dict:
        with open(self.shards[self.shard_of[i]], "rb") as f:
            f.seek(self.offset[i])
            return json.loads(f.readline())

    def image_paths(self, i: int, rec: dict) -> list[str]:
        """The absolute paths of sample i's images, each checked by the root rule (symlinks resolved)."""
        k = self.shard_of[i]
        base = rec.get("image_root") or self.roots[k]
        return [allowed_resolved_path(resolve_data_path(p, base), roots=self.image_roots[k],
                                      where=f"{self.shards[k]}: sample {rec.get('id')}") for p in rec.get("images", [])]


def _fail(what: str, where: str | Path, fix: str | None = None) -> MedvlError:
    return MedvlError(what, where=str(where), fix=fix or "run the prepare-data command that made it again with "
                                                         "--overwrite to re-create it")


def _prepare_fix(d: Path) -> str:
    """How to get prepared data where `d` is not; worded for train (data.train / data.val) and inspect-data alike."""
    if d.is_file() or (d.is_dir() and any(d.iterdir())):
        # Raw data given where prepared data belongs: prepare it into a new folder named after it, next to it
        # (raw/llava.json -> raw/llava; raw/ -> raw-prepared), never into the raw data itself.
        out = d.with_name(d.stem) if d.is_file() else d.with_name(f"{d.name}-prepared")
        if out.exists():
            out = d.with_name(f"{d.stem}-prepared")
        first = "prepare it" if d.is_file() else f"if {d} holds raw data, prepare it"
        return (f"{first} first: `medvl prepare-data {d} --out {out}`, then use {out} (data.train in the recipe, "
                f"or `medvl inspect-data {out} --model MODEL`)")
    return (f"prepare the raw data first: `medvl prepare-data RAW_DATA --out {d}`, or give the folder prepare-data "
            "wrote (data.train in the recipe, or the inspect-data argument)")


def verify_prepared(d: str | Path) -> dict:
    """The manifest of a complete prepared directory, or a MedvlError saying what is missing or wrong."""
    d = Path(d)
    if not d.is_dir():
        raise MedvlError(f"prepared data {d} not found" if not d.exists() else f"{d} is a file (raw data?), not a "
                         "prepared-data folder", where=str(d), fix=_prepare_fix(d))
    manifest_path = d / "manifest.json"
    if not manifest_path.is_file():
        if any(d.glob(SHARD_GLOB)) or (d / "prepare-state.json").exists():
            raise _fail("prepared data is incomplete: no manifest.json (prepare-data was interrupted or failed)",
                        d, "run the same prepare-data command again: it finishes the missing shards (a failed "
                           "run's leftovers are replaced)")
        raise _fail(f"no prepared data in {d} (no manifest.json, no {SHARD_GLOB} files)", d, _prepare_fix(d))
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(f"manifest.json is corrupt ({e})", manifest_path) from None
    listed = manifest.get("shard_files") if isinstance(manifest, dict) else None
    if not isinstance(listed, list) or not all(isinstance(s, dict) and {"file", "records", "sha256"} <= s.keys()
                                                 for s in listed):
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise _fail(f"manifest.json has no valid shard list (manifest version {version!r}, expected "
                    f"{MANIFEST_VERSION}): it is corrupt, or was written by an older medvl", manifest_path)
    names = {s["file"] for s in listed}
    missing = [s["file"] for s in listed if not (d / s["file"]).is_file()]
    if missing:
        raise _fail(f"prepared data is incomplete: {len(missing)} shard(s) listed in manifest.json are missing "
                    f"({', '.join(missing[:3])})", d)
    extra = sorted(p.name for p in d.glob(SHARD_GLOB) if p.name not in names)
    if extra:
        raise _fail(f"{', '.join(extra[:3])} is not in manifest.json (left over from another run?)", d)
    return manifest


def verify_recipe_data(recipe) -> None:
    """Every prepared folder a recipe trains or validates on is complete (`verify_prepared`): called before the
    model loads, and before launching several processes, so a broken prepare is one clear error, once."""
    for d in [s.path for s in recipe.data.train] + ([recipe.data.val] if recipe.data.val else []):
        verify_prepared(d)


def index_prepared(dirs: list[str | Path]) -> SampleIndex:
    shards, roots, image_roots, text_keys = [], [], [], []
    shard_of, offset, n_tokens = array("H"), array("Q"), array("i")
    for d in map(Path, dirs):
        manifest = verify_prepared(d)
        allowed = tuple(str(r) for r in manifest.get("image_roots") or ())
        ok_bases: set[str] = set()
        for entry in manifest["shard_files"]:
            path = d / entry["file"]
            k = len(shards)
            shards.append(path)
            roots.append(d)
            image_roots.append(allowed)
            text_keys.append(manifest.get("text_encoding_key"))
            count, pos, digest = 0, 0, hashlib.sha256()
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    digest.update(line)
                    if line.strip():
                        rec = _parse_line(line, path, lineno)
                        _check_paths(rec, d, allowed, f"{path}:{lineno}", ok_bases)
                        shard_of.append(k)
                        offset.append(pos)
                        n_tokens.append(int((rec.get("meta") or {}).get("n_tokens", -1)))
                        count += 1
                    pos += len(line)
            if count != entry["records"] or digest.hexdigest() != entry["sha256"]:
                got = f"{count} records" if count != entry["records"] else "different content"
                raise _fail(f"{entry['file']} does not match manifest.json ({got}; the manifest says "
                            f"{entry['records']} records, SHA-256 {entry['sha256'][:12]}...): the shard was truncated "
                            "or changed after prepare-data", path)
    return SampleIndex(shards, shard_of, offset, n_tokens, roots, image_roots, text_keys)


def _parse_line(line: bytes, path: Path, lineno: int) -> dict:
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(f"a prepared record is not valid JSON ({e}): the shard is truncated or corrupt",
                    f"{path}:{lineno}") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
        raise _fail("a prepared record is not a medvl record (no messages)", f"{path}:{lineno}")
    return rec


def _check_paths(rec: dict, d: Path, allowed: tuple[str, ...], where: str, ok_bases: set) -> None:
    """The cheap (lexical) root-rule pass over every sample at load; the full one runs when an image is opened.

    Fast path: a relative path without `..` under an image_root already found inside the allowed folders needs
    no further work (one set lookup; the whole pass costs ~1 s per million samples)."""
    images = rec.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise _fail("`images` must be a list of paths", where)
    base = rec.get("image_root") or str(d)
    for p in images:
        if base in ok_bases and not os.path.isabs(p) and ".." not in p:
            continue
        problem = path_problem(resolve_data_path(p, base), base=None, roots=allowed, lexical=True)
        if problem:
            raise MedvlError(f"image path outside the prepared data's image folders: {problem.split('; ')[0]}",
                             where=where, fix="prepared data may only name images under the folders its "
                                              "manifest.json lists (image_roots): re-run prepare-data with "
                                              "--image-root for that folder")
        if not os.path.isabs(p) and ".." not in p and path_problem(base, base=None, roots=allowed,
                                                                   lexical=True) is None:
            ok_bases.add(base)


class EncodedDataset:
    """Map-style dataset: index i -> Encoded (or Rejected, which the collate step drops and counts).

    Records whose shard was prepared under this run's text encoding key carry their text ids (meta.tokens) and
    skip the chat template and the tokenizer (medvl/data/stored_tokens.py)."""

    def __init__(self, index: SampleIndex, processor, family, *, loss_mask: str, max_seq_len: int | None,
                 load_image):
        from medvl.data.stored_tokens import text_encoding_key

        self.index, self.processor, self.family = index, processor, family
        self.loss_mask, self.max_seq_len, self.load_image = loss_mask, max_seq_len, load_image
        key = text_encoding_key(processor, family, loss_mask) if any(index.text_keys) else None
        self.stored_shards = [key is not None and k == key for k in index.text_keys]

    def __len__(self) -> int:
        return len(self.index)

    def record(self, i: int) -> dict:
        return self.index.read(i)

    def stored_count(self, ids) -> int:
        """How many of these samples carry text ids this run can use."""
        return sum(1 for i in ids if self.stored_shards[self.index.shard_of[i]])

    def __getitem__(self, i: int):
        from medvl.data.collate import encode_record
        from medvl.data.stored_tokens import from_stored

        rec = self.index.read(i)
        if rec.get("images") and not self.family.is_vision:
            from medvl.data.collate import Rejected

            return Rejected(str(rec.get("id", i)), "images_for_text_model",
                            f"{len(rec['images'])} image(s) but {self.family.name} is a text-only model")
        # image_root is a str in the JSON line; relative paths (every real dataset's `images/...`) join onto it
        images = [self.load_image(p) for p in self.index.image_paths(i, rec)]
        tokens = rec["meta"].get("tokens") if self.stored_shards[self.index.shard_of[i]] else None
        return encode_record(rec, images, self.processor, self.family, loss_mask=self.loss_mask,
                             max_seq_len=self.max_seq_len, stored=from_stored(tokens) if tokens else None)


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
class BatchPlan:
    """Which micro-batch each rank takes at each optimizer step, across epochs, resumable by step.

    Every epoch has the same number of steps (the scheduler's total and the resume position count on it). Padded
    epochs always have the same number of micro-batches; packed ones do not (the first-fit rows of another
    shuffle came out 792-800 for one dataset where epoch 0 had 800), so an epoch after the first is fitted to
    epoch 0's count of used rows (`fit_rows`) instead of running out of rows mid-epoch (an IndexError at the
    last steps of epoch 2 before) or silently leaving surplus rows out."""

    lengths: list[int]
    seed: int
    micro_batch: int
    pack_budget: int | None
    world: int
    grad_accum: int

    def __post_init__(self):
        self._cache: dict[int, list[list[int]]] = {}
        # Kept apart from the one-epoch cache: read through it, every micro-batch of epoch 2 onwards rebuilt the
        # plans of epochs 0 and e (54 ms a micro-batch at 200k samples, against 16 us).
        self._first = epoch_batches(self.lengths, seed=self.seed, epoch=0, micro_batch=self.micro_batch,
                                    pack_budget=self.pack_budget)
        self._used = len(self._first) // (self.world * self.grad_accum) * (self.world * self.grad_accum)

    def _epoch(self, e: int) -> list[list[int]]:
        if e == 0:
            return self._first
        if e not in self._cache:
            rows = epoch_batches(self.lengths, seed=self.seed, epoch=e, micro_batch=self.micro_batch,
                                 pack_budget=self.pack_budget)
            if self.pack_budget is not None:
                rows = fit_rows(rows, self._used, self.lengths, self.pack_budget)
            self._cache = {e: rows}
        return self._cache[e]

    @property
    def steps_per_epoch(self) -> int:
        # Every rank must take the same number of steps: the last partial window of an epoch is dropped.
        return self._used // (self.world * self.grad_accum)

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The grad_accum micro-batches rank `rank` runs at optimizer step `step` (0-based, across epochs)."""
        spe = self.steps_per_epoch
        epoch, s = divmod(step, spe)
        batches = self._epoch(epoch)
        base = s * self.world * self.grad_accum
        return [batches[base + m * self.world + rank] for m in range(self.grad_accum)]

    def dropped_per_epoch(self) -> int:
        """Samples epoch 0 leaves out (its last partial window). A later packed epoch may leave out a few more or
        fewer: its last rows hold other samples, and a sample that fits in no row of the fitted epoch waits."""
        return sum(len(b) for b in self._first[self._used:])


def fit_rows(rows: list[list[int]], target: int, lengths, budget: int) -> list[list[int]]:
    """Packed rows re-shaped to `target` rows without losing a sample where it can be helped: too few, and the
    fullest rows are split in two; too many, and the surplus rows' samples move (longest first, first fit) into
    rows with room. Samples that fit nowhere stay in rows past `target`, which the epoch leaves out, as epoch 0
    leaves out its partial window."""
    rows = [list(r) for r in rows]
    while len(rows) < target:
        k = max(range(len(rows)), key=lambda r: len(rows[r]))
        if len(rows[k]) < 2:
            break
        half = len(rows[k]) // 2
        rows[k:k + 1] = [rows[k][:half], rows[k][half:]]
    if len(rows) <= target:
        return rows
    kept, spill = rows[:target], [i for r in rows[target:] for i in r]
    room = [budget - sum(lengths[i] for i in r) for r in kept]
    left = []
    for i in sorted(spill, key=lambda i: -lengths[i]):
        k = next((k for k in range(len(kept)) if room[k] >= lengths[i]), None)
        if k is None:
            left.append(i)
        else:
            kept[k].append(i)
            room[k] -= lengths[i]
    return kept + [[i] for i in left]


class StepBatchSampler:
    """A torch batch sampler over the plan, from a start step: DataLoader workers then encode ahead."""

    def __init__(self, plan: BatchPlan, rank: int, start_step: int, total_steps: int):
        self.plan, self.rank, self.start, self.total = plan, rank, start_step, total_steps

    def __iter__(self):
        for step in range(self.start, self.total):
            yield from self.plan.micro_batches(step, self.rank)

    def __len__(self) -> int:
        return (self.total - self.start) * self.plan.grad_accum
