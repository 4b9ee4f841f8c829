"""The Qwen-VL image processor's result without its per-call overhead, bit for bit.

`Qwen2VLImageProcessorPil.__call__` (Qwen2-VL, Qwen2.5-VL and Qwen3-VL all use it in transformers 5.x; Qwen3-VL
with patch 16) spends most of its ~0.19 ms per 64x64 image validating and merging keyword arguments. The work
itself is small: resize to the smart_resize grid with PIL bicubic, rescale by 1/255 and normalize, cut into
patches. `qwen_pixels` does that work in ~0.10 ms:

- the resize is the same Pillow call on the same RGB pixels (the processor round-trips them through numpy and
  back into an identical RGB image first; a same-size resize is a copy in Pillow, so it is skipped);
- a uint8 pixel has 256 values, so rescale + normalize become a per-channel lookup table built with the
  processor's own arithmetic (float64 multiply, cast to float32, then (x - mean32) / std32 in float32: IEEE
  operations are exactly rounded, so a table entry equals the processor's value for that pixel);
- the patch layout is the processor's `patchify` reshape/transpose/broadcast (temporal_patch_size copies).

It answers only where it can promise the processor's exact tensors: the PIL backend class itself (the
torchvision backend resizes differently), the default switches (resize, rescale, normalize, convert-RGB all on,
bicubic), plain RGB PIL images (what medvl's loader returns; anything else goes through the processor, which
converts it). None means "call the processor". The first call for a processor and setting compares with the
processor on the real images and turns the fast path off for good if any bit differs: a future transformers
could change its arithmetic without changing any attribute checked here, and a silent drift in training
inputs would only show as a worse model.

    vision = qwen_pixels(ip, images) or ip(images=images, return_tensors="pt")

numpy, torch, PIL and transformers are imported on first use: medvl.data.collate imports this module, and the
CLI's startup must not load them (tests/test_cli_startup.py).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["qwen_pixels"]

_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC == transformers' PILImageResampling.BICUBIC

# processor -> {settings: {"table": lookup table (float32 [C*256]), "checked": the branches (resized or not) whose
# first call matched the processor, "failed": a self-check found a difference, so the processor is called}}.
# Kept off the processor object: its __dict__ is what save_pretrained writes to preprocessor_config.json.
_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _settings(ip) -> tuple | None:
    """Every value the processor's call reads for a PIL image, or None for a configuration not verified here."""
    try:  # a transformers that moved the module: the processor's own call, not a crash in the loader
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (Qwen2VLImageProcessorPil,  # noqa: F401
                                                                                smart_resize)
    except ImportError:
        return None

    if type(ip) is not Qwen2VLImageProcessorPil:  # a subclass may override any step
        return None
    if not (ip.do_resize is True and ip.do_rescale is True and ip.do_normalize is True
            and ip.do_convert_rgb is True):
        return None
    # min_pixels / max_pixels as attributes override `size` inside the call (with a deprecation warning)
    if getattr(ip, "min_pixels", None) is not None or getattr(ip, "max_pixels", None) is not None:
        return None
    resample, size = ip.resample, ip.size
    if not isinstance(resample, int) or int(resample) != _BICUBIC:  # a torchvision InterpolationMode, or another filter
        return None
    try:
        lo, hi = int(size["shortest_edge"]), int(size["longest_edge"])
        patch, merge, temporal = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
        mean = tuple(float(m) for m in ip.image_mean)
        std = tuple(float(s) for s in ip.image_std)
        scale = float(ip.rescale_factor)
    except (KeyError, TypeError, ValueError):
        return None
    if not (lo and hi and patch > 0 and merge > 0 and temporal > 0 and len(mean) == len(std) == 3):
        return None
    return lo, hi, patch, merge, temporal, mean, std, scale


def _lookup_table(mean: tuple, std: tuple, scale: float) -> np.ndarray:
    """Channel c, value v -> the processor's float32 at offset c*256 + v (transformers' rescale, then normalize)."""
    import numpy as np

    x = (np.arange(256, dtype=np.uint8).astype(np.float64) * scale).astype(np.float32)
    table = (x[None, :] - np.array(mean, dtype=np.float32)[:, None]) / np.array(std, dtype=np.float32)[:, None]
    return np.ascontiguousarray(table, dtype=np.float32).ravel()


def _plain_rgb(im) -> bool:
    from PIL import Image

    # an RGB image with a transparency key is composited onto white by the processor's convert_to_rgb
    return isinstance(im, Image.Image) and im.mode == "RGB" and im.info.get("transparency") is None


def _fast(images, settings, table):
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    lo, hi, p, m, t = settings[:5]
    offsets = np.arange(3, dtype=np.intp) * 256
    out, grids, resized = [], [], set()
    for im in images:
        w, h = im.size
        # transformers' own rule, so a refused aspect ratio (> 200) raises the processor's ValueError
        rh, rw = smart_resize(h, w, factor=p * m, min_pixels=lo, max_pixels=hi)
        resized.add((rw, rh) != (w, h))
        if (rw, rh) != (w, h):
            im = im.resize((rw, rh), resample=Image.Resampling.BICUBIC)
        # H x W x C float32 (take on flat indices: 2x faster than table[a, channel] fancy indexing)
        x = table.take(np.asarray(im) + offsets)
        gh, gw = rh // p, rw // p
        # patchify's layout (gh/m, gw/m, m, m, C, t, p, p), read from channels-last pixels; one gather over the
        # final index layout instead measured 36 us against 30 us for a 56x56 image
        x = x.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
        out.append(x.reshape(gh * gw, 3 * t * p * p))
        grids.append([1, gh, gw])
    return out, grids, frozenset(resized)


def qwen_pixels(ip, images) -> dict | None:
    """`{"pixel_values", "image_grid_thw"}` equal in every bit, dtype and shape to `ip(images=images,
    return_tensors="pt")`, or None where that cannot be promised (then call the processor)."""
    import numpy as np
    import torch

    if not isinstance(images, (list, tuple)) or not images or not all(_plain_rgb(im) for im in images):
        return None
    settings = _settings(ip)
    if settings is None:
        return None
    try:
        known = _STATE.setdefault(ip, {})
    except TypeError:  # an unhashable or un-weakref-able processor object
        return None
    state = known.setdefault(settings, {"table": None, "checked": set(), "failed": False})
    if state["failed"]:
        return None  # this setting failed its self-check
    if state["table"] is None:
        state["table"] = _lookup_table(*settings[5:])
    patches, grids, branch = _fast(images, settings, state["table"])
    result = {"pixel_values": torch.from_numpy(np.concatenate(patches)),
              "image_grid_thw": torch.tensor(grids, dtype=torch.int64)}
    # Checked once per branch the call took (resized or already on the grid, or both): a first image already on
    # the grid (the keepalive row's 56x56) proves nothing about the resize
    if branch not in state["checked"]:
        ref = ip(images=list(images), return_tensors="pt")
        same = set(ref.keys()) == set(result) and all(
            ref[k].dtype == v.dtype and ref[k].shape == v.shape and torch.equal(ref[k], v) for k, v in result.items())
        if not same:
            state["failed"] = True
            return None
        state["checked"].add(branch)
        return {k: ref[k] for k in result}
    return result
