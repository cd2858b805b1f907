"""The stretch transform of depth and RT-DETR models, bit-exact with Ultralytics ``LetterBox(scale_fill=True)``.

``DepthPredictor`` and ``RTDETRPredictor`` set ``scale_fill = True``: ``BasePredictor.pre_transform`` then
resizes the image to exactly ``imgsz`` (no aspect ratio kept, no padding, never ``rect``), with
``cv2.resize(..., interpolation=cv2.INTER_LINEAR)`` when the size differs, and the zero-width
``copyMakeBorder`` that follows changes nothing. Imports only numpy and OpenCV, never Ultralytics.

Geometry is a value, the same :class:`handler.image.letterbox.LetterboxParams` as the letterbox's, with no padding:
``resized = input = imgsz``, ``pad_top = pad_left = 0``, so ``gain_x = input_w / orig_w`` and
``gain_y = input_h / orig_h`` (Ultralytics' ``ratio`` for ``scale_fill``), and ``as_row()`` gives the
postprocessor's geometry row ``[0, 0, gain_x, gain_y, orig_w, orig_h]``.
"""

from __future__ import annotations

import cv2
import numpy as np

from handler.image.letterbox import LetterboxParams, target_hw


def stretch_params(orig_hw: tuple[int, int], imgsz: int | tuple[int, int] | list[int]) -> LetterboxParams:
    """The placement of an image of ``orig_hw`` (h, w) stretched onto ``imgsz`` (int or ``[h, w]``)."""
    h0, w0 = orig_hw
    if h0 < 1 or w0 < 1:
        raise ValueError(f"image must be at least 1x1 pixels, got {h0}x{w0}")
    th, tw = target_hw(imgsz)
    if th < 1 or tw < 1:
        raise ValueError(f"imgsz must be positive, got {imgsz}")
    return LetterboxParams(
        orig_h=h0, orig_w=w0, resized_h=th, resized_w=tw, pad_top=0, pad_left=0, input_h=th, input_w=tw
    )


def stretch(image: np.ndarray, imgsz: int | tuple[int, int] | list[int]) -> tuple[np.ndarray, LetterboxParams]:
    """``image: uint8[H, W, 3]`` (any channel order) -> ``(uint8[imgsz_h, imgsz_w, 3], params)``, resized with
    ``cv2.INTER_LINEAR`` to exactly ``imgsz`` (no resize when it already has that size)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"stretch expects a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    params = stretch_params(image.shape[:2], imgsz)
    if (params.input_h, params.input_w) != image.shape[:2]:
        image = cv2.resize(image, (params.input_w, params.input_h), interpolation=cv2.INTER_LINEAR)
    return image, params
