"""Opening medical images as 8-bit RGB.

Loading (`load_image`, `probe_image`):
- PNG, JPEG, TIFF, BMP, WebP through Pillow. EXIF orientation is applied first, as transformers' `load_image`
  does, so the size we count tokens for is the size the model sees. 16-bit (and 32-bit / float) grayscale has no
  display window in the file, so it gets the same robust window as a DICOM without one: the 0.5th to 99.5th
  percentile maps to 0..255 (a 12-bit X-ray stored in a 16-bit PNG would be near-black if we only shifted by 8).
  Transparent images are composited onto white.
- DICOM (detected by the `DICM` magic at byte 128, or a `.dcm`/`.dicom` name) through pydicom: modality rescale
  (`RescaleSlope`/`RescaleIntercept`, per-frame or shared functional groups first for enhanced multi-frame files),
  then the file's VOI window (`WindowCenter`/`WindowWidth`, first value when several, `VOILUTFunction` LINEAR,
  LINEAR_EXACT or SIGMOID) or, when the file has none, the 0.5-99.5 percentile window; MONOCHROME1 is inverted
  after windowing so bone stays white. Colour files (RGB, YBR_* converted to RGB by pydicom, PALETTE COLOR through
  its lookup table) are scaled from their stored bit depth to 8 bits without windowing.
- Multi-frame DICOM policy: `frame="middle"` (default) decodes only frame `n_frames // 2` (frame 15 of 30): one
  sample keeps one image per path, and the central slice or cine frame is the most representative single view.
  `frame="first"` or an int picks another.

Visual-token counts are not computed here: prepare-data asks the model's own processor
(`medvl.data.collate.visual_token_counts`, from each image's width and height alone), so the count is the one
the processor will produce at training time, for every family and resolution setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from medvl.errors import MedvlError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")
PERCENTILE_WINDOW = (0.5, 99.5)
# Named CT windows as (center, width) in Hounsfield units, the usual reading-room values (Radiopaedia's table):
# they replace the file's own VOI window when a viewer (`medvl chat`'s /window) asks for one.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0), "bone": (400.0, 1800.0), "brain": (40.0, 80.0),
    "abdomen": (50.0, 400.0),
}


def is_dicom(path: str | Path) -> bool:
    """True for a DICOM file: the 'DICM' magic after the 128-byte preamble, or a .dcm/.dicom name."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    kind: str  # "dicom" or Pillow's format name in lower case ("png", "jpeg", ...)
    frames: int = 1


def load_image(path: str | Path, *, frame: str | int = "middle",
               window: tuple[float, float] | None = None) -> Image.Image:
    """Decode one image file to an 8-bit RGB PIL image; raises MedvlError when it cannot be decoded.
    `window` (center, width), in the modality's units after rescale, replaces a grayscale DICOM's own VOI window
    (linear); other images ignore it."""
    if is_dicom(path):
        return _dicom_frame(path, frame, window)[0]
    return _open_pil(path)[0]


def probe_image(path: str | Path, *, frame: str | int = "middle") -> ImageInfo:
    """Decode the image fully (proving it decodes) and report the size the model will see."""
    if is_dicom(path):
        img, n = _dicom_frame(path, frame)
        return ImageInfo(img.width, img.height, "dicom", n)
    img, kind = _open_pil(path)
    return ImageInfo(img.width, img.height, kind)


# --------------------------------------------------------------------------------------------------- Pillow


def _open_pil(path: str | Path) -> tuple[Image.Image, str]:
    try:
        with Image.open(path) as im:
            im.load()  # Image.open only reads the header; a truncated file fails here, not at training time
            kind = (im.format or "unknown").lower()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im), kind
    except FileNotFoundError:
        raise MedvlError("image file not found", where=str(path)) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise MedvlError(
            f"cannot decode image: {e}", where=str(path), fix="re-export the file as PNG or JPEG, or drop it"
        ) from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_percentile_window(np.asarray(im))).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def _percentile_window(a: np.ndarray) -> np.ndarray:
    """Linear 0..255 mapping of the 0.5-99.5 percentile range; a flat image maps to 0."""
    a = a.astype(np.float64)
    lo, hi = np.percentile(a, PERCENTILE_WINDOW)
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.round(np.clip((a - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------------- DICOM


def _dicom_frame(path: str | Path, frame: str | int,
                 window: tuple[float, float] | None = None) -> tuple[Image.Image, int]:
    """(RGB image of the chosen frame, number of frames)."""
    import warnings

    # pydicom warns about benign quirks it repairs itself (e.g. "128 bytes of excess padding"); in a training
    # run those lines would repeat for every sample. Real failures still raise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds, n = _dicom_read(path)
        index = _frame_index(frame, n, path)
        return _dicom_rgb(ds, index, n, path, window), n


def _dicom_read(path: str | Path) -> tuple[Any, int]:
    import pydicom  # 0.2 s to import: only when a DICOM file is actually met

    try:
        ds = pydicom.dcmread(path, force=True)
    except FileNotFoundError:
        raise MedvlError("image file not found", where=str(path)) from None
    except Exception as e:  # pydicom raises many exception types for damaged files
        raise MedvlError(f"cannot read DICOM file ({type(e).__name__}: {e})", where=str(path)) from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise MedvlError("DICOM file has no pixel data (a report, structured report or DICOMDIR?)",
                         where=str(path), fix="drop it from the dataset")
    return ds, int(ds.get("NumberOfFrames", 1) or 1)


def _dicom_rgb(ds: Any, index: int, n: int, path: str | Path,
               override: tuple[float, float] | None = None) -> Image.Image:
    from pydicom.pixels import apply_color_lut, pixel_array

    try:
        # index= decodes one frame only: a 300-frame cine never sits in memory whole.
        arr = pixel_array(ds, index=index) if n > 1 else pixel_array(ds)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if photometric == "PALETTE COLOR":
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            return Image.fromarray(_scale_bits(apply_color_lut(arr, ds), bits))
    except Exception as e:  # missing codec (JPEG-LS, JPEG Lossless), truncated data, broken LUT
        syntax = getattr(ds.get("file_meta", {}), "TransferSyntaxUID", None)
        raise MedvlError(
            f"cannot decode DICOM pixel data ({type(e).__name__}: {e})",
            where=str(path),
            fix=f"transfer syntax {getattr(syntax, 'name', 'unknown')}: JPEG-LS and JPEG Lossless need pylibjpeg "
            "or gdcm installed; or convert the file with `gdcmconv --raw`",
        ) from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # RGB, or YBR which pydicom already converted to RGB
        bits = int(ds.get("BitsStored", 8 * arr.dtype.itemsize))
        return Image.fromarray(_scale_bits(arr[..., :3], bits))
    if arr.ndim != 2:
        raise MedvlError(f"unexpected DICOM pixel array shape {arr.shape}", where=str(path))
    slope, intercept = _rescale(ds, index)
    values = arr.astype(np.float64) * slope + intercept
    window = (*override, "LINEAR") if override else _window(ds, index)
    gray = _apply_window(values, *window) if window else _percentile_window(values)
    if photometric == "MONOCHROME1":  # 0 means white in MONOCHROME1 (CR/DX); invert so bone stays white
        gray = 255 - gray
    return Image.fromarray(gray).convert("RGB")


def _frame_index(frame: str | int, n: int, path: Any) -> int:
    if frame == "middle":
        return n // 2
    if frame == "first":
        return 0
    if isinstance(frame, int) and -n <= frame < n:
        return frame % n
    raise MedvlError(f"frame {frame!r} does not exist in a {n}-frame file", where=str(path),
                     fix="use 'middle', 'first' or an index from 0 to frames-1")


def _scale_bits(a: np.ndarray, bits: int) -> np.ndarray:
    if a.dtype == np.uint8 and bits <= 8:
        return np.ascontiguousarray(a)
    top = float(2 ** bits - 1)
    return np.round(np.clip(a.astype(np.float64), 0, top) * (255.0 / top)).astype(np.uint8)


def _functional_item(ds: Any, index: int, sequence: str) -> Any:
    """The item of an enhanced multi-frame functional group (per-frame first, then shared), or None."""
    for group, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(group)
        seq = getattr(items[i], sequence, None) if items and len(items) > i else None
        if seq:
            return seq[0]
    return None


def _first(value: Any) -> float:
    # WindowCenter is multi-valued in some files ([40, 40, 40] in J2K_pixelrep_mismatch.dcm): the first one wins.
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0]
    return float(value)


def _rescale(ds: Any, index: int) -> tuple[float, float]:
    item = _functional_item(ds, index, "PixelValueTransformationSequence") or ds
    slope = item.get("RescaleSlope", None)
    intercept = item.get("RescaleIntercept", None)
    slope = _first(slope) if slope not in (None, "") else 1.0
    intercept = _first(intercept) if intercept not in (None, "") else 0.0
    return slope, intercept


def _window(ds: Any, index: int) -> tuple[float, float, str] | None:
    item = _functional_item(ds, index, "FrameVOILUTSequence") or ds
    center, width = item.get("WindowCenter", None), item.get("WindowWidth", None)
    if center in (None, "") or width in (None, ""):
        return None
    c, w = _first(center), _first(width)
    function = str(item.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if w <= 0 or (function == "LINEAR" and w < 1):  # not a valid window (PS3.3 C.11.2.1.2): fall back
        return None
    return c, w, function


def _apply_window(x: np.ndarray, c: float, w: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 VOI windows, output range 0..255."""
    if function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    elif function == "LINEAR_EXACT":
        y = np.clip((x - c) / w + 0.5, 0.0, 1.0)
    else:
        # LINEAR: the window spans c - 0.5 +- (w - 1) / 2; w == 1 degenerates to a threshold at c - 0.5.
        lower, upper = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
        ramp = (x - (c - 0.5)) / max(w - 1, 1e-12) + 0.5
        y = np.where(x <= lower, 0.0, np.where(x > upper, 1.0, ramp))
    return np.round(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------------- limits

MAX_ASPECT_RATIO = 200  # Qwen-VL's image processor (smart_resize) refuses anything longer


@dataclass(frozen=True)
class ResolutionPolicy:
    """Pixel budget of the Qwen-VL resize: both sides a multiple of `factor`, area within [min, max]; its
    presence on a CheckPolicy turns on the aspect-ratio refusal above."""

    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 16384 * 28 * 28
    factor: int = 28
