"""The scripted postprocessor of a depth model: the ``Depth`` head's map -> metres at original size.

Plain torch, ``torch.jit.script``-able; ``postprocess.pt`` loads with ``torch.jit.load`` alone.
It reproduces Ultralytics 8.4.190 ``DepthPredictor.postprocess`` (``ultralytics/models/yolo/depth/predict.py``)
on the same tensor: bilinear (``align_corners=True``) to the network input for the whole batch, then
bilinear (``align_corners=True``) from the input to each original size. The input is the stretched image
(``handler/image/stretch.py``, Ultralytics' ``LetterBox(scale_fill=True)``), so the whole input maps onto the whole
original image and no padding is cut.

Contract of :class:`DepthPostprocess.forward`:

Inputs
  feats     list of one tensor ``depth: [B, 1, H / 4, W / 4]``, float32 or float16, metres (> 0): the traced
            backbone's output (``export/backbone.py``, ``WholeNetwork``) for a stretched input ``B x 3 x H x W``.
  geometry  ``float32[B, 6]``, rows of ``LetterboxParams.as_row()`` of :func:`handler.image.stretch.stretch`
            (``[0, 0, gain_x, gain_y, orig_w, orig_h]``); only ``orig_w, orig_h`` are read.

Outputs
  depth     ``float32[B, H0, W0]`` metres, ``H0 x W0`` the largest original size in the batch;
            ``depth[b, :orig_h_b, :orig_w_b]`` is image b's map in original-image pixels, everything else 0.
  sizes     ``int64[B, 2]``: ``(orig_h, orig_w)`` of each image.
  stats     ``float32[B, 4]``: ``min, max, mean, median`` of image b's map (the median of an even count is the
            mean of the two middle values, as numpy's).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn

from export.postprocess import bilinear

DEPTH_STRIDE = 4  # the Depth head predicts at P2 resolution: input = map x 4 (Ultralytics' export upsamples x4)


def median(values: Tensor) -> Tensor:
    """``values: float32[N]``, N >= 1 -> the median as a 0-d tensor, numpy's definition (mean of the two
    middle values for an even N). ``kthvalue`` is linear time and has no size limit (``torch.quantile`` does)."""
    n = values.numel()
    low = torch.kthvalue(values, (n + 1) // 2)[0]
    if n % 2 == 1:
        return low
    return (low + torch.kthvalue(values, n // 2 + 1)[0]) / 2


class DepthPostprocess(nn.Module):
    """Depth head output -> metres at original size; see the module docstring for the contract."""

    def __init__(self) -> None:
        super().__init__()
        self.depth_stride = DEPTH_STRIDE

    def forward(self, feats: List[Tensor], geometry: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        maps = feats[0].float()  # [B, 1, h, w]
        bsz, device = maps.shape[0], maps.device
        input_hw = [int(maps.shape[2]) * self.depth_stride, int(maps.shape[3]) * self.depth_stride]
        maps = bilinear(maps, input_hw, True)  # [B, 1, H, W]
        geometry = geometry.to(device=device, dtype=torch.float32)
        sizes = torch.stack((geometry[:, 5], geometry[:, 4]), 1).round().to(torch.long)  # [B, 2] (h, w)
        h_max = int(sizes[:, 0].max()) if bsz > 0 else 0
        w_max = int(sizes[:, 1].max()) if bsz > 0 else 0
        out = torch.zeros((bsz, h_max, w_max), dtype=torch.float32, device=device)
        stats = torch.zeros((bsz, 4), dtype=torch.float32, device=device)
        for b in range(bsz):
            oh, ow = int(sizes[b, 0]), int(sizes[b, 1])
            d = bilinear(maps[b : b + 1], [oh, ow], True)[0, 0]  # [oh, ow]
            out[b, :oh, :ow] = d
            flat = d.flatten()
            stats[b] = torch.stack((flat.min(), flat.max(), flat.mean(), median(flat)))
        return out, sizes, stats
