"""The classify transform: Ultralytics' classification resize + center crop, reproduced without Ultralytics
or torchvision (the other tasks use the letterbox, ``letterbox.py``, or the stretch, ``stretch.py``).

It takes ``uint8[H, W, 3]`` BGR and returns ``uint8[h, w, 3]`` BGR plus the geometry it used
(:class:`CropParams`), so the pipeline converts it to the network input as any other (BGR -> RGB, /255).

What Ultralytics 8.4.190 does for a classify model (``ultralytics/models/yolo/classify/predict.py``,
``ClassificationPredictor.setup_source`` / ``pre_transform``, with ``classify_transforms(imgsz)`` of
``ultralytics/data/augment.py``), measured to be bit-exact with :func:`classify_transform`:

1. ``PIL.Image.fromarray`` of the BGR array (no channel swap: PIL resizes each channel alike);
2. torchvision ``Resize``: a square ``imgsz`` resizes the *shortest* side to ``imgsz`` and the long side
   to ``int(imgsz * long / short)`` (truncated); a non-square ``imgsz`` ``[h, w]`` resizes to exactly
   ``(h, w)``; interpolation ``BILINEAR`` through PIL (which always antialiases); no resize when the
   size is already right;
3. torchvision ``CenterCrop(imgsz)``: ``top = int(round((h - ch) / 2))``, ``left`` alike (Python's round);
4. back to a numpy array, then the predictor's common step: BGR -> RGB, ``/ 255``;
5. ``Normalize(mean=(0, 0, 0), std=(1, 1, 1))``: the identity. ``crop_fraction`` is deprecated and unused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from handler.image.letterbox import target_hw


@dataclass(frozen=True)
class CropParams:
    """How a classify input was cut from the original image: resized to ``resized_h x resized_w``,
    then the window ``[crop_top : crop_top + input_h, crop_left : crop_left + input_w]`` kept."""

    orig_h: int
    orig_w: int
    resized_h: int
    resized_w: int
    crop_top: int
    crop_left: int
    input_h: int
    input_w: int




def classify_params(orig_hw: tuple[int, int], imgsz: int | tuple[int, int] | list[int]) -> CropParams:
    """The resize and center crop of Ultralytics' ``classify_transforms(imgsz)`` for an image of ``orig_hw``."""
    h0, w0 = orig_hw
    if h0 < 1 or w0 < 1:
        raise ValueError(f"image must be at least 1x1 pixels, got {h0}x{w0}")
    th, tw = target_hw(imgsz)
    if th == tw:  # shortest side -> th, as torchvision's _compute_resized_output_size
        short, long = (w0, h0) if w0 <= h0 else (h0, w0)
        new_short, new_long = th, int(th * long / short)
        new_w, new_h = (new_short, new_long) if w0 <= h0 else (new_long, new_short)
    else:
        new_h, new_w = th, tw
    if new_h < th or new_w < tw:  # cannot happen for the sizes above; torchvision would zero-pad
        raise ValueError(f"resized {new_h}x{new_w} is smaller than the crop {th}x{tw}")
    return CropParams(
        orig_h=h0,
        orig_w=w0,
        resized_h=new_h,
        resized_w=new_w,
        crop_top=int(round((new_h - th) / 2.0)),
        crop_left=int(round((new_w - tw) / 2.0)),
        input_h=th,
        input_w=tw,
    )


def classify_transform(image: np.ndarray, imgsz: int | tuple[int, int] | list[int]) -> tuple[np.ndarray, CropParams]:
    """``image: uint8[H, W, 3]`` BGR -> ``(uint8[imgsz_h, imgsz_w, 3]`` BGR, params), bit-exact with
    Ultralytics' classification preprocessing (see the module docstring)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"classify_transform expects a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    p = classify_params(image.shape[:2], imgsz)
    pil = Image.fromarray(image)
    if (p.resized_h, p.resized_w) != image.shape[:2]:
        pil = pil.resize((p.resized_w, p.resized_h), Image.BILINEAR)
    pil = pil.crop((p.crop_left, p.crop_top, p.crop_left + p.input_w, p.crop_top + p.input_h))
    return np.asarray(pil), p  # [input_h, input_w, 3] BGR
