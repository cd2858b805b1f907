"""The scripted postprocessor: raw YOLO head outputs -> detections in original-image pixels.

Everything here is plain torch and goes through ``torch.jit.script``; the exported
``postprocess.pt`` loads with ``torch.jit.load`` alone (no torchvision, numpy or Ultralytics).

Contract of :class:`YoloPostprocess.forward` (contract version :data:`CONTRACT_VERSION`):

Inputs
  feats      list of ``nl`` tensors ``[B, no, H_i, W_i]``, float32 or float16: the traced backbone's
             output for an input of ``B x 3 x H x W``, with ``H_i = H / stride_i``. Channels are
             ``4 * reg_max`` box logits (DFL bins, or ltrb distances in grid units when reg_max == 1),
             then ``nc`` class logits, then ``nkpt * kdim`` raw keypoint values (pose models only).
  geometry   ``float32[B, 6]``, one row per image, from ``LetterboxParams.as_row()``:
             ``[pad_left, pad_top, gain_x, gain_y, orig_w, orig_h]``; input pixel
             ``x_in = x_orig * gain_x + pad_left`` (same for y).
  conf       ``float32[B]``: keep detections whose score is strictly greater.
  iou        ``float32[B]``: NMS suppresses a box whose IoU with a kept box of the same class is
             strictly greater (ignored by NMS-free one-to-one heads, exactly as Ultralytics).
  max_det    ``int64[B]``, each >= 1: detections kept per image.
  class_mask ``bool[B, nc]`` or None: True where a class may be returned. The best class of a box is
             chosen first, then filtered, as Ultralytics' ``classes=`` does.
  agnostic   bool: class-agnostic NMS (and top-k) instead of per-class.

Outputs
  detections ``float32[B, K, 6 + 3 * nkpt]`` with ``K = max(max_det)``, zero-padded after
             ``counts[b]`` rows, sorted by score, highest first. Columns:
             ``x1, y1, x2, y2`` (xyxy, original-image pixels, clipped to the image),
             ``score`` (sigmoid class probability), ``class_id`` (as float), then for each keypoint
             ``x, y`` (original-image pixels, clipped) and ``visibility`` (sigmoid; 1.0 when the
             model predicts no visibility, kdim == 2).
  counts     ``int64[B]``: valid rows per image.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

CONTRACT_VERSION = 1

# Keypoint decode formulas (``kpt_decode`` of YoloPostprocess, ``kpt_decode`` in metadata):
KPT_DECODE_NONE = 0  # detect model
KPT_DECODE_POSE = 1  # v8/v11 ``Pose``:  xy = (raw * 2 + anchor - 0.5) * stride
KPT_DECODE_POSE26 = 2  # YOLO26 ``Pose26``: xy = (raw + anchor) * stride


def make_anchors(feats: List[Tensor], strides: List[float]) -> Tuple[Tensor, Tensor]:
    """Grid-cell centres of every level, from the feature maps' actual sizes.

    Returns ``anchors: float32[A, 2]`` (x, y) in grid units and ``stride: float32[A, 1]``, with
    ``A = sum(H_i * W_i)`` in the same row-major order as ``feat.flatten(2)``.
    """
    points: List[Tensor] = []
    stride_rows: List[Tensor] = []
    for i, feat in enumerate(feats):
        h, w = feat.shape[2], feat.shape[3]
        sx = torch.arange(w, device=feat.device, dtype=torch.float32) + 0.5
        sy = torch.arange(h, device=feat.device, dtype=torch.float32) + 0.5
        gy, gx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((gx, gy), -1).view(-1, 2))  # [H_i * W_i, 2]
        stride_rows.append(torch.full((h * w, 1), strides[i], device=feat.device, dtype=torch.float32))
    return torch.cat(points), torch.cat(stride_rows)


def dfl_distances(box: Tensor, reg_max: int) -> Tensor:
    """``box: [B, 4 * reg_max, A]`` logits -> ``[B, 4, A]`` ltrb distances in grid units.

    Distribution Focal Loss decode: the expectation of the softmax over ``reg_max`` bins. With
    ``reg_max == 1`` (YOLO26) the head predicts the distances directly.
    """
    if reg_max == 1:
        return box
    b, a = box.shape[0], box.shape[2]
    prob = box.view(b, 4, reg_max, a).softmax(2)  # [B, 4, reg_max, A]
    bins = torch.arange(reg_max, device=box.device, dtype=box.dtype).view(1, 1, reg_max, 1)
    return (prob * bins).sum(2)  # [B, 4, A]


def decode_boxes(dist: Tensor, anchors: Tensor, stride: Tensor) -> Tensor:
    """``dist: [B, 4, A]`` ltrb -> ``[B, A, 4]`` xyxy in network-input pixels."""
    lt, rb = dist.permute(0, 2, 1).chunk(2, -1)  # [B, A, 2] each
    return torch.cat((anchors - lt, anchors + rb), -1) * stride


def decode_keypoints(raw: Tensor, anchors: Tensor, stride: Tensor, kdim: int, pose26: bool) -> Tensor:
    """``raw: [B, nkpt * kdim, A]`` -> ``[B, A, nkpt, 3]`` (x, y in input pixels, visibility).

    v8/v11 ``Pose`` and YOLO26 ``Pose26`` (``pose26=True``) use different offsets. Visibility is the sigmoid of the third channel, or 1.0 when ``kdim == 2``.
    """
    b, a = raw.shape[0], raw.shape[2]
    y = raw.permute(0, 2, 1).reshape(b, a, -1, kdim)  # [B, A, nkpt, kdim]
    grid = anchors.view(1, a, 1, 2)
    s = stride.view(1, a, 1, 1)
    if pose26:
        xy = (y[..., :2] + grid) * s
    else:
        xy = (y[..., :2] * 2.0 + (grid - 0.5)) * s
    if kdim == 3:
        vis = y[..., 2:3].sigmoid()
    else:
        vis = torch.ones_like(y[..., :1])
    return torch.cat((xy, vis), -1)  # [B, A, nkpt, 3]


def box_iou_one(box: Tensor, boxes: Tensor) -> Tensor:
    """IoU of ``box: [4]`` with ``boxes: [N, 4]`` (xyxy) -> ``[N]``, torchvision's formula."""
    w = (torch.minimum(box[2], boxes[:, 2]) - torch.maximum(box[0], boxes[:, 0])).clamp(min=0)
    h = (torch.minimum(box[3], boxes[:, 3]) - torch.maximum(box[1], boxes[:, 1])).clamp(min=0)
    inter = w * h
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float, max_keep: int, agnostic: bool) -> Tensor:
    """Greedy NMS, the same decisions as ``torchvision.ops.batched_nms``.

    ``boxes: [N, 4]`` xyxy, ``scores: [N]``, ``classes: [N]`` -> ``int64[K]`` indices into the inputs,
    highest score first, ``K <= max_keep``. A box is suppressed when its IoU with a kept box of the
    same class (any class if ``agnostic``) is strictly greater than ``iou_threshold``. The loop runs
    once per kept box, not once per candidate.
    """
    n = boxes.shape[0]
    if n == 0 or max_keep <= 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True)[1]  # ties keep input order: deterministic
    boxes = boxes[order]
    classes = classes[order]
    remaining = torch.ones(n, dtype=torch.bool, device=boxes.device)
    keep: List[int] = []
    while len(keep) < max_keep:
        i = int(torch.argmax(remaining.to(torch.uint8)))  # first remaining = highest remaining score
        if not bool(remaining[i]):
            break
        keep.append(i)
        suppress = box_iou_one(boxes[i], boxes) > iou_threshold  # [N]
        if not agnostic:
            suppress = suppress & (classes == classes[i])
        remaining = remaining & ~suppress
        remaining[i] = False
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def select_nms(
    boxes: Tensor,
    scores: Tensor,
    conf: float,
    iou: float,
    max_det: int,
    class_mask: Optional[Tensor],
    agnostic: bool,
    max_candidates: int = 30000,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One image, one-to-many head. ``boxes: [A, 4]``, ``scores: [A, nc]`` ->
    ``(index int64[K] into A, score float32[K], class int64[K])``, Ultralytics' ``non_max_suppression``
    (``max_candidates`` is its ``max_nms``)."""
    best, cls = scores.max(1)  # [A] each
    keep = best > conf
    if class_mask is not None:
        keep = keep & class_mask[cls]
    idx = keep.nonzero().view(-1)  # [N]
    if idx.numel() > max_candidates:
        idx = idx[best[idx].argsort(descending=True)[:max_candidates]]
    kept = idx[nms(boxes[idx], best[idx], cls[idx], iou, max_det, agnostic)]
    return kept, best[kept], cls[kept]


def select_topk(
    scores: Tensor, conf: float, max_det: int, class_mask: Optional[Tensor], agnostic: bool, min_topk: int = 300
) -> Tuple[Tensor, Tensor, Tensor]:
    """One image, NMS-free one-to-one head (YOLO26 end-to-end). ``scores: [A, nc]`` ->
    ``(index int64[K] into A, score float32[K], class int64[K])``.

    Exactly Ultralytics' ``Detect.get_topk_index`` with the predictor's ``k = max(max_det, min_topk=300)``,
    followed by its end-to-end filter: ``score > conf``, the class filter, then the first ``max_det``.
    The same anchor may appear with two classes, as in Ultralytics.
    """
    a, nc = scores.shape[0], scores.shape[1]
    k = min(max(max_det, min_topk), a)
    if agnostic:
        best, labels = scores.max(1)
        top, index = best.topk(k)
        cls = labels[index]
    else:
        anchor_index = scores.max(1)[0].topk(k)[1]  # [k]
        top, flat = scores[anchor_index].flatten().topk(k)  # [k] over (anchor, class) pairs
        cls = flat % nc
        index = anchor_index[torch.div(flat, nc, rounding_mode="floor")]
    keep = top > conf
    if class_mask is not None:
        keep = keep & class_mask[cls]
    sel = keep.nonzero().view(-1)[:max_det]
    return index[sel], top[sel], cls[sel]


def unletterbox_points(xy: Tensor, geometry: Tensor) -> Tensor:
    """``xy: [..., 2]`` input pixels -> original-image pixels, clipped to ``[0, orig_w] x [0, orig_h]``.

    ``geometry: float32[6]`` is one row of the postprocessor's ``geometry`` input.
    """
    x = ((xy[..., 0] - geometry[0]) / geometry[2]).clamp(min=0.0).minimum(geometry[4])
    y = ((xy[..., 1] - geometry[1]) / geometry[3]).clamp(min=0.0).minimum(geometry[5])
    return torch.stack((x, y), -1)


class YoloPostprocess(nn.Module):
    """Raw head outputs -> fixed-shape detections; see the module docstring for the contract."""

    def __init__(
        self,
        nc: int,
        reg_max: int,
        strides: List[float],
        end2end: bool,
        kpt_shape: Tuple[int, int] = (0, 0),
        kpt_decode: int = KPT_DECODE_NONE,
    ) -> None:
        super().__init__()
        self.nc = nc
        self.reg_max = reg_max
        self.strides = [float(s) for s in strides]
        self.end2end = end2end
        self.nkpt = int(kpt_shape[0])
        self.kdim = int(kpt_shape[1])
        self.kpt_decode = kpt_decode
        self.ncols = 6 + 3 * self.nkpt

    def decode(self, feats: List[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Raw maps -> ``boxes [B, A, 4]`` xyxy input pixels, ``scores [B, A, nc]``,
        ``keypoints [B, A, nkpt, 3]`` (None for detect models)."""
        anchors, stride = make_anchors(feats, self.strides)  # [A, 2], [A, 1]
        raw = torch.cat([f.float().flatten(2) for f in feats], 2)  # [B, no, A]
        nbox = 4 * self.reg_max
        boxes = decode_boxes(dfl_distances(raw[:, :nbox], self.reg_max), anchors, stride)
        scores = raw[:, nbox : nbox + self.nc].sigmoid().permute(0, 2, 1)  # [B, A, nc]
        kpts: Optional[Tensor] = None
        if self.nkpt > 0:
            kpts = decode_keypoints(raw[:, nbox + self.nc :], anchors, stride, self.kdim, self.kpt_decode == 2)
        return boxes, scores, kpts

    def forward(
        self,
        feats: List[Tensor],
        geometry: Tensor,
        conf: Tensor,
        iou: Tensor,
        max_det: Tensor,
        class_mask: Optional[Tensor] = None,
        agnostic: bool = False,
    ) -> Tuple[Tensor, Tensor]:
        boxes, scores, kpts = self.decode(feats)
        bsz = boxes.shape[0]
        device = boxes.device
        geometry = geometry.to(device=device, dtype=torch.float32)
        limit = int(max_det.max()) if max_det.numel() > 0 else 1
        out = torch.zeros((bsz, limit, self.ncols), dtype=torch.float32, device=device)
        counts = torch.zeros(bsz, dtype=torch.long, device=device)
        for b in range(bsz):
            mask: Optional[Tensor] = None
            if class_mask is not None:
                mask = class_mask[b].to(device)
            conf_b = float(conf[b])
            max_det_b = int(max_det[b])
            if self.end2end:
                index, score, cls = select_topk(scores[b], conf_b, max_det_b, mask, agnostic)
            else:
                index, score, cls = select_nms(boxes[b], scores[b], conf_b, float(iou[b]), max_det_b, mask, agnostic)
            n = index.shape[0]
            xyxy = unletterbox_points(boxes[b][index].view(n, 2, 2), geometry[b]).view(n, 4)
            cols = [xyxy, score.view(n, 1), cls.to(torch.float32).view(n, 1)]
            if kpts is not None:
                kb = kpts[b][index]  # [n, nkpt, 3]
                kxy = unletterbox_points(kb[..., :2], geometry[b])
                cols.append(torch.cat((kxy, kb[..., 2:3]), -1).view(n, 3 * self.nkpt))
            out[b, :n] = torch.cat(cols, 1)
            counts[b] = n
        return out, counts
