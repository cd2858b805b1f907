"""handler/image/decode.py must give the pixels Ultralytics reads from the same file."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image
from ultralytics.utils.patches import imread

from handler.image.decode import ImageDecodeError, ImageTooLargeError, decode_image


def _pil_bytes(array: np.ndarray, fmt: str, mode: str | None = None, orientation: int | None = None) -> bytes:
    im = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    kwargs = {}
    if orientation:
        exif = im.getexif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)
CASES = {
    "jpeg": (lambda: _pil_bytes(RGB, "JPEG"), ".jpg"),
    "jpeg-exif-rotated": (lambda: _pil_bytes(RGB, "JPEG", orientation=6), ".jpg"),
    "jpeg-exif-mirrored": (lambda: _pil_bytes(RGB, "JPEG", orientation=2), ".jpg"),
    "png": (lambda: _pil_bytes(RGB, "PNG"), ".png"),
    "png-gray": (lambda: _pil_bytes(RGB[..., 0], "PNG"), ".png"),
    "png-rgba": (lambda: _pil_bytes(np.dstack([RGB, RGB[..., :1]]), "PNG"), ".png"),
    "png-16bit": (lambda: cv2.imencode(".png", (RGB.astype(np.uint16) * 257 + 3))[1].tobytes(), ".png"),
    "png-16bit-gray": (lambda: cv2.imencode(".png", (RGB[..., 0].astype(np.uint16) * 200))[1].tobytes(), ".png"),
    "webp": (lambda: _pil_bytes(RGB, "WEBP"), ".webp"),
    "bmp": (lambda: _pil_bytes(RGB, "BMP"), ".bmp"),
    "tiff": (lambda: _pil_bytes(RGB, "TIFF"), ".tiff"),
    "tiff-rgba": (lambda: _pil_bytes(np.dstack([RGB, RGB[..., :1]]), "TIFF"), ".tif"),
    "tiff-gray": (lambda: _pil_bytes(RGB[..., 1], "TIFF"), ".tif"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_equals_ultralytics_imread(case, tmp_path):
    make, suffix = CASES[case]
    data = make()
    path = tmp_path / f"image{suffix}"
    path.write_bytes(data)
    ours = decode_image(data)
    theirs = imread(str(path))
    assert ours.dtype == np.uint8 and ours.ndim == 3 and ours.shape[2] == 3
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert np.array_equal(ours, theirs)


def test_exif_orientation_is_applied():
    ours = decode_image(_pil_bytes(RGB, "PNG", orientation=6))  # rotate 90: 37x53 -> 53x37
    assert ours.shape[:2] == (53, 37)


@pytest.mark.parametrize("data", [b"", b"hello world", b"GIF89a" + bytes(20)])
def test_unsupported_or_empty(data):
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data)
    assert e.value.unsupported == bool(data)


def test_truncated_image_is_a_decode_error():
    data = _pil_bytes(RGB, "PNG")
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data[:40])
    assert not e.value.unsupported


def test_pixel_limit():
    data = _pil_bytes(RGB, "PNG")
    assert decode_image(data, max_pixels=37 * 53).shape[:2] == (37, 53)
    with pytest.raises(ImageTooLargeError, match="1961 pixels"):
        decode_image(data, max_pixels=37 * 53 - 1)


def test_decompression_bomb_is_refused_from_the_header(monkeypatch):
    from PIL import Image

    data = _pil_bytes(RGB, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 37x53 > 2 x 100: Pillow calls it a bomb
    with pytest.raises(ImageTooLargeError, match="too large"):
        decode_image(data, max_pixels=10_000_000)
    assert decode_image(data, max_pixels=0).shape[:2] == (37, 53)  # 0 = no limit of ours
