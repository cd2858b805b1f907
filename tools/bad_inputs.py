"""Hostile and broken requests, generated here (nothing downloaded), each with the answer it must get.

One :class:`Probe` is one HTTP request to ``/predictions/NAME``: a raw body with a Content-Type, a
JSON body, or a multipart form. :meth:`Probe.send` sends it over HTTP; :meth:`Probe.row` gives the
request row TorchServe 0.12 hands to ``handle()`` for the same request (see ``handler/request.py``),
so the same cases drive the in-process handler tests, the real-TorchServe tests and the load test
(``python -m bench.loadtest``).

Dev side only (tests and the load test); the handler never imports this.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import requests

BOMB_SIDE = 60_000  # the decompression bomb's declared width and height


@dataclass(frozen=True)
class Probe:
    """One request and the answer it must get: ``status`` and, for errors, the JSON ``error.type``."""

    name: str
    form: str  # "raw" | "json" | "multipart"
    status: int
    error_type: str | None = None  # None for 200
    body: bytes = b""  # raw: the body; json: the JSON text
    content_type: str = "application/octet-stream"  # raw only
    fields: dict[str, bytes | str] = field(default_factory=dict)  # multipart: name -> file bytes or text
    # Multipart field names sent as files (with a filename); the others are text fields.
    file_fields: tuple[str, ...] = ()

    def send(self, session: requests.Session, url: str, headers: dict[str, str], timeout: float) -> requests.Response:
        if self.form == "raw":
            return session.post(url, data=self.body, headers={**headers, "Content-Type": self.content_type}, timeout=timeout)
        if self.form == "json":
            return session.post(url, data=self.body, headers={**headers, "Content-Type": "application/json"}, timeout=timeout)
        files = {k: (k if k in self.file_fields else None, v) for k, v in self.fields.items()}
        return session.post(url, files=files, headers=headers, timeout=timeout)

    def row(self) -> tuple[dict, str | None]:
        """(request row, Content-Type of ``body``) as TorchServe 0.12 passes this request to the handler."""
        if self.form == "raw":
            if self.content_type.startswith("text/"):  # TorchServe decodes text/* bodies to str
                return {"body": self.body.decode("utf-8", "replace")}, self.content_type
            return {"body": bytearray(self.body)}, self.content_type
        if self.form == "json":
            try:
                return {"body": json.loads(self.body)}, "application/json"
            except ValueError:  # invalid JSON arrives as bytes
                return {"body": bytearray(self.body)}, "application/json"
        return {k: bytearray(v if isinstance(v, bytes) else v.encode()) for k, v in self.fields.items()}, None


def encode(image: np.ndarray, ext: str = ".png", params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, image, params or [])
    if not ok:
        raise ValueError(f"OpenCV could not encode {image.shape} {image.dtype} as {ext}")
    return buf.tobytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A PNG whose header declares ``side x side`` RGB pixels (10.8 GB at 60000), with a little real data.

    The full file would still be ~10 MB of zlib; the header alone is what a server must refuse on.
    """
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    rows = zlib.compress(b"\0" * (1 + 3 * side) * 64, 9)  # the first 64 rows of zeros
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def corrupt_png_crc(png: bytes) -> bytes:
    """``png`` with one bit of its first IDAT chunk's CRC flipped."""
    at = png.index(b"IDAT")
    length = struct.unpack(">I", png[at - 4 : at])[0]
    crc = at + 4 + length
    return png[:crc] + bytes([png[crc] ^ 0x01]) + png[crc + 1 :]


def animated_gif() -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (64, 48), c) for c in ("red", "green", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def random_bytes(n: int, seed: int = 0) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    return b"\0" + data[1:]  # never a known image signature by chance


def bad_probes(jpeg: bytes) -> list[Probe]:
    """Every bad request of the hardening issue. ``jpeg``: a valid JPEG (e.g. bus.jpg) to damage or to carry parameters."""
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    small_png = encode(cv2.resize(image, (64, 48)))
    b64 = base64.b64encode(jpeg).decode()

    def js(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    def param(name: str, value: str, error: str = "invalid_parameter") -> Probe:
        return Probe(f"param {name}={value}", "multipart", 400, error, fields={"image": jpeg, name: value}, file_fields=("image",))

    return [
        # bodies that are not usable images
        Probe("empty body", "raw", 400, "invalid_image", b"", "image/jpeg"),
        Probe("1 byte", "raw", 415, "unsupported_media_type", b"\xff", "application/octet-stream"),
        Probe("random bytes", "raw", 415, "unsupported_media_type", random_bytes(4096), "application/octet-stream"),
        Probe("plain text as octet-stream", "raw", 415, "unsupported_media_type", b"hello, this is not an image\n"),
        Probe("plain text as text/plain", "raw", 415, "unsupported_media_type", b"hello, this is not an image\n", "text/plain"),
        Probe("HTML", "raw", 415, "unsupported_media_type", b"<!doctype html><html><body><img src=x></body></html>", "text/html"),
        Probe("HTML as image/jpeg", "raw", 415, "unsupported_media_type", b"<html><body>hi</body></html>", "image/jpeg"),
        Probe("JPEG truncated to half", "raw", 400, "invalid_image", jpeg[: len(jpeg) // 2], "image/jpeg"),
        Probe("JPEG signature only", "raw", 400, "invalid_image", jpeg[:3], "image/jpeg"),
        Probe("PNG with a corrupt CRC", "raw", 400, "invalid_image", corrupt_png_crc(small_png), "image/png"),
        Probe("PNG header only", "raw", 400, "invalid_image", small_png[:33], "image/png"),
        Probe("animated GIF (rejected)", "raw", 415, "unsupported_media_type", animated_gif(), "image/gif"),
        # dimensions
        Probe(f"PNG declaring {BOMB_SIDE}x{BOMB_SIDE}", "raw", 413, "image_too_large", png_bomb(), "image/png"),
        # JSON and base64
        Probe("base64 that does not decode", "json", 400, "invalid_image", js({"image": "not*base64!"})),
        Probe("base64 of garbage", "json", 415, "unsupported_media_type", js({"image": base64.b64encode(b"garbage").decode()})),
        Probe("JSON without image", "json", 400, "invalid_image", js({"conf": 0.5})),
        Probe("JSON image is a number", "json", 400, "invalid_image", js({"image": 12345})),
        Probe("JSON image is a list", "json", 400, "invalid_image", js({"image": [b64[:10]]})),
        Probe("JSON conf is a string", "json", 400, "invalid_parameter", js({"image": b64, "conf": "abc"})),
        Probe("JSON conf is a bool", "json", 400, "invalid_parameter", js({"image": b64, "conf": True})),
        Probe("JSON max_det is a list", "json", 400, "invalid_parameter", js({"image": b64, "max_det": [5]})),
        Probe("JSON max_det is 2.5", "json", 400, "invalid_parameter", js({"image": b64, "max_det": 2.5})),
        Probe("JSON classes is an object", "json", 400, "invalid_parameter", js({"image": b64, "classes": {"person": 1}})),
        Probe("JSON unknown field", "json", 400, "invalid_parameter", js({"image": b64, "confidence": 0.5})),
        Probe("JSON body is a list", "json", 400, "invalid_parameter", js([b64])),
        Probe("JSON that does not parse", "json", 400, "invalid_parameter", b'{"image": "abc"'),
        # request parameters
        param("conf", "abc"),
        param("conf", "-1"),
        param("conf", "2"),
        param("conf", "nan"),
        param("iou", "1.5"),
        param("iou", "-0.1"),
        param("max_det", "0"),
        param("max_det", str(10**9)),
        param("max_det", "1e3"),
        param("classes", "999"),
        param("classes", "-1"),
        param("classes", "zebra"),
        param("classes", ""),
        # multipart
        Probe("multipart without a file part", "multipart", 400, "invalid_image", fields={"conf": "0.5"}),
        Probe("multipart file in an unknown field", "multipart", 415, "unsupported_media_type", fields={"photo": jpeg}, file_fields=("photo",)),
        Probe("multipart with two images", "multipart", 400, "invalid_parameter", fields={"image": jpeg, "file": jpeg}, file_fields=("image", "file")),
    ]


def odd_images(jpeg: bytes) -> dict[str, bytes]:
    """Valid images in unusual encodings, all made from ``jpeg``'s pixels. Each must give correct detections.

    ``16-bit PNG`` and ``RGBA PNG`` carry exactly the pixels of ``plain PNG``; the others differ by
    their encoding (CMYK round trip, gray, EXIF rotation) and are compared with Ultralytics instead.
    """
    from PIL import Image

    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    rgb = Image.fromarray(np.ascontiguousarray(bgr[..., ::-1]))

    def pil(im: "Image.Image", fmt: str, **kw: Any) -> bytes:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    exif = rgb.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    alpha = np.full(bgr.shape[:2], 255, np.uint8)
    alpha[: bgr.shape[0] // 2] = 40  # alpha is dropped, as Ultralytics does: the pixels stay the colour ones
    return {
        "plain PNG": encode(bgr),
        "16-bit PNG": encode(bgr.astype(np.uint16) * 257),
        "RGBA PNG": encode(np.dstack([bgr, alpha])),
        "grayscale PNG": encode(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)),
        "grayscale JPEG": pil(rgb.convert("L"), "JPEG", quality=95),
        "CMYK JPEG": pil(rgb.convert("CMYK"), "JPEG", quality=95),
        "EXIF-rotated JPEG": pil(rgb, "JPEG", quality=95, exif=exif.tobytes()),
    }


def odd_sizes() -> dict[str, bytes]:
    """Valid images of extreme shapes: they must be served (200), whatever they contain."""
    rng = np.random.default_rng(1)
    return {
        "1x1": encode(np.full((1, 1, 3), 128, np.uint8)),
        "1x10000": encode(rng.integers(0, 256, (10000, 1, 3), dtype=np.uint8)),  # 1 wide, 10000 high
        "10000x1": encode(rng.integers(0, 256, (1, 10000, 3), dtype=np.uint8)),
    }
