"""Shared fixtures: offline mode, tiny models built once per session, a GPU marker."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process: the tiny models gain nothing from more, and on a shared 2-core machine torch's
# default of one thread per core made single tests swing from 3 s to 11 s. Launched workers inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava", "internvl", "causal-lm", "glm4")
VISION_FAMILIES = FAMILIES[:5]


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(family) -> path of a saved tiny model of that family, built once per test session."""
    built: dict[str, object] = {}

    def get(family: str):
        if family not in built:
            from medvl.tiny import build_tiny

            path = tmp_path_factory.mktemp(f"tiny-{family}")
            build_tiny(family, path / "model")
            built[family] = path / "model"
        return built[family]

    return get


def write_prepared(out, n: int = 64, *, text_only_every: int = 0, split: str = "train", offset: int = 0):
    """A prepared-data directory (the prepare-data output shape) of easy-vqa questions with their images."""
    import json
    from pathlib import Path

    import easy_vqa

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    questions, answers, image_ids = (easy_vqa.get_train_questions() if split == "train"
                                     else easy_vqa.get_test_questions())
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    with open(out / "data-00000.jsonl", "w") as f:
        for i in range(offset, offset + n):
            if text_only_every and i % text_only_every == 0:
                rec = {"id": f"t{i}", "source": "test", "images": [], "meta": {},
                       "messages": [{"role": "user", "content": f"is {answers[i]} a colour or a shape?"},
                                    {"role": "assistant", "content": "a word", "train": True}]}
            else:
                rec = {"id": f"e{i}", "source": "easy-vqa", "images": [paths[image_ids[i]]], "meta": {},
                       "messages": [{"role": "user", "content": "<image>" + questions[i]},
                                    {"role": "assistant", "content": answers[i], "train": True}]}
            f.write(json.dumps(rec) + "\n")
    write_manifest(out, image_roots=[str(Path(p).parent) for p in list(paths.values())[:1]])
    return out


def write_manifest(out, *, image_roots=()):
    """The manifest.json train verifies a prepared directory against (per-shard record count and SHA-256, the
    folders images may come from), for prepared data written by hand in tests."""
    import hashlib
    import json
    from pathlib import Path

    out = Path(out)
    shards = []
    for path in sorted(out.glob("data-*.jsonl")):
        data = path.read_bytes()
        shards.append({"file": path.name, "records": sum(1 for line in data.splitlines() if line.strip()),
                       "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"version": 2, "shards": len(shards), "accepted": sum(s["records"] for s in shards),
                "shard_files": shards, "image_roots": sorted(image_roots)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="session")
def prepared_vqa(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("prepared") / "vqa", 96, text_only_every=6)


@pytest.fixture(scope="session")
def prepared_text(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("prepared") / "text", 64, text_only_every=1)


@pytest.fixture
def data_for(prepared_vqa, prepared_text):
    """data_for(family): a prepared set the family can train on (text-only models get text-only data)."""
    from medvl.families import get_family

    return lambda family: prepared_vqa if get_family(family).is_vision else prepared_text


class RecordingProgress:
    """A ProgressSink that keeps every call, for asserting on what a library function reported."""

    def __init__(self) -> None:
        self.tasks: list[tuple[str, int | None]] = []
        self.advanced = 0
        self.notes: list[str] = []

    def start(self, task: str, total: int | None = None) -> None:
        self.tasks.append((task, total))

    def advance(self, n: int = 1) -> None:
        self.advanced += n

    def note(self, message: str) -> None:
        self.notes.append(message)

    def finish(self) -> None:
        pass
