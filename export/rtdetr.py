"""The scripted postprocessor of an RT-DETR detector: decoder queries -> detections in original-image pixels.

Plain torch, ``torch.jit.script``-able; ``postprocess.pt`` loads with ``torch.jit.load`` alone.
It reproduces Ultralytics 8.4.190 on the same decoder output: ``RTDETRDecoder.postprocess`` (the top-k over
all (query, class) pairs, ``ultralytics/nn/modules/head.py``) followed by ``RTDETRPredictor.postprocess``
(``ultralytics/models/rtdetr/predict.py``: cxcywh -> xyxy, ``score > conf``, the class filter, the first
``max_det``, times the original width and height). NMS-free; a query may appear with two classes, as in
Ultralytics. The input was stretched (``handler/image/stretch.py``), so normalised coordinates map to the original
image by its width and height alone.

Contract of :class:`RTDETRPostprocess.forward`, the signature and outputs of ``YoloPostprocess`` (detect) so
that the detect task serves it unchanged:

Inputs
  feats       list of one tensor ``queries: [B, Q, 4 + nc]``, float32 or float16 (``export/backbone.py``,
              ``RTDETRQueries``): normalised ``cx, cy, w, h`` of the network input, then ``nc`` sigmoid scores.
  geometry    ``float32[B, 6]``, rows of ``LetterboxParams.as_row()`` of :func:`handler.image.stretch.stretch`;
              only ``orig_w, orig_h`` (columns 4, 5) are read.
  conf        ``float32[B]``: keep detections whose score is strictly greater.
  iou         ``float32[B]``: ignored (NMS-free; Ultralytics' RT-DETR predictor ignores it too).
  max_det     ``int64[B]``, each >= 1: detections kept per image; at most ``min(Q, Q * nc)`` (300) exist.
  class_mask  ``bool[B, nc]`` or None: True where a class may be returned (Ultralytics' ``classes=``).
  agnostic    ignored (no NMS).

Outputs
  detections  ``float32[B, K, 6]`` with ``K = max(max_det)``, zero-padded after ``counts[b]`` rows, highest
              score first: ``x1, y1, x2, y2`` (xyxy, original-image pixels, not clipped, as Ultralytics),
              ``score`` (sigmoid class probability), ``class_id`` (as float).
  counts      ``int64[B]``: valid rows per image.
  masks       ``uint8[B, 0, 0, 0]`` (the detect contract's empty third output).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn


def xywh2xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` cx, cy, w, h -> x1, y1, x2, y2, term for term Ultralytics' ``ops.xywh2xyxy``."""
    xy = boxes[..., :2]
    wh = boxes[..., 2:] / 2
    return torch.cat((xy - wh, xy + wh), -1)


def top_queries(queries: Tensor, nc: int, num_queries: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``queries: float32[B, Q, 4 + nc]`` -> ``boxes [B, k, 4]`` (normalised cxcywh), ``scores [B, k]``,
    ``classes int64[B, k]``, highest first, ``k = min(num_queries, Q * nc)``: ``RTDETRDecoder.postprocess``
    (eval, one group: ``topk`` over the flattened (query, class) scores)."""
    boxes, scores = queries[..., :4], queries[..., 4:]
    k = min(num_queries, scores.shape[1] * nc)
    top, index = scores.flatten(1).topk(k, dim=1)  # [B, k]
    query = torch.div(index, nc, rounding_mode="floor")
    picked = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))  # [B, k, 4]
    return picked, top, index - query * nc


class RTDETRPostprocess(nn.Module):
    """Decoder queries -> fixed-shape detections; see the module docstring for the contract."""

    def __init__(self, nc: int, num_queries: int = 300) -> None:
        super().__init__()
        self.nc = nc
        self.num_queries = num_queries

    def forward(
        self,
        feats: List[Tensor],
        geometry: Tensor,
        conf: Tensor,
        iou: Tensor,
        max_det: Tensor,
        class_mask: Optional[Tensor] = None,
        agnostic: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        queries = feats[0].float()  # [B, Q, 4 + nc]
        bsz, device = queries.shape[0], queries.device
        boxes, scores, classes = top_queries(queries, self.nc, self.num_queries)  # [B, k, 4], [B, k], [B, k]
        boxes = xywh2xyxy(boxes)
        geometry = geometry.to(device=device, dtype=torch.float32)
        limit = int(max_det.max()) if max_det.numel() > 0 else 1
        out = torch.zeros((bsz, limit, 6), dtype=torch.float32, device=device)
        counts = torch.zeros(bsz, dtype=torch.long, device=device)
        for b in range(bsz):
            keep = scores[b] > float(conf[b])  # [k]
            if class_mask is not None:
                keep = keep & class_mask[b].to(device)[classes[b]]
            sel = keep.nonzero().view(-1)[: int(max_det[b])]  # [n], still highest first
            n = sel.shape[0]
            xyxy = boxes[b][sel]  # [n, 4] normalised
            scale = torch.stack((geometry[b, 4], geometry[b, 5], geometry[b, 4], geometry[b, 5]))  # ow, oh, ow, oh
            rows = torch.cat((xyxy * scale, scores[b][sel].view(n, 1), classes[b][sel].to(torch.float32).view(n, 1)), 1)
            out[b, :n] = rows
            counts[b] = n
        return out, counts, torch.zeros((bsz, 0, 0, 0), dtype=torch.uint8, device=device)
