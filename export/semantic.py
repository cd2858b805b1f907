"""The scripted postprocessor of a semantic segmentation model: class logits -> per-pixel class maps.

Plain torch, ``torch.jit.script``-able; ``postprocess.pt`` loads with ``torch.jit.load`` alone.
It reproduces Ultralytics 8.4.190 ``SemanticSegmentationPredictor.postprocess``
(``ultralytics/models/yolo/semantic/predict.py``) on the same logits, step for step.

Contract of :class:`SemanticPostprocess.forward`:

Inputs
  feats       list of one tensor ``logits: [B, nc, H / 8, W / 8]``, float32 or float16: the traced
              backbone's output (``export/backbone.py``, ``WholeNetwork``) for a letterboxed input
              ``B x 3 x H x W`` (``handler/image/letterbox.py``; all B images share H x W).
  geometry    ``float32[B, 6]``, rows of ``LetterboxParams.as_row()``:
              ``[pad_left, pad_top, gain_x, gain_y, orig_w, orig_h]``. Only ``orig_w, orig_h`` are read: the
              predictor calls ``ops.scale_masks(logits, orig_shape)`` *without* the letterbox's ratio_pad, so
              the crop is re-derived from the shapes exactly as ``scale_masks`` does
              (:func:`content_window`); it equals the letterbox's own placement except, for some sizes, one
              row or column at the edge, and we follow Ultralytics there.
  class_mask  ``bool[B, nc]`` or None: True where a class may be returned; any other class's pixels become
              :data:`handler.contract.SEMANTIC_IGNORE` (255), as Ultralytics' ``classes=``. Ignored when ``nc == 1`` (as Ultralytics).

Outputs
  class_map   ``[B, H0, W0]``, ``H0 x W0`` the largest original size in the batch; dtype ``uint8`` when
              ``max(nc, 2) <= 256``, ``int16`` up to 32768 classes, else ``int32`` (the predictor's
              ``_class_map_dtype``). ``class_map[b, :orig_h_b, :orig_w_b]`` is image b's map, original-image
              pixels; everything outside it is ``SEMANTIC_IGNORE``. Per pixel: bilinear upsample of the logits to
              the input (``align_corners=False``), cut the letterbox padding, bilinear resize to the original
              size, then the first-maximum class (``nc == 1``: ``logit > 0``).
  sizes       ``int64[B, 2]``: ``(orig_h, orig_w)`` of each image.
  pixels      ``int64[B, max(nc, 2)]``: pixels of each class id in image b's map (filtered-out classes count 0).
  ``nc == 1`` (binary): the map is 1 where the one class is predicted and 0 elsewhere (the predictor's
  ``gt(0)``), so ``pixels`` has two columns, background and the class.

Memory: the upsampled logits are processed ``chunk`` channels at a time (default 32), so peak float memory
is ``chunk * H0 * W0 * 4`` bytes (265 MB for a 1920x1080 image), not ``nc * H0 * W0 * 4``. With
``nc <= chunk`` (Cityscapes' 19 classes) the computation is Ultralytics' own, bit for bit. With more classes,
bilinear interpolation is still per channel, but CPU kernels vectorise differently for other channel counts,
so a logit can differ in its last bit and flip a near-tie pixel: measured on a 19-class model run in chunks of
8, 1 pixel of zidane.jpg's 921,600, on a class boundary.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from export.postprocess import bilinear
from handler.contract import SEMANTIC_IGNORE

LOGIT_STRIDE = 8  # the SemanticSegment head predicts on P3: input = logits x 8 (Ultralytics' export upsamples x8)


def class_map_dtype(nc: int) -> torch.dtype:
    """The predictor's ``_class_map_dtype(max(nc, 2))``: uint8, int16 or int32."""
    n = max(nc, 2)
    return torch.uint8 if n <= 256 else torch.int16 if n <= 32768 else torch.int32


def content_window(input_hw: List[int], orig_hw: List[int]) -> List[int]:
    """``[top, bottom, left, right]`` of the image inside a letterboxed input of ``input_hw``, derived from
    the shapes as Ultralytics' ``ops.scale_masks(masks, shape)`` does with ``ratio_pad=None``:
    ``gain = min(H / h0, W / w0)``, ``pad = (W - max(round(w0 * gain), 1)) / 2`` (same for h),
    ``top = round(pad_h - 0.1)``, ``bottom = top + max(round(h0 * gain), 1)``. Python's and TorchScript's
    ``round`` both round half to even."""
    h, w = float(input_hw[0]), float(input_hw[1])
    h0, w0 = float(orig_hw[0]), float(orig_hw[1])
    gain = min(h / h0, w / w0)
    content_h = max(int(round(h0 * gain)), 1)
    content_w = max(int(round(w0 * gain)), 1)
    top = int(round((h - content_h) / 2 - 0.1))
    left = int(round((w - content_w) / 2 - 0.1))
    return [top, top + content_h, left, left + content_w]


def original_logits(logits: Tensor, input_hw: List[int], orig_hw: List[int]) -> Tensor:
    """``logits: float32[1, c, h, w]`` of a letterboxed input of ``input_hw`` -> ``float32[1, c, h0, w0]``:
    bilinear to the input (when the size differs), cut the padding and bilinear to ``orig_hw`` (when the input
    is not already that size), as the predictor (``align_corners=False`` both times)."""
    if logits.shape[2] != input_hw[0] or logits.shape[3] != input_hw[1]:
        logits = bilinear(logits, input_hw, False)
    if input_hw[0] == orig_hw[0] and input_hw[1] == orig_hw[1]:  # scale_masks returns its input unchanged
        return logits
    top, bottom, left, right = content_window(input_hw, orig_hw)
    return bilinear(logits[:, :, top:bottom, left:right], orig_hw, False)


class SemanticPostprocess(nn.Module):
    """Class logits -> class maps; see the module docstring for the contract."""

    def __init__(self, nc: int, chunk: int = 32) -> None:
        super().__init__()
        self.nc = nc
        self.chunk = chunk
        self.out_dtype = class_map_dtype(nc)
        self.logit_stride = LOGIT_STRIDE
        self.ignore = SEMANTIC_IGNORE
        self.nvalues = max(nc, 2)  # values a map can hold besides SEMANTIC_IGNORE (nc == 1: 0 background, 1 the class)

    def image_map(self, logits: Tensor, input_hw: List[int], orig_hw: List[int]) -> Tensor:
        """One image: ``logits: [nc, h, w]`` -> ``int64[h0, w0]`` class ids (first maximum; ``nc == 1``: ``> 0``)."""
        if self.nc == 1:
            return (original_logits(logits[None].float(), input_hw, orig_hw)[0, 0] > 0).to(torch.long)
        best_value = torch.empty(0)
        best_class = torch.empty(0, dtype=torch.long)
        for start in range(0, self.nc, self.chunk):
            part = original_logits(logits[None, start : start + self.chunk].float(), input_hw, orig_hw)[0]  # [c, h0, w0]
            value, index = part.max(0)  # first maximum within the chunk (the predictor's CPU path: max(0).indices)
            if start == 0:
                best_value, best_class = value, index
            else:
                better = value > best_value  # strictly: an earlier class keeps a tie, as argmax over all
                best_value = torch.where(better, value, best_value)
                best_class = torch.where(better, index + start, best_class)
        return best_class

    def forward(
        self, feats: List[Tensor], geometry: Tensor, class_mask: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        logits = feats[0]  # [B, nc, h, w]
        bsz, device = logits.shape[0], logits.device
        input_hw = [int(logits.shape[2]) * self.logit_stride, int(logits.shape[3]) * self.logit_stride]
        geometry = geometry.to(device=device, dtype=torch.float32)
        sizes = torch.stack((geometry[:, 5], geometry[:, 4]), 1).round().to(torch.long)  # [B, 2] (h, w)
        h_max = int(sizes[:, 0].max()) if bsz > 0 else 0
        w_max = int(sizes[:, 1].max()) if bsz > 0 else 0
        out = torch.full((bsz, h_max, w_max), self.ignore, dtype=self.out_dtype, device=device)
        pixels = torch.zeros((bsz, self.nvalues), dtype=torch.long, device=device)
        for b in range(bsz):
            oh, ow = int(sizes[b, 0]), int(sizes[b, 1])
            cls = self.image_map(logits[b], input_hw, [oh, ow])  # [oh, ow] int64
            if class_mask is not None and self.nc > 1:
                keep = class_mask[b].to(device)[cls]  # [oh, ow]
                pixels[b] = torch.bincount(cls[keep], minlength=self.nvalues)
                cls = torch.where(keep, cls, torch.full_like(cls, self.ignore))
            else:
                pixels[b] = torch.bincount(cls.flatten(), minlength=self.nvalues)
            out[b, :oh, :ow] = cls.to(self.out_dtype)
        return out, sizes, pixels
