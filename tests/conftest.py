"""Shared fixtures: offline mode, tiny models built once per session, a GPU marker."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava", "internvl", "causal-lm")
VISION_FAMILIES = FAMILIES[:-1]


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
