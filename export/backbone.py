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
instead (contract in ``export/classify.py``); each task's entry in ``export/tasks.py`` names its module.

The three whole-network tasks trace the model's own eval forward:
  semantic  (:class:`WholeNetwork`) a 1-tuple ``(logits: float32[B, nc, H / 8, W / 8],)``: the ``SemanticSegment``
            head's class logits, before any upsampling (eval mode, not Ultralytics' export mode, which
            upsamples x8 and may bake an argmax in). Any H, W (multiples of ``max_stride``).
  depth     (:class:`WholeNetwork`) a 1-tuple ``(depth: float32[B, 1, H / 4, W / 4],)``: the ``Depth`` head's eval
            output, ``exp(cal_a * clamp(log_depth, -4, 5) + cal_b)``, metres, > 0, calibration applied, before
            the x4 upsampling (which only Ultralytics' export mode does, align_corners=True, the same that
            ``DepthPredictor.postprocess`` does from this tensor). Any H, W (multiples of ``max_stride``).
  rtdetr    (:class:`RTDETRQueries`) a 1-tuple ``(queries: float32[B, Q, 4 + nc],)`` with ``Q = num_queries`` (300):
            the last decoder layer's boxes, normalised ``cx, cy, w, h`` in ``[0, 1]`` of the network input, then
            the ``nc`` sigmoid class scores; before ``RTDETRDecoder.postprocess``'s top-k over (query, class)
            pairs, which is the postprocessor's (``export/rtdetr.py``). Any B, any H, W (multiples of
            ``max_stride``): the tracer records the anchors, the AIFI positional embedding and the deformable
            attention's level sizes as functions of the input size (tests/test_new_tasks.py: traced at 640x640,
            run at 480x640 and 320x320, equal to eager), *provided* the head's anchor cache is cold when it is
            traced; :class:`RTDETRQueries` clears it on every call (a warm cache makes the trace bake
            ``8400`` anchors in, and it fails at any other size).
"""

from __future__ import annotations

import warnings
from typing import List, Tuple

import torch
from torch import Tensor, nn

from export.checkpoint import LoadedModel


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


class WholeNetwork(nn.Module):
    """A fused semantic or depth model whose eval forward already returns the one raw tensor we serve
    (``SemanticSegment``: logits ``[B, nc, H / 8, W / 8]``; ``Depth``: metres ``[B, 1, H / 4, W / 4]``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        return (self.model(x),)


class RTDETRQueries(nn.Module):
    """A fused ``RTDETRDetectionModel`` that returns the decoder's queries ``[B, Q, 4 + nc]`` (normalised
    cxcywh, sigmoid scores) instead of the head's eval output ``(top-k [B, Q, 6], raw)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        # RTDETRDecoder caches its anchors per feature size in Python (head.shapes / head.anchors); a trace
        # taken with a warm cache would hold them as a constant. Cold, the trace computes them from x's size.
        self.model.model[-1].shapes = []
        _, raw = self.model(x)  # eval: (postprocessed, (dec_bboxes, dec_scores, enc_bboxes, enc_scores, dn_meta))
        boxes, logits = raw[0][-1], raw[1][-1]  # last decoder layer: [B, Q, 4] sigmoid boxes, [B, Q, nc] logits
        return (torch.cat((boxes, logits.sigmoid()), -1),)  # [B, Q, 4 + nc], the head's own sigmoid


def trace_backbone(network: nn.Module, example_hw: tuple[int, int]) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``network`` (a task's module above, ``export.tasks.raw_network``) on CPU, fp32, at
    ``1 x 3 x example_hw``."""
    wrapper = network.eval()
    example = torch.rand(1, 3, *example_hw)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit.* deprecation notices in torch 2.14
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        return torch.jit.trace(wrapper, example, check_trace=False)
