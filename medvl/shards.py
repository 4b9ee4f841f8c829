"""Safetensors weights on disk, read memory-mapped and written one shard at a time; shared by convert and export.

    shard_bytes = parse_size("5GB")                        # transformers' own parser: what save_pretrained takes
    weights = Weights(Path("Qwen2.5-7B-Instruct"), "--llm")  # names, shapes, dtypes; tensors read on demand
    shards, size = write_streamed(out, {name: (shape, dtype)}, build, shard_bytes, progress)

`write_streamed` asks huggingface_hub's splitter (the one save_pretrained uses) which tensors go into which
file, so names, order and index are the ones stock transformers writes (`model.safetensors`, or
`model-00001-of-00003.safetensors` + `model.safetensors.index.json`); the tensors themselves are built one shard
at a time by the caller's `build(name)`, so memory holds one shard (<= max size), never a model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from medvl.errors import MedvlError

# safetensors header dtype codes -> torch dtype names (the ones a transformers checkpoint holds)
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2 * 2**30: transformers' parser (the one `save_pretrained(max_shard_size=)`
    applies), with a clear error instead of its ValueError."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        return convert_file_size_to_int(text if isinstance(text, int) else str(text).strip())
    except ValueError:
        raise MedvlError(f"cannot read the size '{text}'", fix="write it like 5GB, 500MB or 2GiB") from None


class Weights:
    """The safetensors tensors of a save_pretrained directory (one file or shards + index), memory-mapped."""

    def __init__(self, root: Path, label: str):
        from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE

        index = root / SAFETENSORS_INDEX_FILE
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (root / SAFETENSORS_SINGLE_FILE).is_file():
            files = [SAFETENSORS_SINGLE_FILE]
        else:
            raise MedvlError(f"no safetensors weights in {root} ({label})", where=str(root),
                             fix="re-save the model with save_pretrained (safetensors); .bin files are not read")
        from medvl.models import check_model_weights

        check_model_weights(root)  # truncated or random files: a clear error, not safetensors' own
        self._handles: dict[Path, object] = {}
        self.file, self.shape, self.dtype = {}, {}, {}
        for name in files:
            handle = self._open(root / name)
            for key in handle.keys():
                sl = handle.get_slice(key)
                self.file[key], self.shape[key], self.dtype[key] = root / name, tuple(sl.get_shape()), sl.get_dtype()

    def _open(self, path: Path):
        if path not in self._handles:
            from safetensors import safe_open

            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def get(self, name: str):
        return self._open(self.file[name]).get_tensor(name)

    def rows(self, name: str, start: int, stop: int):
        """Rows start:stop of a tensor, read without loading the rest (an embedding of a 7B model is ~1 GB)."""
        return self._open(self.file[name]).get_slice(name)[start:stop]

    def torch_dtype(self, name: str):
        import torch

        return getattr(torch, SAFETENSORS_DTYPES.get(self.dtype[name], "float32"))


def write_streamed(out: Path, planned: dict[str, tuple[tuple[int, ...], object]], build: Callable[[str], object],
                   max_bytes: int, progress) -> tuple[int, int]:
    """Write tensors {name: (shape, torch dtype)} as safetensors shards in `out`, building each with
    `build(name)` only when its shard is written; returns (shards, bytes). The index is written when there is
    more than one shard, as save_pretrained does."""
    import torch
    from huggingface_hub import split_state_dict_into_shards_factory
    from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_WEIGHTS_FILE_PATTERN
    from safetensors.torch import save_file

    split = split_state_dict_into_shards_factory(
        planned, max_shard_size=max_bytes, filename_pattern=SAFETENSORS_WEIGHTS_FILE_PATTERN,
        get_storage_size=lambda p: math.prod(p[0]) * torch.empty((), dtype=p[1]).element_size())
    progress.start("writing weights", len(planned))
    for fname, names in split.filename_to_tensors.items():
        tensors = {name: build(name).contiguous() for name in names}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        progress.advance(len(names))
        del tensors
    progress.finish()
    if split.is_sharded:
        (out / SAFETENSORS_INDEX_FILE).write_text(
            json.dumps({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, indent=2))
    return len(split.filename_to_tensors), split.metadata["total_size"]
