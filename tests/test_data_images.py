"""Image loading (Pillow formats and DICOM), and prepare-data's visual-token count against the processor's."""

import numpy as np
import pytest
from PIL import Image

from medvl.data.images import is_dicom, load_image, probe_image
from medvl.errors import MedvlError

from .conftest import VISION_FAMILIES

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


def _dcm(name):
    path = get_testdata_file(name, download=False)
    if not path and tuple(int(x) for x in pydicom.__version__.split(".")[:3]) < (3, 0, 2):
        pytest.skip(f"pydicom {pydicom.__version__} does not bundle {name} (3.0.2, the verified version, does)")
    assert path, f"{name} is not among pydicom's bundled files"
    return path


# ------------------------------------------------------------------------------------------ Pillow formats


@pytest.mark.parametrize("suffix", ["png", "jpg", "tif", "bmp", "webp"])
def test_common_formats_load_as_rgb(tmp_path, suffix):
    path = tmp_path / f"scan.{suffix}"
    Image.new("L", (37, 21), 200).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (37, 21)
    assert abs(int(np.asarray(img)[10, 10, 0]) - 200) <= 2  # lossy formats may move a gray level
    info = probe_image(path)
    assert (info.width, info.height) == (37, 21) and info.kind in ("png", "jpeg", "tiff", "bmp", "webp")


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16bit_grayscale_uses_the_percentile_window(tmp_path, suffix):
    # 12-bit data in a 16-bit container: a plain >> 8 would squeeze it into 0..15.
    ramp = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (8, 1))  # 8 x 256, values 0..4080
    path = tmp_path / f"xray.{suffix}"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16")
    out = np.asarray(load_image(path))[0, :, 0]
    assert out[0] == 0 and out[-1] == 255  # 0.5th / 99.5th percentiles reach the ends
    assert 120 <= out[128] <= 135 and np.all(np.diff(out.astype(int)) >= 0)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif.tobytes())
    assert load_image(path).size == (20, 40)
    assert (probe_image(path).width, probe_image(path).height) == (20, 40)


def test_transparency_is_composited_on_white(tmp_path):
    path = tmp_path / "overlay.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 255, 255]


def test_broken_files_raise_medvl_error(tmp_path):
    good = tmp_path / "full.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(good, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MedvlError, match="cannot decode image") as e:
        probe_image(cut)
    assert e.value.where == str(cut)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(MedvlError, match="cannot decode image"):
        load_image(text)
    with pytest.raises(MedvlError, match="not found"):
        load_image(tmp_path / "absent.png")


# ------------------------------------------------------------------------------------------ DICOM


def test_dicom_detection_by_magic_and_suffix(tmp_path):
    assert is_dicom(_dcm("6154"))  # no extension: the DICM magic at byte 128 decides
    assert is_dicom(tmp_path / "missing.dcm")
    png = tmp_path / "a.png"
    Image.new("RGB", (2, 2)).save(png)
    assert not is_dicom(png)


def test_mr_uses_the_file_window():
    # MR_small.dcm: WindowCenter 600, WindowWidth 1600, no rescale; raw values 127..2145.
    raw = pydicom.dcmread(_dcm("MR_small.dcm")).pixel_array
    out = np.asarray(load_image(_dcm("MR_small.dcm")))[..., 0]
    low, high = np.unravel_index(raw.argmin(), raw.shape), np.unravel_index(raw.argmax(), raw.shape)
    assert out[low] == round(((127 - 599.5) / 1599 + 0.5) * 255)  # 52
    assert out[high] == 255  # 2145 is above the window's top (1399)


def test_ct_without_window_uses_rescale_and_percentiles():
    out = np.asarray(load_image(_dcm("CT_small.dcm")))[..., 0]
    assert out.shape == (128, 128)
    # The percentile window clips 0.5% at each end: at least 81 of 16,384 pixels at 0 and at 255.
    assert (out == 0).sum() >= 81 and (out == 255).sum() >= 81


def test_monochrome1_is_inverted_after_rescale_and_window():
    # dicomdirtests CR1/6154: MONOCHROME1, slope 0.684, intercept 200, window 1600 / 2800.
    path = _dcm("6154")
    raw = pydicom.dcmread(path).pixel_array
    out = np.asarray(load_image(path))[..., 0]
    value = 1994 * 0.684 + 200  # the darkest raw value, brightest on screen
    expected = 255 - round(((value - 1599.5) / 2799 + 0.5) * 255)
    assert raw.min() == 1994 and out[np.unravel_index(raw.argmin(), raw.shape)] == expected == 131
    assert out[np.unravel_index(raw.argmax(), raw.shape)] < expected


def _synthetic(path, pixels, **tags):
    """A tiny valid DICOM with the given signed 16-bit pixels and tags."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_multi_valued_window_uses_the_first_and_rescale_applies(tmp_path):
    px = np.array([[-1000, 0, 10, 20], [40, 60, 90, 3000]], dtype=np.int16)
    path = _synthetic(tmp_path / "ct.dcm", px, RescaleSlope=1, RescaleIntercept=-1024,
                      WindowCenter=[-984, 500], WindowWidth=[101, 2000])
    out = np.asarray(load_image(path))[..., 0]
    hu = px.astype(float) - 1024  # window -984 / 101 spans -1034.5 .. -934.5 in HU
    expected = np.clip(((hu - (-984 - 0.5)) / 100 + 0.5), 0, 1) * 255
    assert out.tolist() == np.round(expected).astype(int).tolist()
    assert out[0, 0] == 0 and out[1, 3] == 255 and out[1, 0] == 129  # HU -984: the centre


def test_multi_frame_policy_middle_first_index_and_all(tmp_path):
    frames = np.stack([np.full((3, 5), 100 * k, dtype=np.int16) for k in range(5)])
    # window 200.5 / 401 maps 0..400 linearly onto 0..255: y = ((x - 200) / 400 + 0.5) * 255
    path = _synthetic(tmp_path / "cine.dcm", frames, WindowCenter=200.5, WindowWidth=401)
    assert probe_image(path).frames == 5
    middle = np.asarray(load_image(path))[1, 1, 0]
    assert middle == np.asarray(load_image(path, frame=2))[1, 1, 0] == 128  # frame 5 // 2 = 2, value 200
    assert np.asarray(load_image(path, frame="first"))[1, 1, 0] == 0
    assert [np.asarray(load_image(path, frame=i))[1, 1, 0] for i in range(5)] == [0, 64, 128, 191, 255]
    with pytest.raises(MedvlError, match="frame 9 does not exist in a 5-frame file"):
        load_image(path, frame=9)


def test_colour_dicom_ybr_multiframe_and_palette():
    from pydicom.pixels import pixel_array

    ybr = _dcm("examples_ybr_color.dcm")  # 30 frames, YBR_FULL_422, JPEG baseline
    info = probe_image(ybr)
    assert (info.width, info.height, info.frames) == (320, 240, 30)
    assert np.array_equal(np.asarray(load_image(ybr)), pixel_array(ybr, index=15))  # RGB, middle frame
    palette = load_image(_dcm("examples_palette.dcm"))
    assert palette.size == (800, 350) and np.asarray(palette).max() == 254  # 16-bit LUT 65280 -> 254


def test_undecodable_dicom_names_the_missing_codec():
    with pytest.raises(MedvlError, match="cannot decode DICOM pixel data") as e:
        load_image(_dcm("MR_small_jpeg_ls_lossless.dcm"))
    assert "pylibjpeg" in e.value.fix
    with pytest.raises(MedvlError, match="cannot decode DICOM pixel data"):
        probe_image(_dcm("MR_truncated.dcm"))


# ------------------------------------------------------------------------------------------ tokens

SIZES = [(13, 977), (41, 42), (97, 211), (360, 420), (719, 1279)]  # (height, width): odd sides and aspects


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_prepare_counts_the_tokens_the_processor_produces(family, tiny_dir):
    """prepare-data measures a sample from image (width, height) alone; the trainer's encoding of real pixels
    must be exactly that long, with a resolution preset set on Qwen-VL processors too."""
    from medvl.config import RESOLUTION_PRESETS
    from medvl.data.collate import encode_record, measure
    from medvl.families import get_family
    from medvl.models import apply_resolution, load_processor

    fam, proc = get_family(family), load_processor(tiny_dir(family))
    apply_resolution(proc, fam, *RESOLUTION_PRESETS["huatuo"])
    image_id = proc.tokenizer.convert_tokens_to_ids(fam.image_token)
    for h, w in SIZES:
        rec = {"id": "s", "messages": [{"role": "user", "content": "<image>what is this?"},
                                       {"role": "assistant", "content": "a scan"}]}
        _, n_tokens, visual, _ = measure(rec, [(w, h)], proc, fam)
        ids = encode_record(rec, [Image.new("RGB", (w, h))], proc, fam).input_ids
        assert n_tokens == len(ids), (h, w)
        # The count covers the image tokens plus InternVL's <img>...</img> wrapper (2 tokens).
        assert visual == [ids.count(image_id) + (2 if family == "internvl" else 0)], (h, w)
