"""The two exported halves of a classify model: the traced logits network and the scripted softmax + top-k.

Contract of the traced ``backbone.pt`` of a classify model:
  input   ``images: float32[B, 3, H, W]`` (float16 when the handler runs half on CUDA), RGB, 0..1, the
          output of the classification transform (``handler/image/classify_crop.py``); any B, any H and W
          (the head pools globally), normally the exported ``imgsz``.
  output  a 1-tuple ``(logits: float32[B, nc],)``: the ``Classify`` head's linear output *before* its
          softmax (in eval mode Ultralytics' head returns ``(softmax, logits)``; we keep the logits and
          do the softmax in the postprocessor). A tuple, like the detect/pose backbone's output.

Contract of :class:`ClassifyPostprocess.forward` (``postprocess.pt``):
  feats      list of one tensor ``logits: [B, nc]``, float32 or float16 (the backbone's output tuple).
  top_k      ``int64[B]``, each >= 1: classes to return per image (more than ``nc`` returns ``nc``).
  returns    ``scores: float32[B, K]``: softmax probabilities (computed in float32), highest first;
             ``class_ids: int64[B, K]``; ``counts: int64[B] = min(top_k, nc)``; ``K = max(counts)``.
             Rows are padded after ``counts[b]`` with score 0 and class id -1.
  Ties keep ``torch.topk``'s order.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn


class ClassifyLogits(nn.Module):
    """A fused Ultralytics ``ClassificationModel`` that returns ``(logits,)`` instead of ``(softmax, logits)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        out = self.model(x)  # eval mode: (probabilities [B, nc], logits [B, nc])
        return (out[1],)


class ClassifyPostprocess(nn.Module):
    """Softmax over the class logits, then the ``top_k`` best classes of each image."""

    def __init__(self, nc: int) -> None:
        super().__init__()
        self.nc = nc

    def forward(self, feats: List[Tensor], top_k: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        logits = feats[0].to(torch.float32)  # [B, nc]
        bsz = logits.shape[0]
        counts = top_k.to(device=logits.device, dtype=torch.long).clamp(1, self.nc)  # [B]
        k = int(counts.max()) if bsz > 0 else 1
        scores, class_ids = logits.softmax(1).topk(k, dim=1)  # [B, K] each, highest first
        keep = torch.arange(k, device=logits.device).view(1, k) < counts.view(bsz, 1)  # [B, K]
        scores = torch.where(keep, scores, torch.zeros_like(scores))
        class_ids = torch.where(keep, class_ids, torch.full_like(class_ids, -1))
        return scores, class_ids, counts
