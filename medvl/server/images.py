"""A request's images decoded on the request side, before it joins the batch queue.

The generation worker is one thread for every request: an image decoded there (a 16-megapixel PNG or a DICOM
series takes a second or more) would stall every batched answer's tokens. So `load_request_images` runs in the
batcher's small request pool (`Batcher.load_images`, awaited by the HTTP handler): a bad image is answered
with its 400 there and never reaches the worker, and a good one reaches it as a decoded RGB image that the
worker only hands to the processor.

Sizes are checked before the full decode: PIL reads the header first, DICOM's size comes from its header
(pydicom decodes every frame of the pixel data to pick the middle one).
"""

from __future__ import annotations

import os
import tempfile

from medvl.errors import MedvlError
from medvl.server.protocol import ApiError, ChatRequest, ImageRef, Limits

# pydicom decodes all frames to take the middle one: 64M pixels is a 256-slice 512x512 series, ~128 MB as int16
DICOM_MAX_DECODED_PIXELS = 64 * 1024 * 1024


def images_ready(request: ChatRequest) -> bool:
    return all(ref.image is not None for ref in request.images)


def load_request_images(request: ChatRequest, limits: Limits) -> None:
    """Decode every image of the request not decoded yet (kept on its ImageRef); ApiError(400) for a bad one."""
    for ref in request.images:
        if ref.image is None:
            ref.image = decode_image(ref, limits)
            ref.data = None  # the bytes are not needed any more; the request may wait in the queue a while


def decode_image(ref: ImageRef, limits: Limits):
    """The decoded image (a loaded `ChatImage`) through the one loader (DICOM included), the pixel limit checked
    first."""
    from PIL import Image

    from medvl.conversation import ChatImage
    from medvl.data.images import is_dicom

    path, tmp = ref.path, None
    if ref.data is not None:  # the loader reads files (PIL and pydicom alike): a private temporary file
        fd, tmp = tempfile.mkstemp(suffix=ref.suffix, prefix="medvl-serve-")
        with os.fdopen(fd, "wb") as f:
            f.write(ref.data)
        path = tmp
    try:
        dicom = is_dicom(path)
        if dicom:  # header only: pydicom decodes every frame of the pixel data to pick the middle one
            _check_dicom_size(path, ref, limits)
        else:
            try:
                with Image.open(path) as im:
                    w, h = im.size
            except Exception:
                raise ApiError(400, "the image does not decode (PNG, JPEG, TIFF, BMP, WebP or DICOM expected)",
                               param=ref.param, code="image_undecodable") from None
            if w * h > limits.max_image_pixels:
                raise ApiError(400, f"image of {w}x{h} pixels is above this server's limit of "
                               f"{limits.max_image_pixels:,} pixels", param=ref.param, code="image_too_large")
        image = ChatImage(path, None, dicom)
        try:
            pixels = image.load()  # decoded once and kept: the worker's render_prompt only reads it
        except MedvlError as exc:
            raise ApiError(400, exc.what, param=ref.param, code="image_undecodable") from None
        if pixels.width * pixels.height > limits.max_image_pixels:
            raise ApiError(400, "image above this server's pixel limit", param=ref.param, code="image_too_large")
        return image
    finally:
        if tmp:
            os.unlink(tmp)


def _check_dicom_size(path: str, ref: ImageRef, limits: Limits) -> None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        w, h = int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:
        raise ApiError(400, "the DICOM header does not read", param=ref.param, code="image_undecodable") from None
    if w * h > limits.max_image_pixels or w * h * frames > DICOM_MAX_DECODED_PIXELS:
        raise ApiError(400, f"DICOM of {frames} frame(s) of {w}x{h} pixels is above this server's limit of "
                       f"{limits.max_image_pixels:,} pixels per frame and {DICOM_MAX_DECODED_PIXELS:,} in "
                       "all", param=ref.param, code="image_too_large")
