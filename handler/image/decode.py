"""Bytes of an image file -> ``uint8[H, W, 3]`` BGR pixels, the way Ultralytics reads a file.

Ultralytics' ``ultralytics.utils.patches.imread`` decodes with ``cv2.imdecode(..., IMREAD_COLOR)``,
which applies the EXIF orientation, converts grayscale to 3 channels, drops alpha and keeps the high
byte of 16-bit samples. TIFFs take its multi-page path: the first page, unchanged, alpha dropped.
We do the same from bytes, so served pixels equal ``YOLO.predict(path)`` pixels.
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np

# Leading bytes of the formats we accept (what cv2 decodes in the opencv-python wheels).
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
# Formats we recognise and refuse on purpose (HTTP 415), with the reason given to the client.
# GIF: OpenCV's GIF support varies between builds, Ultralytics' predict does not list it, and an
# animated GIF has no single right frame; reject it clearly rather than guess.
_REFUSED: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF images (animated or not) are not accepted; send the frame you want as PNG or JPEG"),
    (b"GIF89a", "GIF images (animated or not) are not accepted; send the frame you want as PNG or JPEG"),
)


class ImageDecodeError(ValueError):
    """The bytes are not an image we can decode (HTTP 400), or not a format we accept (415)."""

    def __init__(self, message: str, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


class ImageTooLargeError(ValueError):
    """The image has more pixels than the configured limit (HTTP 413)."""


def _header_size(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) from the file header without decoding pixels, when Pillow is installed."""
    try:
        import io

        from PIL import Image
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():
            # We apply our own limit; Pillow's complaints about a damaged header are not ours to log.
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Image.DecompressionBombError as e:  # Pillow refuses > 2 x its MAX_IMAGE_PIXELS from the header
        if max_pixels > 0:
            raise ImageTooLargeError(f"image too large: {e}") from None
        return None
    except Exception:  # noqa: BLE001 - cv2 decides below whether the file is readable
        return None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if max_pixels > 0 and width * height > max_pixels:
        raise ImageTooLargeError(f"image has {width}x{height} = {width * height} pixels; the limit is {max_pixels}")


def sniff_format(data: bytes) -> str | None:
    """``jpeg | png | webp | bmp | tiff`` from the leading bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def decode_image(data: bytes | bytearray | memoryview, max_pixels: int = 0) -> np.ndarray:
    """Decode an encoded JPEG, PNG, WebP, BMP or TIFF to ``uint8[H, W, 3]`` BGR.

    Raises :class:`ImageDecodeError` for an empty body, an unknown format (``unsupported=True``) or
    a corrupt file, and :class:`ImageTooLargeError` when ``max_pixels > 0`` and the image is larger
    (checked from the header before decoding where possible).
    """
    data = bytes(data)
    if not data:
        raise ImageDecodeError("empty image body")
    fmt = sniff_format(data)
    for magic, reason in _REFUSED:
        if data.startswith(magic):
            raise ImageDecodeError(reason, unsupported=True)
    if fmt is None:
        raise ImageDecodeError("unsupported image type; send JPEG, PNG, WebP, BMP or TIFF", unsupported=True)
    size = _header_size(data, max_pixels)
    if size is not None:
        _check_pixels(size[0], size[1], max_pixels)
    buf = np.frombuffer(data, np.uint8)
    image = None
    if fmt == "tiff":
        # The first page only: later pages may be larger than the header's first-page size we checked.
        ok, pages = cv2.imdecodemulti(buf, cv2.IMREAD_UNCHANGED, range=(0, 1))
        if ok and pages and pages[0].ndim == 3:
            image = pages[0][..., :3]
    if image is None:
        image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if image is None:
        raise ImageDecodeError(f"could not decode the {fmt} image (corrupt or truncated?)")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ImageDecodeError(f"unsupported pixel layout {image.dtype} {image.shape}", unsupported=True)
    _check_pixels(image.shape[1], image.shape[0], max_pixels)
    return np.ascontiguousarray(image)
