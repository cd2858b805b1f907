"""The one letterbox of this project, bit-exact with Ultralytics ``LetterBox`` on uint8 images.

Both the TorchServe handler and the export check (``export/verify.py``) call :func:`letterbox`.
It imports only numpy and OpenCV, never Ultralytics.

Geometry is a value: :func:`letterbox` returns the padded image together with the
:class:`LetterboxParams` it used, and the scripted postprocessor inverts exactly those
numbers (see ``export/postprocess.py``, ``geometry`` argument). Nothing re-derives them
from shapes later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

PAD_VALUE = 114
LetterboxMode = Literal["rect", "square"]
LETTERBOX_MODES: tuple[str, ...] = ("rect", "square")


@dataclass(frozen=True)
class LetterboxParams:
    """How one image was placed into the network input.

    Original pixel ``(x, y)`` maps to input pixel ``(x * gain_x + pad_left, y * gain_y + pad_top)``.
    ``gain_x = resized_w / orig_w`` and ``gain_y = resized_h / orig_h`` are the per-axis gains of the
    rounded resize, as Ultralytics' ``scale_boxes`` computes them.
    """

    orig_h: int
    orig_w: int
    resized_h: int  # image area inside the input, before padding
    resized_w: int
    pad_top: int
    pad_left: int
    input_h: int  # shape of the padded network input
    input_w: int

    @property
    def gain_x(self) -> float:
        return self.resized_w / self.orig_w

    @property
    def gain_y(self) -> float:
        return self.resized_h / self.orig_h

    def as_row(self) -> list[float]:
        """The row of the postprocessor's ``geometry`` tensor: [pad_left, pad_top, gain_x, gain_y, orig_w, orig_h]."""
        return [float(self.pad_left), float(self.pad_top), self.gain_x, self.gain_y, float(self.orig_w), float(self.orig_h)]


def target_hw(imgsz: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """The target size ``(h, w)`` of a transform: ``imgsz`` as an int (square) or ``[h, w]``. The one place
    that reads an ``imgsz``; the letterbox, the stretch, the classify crop and the export check all call it."""
    if isinstance(imgsz, int):
        return imgsz, imgsz
    h, w = imgsz
    return int(h), int(w)


def letterbox_params(
    orig_hw: tuple[int, int],
    imgsz: int | tuple[int, int] | list[int] = 640,
    stride: int = 32,
    mode: LetterboxMode = "rect",
) -> LetterboxParams:
    """Compute the placement of an image of size ``orig_hw`` (h, w) without touching pixels.

    ``rect`` pads only up to the next multiple of ``stride`` (what ``YOLO.predict`` does for a single
    image or a batch of same-shaped images); ``square`` pads to the full ``imgsz``. ``imgsz`` must be a
    multiple of ``stride`` in square mode for the result to be a valid network input.
    """
    if mode not in LETTERBOX_MODES:
        raise ValueError(f"letterbox mode must be one of {LETTERBOX_MODES}, got {mode!r}")
    h0, w0 = orig_hw
    if h0 < 1 or w0 < 1:
        raise ValueError(f"image must be at least 1x1 pixels, got {h0}x{w0}")
    th, tw = target_hw(imgsz)
    r = min(th / h0, tw / w0)
    new_w, new_h = max(round(w0 * r), 1), max(round(h0 * r), 1)
    dw, dh = tw - new_w, th - new_h
    if mode == "rect":
        dw, dh = dw % stride, dh % stride
    # Ultralytics splits odd padding with a -0.1/+0.1 nudge, so the extra pixel goes bottom/right.
    top, bottom = round(dh / 2 - 0.1), round(dh / 2 + 0.1)
    left, right = round(dw / 2 - 0.1), round(dw / 2 + 0.1)
    return LetterboxParams(
        orig_h=h0,
        orig_w=w0,
        resized_h=new_h,
        resized_w=new_w,
        pad_top=top,
        pad_left=left,
        input_h=new_h + top + bottom,
        input_w=new_w + left + right,
    )


def letterbox(
    image: np.ndarray,
    imgsz: int | tuple[int, int] | list[int] = 640,
    stride: int = 32,
    mode: LetterboxMode = "rect",
) -> tuple[np.ndarray, LetterboxParams]:
    """Resize and pad ``image: uint8[H, W, 3]`` (any channel order) the way Ultralytics does.

    Returns ``(padded: uint8[input_h, input_w, 3], params)``. Resize is ``cv2.INTER_LINEAR`` and the
    border is constant 114.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"letterbox expects an HxWx3 image, got shape {image.shape}")
    params = letterbox_params(image.shape[:2], imgsz, stride, mode)
    if (params.resized_h, params.resized_w) != image.shape[:2]:
        image = cv2.resize(image, (params.resized_w, params.resized_h), interpolation=cv2.INTER_LINEAR)
    bottom = params.input_h - params.resized_h - params.pad_top
    right = params.input_w - params.resized_w - params.pad_left
    padded = cv2.copyMakeBorder(
        image, params.pad_top, bottom, params.pad_left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3
    )
    return padded, params
