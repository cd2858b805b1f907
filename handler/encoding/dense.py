"""Dense per-pixel outputs -> what a response carries: PNG (8/16-bit) and raw float32, in base64.

* Depth, ``encoding=png16`` (the default): a 16-bit grey PNG where a value ``v`` means
  ``min + (max - min) * v / 65535`` metres (:func:`encode_depth_png16` / :func:`decode_depth_png16`); the
  quantisation step is ``(max - min) / 65535``, and a decoded value is within half a step of the float map.
* Depth, ``encoding=float32``: the raw map, little-endian float32, row-major ``[H, W]``
  (:func:`encode_float32`), refused with :class:`DenseTooLarge` when its base64 text would exceed the limit.
* Semantic class map, ``encoding=png``: an 8-bit grey PNG of the class ids, or a 16-bit one when the map's
  dtype is wider than 8 bits (``nc > 256``; Ultralytics' ``int16`` maps), :func:`encode_class_map_png`.

PNGs are written by OpenCV (``cv2.imencode``), which writes 16-bit single-channel PNGs as such; any PNG reader
(PIL: mode ``I;16``) reads them back. Imports numpy and OpenCV only.
"""

from __future__ import annotations

import base64

import cv2
import numpy as np

PNG16_MAX = 65535


class DenseTooLarge(ValueError):
    """An encoded dense output would exceed the response size limit; the message names the smaller encoding."""


def b64(data: bytes) -> str:
    """``data`` -> standard base64 text (RFC 4648, with padding)."""
    return base64.b64encode(data).decode("ascii")


def b64_len(n_bytes: int) -> int:
    """Characters of the base64 text of ``n_bytes`` bytes."""
    return 4 * ((n_bytes + 2) // 3)


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:  # cv2 fails only on shapes/dtypes it cannot write, which the callers exclude
        raise ValueError(f"cannot PNG-encode an array of {image.dtype} {image.shape}")
    return buf.tobytes()


def encode_depth_png16(depth: np.ndarray) -> tuple[bytes, float, float]:
    """``depth: float32[H, W]`` metres -> ``(png, min, max)``: a 16-bit PNG of
    ``round((depth - min) / (max - min) * 65535)`` (all 0 when ``max == min``), and the ``min, max`` that decode it
    (as Python floats of the float32 values)."""
    if depth.ndim != 2 or depth.size == 0:
        raise ValueError(f"depth map must be a non-empty HxW array, got shape {depth.shape}")
    d = depth.astype(np.float64)
    lo, hi = float(np.float32(d.min())), float(np.float32(d.max()))
    if hi > lo:
        q = np.rint((d - lo) / (hi - lo) * PNG16_MAX)
    else:
        q = np.zeros_like(d)
    return _png(np.clip(q, 0, PNG16_MAX).astype(np.uint16)), lo, hi


def decode_depth_png16(png: bytes, lo: float, hi: float) -> np.ndarray:
    """The inverse of :func:`encode_depth_png16`: ``float32[H, W]`` metres, ``lo + (hi - lo) * v / 65535``."""
    v = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    if v is None or v.dtype != np.uint16 or v.ndim != 2:
        raise ValueError("not a 16-bit single-channel PNG")
    return (lo + (hi - lo) * v.astype(np.float64) / PNG16_MAX).astype(np.float32)


def depth_step(lo: float, hi: float) -> float:
    """The quantisation step of a 16-bit depth PNG with this ``min, max`` (metres per unit of ``v``)."""
    return (hi - lo) / PNG16_MAX


def encode_float32(depth: np.ndarray, max_b64_chars: int | None = None) -> bytes:
    """``depth: float32[H, W]`` -> its bytes, little-endian float32, row-major. Raises :class:`DenseTooLarge`
    when the base64 text would be longer than ``max_b64_chars`` (None: no limit)."""
    raw = np.ascontiguousarray(depth, dtype="<f4").tobytes()
    if max_b64_chars is not None and b64_len(len(raw)) > max_b64_chars:
        h, w = depth.shape[:2]
        raise DenseTooLarge(
            f"encoding=float32 of a {w}x{h} depth map is {b64_len(len(raw))} characters of base64, over the "
            f"response limit of {max_b64_chars}; use encoding=png16 (2 bytes per pixel, PNG-compressed)"
        )
    return raw


def decode_float32(raw: bytes, height: int, width: int) -> np.ndarray:
    """The inverse of :func:`encode_float32`: ``float32[height, width]``."""
    expected = 4 * height * width
    if len(raw) != expected:
        raise ValueError(f"float32 map of {width}x{height} needs {expected} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype="<f4").reshape(height, width).astype(np.float32)


def encode_class_map_png(class_map: np.ndarray) -> bytes:
    """``class_map: [H, W]`` class ids -> a grey PNG: 8-bit for a ``uint8`` map, else 16-bit (ids must be in
    ``0..65535``; a semantic map's 255 'ignore' stays 255)."""
    if class_map.ndim != 2 or class_map.size == 0:
        raise ValueError(f"class map must be a non-empty HxW array, got shape {class_map.shape}")
    if class_map.dtype == np.uint8:
        return _png(class_map)
    if class_map.min() < 0 or class_map.max() > PNG16_MAX:
        raise ValueError(f"class ids must be in 0..{PNG16_MAX} for a 16-bit PNG, got {class_map.min()}..{class_map.max()}")
    return _png(class_map.astype(np.uint16))


def decode_class_map_png(png: bytes) -> np.ndarray:
    """A PNG of :func:`encode_class_map_png` -> ``uint8[H, W]`` or ``uint16[H, W]`` class ids."""
    v = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    if v is None or v.ndim != 2:
        raise ValueError("not a single-channel PNG")
    return v
