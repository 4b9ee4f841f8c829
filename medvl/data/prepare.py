"""`medvl prepare-data`: raw files in, clean shards + manifest + quarantine out, before any GPU is rented.

    result = prepare(["pubmedvision.json", "disc.jsonl"], "data/mix", model="Qwen/Qwen2.5-VL-7B-Instruct")

Output directory:
  data-00000.jsonl ...     normalized records (medvl/data/schema.py), `meta.n_tokens` = exact length when
                           a model is given (text tokens + the processor's own visual-token count per image)
  quarantine-00000.jsonl   every rejected sample of that shard: code, message, location, id
  stats-00000.json         the shard's counts; written last, so its presence means the shard is complete
  quarantine.jsonl         all rejections, merged at the end
  manifest.json            counts per source and per reason, image and token histograms, versions,
                           settings, and a content hash over the shards (the run records it)

Shards follow input order: shard k holds what became of input samples k*S .. (k+1)*S-1. An interrupted run
re-run with the same settings skips every complete shard and redoes the rest, so no sample is lost or written
twice. Memory stays constant: the reader streams, and at most 2 x workers shards are in flight.
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
from medvl.data.formats import ReadOptions, read_file
from medvl.data.schema import Record, Rejection
from medvl.errors import MedvlError
from medvl.progress import NullProgress
from medvl.versions import library_versions

MANIFEST_VERSION = 1


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
    image_root: str | None = None
    frame: str = "middle"

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PrepareResult:
    out_dir: Path
    manifest: dict
    skipped_shards: int = 0
    rejections: list[dict] = field(default_factory=list)  # the first few, for the summary


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


def _policy(settings: Settings) -> CheckPolicy:
    return CheckPolicy(max_images=settings.max_images, frame=settings.frame)


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
                      max_seq_len=settings.max_seq_len)
        if isinstance(out, Rejected):
            code = {"too_long": "too-long", "no_supervised_tokens": "no-trainable-turn"}.get(out.reason, "template")
            return Rejection(code, out.message, checked.location, checked.id)
        kept, n_tokens, visual = out
        if len(kept) < len(rec["messages"]):
            dropped = len(rec["messages"]) - len(kept)
            rec["messages"] = kept
            rec["images"] = rec["images"][:len(visual)]
            rec["meta"]["image_sizes"] = rec["meta"].get("image_sizes", [])[:len(visual)]
            rec["meta"].setdefault("repairs", []).append(f"dropped {dropped} trailing turn(s) to fit max_seq_len")
        rec["meta"]["n_tokens"] = n_tokens
        rec["meta"]["visual_tokens"] = visual
    return rec


def process_shard(k: int, items: list, out_dir: str, settings: Settings | None = None) -> dict:
    """Check and measure one shard's samples and write its three files; returns the shard's stats."""
    settings = settings or _WORKER["settings"]
    if settings.model and "processor" not in _WORKER:
        _worker_init(settings)
    out = Path(out_dir)
    stats = {"shard": k, "inputs": len(items), "accepted": 0, "rejected": Counter(), "sources": Counter(),
             "rejected_sources": Counter(), "images": 0, "n_tokens": [], "visual_tokens": [], "modalities": Counter(),
             "repaired": 0}
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
            stats["repaired"] += bool(meta.get("repairs"))
            stats["modalities"][meta.get("modality") or ("text" if not res["images"] else "unknown")] += 1
            if "n_tokens" in meta:
                stats["n_tokens"].append(meta["n_tokens"])
                stats["visual_tokens"].extend(meta["visual_tokens"])
    data_path = out / f"data-{k:05d}.jsonl"
    os.replace(data_tmp, data_path)
    os.replace(quar_tmp, out / f"quarantine-{k:05d}.jsonl")
    stats["sha256"] = _file_sha(data_path)
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

def _stream(settings: Settings):
    options = ReadOptions(image_root=settings.image_root)
    for path in settings.inputs:
        yield from read_file(path, settings.format, options=options)


def _open_output(out: Path, settings: Settings, overwrite: bool) -> set[int]:
    """Create or reopen the output directory; the shards already complete (for resuming)."""
    state = out / "prepare-state.json"
    if out.is_dir() and any(out.iterdir()):
        old = json.loads(state.read_text()).get("fingerprint") if state.is_file() else None
        if old != settings.fingerprint() or (out / "manifest.json").is_file() and overwrite:
            if not overwrite:
                raise MedvlError(
                    f"{out} already holds prepared data made with other inputs or settings", where=str(out),
                    fix="choose a new --out directory, or pass --overwrite to replace it")
            import shutil

            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"fingerprint": settings.fingerprint(), "settings": asdict(settings)}, indent=2))
    return {int(p.stem.split("-")[1]) for p in out.glob("stats-*.json")}


def prepare(inputs, out_dir, *, format: str | None = None, model: str | None = None, max_seq_len: int | None = None,
            max_images: int = 8, min_pixels: int | None = None, max_pixels: int | None = None,
            loss_mask: str = "all", shard_size: int = 10_000, workers: int = 1, strict: bool = False,
            image_root: str | None = None, overwrite: bool = False, progress=None) -> PrepareResult:
    progress = progress or NullProgress()
    missing = [str(p) for p in inputs if not Path(p).is_file()]
    if missing:
        raise MedvlError(f"input file(s) not found: {', '.join(missing)}", fix="check the paths")
    if max_seq_len and not model:
        raise MedvlError("--max-seq-len needs --model: lengths are measured with the model's own processor",
                         fix="add --model PATH_OR_ID (the model you will train)")
    settings = Settings(tuple(str(Path(p).resolve()) for p in inputs), format, model and str(model), max_seq_len,
                        max_images, min_pixels, max_pixels, loss_mask, shard_size, image_root)
    out = Path(out_dir)
    done = _open_output(out, settings, overwrite)
    stream = _stream(settings)
    progress.start("prepare", None)
    if strict:
        _worker_init(settings)
        return _finish(out, settings, _run_strict(stream, out, settings, done, progress), len(done), progress)
    if workers <= 1:
        _worker_init(settings)
        stats = [process_shard(k, chunk, str(out), settings) for k, chunk in _chunks(stream, settings, done, progress)]
    else:
        stats = _run_parallel(stream, out, settings, done, workers, progress)
    return _finish(out, settings, stats, len(done), progress)


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


def _histogram(values: list[int]) -> dict[str, int]:
    """Counts in power-of-two bins: '64-127': n."""
    bins: Counter = Counter()
    for v in values:
        lo = 1 << max(0, int(v).bit_length() - 1) if v > 0 else 0
        bins[f"{lo}-{max(lo * 2 - 1, 0)}"] += 1
    return dict(sorted(bins.items(), key=lambda kv: int(kv[0].split("-")[0])))


def _finish(out: Path, settings: Settings, new_stats: list[dict], skipped: int, progress) -> PrepareResult:
    progress.finish()
    all_stats = sorted((json.loads(p.read_text()) for p in out.glob("stats-*.json")), key=lambda s: s["shard"])
    totals = {"inputs": 0, "accepted": 0, "images": 0, "repaired": 0}
    rejected, sources, rejected_sources, modalities = Counter(), Counter(), Counter(), Counter()
    n_tokens, visual = [], []
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
            with open(out / f"quarantine-{s['shard']:05d}.jsonl", encoding="utf-8") as f:
                quar.write(f.read())
    os.replace(out / ".quarantine.jsonl.tmp", out / "quarantine.jsonl")
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
    }
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    os.replace(tmp, out / "manifest.json")
    first = []
    with open(out / "quarantine.jsonl", encoding="utf-8") as f:
        first = [json.loads(line) for line in islice(f, 20)]
    return PrepareResult(out, manifest, skipped, first)
