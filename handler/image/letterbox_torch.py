"""The letterbox in torch ops, on any device, bit-exact with ``handler/image/letterbox.py`` (so with OpenCV and
Ultralytics) on uint8 images. Used by ``preprocess: device`` (``handler/pipeline.py``).

Geometry is not computed here: the placement comes from :func:`handler.image.letterbox.letterbox_params` (or any
other function that returns a :class:`LetterboxParams`, such as ``handler/image/stretch.py``'s ``stretch_params``),
and :func:`place` moves pixels to where those numbers say.

The resize reproduces ``cv2.resize(..., interpolation=cv2.INTER_LINEAR)`` on uint8 bit for bit, as
``examples/cpp/yolo_infer.cpp`` does with libtorch (read from OpenCV's ``imgproc/src/resize.cpp``):

* per axis, destination pixel ``d`` samples ``f = float((d + 0.5) * (src / dst) - 0.5)`` (double, then
  float), source index ``floor(f)``, weights ``(1 - frac, frac)``, each rounded to 11-bit fixed point
  (``* 2048``, ties to even) on its own;
* columns left of 0 or right of ``src - 1`` read the edge pixel with weights ``(2048, 0)``; rows are only
  clamped (row ``-1`` reads rows ``(0, 0)`` with its own weights);
* a horizontal pass in integers (values times 2048), then the vertical pass with the rounding of OpenCV's
  ``VResizeLinearVec_32s8u``: ``((b0 * (r0 >> 4)) >> 16) + ((b1 * (r1 >> 4)) >> 16) + 2) >> 2``;
* an exact 2x downscale on both axes, which ``cv2.resize`` turns into ``INTER_AREA``: the 2x2 mean
  ``(a + b + c + d + 2) >> 2``.

The sample positions and weights are computed once per (source, destination) length on the CPU, in numpy,
and cached (uploaded with each use); on the device only integer gathers, multiplies and shifts run, so CUDA gives the CPU's pixels.
All intermediate values fit int32 (at most ``255 * 2048`` and ``32640 * 2048``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from handler.image.letterbox import PAD_VALUE, LetterboxMode, LetterboxParams, letterbox_params

COEF_BITS = 11  # OpenCV INTER_RESIZE_COEF_BITS
COEF_SCALE = 1 << COEF_BITS


@dataclass(frozen=True)
class AxisTaps:
    """One axis of the resize: destination pixel ``d`` reads source ``i0[d]`` and ``i1[d]`` with weights
    ``c0[d] + c1[d] == 2048``. All ``int32[dst]``, on one device."""

    i0: Tensor
    i1: Tensor
    c0: Tensor
    c1: Tensor


@lru_cache(maxsize=512)
def _axis_taps_cpu(src: int, dst: int, edge_weights: bool) -> np.ndarray:
    """``int32[4, dst]`` rows (i0, i1, c0, c1), computed as ``cv::resize`` does (see the module docstring).
    ``edge_weights``: the column rule (edge taps get weights (2048, 0)); False: the row rule."""
    scale = 1.0 / (dst / src)  # cv::resize: scale_x = 1. / inv_scale_x, inv_scale_x = dst / src
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f)
    f = f - s  # float32
    i = s.astype(np.int64)
    if edge_weights:
        f[(i < 0) | (i >= src - 1)] = 0.0
    i1 = np.clip(i + 1, 0, src - 1)  # from the unclamped index: row -1 reads rows (0, 0)
    i0 = np.clip(i, 0, src - 1)
    scale_f = np.float32(COEF_SCALE)
    c0 = np.rint((np.float32(1.0) - f) * scale_f)  # float32 product, then lrint (ties to even) as saturate_cast<short>
    c1 = np.rint(f * scale_f)
    return np.stack([i0, i1, c0.astype(np.int64), c1.astype(np.int64)]).astype(np.int32)


@lru_cache(maxsize=512)
def _axis_taps_host(src: int, dst: int, edge_weights: bool, pinned: bool) -> Tensor:
    """``_axis_taps_cpu`` as a torch tensor, in pinned memory for CUDA uploads. Never written after creation,
    so any number of pending copies may read it."""
    taps = torch.from_numpy(_axis_taps_cpu(src, dst, edge_weights))
    return taps.pin_memory() if pinned else taps


def _axis_taps(src: int, dst: int, edge_weights: bool, device: torch.device) -> AxisTaps:
    """The taps on ``device``. Uploaded on the current stream for each use (a few hundred bytes), so the
    kernels that read them are ordered after the copy by construction, whatever stream they run on."""
    taps = _axis_taps_host(src, dst, edge_weights, device.type == "cuda").to(device, non_blocking=True)
    return AxisTaps(taps[0], taps[1], taps[2], taps[3])


def _horizontal(rows: Tensor, tx: AxisTaps) -> Tensor:
    """``uint8[n, W, C]`` -> ``int32[n, w, C]``, each value the 2048-scaled weighted sum of two columns."""
    w = tx.c0.shape[0]
    a = rows.index_select(1, tx.i0).to(torch.int32) * tx.c0.view(1, w, 1)
    return a.add_(rows.index_select(1, tx.i1).to(torch.int32) * tx.c1.view(1, w, 1))


def resize_linear(image: Tensor, h: int, w: int) -> Tensor:
    """``cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)`` for ``image: uint8[H, W, C]`` on any
    device -> ``uint8[h, w, C]`` on the same device, bit for bit."""
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"resize_linear expects a uint8 [H, W, C] tensor, got {image.dtype} {tuple(image.shape)}")
    if h < 1 or w < 1:
        raise ValueError(f"resize target must be at least 1x1, got {h}x{w}")
    src_h, src_w, c = image.shape
    if (src_h, src_w) == (h, w):
        return image.clone()
    if (src_h, src_w) == (2 * h, 2 * w):  # cv::resize's INTER_AREA fast path
        quads = image.reshape(h, 2, w, 2, c).to(torch.int32).sum((1, 3), dtype=torch.int32)  # [h, w, C]
        return quads.add_(2).bitwise_right_shift_(2).to(torch.uint8)
    tx = _axis_taps(src_w, w, True, image.device)
    ty = _axis_taps(src_h, h, False, image.device)
    if 2 * h <= src_h:  # downscale: the horizontal pass on the 2h source rows that are read, not all H
        r0, r1 = _horizontal(image.index_select(0, ty.i0), tx), _horizontal(image.index_select(0, ty.i1), tx)
    else:
        rows = _horizontal(image, tx)  # [H, w, C]
        r0, r1 = rows.index_select(0, ty.i0), rows.index_select(0, ty.i1)  # [h, w, C]
    b0, b1 = ty.c0.view(h, 1, 1), ty.c1.view(h, 1, 1)
    out = (r0.bitwise_right_shift_(4).mul_(b0).bitwise_right_shift_(16)).add_(
        r1.bitwise_right_shift_(4).mul_(b1).bitwise_right_shift_(16)
    )
    return out.add_(2).bitwise_right_shift_(2).clamp_(0, 255).to(torch.uint8)


def place(image: Tensor, params: LetterboxParams, out: Tensor | None = None) -> Tensor:
    """``image: uint8[orig_h, orig_w, C]`` -> ``uint8[input_h, input_w, C]``: resized to ``resized_h x
    resized_w`` (INTER_LINEAR, as above) at ``(pad_top, pad_left)``, the rest 114, on the image's device.

    ``out``: an ``uint8[input_h, input_w, C]`` tensor to write into (a slot of a batch); returned."""
    if tuple(image.shape[:2]) != (params.orig_h, params.orig_w):
        raise ValueError(f"image is {tuple(image.shape[:2])}, the placement is for {params.orig_h}x{params.orig_w}")
    c = image.shape[2]
    if out is None:
        out = torch.empty((params.input_h, params.input_w, c), dtype=torch.uint8, device=image.device)
    elif tuple(out.shape) != (params.input_h, params.input_w, c) or out.dtype != torch.uint8:
        raise ValueError(f"out must be uint8[{params.input_h}, {params.input_w}, {c}], got {out.dtype} {tuple(out.shape)}")
    top, left, h, w = params.pad_top, params.pad_left, params.resized_h, params.resized_w
    # The padding bands only, so the image area is written once.
    out[:top].fill_(PAD_VALUE)
    out[top + h :].fill_(PAD_VALUE)
    out[top : top + h, :left].fill_(PAD_VALUE)
    out[top : top + h, left + w :].fill_(PAD_VALUE)
    if (h, w) == (params.orig_h, params.orig_w):
        out[top : top + h, left : left + w].copy_(image)
    else:
        out[top : top + h, left : left + w].copy_(resize_linear(image, h, w))
    return out


def letterbox(
    image: Tensor,
    imgsz: int | tuple[int, int] | list[int] = 640,
    stride: int = 32,
    mode: LetterboxMode = "rect",
) -> tuple[Tensor, LetterboxParams]:
    """``handler.image.letterbox.letterbox`` for ``image: uint8[H, W, 3]`` (any channel order) on any device:
    ``(padded: uint8[input_h, input_w, 3]`` on that device, ``params)``, pixel for pixel the same."""
    if image.dim() != 3 or image.shape[2] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"letterbox expects a uint8 HxWx3 tensor, got {image.dtype} {tuple(image.shape)}")
    params = letterbox_params((int(image.shape[0]), int(image.shape[1])), imgsz, stride, mode)
    return place(image, params), params


def to_network_input(batch: Tensor, half: bool = False) -> Tensor:
    """``uint8[n, H, W, 3]`` BGR -> ``float[n, 3, H, W]`` RGB 0..1 (FP16 with ``half``) on the batch's device,
    channels-last in memory: the same values and strides as ``YoloPipeline.to_input`` gives (BGR -> RGB as
    a channel flip, the NHWC -> NCHW permute as a view, then the division by 255 in the target dtype)."""
    if batch.dim() != 4 or batch.shape[3] != 3 or batch.dtype != torch.uint8:
        raise ValueError(f"to_network_input expects uint8[n, H, W, 3], got {batch.dtype} {tuple(batch.shape)}")
    rgb = batch.flip(3).permute(0, 3, 1, 2)  # [n, 3, H, W], NHWC memory
    return (rgb.half() if half else rgb.float()).div_(255)
