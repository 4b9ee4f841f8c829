"""`medvl prepare-data`: raw files in, clean shards + manifest + quarantine out, before any GPU is rented.

    result = prepare(["pubmedvision.json", "disc.jsonl"], "data/mix", model="Qwen/Qwen2.5-VL-7B-Instruct")

Inputs are files or folders (inputs.py: what is read, what is skipped and why). A file that cannot be read is a
file-level failure: the other files are finished, the manifest lists it under `files`, and `result.failed` is
true (the CLI exits 2). Image paths follow the one root rule (paths.py): the dataset file's folder and the
`image_roots` given; a relative path resolves against the file's folder (an InternVL meta's `root`), or, when
not found there, against the first image root that holds it.

Output directory:
  data-00000.jsonl ...     normalized records (medvl/data/schema.py), `meta.n_tokens` = exact length when
                           a model is given (text tokens + the processor's own visual-token count per image)
  quarantine-00000.jsonl   every rejected sample of that shard: code, message, location, id
  stats-00000.json         the shard's counts; written last, so its presence means the shard is complete
  quarantine.jsonl         all rejections, merged at the end
  manifest.json            counts per source and per reason, image and token histograms, versions,
                           settings, each shard's record count and SHA-256 (train verifies them before step
                           1), the folders images may come from, the files read / failed / skipped, and a
                           content hash over the shards (the run records it). Written last: without it the
                           output is an unfinished run, which train refuses.

Shards follow input order: shard k holds what became of input samples k*S .. (k+1)*S-1. An interrupted run
re-run with the same settings and unchanged input files (size and mtime) skips every complete shard and redoes
the rest, so no sample is lost or written twice. A run that failed before its first shard was complete leaves
nothing behind (no state file, no empty folder), so the corrected command simply starts. Memory stays constant
apart from the duplicate-id set (inputs.py): the reader streams, and at most 2 x workers shards are in flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

from medvl.data.checks import CheckPolicy, check_record
from medvl.data.formats import ReadOptions
from medvl.data.images import ResolutionPolicy
from medvl.data.inputs import FileReport, Skipped, expand_inputs, read_inputs, unique_ids
from medvl.data.output import cleanup_failed, open_output
from medvl.data.schema import Record, Rejection
from medvl.data.stored_tokens import text_encoding_key, to_stored
from medvl.errors import MedvlError
from medvl.progress import NullProgress
from medvl.versions import library_versions

MANIFEST_VERSION = 2  # 2: shard_files, image_roots, files


@dataclass(frozen=True)
class Settings:
    """Everything that changes the output; a resumed run must match it exactly."""

    inputs: tuple[str, ...]
    format: str | None = None
    model: str | None = None
    max_seq_len: int | None = None
    max_images: int = 8
    min_pixels: int | None = None
    max_pixels: int | None = None
    loss_mask: str = "all"
    shard_size: int = 10_000
    image_roots: tuple[str, ...] = ()  # --image-root folders (absolute): allowed, and searched for relative paths
    frame: str = "middle"
    columns: tuple[tuple[str, str], ...] = ()

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PrepareResult:
    out_dir: Path
    manifest: dict
    skipped_shards: int = 0
    rejections: list[dict] = field(default_factory=list)  # the first few, for the summary
    files: list[dict] = field(default_factory=list)  # per input file: path, samples, error, kept
    skipped_files: list[dict] = field(default_factory=list)  # {path, reason} for folder entries not read

    @property
    def failed_files(self) -> list[dict]:
        return [f for f in self.files if f["error"]]

    @property
    def failed(self) -> bool:
        """A file could not be read, or nothing at all was kept: the CLI exits 2 after the summary."""
        return bool(self.failed_files) or self.manifest["accepted"] == 0


# ---------------------------------------------------------------------------------------------------------
# worker side: one shard

_WORKER: dict = {}


def _worker_init(settings: Settings) -> None:
    _WORKER.clear()
    _WORKER["settings"] = settings
    if settings.model:
        from medvl.families import detect_family
        from medvl.models import apply_resolution, load_processor

        family = detect_family(settings.model)
        processor = load_processor(settings.model, family)
        apply_resolution(processor, family, settings.min_pixels, settings.max_pixels)
        _WORKER["family"], _WORKER["processor"] = family, processor
        _WORKER["text_key"] = text_encoding_key(processor, family, settings.loss_mask)


def _policy(settings: Settings) -> CheckPolicy:
    # Qwen-VL processors refuse images over 200:1 (a ValueError at measuring time): refuse them as a check instead.
    family = _WORKER.get("family")
    resolution = ResolutionPolicy() if family is not None and family.mrope else None
    roots = settings.image_roots + tuple(sorted({str(Path(p).parent) for p in settings.inputs}))
    return CheckPolicy(max_images=settings.max_images, frame=settings.frame, resolution=resolution, roots=roots,
                       search=settings.image_roots)


def process_item(item: Record | Rejection, settings: Settings) -> dict | Rejection:
    """One sample through the checks and the exact length measurement: a record dict or a Rejection."""
    if isinstance(item, Rejection):
        return item
    checked = check_record(item, _policy(settings))
    if isinstance(checked, Rejection):
        return checked
    rec = checked.to_dict()
    if "processor" in _WORKER:
        from medvl.data.collate import Rejected, measure

        family = _WORKER["family"]
        if rec["images"] and not family.is_vision:
            return Rejection("images-for-text-model", f"{len(rec['images'])} image(s), but {settings.model} is "
                             "a text-only model", checked.location, checked.id)
        sizes = [tuple(s) for s in rec["meta"].get("image_sizes", [])]
        out = measure(rec, sizes, _WORKER["processor"], family, loss_mask=settings.loss_mask,
                      max_seq_len=settings.max_seq_len, keep_text=bool(_WORKER["text_key"]))
        if isinstance(out, Rejected):
            code = {"too_long": "too-long", "no_supervised_tokens": "no-trainable-turn"}.get(out.reason, "template")
            return Rejection(code, out.message, checked.location, checked.id)
        kept, n_tokens, visual, text = out
        if len(kept) < len(rec["messages"]):
            dropped = len(rec["messages"]) - len(kept)
            rec["messages"] = kept
            rec["images"] = rec["images"][:len(visual)]
            rec["meta"]["image_sizes"] = rec["meta"].get("image_sizes", [])[:len(visual)]
            rec["meta"].setdefault("repairs", []).append(f"dropped {dropped} trailing turn(s) to fit max_seq_len")
        rec["meta"]["n_tokens"] = n_tokens
        rec["meta"]["visual_tokens"] = visual
        stored = to_stored(*text) if text is not None else None
        if stored is not None:
            rec["meta"]["tokens"] = stored
    return rec


def process_shard(k: int, items: list, out_dir: str, settings: Settings | None = None) -> dict:
    """Check and measure one shard's samples and write its three files; returns the shard's stats."""
    settings = settings or _WORKER["settings"]
    if settings.model and "processor" not in _WORKER:
        _worker_init(settings)
    out = Path(out_dir)
    stats = {"shard": k, "inputs": len(items), "accepted": 0, "rejected": Counter(), "sources": Counter(),
             "rejected_sources": Counter(), "images": 0, "n_tokens": [], "visual_tokens": [], "modalities": Counter(),
             "repaired": 0, "image_roots": set(), "text_key": _WORKER.get("text_key")}
    data_tmp, quar_tmp = out / f".data-{k:05d}.jsonl.tmp", out / f".quarantine-{k:05d}.jsonl.tmp"
    with open(data_tmp, "w", encoding="utf-8") as data, open(quar_tmp, "w", encoding="utf-8") as quar:
        for item in items:
            res = process_item(item, settings)
            if isinstance(res, Rejection):
                quar.write(res.to_json() + "\n")
                stats["rejected"][res.code] += 1
                stats["rejected_sources"][_source_of(item)] += 1
                continue
            data.write(json.dumps(res, ensure_ascii=False) + "\n")
            meta = res["meta"]
            stats["accepted"] += 1
            stats["sources"][res["source"]] += 1
            stats["images"] += len(res["images"])
            if res["images"] and res["image_root"]:
                stats["image_roots"].add(res["image_root"])
            stats["repaired"] += bool(meta.get("repairs"))
            stats["modalities"][meta.get("modality") or ("text" if not res["images"] else "unknown")] += 1
            if "n_tokens" in meta:
                stats["n_tokens"].append(meta["n_tokens"])
                stats["visual_tokens"].extend(meta["visual_tokens"])
    data_path = out / f"data-{k:05d}.jsonl"
    os.replace(data_tmp, data_path)
    os.replace(quar_tmp, out / f"quarantine-{k:05d}.jsonl")
    stats["sha256"] = _file_sha(data_path)
    stats["image_roots"] = sorted(stats["image_roots"])
    stats = {key: dict(v) if isinstance(v, Counter) else v for key, v in stats.items()}
    stats_tmp = out / f".stats-{k:05d}.json.tmp"
    stats_tmp.write_text(json.dumps(stats))
    os.replace(stats_tmp, out / f"stats-{k:05d}.json")  # last: marks the shard complete
    return stats


def _source_of(item) -> str:
    if isinstance(item, Record):
        return item.source
    loc = getattr(item, "location", "")
    return Path(loc.split("[")[0].split(":")[0]).stem or "unknown"


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# driver


def prepare(inputs, out_dir, *, format: str | None = None, model: str | None = None, max_seq_len: int | None = None,
            max_images: int = 8, min_pixels: int | None = None, max_pixels: int | None = None,
            loss_mask: str = "all", shard_size: int = 10_000, workers: int = 1, strict: bool = False,
            image_root: str | list[str] | None = None, columns: str | None = None, overwrite: bool = False,
            progress=None) -> PrepareResult:
    """Prepare `inputs` (files or folders) into `out_dir`. `image_root`: one folder or a list (--image-root)."""
    from medvl.data.formats import canonical_format, parse_columns

    progress = progress or NullProgress()
    out = Path(out_dir)
    if max_seq_len and not model:
        raise MedvlError("--max-seq-len needs --model: lengths are measured with the model's own processor",
                         fix="add --model PATH_OR_ID (the model you will train)")
    if format:
        canonical_format(format)  # an unknown name is refused before anything is read or written
    roots = [image_root] if isinstance(image_root, (str, Path)) else list(image_root or [])
    bad = [str(r) for r in roots if not Path(r).is_dir()]
    if bad:
        raise MedvlError(f"--image-root {', '.join(bad)}: not a folder", fix="give existing folders")
    files, skipped = expand_inputs(inputs)
    settings = Settings(tuple(f.path for f in files), format, model and str(model), max_seq_len, max_images,
                        min_pixels, max_pixels, loss_mask, shard_size,
                        tuple(str(Path(r).resolve()) for r in roots), columns=parse_columns(columns) if columns else ())
    created = not out.exists()
    done = open_output(out, settings, overwrite)
    reports: list[FileReport] = []
    try:
        stream = unique_ids(read_inputs(files, settings.format, _read_options(settings), reports, strict=strict))
        progress.start("prepare", None)
        if strict:
            _worker_init(settings)
            _run_strict(stream, out, settings, done, progress)
        elif workers <= 1:
            _worker_init(settings)
            for k, chunk in _chunks(stream, settings, done, progress):
                process_shard(k, chunk, str(out), settings)
        else:
            _run_parallel(stream, out, settings, done, workers, progress)
        if not any(r.samples for r in reports):  # every file failed: there is nothing to write a manifest for
            raise MedvlError("no samples could be read from any input:\n  " + "\n  ".join(
                r.error or f"{r.path}: no samples" for r in reports), fix="fix the files listed; nothing was written")
    except BaseException:
        progress.finish()
        cleanup_failed(out, created)
        raise
    return _finish(out, settings, len(done), progress, reports, skipped)


def _read_options(settings: Settings) -> ReadOptions:
    return ReadOptions(columns=settings.columns)


def _chunks(stream, settings: Settings, done: set[int], progress):
    k = 0
    while True:
        chunk = list(islice(stream, settings.shard_size))
        if not chunk:
            return
        progress.advance(len(chunk))
        if k not in done:
            yield k, chunk
        k += 1


def _run_parallel(stream, out: Path, settings: Settings, done: set[int], workers: int, progress) -> list[dict]:
    import multiprocessing as mp

    stats, pending = [], []
    # spawn, not fork: the parent may hold torch/tokenizers threads, which fork does not copy safely
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(settings,)) as pool:
        try:
            for k, chunk in _chunks(stream, settings, done, progress):
                with _sigint_ignored():  # workers start inside submit(); an ignored signal survives their exec
                    pending.append(pool.submit(process_shard, k, chunk, str(out)))
                while len(pending) >= 2 * workers:  # bounded in flight: constant memory
                    stats.append(pending.pop(0).result())
            stats += [f.result() for f in pending]
        except KeyboardInterrupt:
            # Ctrl-C reaches every process of the terminal; the workers ignore it (each used to print its own
            # traceback, ~110 lines for 2 workers), the parent stops them. Shards are written whole or not at
            # all, so the next run continues from the completed ones.
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return stats


@contextlib.contextmanager
def _sigint_ignored():
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_strict(stream, out: Path, settings: Settings, done: set[int], progress) -> list[dict]:
    stats = []
    for k, chunk in _chunks(stream, settings, done, progress):
        for item in chunk:
            res = process_item(item, settings)
            if isinstance(res, Rejection):
                raise MedvlError(f"bad sample ({res.code}): {res.message}", where=res.location,
                                 fix="fix or remove the sample, or run without --strict to quarantine it and go on")
        stats.append(process_shard(k, chunk, str(out), settings))
    return stats


def _file_summaries(reports: list[FileReport], sources: Counter) -> list[dict]:
    """Per input file: samples read, kept, and the file-level error (a failure, or "nothing kept")."""
    files = []
    for r in reports:
        kept = sum(sources.get(src, 0) for src in r.sources)
        error = r.error
        if error is None and r.samples and not kept:
            error = (f"{r.path}: none of its {r.samples} samples was kept (all quarantined; see quarantine.jsonl "
                     "for the reasons)")
        files.append({**r.as_dict(), "kept": kept, "error": error})
    return files


def _histogram(values: list[int]) -> dict[str, int]:
    """Counts in power-of-two bins: '64-127': n."""
    bins: Counter = Counter()
    for v in values:
        lo = 1 << max(0, int(v).bit_length() - 1) if v > 0 else 0
        bins[f"{lo}-{max(lo * 2 - 1, 0)}"] += 1
    return dict(sorted(bins.items(), key=lambda kv: int(kv[0].split("-")[0])))


def _finish(out: Path, settings: Settings, skipped: int, progress, reports: list[FileReport],
            skipped_files: list[Skipped]) -> PrepareResult:
    progress.finish()
    all_stats = sorted((json.loads(p.read_text()) for p in out.glob("stats-*.json")), key=lambda s: s["shard"])
    totals = {"inputs": 0, "accepted": 0, "images": 0, "repaired": 0}
    rejected, sources, rejected_sources, modalities = Counter(), Counter(), Counter(), Counter()
    n_tokens, visual, shard_files, text_keys = [], [], [], set()
    image_roots = set(settings.image_roots) | {str(Path(p).parent) for p in settings.inputs}
    content = hashlib.sha256()
    with open(out / ".quarantine.jsonl.tmp", "w", encoding="utf-8") as quar:
        for s in all_stats:
            for key in totals:
                totals[key] += s[key]
            rejected.update(s["rejected"])
            sources.update(s["sources"])
            rejected_sources.update(s["rejected_sources"])
            modalities.update(s["modalities"])
            n_tokens += s["n_tokens"]
            visual += s["visual_tokens"]
            content.update(s["sha256"].encode())
            shard_files.append({"file": f"data-{s['shard']:05d}.jsonl", "records": s["accepted"], "sha256": s["sha256"]})
            image_roots.update(s.get("image_roots", []))
            text_keys.add(s.get("text_key"))
            with open(out / f"quarantine-{s['shard']:05d}.jsonl", encoding="utf-8") as f:
                quar.write(f.read())
    os.replace(out / ".quarantine.jsonl.tmp", out / "quarantine.jsonl")
    files = _file_summaries(reports, sources)
    manifest = {
        "version": MANIFEST_VERSION, "settings": asdict(settings), "fingerprint": settings.fingerprint(),
        "shards": len(all_stats), **totals, "rejected": dict(sorted(rejected.items())),
        "rejected_total": sum(rejected.values()),
        "sources": {src: {"accepted": sources.get(src, 0), "rejected": rejected_sources.get(src, 0)}
                    for src in sorted(set(sources) | set(rejected_sources))},
        "modalities": dict(modalities.most_common()),
        "token_lengths": {"histogram": _histogram(n_tokens), "max": max(n_tokens, default=None),
                          "mean": round(sum(n_tokens) / len(n_tokens), 1) if n_tokens else None},
        "visual_tokens_per_image": {"histogram": _histogram(visual), "max": max(visual, default=None)},
        "versions": library_versions(), "content_hash": content.hexdigest(),
        "shard_files": shard_files,
        # the folders training may open images in (paths.py root rule, re-checked when the data is loaded)
        "image_roots": sorted(image_roots),
        # records carry meta.tokens made under this key (stored_tokens.py); null when none do, or when shards of a
        # resumed run were made under different keys (a changed tokenizer or template between the two runs)
        "text_encoding_key": text_keys.pop() if len(text_keys) == 1 else None,
        # a folder of 100k images beside the JSON must not make a 10 MB manifest: the first 200, and the count
        "files": files, "warnings": [w for f in files for w in f["warnings"]],
        "skipped_files": [asdict(x) for x in skipped_files[:200]],
        "skipped_files_total": len(skipped_files),
    }
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    os.replace(tmp, out / "manifest.json")
    with open(out / "quarantine.jsonl", encoding="utf-8") as f:
        first = [json.loads(line) for line in islice(f, 20)]
    return PrepareResult(out, manifest, skipped, first, files, [asdict(x) for x in skipped_files])
