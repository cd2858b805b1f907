"""The network up to the raw head outputs, for ``torch.jit.trace``.

Contract of the traced ``backbone.pt``:
  input   ``images: float32[B, 3, H, W]`` (float16 when the handler runs half on CUDA), RGB, 0..1,
          H and W multiples of the model's largest stride (metadata ``max_stride``); any B.
  output  tuple of ``nl`` tensors ``[B, no, H / stride_i, W / stride_i]`` with
          ``no = 4 * reg_max + nc + extra``: box logits, class logits, then the task's raw values
          (pose: ``nkpt * kdim`` keypoint values; segment: ``nm`` mask coefficients; obb: 1 angle logit);
          a segment model appends one more tensor, the mask prototypes ``[B, nm, H / 4, W / 4]``.
Nothing that depends on H or W (anchors, strides, decode) is inside: that is the postprocessor's
job, so one trace serves every input size. Classify models trace :class:`export.classify.ClassifyLogits`
instead (contract in ``export/classify.py``); :func:`raw_network` picks.
"""

from __future__ import annotations

import warnings
from typing import List, Tuple

import torch
from torch import Tensor, nn

from export.checkpoint import LoadedModel
from export.classify import ClassifyLogits


class RawHead(nn.Module):
    """Wraps a fused Ultralytics model so that it returns the raw per-level head maps."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.layers = loaded.model.model  # nn.Sequential of Ultralytics layers, each with .f (from) and .i
        self.save = set(loaded.model.save)
        head = self.layers[-1]
        branches = head.one2one if loaded.end2end else head.one2many
        self.box_head: nn.ModuleList = branches["box_head"]
        self.cls_head: nn.ModuleList = branches["cls_head"]
        # v8/11 Pose: one keypoint branch; Pose26: a shared stem (pose_head) then a 1x1 conv (kpts_head).
        self.pose_head: nn.ModuleList | None = branches.get("pose_head")
        self.kpts_head: nn.ModuleList | None = branches.get("kpts_head")
        # Segment: mask coefficients per level and the prototypes (Proto on P3; Proto26 on all levels).
        # OBB / OBB26: one raw angle channel per level (the sigmoid of v8/11 OBB is the postprocessor's).
        self.extra_head: nn.ModuleList | None = branches.get("mask_head", branches.get("angle_head"))
        self.proto: nn.Module | None = getattr(head, "proto", None)
        self.proto_all_levels = type(head).__name__ == "Segment26"
        self.nl = len(self.box_head)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        y: List[Tensor | None] = []
        for m in self.layers[:-1]:  # Ultralytics' BaseModel._predict_once, without the head
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        head = self.layers[-1]
        feats = [x if j == -1 else y[j] for j in head.f]
        outs = []
        for i in range(self.nl):
            parts = [self.box_head[i](feats[i]), self.cls_head[i](feats[i])]  # [B, 4*reg_max, h, w], [B, nc, h, w]
            if self.pose_head is not None:
                kpt = self.pose_head[i](feats[i])
                parts.append(self.kpts_head[i](kpt) if self.kpts_head is not None else kpt)  # [B, nkpt*kdim, h, w]
            if self.extra_head is not None:
                parts.append(self.extra_head[i](feats[i]))  # [B, nm or 1, h, w]
            outs.append(torch.cat(parts, 1))  # [B, no, h, w]
        if self.proto is not None:
            outs.append(self.proto(feats if self.proto_all_levels else feats[0]))  # [B, nm, H / 4, W / 4]
        return tuple(outs)


def raw_network(loaded: LoadedModel) -> nn.Module:
    """The eager module that ``backbone.pt`` traces: :class:`ClassifyLogits` for classify, else :class:`RawHead`."""
    return ClassifyLogits(loaded.model) if loaded.task == "classify" else RawHead(loaded)


def trace_backbone(loaded: LoadedModel, example_hw: tuple[int, int]) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of :func:`raw_network` on CPU, fp32, at ``1 x 3 x example_hw``."""
    wrapper = raw_network(loaded).eval()
    example = torch.rand(1, 3, *example_hw)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit.* deprecation notices in torch 2.14
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        return torch.jit.trace(wrapper, example, check_trace=False)
