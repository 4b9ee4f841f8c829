"""medvl.data.qwen_pixels: the Qwen-VL image processor's tensors, bit for bit, without its per-call overhead."""

import numpy as np
import pytest
import torch
from PIL import Image

from medvl.data import qwen_pixels as qp
from medvl.data.images import load_image
from medvl.families import get_family
from medvl.models import apply_resolution, load_processor

QWEN = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
# (min_pixels, max_pixels): the tiny builder's own range is replaced by the benchmark's and a wider one
RESOLUTIONS = ((3136, 12544), (1024, 200704))
# width x height: tiny, 1xN and Nx1 near the 200:1 limit, odd, exact multiples of 28 (patch 14) and of 32
# (patch 16), below min_pixels, above max_pixels
SIZES = ((1, 1), (2, 3), (1, 150), (199, 1), (37, 301), (113, 57), (64, 64), (112, 84), (128, 96), (10, 10),
         (56, 56), (1000, 700), (640, 480))


def _noise(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _easy_vqa(n):
    import easy_vqa

    paths = easy_vqa.get_train_image_paths()
    return [load_image(paths[i]) for i in range(n)]


def _dicom():
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    out = []
    for name in ("MR_small.dcm", "CT_small.dcm"):
        path = get_testdata_file(name, download=False)
        assert path, f"{name} is not among pydicom's bundled files"
        out.append(load_image(path))
    return out


@pytest.fixture(scope="module", params=[(f, r) for f in QWEN for r in RESOLUTIONS], ids=lambda p: f"{p[0]}-{p[1][1]}")
def ip(request, tiny_dir):
    family, (lo, hi) = request.param
    fam = get_family(family)
    proc = load_processor(tiny_dir(family), fam)
    apply_resolution(proc, fam, lo, hi)
    ip = proc.image_processor
    assert type(ip).__name__ == "Qwen2VLImageProcessorPil"  # Qwen3-VL uses the same class, with patch 16
    assert ip.patch_size == (16 if family == "qwen3-vl" else 14)
    return ip


@pytest.fixture
def count_calls(monkeypatch):
    """How often the processor's own preprocess ran since the fixture was made."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    calls = []
    real = Qwen2VLImageProcessorPil.preprocess
    monkeypatch.setattr(Qwen2VLImageProcessorPil, "preprocess",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


def _warm(ip):
    """The self-checks for this setting, one per branch: an image already on the grid, one that is resized, and
    both in one call (each first call returns the processor's own result)."""
    import math

    lo, hi, patch, merge = qp._settings(ip)[:4]
    factor = patch * merge
    side = factor * math.ceil(math.sqrt(lo) / factor)
    assert side * side <= hi
    on_grid, resized = _noise(side, side, 98), _noise(side + 1, side, 99)
    for images in ([on_grid], [resized], [on_grid, resized]):
        qp.qwen_pixels(ip, images)
    state = qp._STATE[ip][qp._settings(ip)]
    assert not state["failed"] and len(state["checked"]) == 3  # all passed: the fast path is on


def _assert_same(ip, images, count_calls):
    _warm(ip)
    before = len(count_calls)
    fast = qp.qwen_pixels(ip, images)
    assert len(count_calls) == before  # computed without the processor
    ref = ip(images=images, return_tensors="pt")
    assert fast is not None and set(fast) == set(ref.keys()) == {"pixel_values", "image_grid_thw"}
    for k in fast:
        assert fast[k].dtype == ref[k].dtype and fast[k].shape == ref[k].shape
        assert torch.equal(fast[k], ref[k]), k
    return fast


def test_every_size_one_at_a_time(ip, count_calls):
    for i, (w, h) in enumerate(SIZES):
        fast = _assert_same(ip, [_noise(w, h, i)], count_calls)
        grid = fast["image_grid_thw"][0].tolist()
        lo, hi = ip.size["shortest_edge"], ip.size["longest_edge"]
        area = grid[1] * grid[2] * ip.patch_size ** 2
        assert grid[0] == 1
        assert lo <= area <= hi or (w, h) in ((1, 150), (199, 1))  # smart_resize's range, but at 1:150


def test_several_images_at_once(ip, count_calls):
    images = [_noise(w, h, i) for i, (w, h) in enumerate(SIZES)] + _easy_vqa(3) + _dicom()
    fast = _assert_same(ip, images, count_calls)
    assert len(fast["image_grid_thw"]) == len(images)


def test_easy_vqa_pngs_and_dicom(ip, count_calls):
    for im in _easy_vqa(12) + _dicom():
        assert im.mode == "RGB"
        _assert_same(ip, [im], count_calls)


def test_aspect_ratio_over_200_raises_the_processors_error(ip):
    im = _noise(201, 1, 0)
    with pytest.raises(ValueError, match="aspect ratio") as ref:
        ip(images=[im], return_tensors="pt")
    with pytest.raises(ValueError, match="aspect ratio") as fast:
        qp.qwen_pixels(ip, [im])
    assert str(fast.value) == str(ref.value)


def test_settings_changed_after_first_use_are_followed(tiny_dir, count_calls):
    fam = get_family("qwen2.5-vl")
    proc = load_processor(tiny_dir("qwen2.5-vl"), fam)
    ip = proc.image_processor
    images = [_noise(300, 200, 1), _noise(64, 64, 2)]
    _assert_same(ip, images, count_calls)
    apply_resolution(proc, fam, 1024, 4096)  # fewer pixels: other grids
    small = _assert_same(ip, images, count_calls)
    ip.image_mean, ip.image_std = (0.5, 0.5, 0.5), (0.25, 0.5, 0.75)  # another lookup table
    _assert_same(ip, images, count_calls)
    assert len(qp._STATE[ip]) == 3 and small["image_grid_thw"].prod(-1).max() * 14 * 14 <= 4096


def test_images_it_does_not_promise_go_to_the_processor(ip):
    rgba = Image.new("RGBA", (64, 64), (10, 20, 30, 128))
    keyed = _noise(64, 64, 0)
    keyed.info["transparency"] = (0, 0, 0)  # an RGB PNG with a tRNS key: the processor composites onto white
    for images in ([Image.new("L", (64, 64), 7)], [rgba], [keyed], [_noise(64, 64, 1), rgba],
                   [np.zeros((64, 64, 3), np.uint8)], [], _noise(64, 64, 2)):
        assert qp.qwen_pixels(ip, images) is None


def test_other_processors_and_settings_go_to_the_processor(tiny_dir):
    import transformers as T

    im = [_noise(64, 64, 0)]
    llava = load_processor(tiny_dir("llava"), get_family("llava")).image_processor
    assert qp.qwen_pixels(llava, im) is None

    class Custom(T.Qwen2VLImageProcessorPil):
        pass

    assert qp.qwen_pixels(Custom(), im) is None
    assert qp.qwen_pixels(T.Qwen2VLImageProcessorPil(), im) is not None  # the plain class with its defaults
    for attr, value in (("do_normalize", False), ("do_rescale", False), ("do_resize", False),
                        ("do_convert_rgb", False), ("resample", Image.Resampling.BILINEAR), ("min_pixels", 1024),
                        ("image_mean", (0.5, 0.5))):
        ip = T.Qwen2VLImageProcessorPil()
        setattr(ip, attr, value)
        assert qp.qwen_pixels(ip, im) is None, attr


def test_the_self_check_turns_the_fast_path_off_when_a_bit_differs(monkeypatch, count_calls):
    """A transformers whose arithmetic changed without any attribute changing (here: normalize nudged by one
    float32 step): the first call compares, finds the difference and the processor keeps the job for good."""
    import transformers as T

    ip = T.Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 12544})
    real = T.Qwen2VLImageProcessorPil.normalize
    monkeypatch.setattr(T.Qwen2VLImageProcessorPil, "normalize",
                        lambda self, *a, **k: np.nextafter(real(self, *a, **k), np.float32(np.inf)))
    im = [_noise(64, 64, 0)]
    assert qp.qwen_pixels(ip, im) is None and len(count_calls) == 1  # compared once, then refused
    assert qp._STATE[ip][qp._settings(ip)]["failed"]
    monkeypatch.setattr(T.Qwen2VLImageProcessorPil, "normalize", real)
    assert qp.qwen_pixels(ip, im) is None and len(count_calls) == 1  # the verdict stands: no second comparison
    other = T.Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 12544})
    assert qp.qwen_pixels(other, im) is not None  # the verdict was this processor's only


def test_a_first_image_already_on_the_grid_does_not_vouch_for_the_resize(monkeypatch, count_calls):
    """The keepalive row's 56x56 image needs no resize, so its self-check says nothing about resizing: a
    transformers whose resize changed (here: another filter) is caught at the first image that is resized."""
    import transformers as T

    ip = T.Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 12544})
    real = T.Qwen2VLImageProcessorPil.resize
    monkeypatch.setattr(T.Qwen2VLImageProcessorPil, "resize",
                        lambda self, image, size, resample, factor, **k: real(self, image, size, 2, factor, **k))
    assert qp.qwen_pixels(ip, [_noise(56, 56, 0)]) is not None  # on the grid: both paths agree
    assert qp.qwen_pixels(ip, [_noise(64, 64, 1)]) is None  # resized: compared again, differs, processor's job
    assert qp._STATE[ip][qp._settings(ip)]["failed"] and len(count_calls) == 2


def test_a_transformers_without_the_module_falls_back_to_the_processor(ip, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl", None)
    assert qp.qwen_pixels(ip, [_noise(64, 64, 0)]) is None  # an ImportError is "call the processor", not a crash
