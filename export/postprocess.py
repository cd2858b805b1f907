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
             strictly greater (ignored by NMS-free one-to-one heads, exactly as Ultralytics). OBB:
             probabilistic IoU and Fast-NMS (see :func:`nms_rotated`), as Ultralytics' rotated NMS.
  max_det    ``int64[B]``, each >= 1: detections kept per image.
  class_mask ``bool[B, nc]`` or None: True where a class may be returned. The best class of a box is
             chosen first, then filtered, as Ultralytics' ``classes=`` does.
  agnostic   bool: class-agnostic NMS (and top-k) instead of per-class.

Outputs
  detections ``float32[B, K, ncols]`` with ``K = max(max_det)``, zero-padded after ``counts[b]`` rows,
             sorted by score, highest first. Columns 0..5 for every task:
             ``x1, y1, x2, y2`` (xyxy, original-image pixels), ``score`` (sigmoid class probability),
             ``class_id`` (as float). Then, by task (``ncols``):
             detect   nothing more (``ncols = 6``); the box is clipped to the image.
             pose     for each keypoint ``x, y`` (original-image pixels, clipped) and ``visibility``
                      (sigmoid; 1.0 when the model predicts no visibility, kdim == 2); ``ncols = 6 + 3 * nkpt``.
             segment  nothing more (``ncols = 6``); the box is clipped; the masks are the third output.
             obb      ``cx, cy, w, h, angle`` (the rotated box: centre and size in original-image pixels,
                      ``scale_boxes(..., xywh=True)`` as Ultralytics, not clipped; angle in radians as the head
                      predicts it), then the four corners ``x, y`` (``xywhr2xyxyxyxy`` order); columns 0..3 are
                      the axis-aligned hull of the corners (not clipped, as Ultralytics' ``obb.xyxy``);
                      ``ncols = 6 + 5 + 8``.
  counts     ``int64[B]``: valid rows per image.
  masks      segment: ``uint8[B, M, H0, W0]`` binary (0/1) instance masks of the kept rows only, in
             original-image pixels, ``M = max(counts)``, ``H0 x W0`` the largest original size in the
             batch; mask ``[b, i, :orig_h_b, :orig_w_b]`` belongs to ``detections[b, i]``, everything
             else is 0. Computed as Ultralytics' ``YOLO.predict`` (``retina_masks=False``):
             ``coeffs @ protos`` -> bilinear upsample to the network input -> ``> 0`` -> crop to the
             input-space box (``process_mask(..., upsample=True)``); a detection whose mask is empty there
             is dropped, as the predictor does; the input-space mask is then mapped to the original
             image as ``scale_masks`` (cut the padding, bilinear resize) and thresholded at 0.5.
             Memory: ``M * H0 * W0`` bytes (50 masks of a 1920x1080 image: 104 MB).
             Other tasks: ``uint8[B, 0, 0, 0]``.

Segment and OBB inputs: a segment backbone returns ``nl + 1`` tensors, the levels (channels: box, class,
then ``nm`` mask coefficients) and last the prototypes ``[B, nm, H / 4, W / 4]``; an OBB backbone's levels
carry one raw angle channel after the class logits.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from handler.contract import CONTRACT_VERSION  # noqa: F401 - the version this contract is (handler/contract.py)
# The corners of a rotated box: one function for the postprocessor and for a tracked OBB frame's moved boxes.
from handler.tasks.detect import rbox_corners

# Keypoint decode formulas (``kpt_decode`` of YoloPostprocess, ``kpt_decode`` in metadata):
KPT_DECODE_NONE = 0  # detect model
KPT_DECODE_POSE = 1  # v8/v11 ``Pose``:  xy = (raw * 2 + anchor - 0.5) * stride
KPT_DECODE_POSE26 = 2  # YOLO26 ``Pose26``: xy = (raw + anchor) * stride
# OBB angle decode (``angle_decode`` of YoloPostprocess, ``angle_decode`` in metadata):
ANGLE_DECODE_NONE = 0  # not an OBB model
ANGLE_DECODE_OBB = 1  # v8/v11 ``OBB``: angle = (sigmoid(raw) - 0.25) * pi, in [-pi/4, 3pi/4)
ANGLE_DECODE_OBB26 = 2  # YOLO26 ``OBB26``: angle = raw


def bilinear(x: Tensor, size: List[int], align_corners: bool) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=...)``, the same kernel called directly.

    ``torch.jit.script`` of ``F.interpolate`` compiles every branch of its body, and torch 2.14's body names
    ``aten::_upsample_lanczos2d_aa``, which torch 2.11 does not have: a ``postprocess.pt`` saved here would not
    load there (docs/gpu.md). The bilinear kernel itself exists in both."""
    return torch._C._nn.upsample_bilinear2d(x, size, align_corners, None)


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


def gather_levels(feats: List[Tensor]) -> Tensor:
    """Level maps ``[B, no, H_i, W_i]`` -> ``float32[B, A, no]``, one row per anchor in :func:`make_anchors`
    order. The per-level permute is a view for channels-last maps (what the traced backbone returns),
    so the only copy is the concatenation of contiguous blocks."""
    b, no = feats[0].shape[0], feats[0].shape[1]
    return torch.cat([f.permute(0, 2, 3, 1).reshape(b, -1, no) for f in feats], 1).float()


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
    y = raw.permute(0, 2, 1).reshape(b, a, raw.shape[1] // kdim, kdim)  # [B, A, nkpt, kdim]; A may be 0
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


def nms_candidates(
    scores: Tensor, conf: float, class_mask: Optional[Tensor], max_candidates: int = 30000
) -> Tuple[Tensor, Tensor, Tensor]:
    """One image, one-to-many head, before NMS. ``scores: [A, nc]`` -> the candidates
    ``(index int64[N] into A, score float32[N], class int64[N])``: best class ``> conf``, the class
    filter, and at most ``max_candidates`` (the highest scores), as Ultralytics' ``non_max_suppression``."""
    best, cls = scores.max(1)  # [A] each
    keep = best > conf
    if class_mask is not None:
        keep = keep & class_mask[cls]
    idx = keep.nonzero().view(-1)  # [N]
    if idx.numel() > max_candidates:
        idx = idx[best[idx].argsort(descending=True)[:max_candidates]]
    return idx, best[idx], cls[idx]


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
    idx, best, cls = nms_candidates(scores, conf, class_mask, max_candidates)
    k = nms(boxes[idx], best, cls, iou, max_det, agnostic)
    return idx[k], best[k], cls[k]


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


def decode_rboxes(dist: Tensor, angle: Tensor, anchors: Tensor, stride: Tensor) -> Tensor:
    """``dist: [B, 4, A]`` ltrb, ``angle: [B, A]`` radians -> ``[B, A, 4]`` rotated ``cx, cy, w, h`` in
    network-input pixels: Ultralytics' ``dist2rbox`` times the stride."""
    lt, rb = dist[:, :2], dist[:, 2:]  # [B, 2, A] each
    cos, sin = torch.cos(angle), torch.sin(angle)  # [B, A]
    half = (rb - lt) / 2  # [B, 2, A], the centre offset in the box's own frame
    x = half[:, 0] * cos - half[:, 1] * sin
    y = half[:, 0] * sin + half[:, 1] * cos
    xy = torch.stack((x, y), -1) + anchors  # [B, A, 2]
    return torch.cat((xy, (lt + rb).permute(0, 2, 1)), -1) * stride  # [B, A, 4]


def rbox_covariance(rboxes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``rboxes: [N, 5]`` xywhr -> the Gaussian covariance ``[[a, c], [c, b]]`` as ``a, b, c: [N]``
    (Ultralytics' ``_get_covariance_matrix``)."""
    a = rboxes[:, 2].pow(2) / 12
    b = rboxes[:, 3].pow(2) / 12
    cos, sin = rboxes[:, 4].cos(), rboxes[:, 4].sin()
    cos2, sin2 = cos.pow(2), sin.pow(2)
    return a * cos2 + b * sin2, a * sin2 + b * cos2, (a - b) * cos * sin


def batch_probiou(obb1: Tensor, obb2: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic IoU (arXiv 2106.06072) of ``obb1: [N, 5]`` with ``obb2: [M, 5]`` xywhr -> ``[N, M]``,
    term for term Ultralytics' ``batch_probiou``."""
    x1, y1 = obb1[:, 0:1], obb1[:, 1:2]  # [N, 1]
    x2, y2 = obb2[:, 0].view(1, -1), obb2[:, 1].view(1, -1)  # [1, M]
    a1, b1, c1 = rbox_covariance(obb1)
    a2, b2, c2 = rbox_covariance(obb2)
    a1, b1, c1 = a1.view(-1, 1), b1.view(-1, 1), c1.view(-1, 1)
    a2, b2, c2 = a2.view(1, -1), b2.view(1, -1), c2.view(1, -1)
    den = (a1 + a2) * (b1 + b2) - (c1 + c2).pow(2)
    t1 = (((a1 + a2) * (y1 - y2).pow(2) + (b1 + b2) * (x1 - x2).pow(2)) / (den + eps)) * 0.25
    t2 = (((c1 + c2) * (x2 - x1) * (y1 - y2)) / (den + eps)) * 0.5
    t3 = (den / (4 * ((a1 * b1 - c1.pow(2)).clamp(min=0) * (a2 * b2 - c2.pow(2)).clamp(min=0)).sqrt() + eps) + eps).log() * 0.5
    bd = (t1 + t2 + t3).clamp(eps, 100.0)
    return 1 - (1.0 - (-bd).exp() + eps).sqrt()


def nms_rotated(rboxes: Tensor, scores: Tensor, iou_threshold: float, max_keep: int, block: int = 1024) -> Tensor:
    """Ultralytics' rotated NMS (``TorchNMS.fast_nms`` with ``batch_probiou``): ``rboxes: [N, 5]`` xywhr
    (classes already shifted apart), ``scores: [N]`` -> ``int64[K]`` indices, highest score first.

    Fast-NMS, not greedy: a box is dropped when its probabilistic IoU with *any* higher-scored box is
    strictly greater than ``iou_threshold``, even one that is dropped itself. The ``N x N`` matrix is
    built ``block`` rows at a time, so memory stays ``block x N``.
    """
    n = rboxes.shape[0]
    if n == 0 or max_keep <= 0:
        return torch.zeros(0, dtype=torch.long, device=rboxes.device)
    order = torch.argsort(scores, descending=True)  # Ultralytics' (unstable) order: the same winners among ties
    rboxes = rboxes[order]
    cols = torch.arange(n, device=rboxes.device).view(1, n)
    suppressed = torch.zeros(n, dtype=torch.bool, device=rboxes.device)
    for start in range(0, n, block):
        end = min(start + block, n)
        rows = torch.arange(start, end, device=rboxes.device).view(-1, 1)
        hit = (batch_probiou(rboxes[start:end], rboxes) > iou_threshold) & (cols > rows)  # [end - start, N]
        suppressed = suppressed | hit.any(0)
    return order[(~suppressed).nonzero().view(-1)[:max_keep]]


def nms_rotated_classes(
    rboxes: Tensor, scores: Tensor, classes: Tensor, iou: float, max_det: int, agnostic: bool, class_offset: float = 7680.0
) -> Tensor:
    """Rotated NMS of candidates ``rboxes: [N, 5]`` xywhr input pixels, ``scores, classes: [N]`` ->
    ``int64[K]`` indices into N, highest score first; per class by shifting each class's centres
    ``class_offset`` apart (Ultralytics' ``max_wh``), unless ``agnostic``."""
    offset = classes.to(torch.float32).view(-1, 1) * (0.0 if agnostic else class_offset)
    shifted = torch.cat((rboxes[:, :2] + offset, rboxes[:, 2:]), 1)  # [N, 5]
    return nms_rotated(shifted, scores, iou, max_det)


def select_nms_rotated(
    rboxes: Tensor,
    scores: Tensor,
    conf: float,
    iou: float,
    max_det: int,
    class_mask: Optional[Tensor],
    agnostic: bool,
    max_candidates: int = 30000,
    class_offset: float = 7680.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One image, OBB one-to-many head. ``rboxes: [A, 5]`` xywhr input pixels, ``scores: [A, nc]`` ->
    ``(index int64[K] into A, score float32[K], class int64[K])``, Ultralytics' ``non_max_suppression(rotated=True)``."""
    idx, best, cls = nms_candidates(scores, conf, class_mask, max_candidates)
    k = nms_rotated_classes(rboxes[idx], best, cls, iou, max_det, agnostic, class_offset)
    return idx[k], best[k], cls[k]


def unletterbox_rboxes(rboxes: Tensor, geometry: Tensor) -> Tensor:
    """``rboxes: [N, 5]`` xywhr input pixels -> original-image pixels (``scale_boxes(..., xywh=True)``:
    centre and size divided by the per-axis gains, the angle unchanged, nothing clipped)."""
    cx = (rboxes[:, 0] - geometry[0]) / geometry[2]
    cy = (rboxes[:, 1] - geometry[1]) / geometry[3]
    return torch.stack((cx, cy, rboxes[:, 2] / geometry[2], rboxes[:, 3] / geometry[3], rboxes[:, 4]), -1)


def crop_to_boxes(masks: Tensor, boxes: Tensor) -> Tensor:
    """``masks: [N, H, W]`` with pixels outside ``boxes: [N, 4]`` (xyxy, same pixel space) set to 0:
    column ``x`` is inside when ``x1 <= x < x2`` (Ultralytics' ``crop_mask``)."""
    h, w = masks.shape[1], masks.shape[2]
    c = torch.arange(w, device=masks.device, dtype=boxes.dtype).view(1, 1, w)
    r = torch.arange(h, device=masks.device, dtype=boxes.dtype).view(1, h, 1)
    x1, y1 = boxes[:, 0].view(-1, 1, 1), boxes[:, 1].view(-1, 1, 1)
    x2, y2 = boxes[:, 2].view(-1, 1, 1), boxes[:, 3].view(-1, 1, 1)
    inside = (c >= x1) & (c < x2) & (r >= y1) & (r < y2)  # [N, H, W]
    return masks & inside


def input_masks(protos: Tensor, coeffs: Tensor, boxes: Tensor, input_hw: List[int], chunk: int = 16) -> Tensor:
    """``protos: [nm, mh, mw]``, ``coeffs: [N, nm]``, ``boxes: [N, 4]`` xyxy input pixels ->
    ``bool[N, H_in, W_in]``: Ultralytics' ``process_mask(..., upsample=True)`` (logits upsampled
    bilinearly to the input, ``> 0``, cropped to the box). ``chunk`` masks at a time bound the float memory."""
    nm, mh, mw = protos.shape[0], protos.shape[1], protos.shape[2]
    out = torch.zeros((coeffs.shape[0], input_hw[0], input_hw[1]), dtype=torch.bool, device=protos.device)
    flat = protos.float().view(nm, -1)
    for s in range(0, coeffs.shape[0], chunk):
        logits = (coeffs[s : s + chunk].float() @ flat).view(1, -1, mh, mw)  # [1, n, mh, mw]
        up = bilinear(logits, input_hw, False)[0]  # [n, H_in, W_in]
        out[s : s + chunk] = crop_to_boxes(up > 0, boxes[s : s + chunk])
    return out


def unletterbox_masks(masks: Tensor, geometry: Tensor, chunk: int = 8) -> Tensor:
    """``masks: bool[N, H_in, W_in]`` -> ``uint8[N, orig_h, orig_w]`` 0/1: Ultralytics' ``scale_masks``
    (cut the letterbox padding, bilinear resize to the original size) thresholded at 0.5."""
    left, top = int(geometry[0]), int(geometry[1])
    ow, oh = int(geometry[4]), int(geometry[5])
    right = left + max(int(torch.round(geometry[4] * geometry[2])), 1)  # the resized image inside the input
    bottom = top + max(int(torch.round(geometry[5] * geometry[3])), 1)
    out = torch.zeros((masks.shape[0], oh, ow), dtype=torch.uint8, device=masks.device)
    for s in range(0, masks.shape[0], chunk):
        part = masks[s : s + chunk, top:bottom, left:right].float().unsqueeze(0)  # [1, n, h, w]
        out[s : s + chunk] = (bilinear(part, [oh, ow], False)[0] > 0.5).to(torch.uint8)
    return out


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
        nm: int = 0,
        angle_decode: int = ANGLE_DECODE_NONE,
    ) -> None:
        super().__init__()
        self.nc = nc
        self.reg_max = reg_max
        self.strides = [float(s) for s in strides]
        self.end2end = end2end
        self.nkpt = int(kpt_shape[0])
        self.kdim = int(kpt_shape[1])
        self.kpt_decode = kpt_decode
        self.nm = nm  # mask coefficients per anchor (segment), else 0
        self.obb = angle_decode != ANGLE_DECODE_NONE
        self.angle_sigmoid = angle_decode == ANGLE_DECODE_OBB  # v8/11 OBB; OBB26 predicts the angle directly
        self.ncols = 6 + 3 * self.nkpt + (13 if self.obb else 0)

    def decode(self, feats: List[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Full decode of every anchor (a reference; :meth:`forward` decodes the candidates only):
        raw level maps -> ``boxes [B, A, 4]`` (xyxy input pixels; OBB: rotated cx, cy, w, h),
        ``scores [B, A, nc]`` and the task's extra values: ``keypoints [B, A, nkpt, 3]`` (pose),
        ``angle [B, A, 1]`` radians (obb), ``coefficients [B, A, nm]`` (segment); None for detect."""
        anchors, stride = make_anchors(feats, self.strides)  # [A, 2], [A, 1]
        raw = torch.cat([f.float().flatten(2) for f in feats], 2)  # [B, no, A]
        nbox = 4 * self.reg_max
        dist = dfl_distances(raw[:, :nbox], self.reg_max)  # [B, 4, A]
        scores = raw[:, nbox : nbox + self.nc].sigmoid().permute(0, 2, 1)  # [B, A, nc]
        rest = raw[:, nbox + self.nc :]  # [B, no - nbox - nc, A]
        if self.obb:
            angle = self._angle(rest[:, 0])  # [B, A]
            return decode_rboxes(dist, angle, anchors, stride), scores, angle.unsqueeze(-1)
        boxes = decode_boxes(dist, anchors, stride)
        extra: Optional[Tensor] = None
        if self.nkpt > 0:
            extra = decode_keypoints(rest, anchors, stride, self.kdim, self.kpt_decode == 2)
        elif self.nm > 0:
            extra = rest.permute(0, 2, 1)  # [B, A, nm]
        return boxes, scores, extra

    def _angle(self, raw: Tensor) -> Tensor:
        """Raw angle channel -> radians (any shape)."""
        if self.angle_sigmoid:
            return (raw.sigmoid() - 0.25) * 3.141592653589793
        return raw

    def _scores(self, rows: Tensor) -> Tensor:
        """One image's rows ``[A, no]`` -> class probabilities ``[A, nc]``. The sigmoid runs on one
        contiguous ``[nc, A]`` block, as in :meth:`decode`: on CPU the vectorised and scalar sigmoid can
        differ in the last bit, which could reorder near-ties."""
        nbox = 4 * self.reg_max
        return rows[:, nbox : nbox + self.nc].t().contiguous().sigmoid().t()

    def _boxes(self, rows: Tensor, anchors: Tensor, stride: Tensor) -> Tensor:
        """Candidate rows ``[N, no]`` (of :func:`gather_levels`) with their ``anchors [N, 2]``,
        ``stride [N, 1]`` -> ``[N, 4]`` xyxy input pixels, or OBB ``[N, 5]`` xywhr (input pixels, radians)."""
        nbox = 4 * self.reg_max
        dist = dfl_distances(rows[:, :nbox].t().contiguous().unsqueeze(0), self.reg_max)  # [1, 4, N]
        if self.obb:
            angle = self._angle(rows[:, nbox + self.nc]).unsqueeze(0)  # [1, N]
            return torch.cat((decode_rboxes(dist, angle, anchors, stride)[0], angle.view(-1, 1)), 1)
        return decode_boxes(dist, anchors, stride)[0]

    def _keypoints(self, rows: Tensor, anchors: Tensor, stride: Tensor) -> Tensor:
        """Candidate rows ``[N, no]`` -> ``[N, nkpt, 3]`` keypoints (x, y input pixels, visibility)."""
        raw = rows[:, 4 * self.reg_max + self.nc :].t().unsqueeze(0)  # [1, nkpt * kdim, N]
        return decode_keypoints(raw, anchors, stride, self.kdim, self.kpt_decode == 2)[0]

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
        protos: Optional[Tensor] = None
        if self.nm > 0:
            protos = feats[-1]  # [B, nm, H / 4, W / 4]
            feats = feats[:-1]
        input_hw = [int(feats[0].shape[2] * self.strides[0]), int(feats[0].shape[3] * self.strides[0])]
        anchors, stride = make_anchors(feats, self.strides)  # [A, 2], [A, 1]
        raw = gather_levels(feats)  # [B, A, no]
        nbox = 4 * self.reg_max
        bsz = raw.shape[0]
        device = raw.device
        geometry = geometry.to(device=device, dtype=torch.float32)
        limit = int(max_det.max()) if max_det.numel() > 0 else 1
        out = torch.zeros((bsz, limit, self.ncols), dtype=torch.float32, device=device)
        counts = torch.zeros(bsz, dtype=torch.long, device=device)
        image_masks: List[Tensor] = []
        for b in range(bsz):
            mask: Optional[Tensor] = None
            if class_mask is not None:
                mask = class_mask[b].to(device)
            conf_b = float(conf[b])
            max_det_b = int(max_det[b])
            scores = self._scores(raw[b])  # [A, nc]; nothing else is decoded for all anchors
            if self.end2end:
                index, score, cls = select_topk(scores, conf_b, max_det_b, mask, agnostic)  # [K] each
                boxes = self._boxes(raw[b][index], anchors[index], stride[index])  # [K, 4] (obb [K, 5])
            else:
                index, score, cls = nms_candidates(scores, conf_b, mask)  # [N] each
                boxes = self._boxes(raw[b][index], anchors[index], stride[index])  # [N, 4] (obb [N, 5])
                if self.obb:
                    k = nms_rotated_classes(boxes, score, cls, float(iou[b]), max_det_b, agnostic)  # [K]
                else:
                    k = nms(boxes, score, cls, float(iou[b]), max_det_b, agnostic)  # [K]
                index, score, cls, boxes = index[k], score[k], cls[k], boxes[k]
            if protos is not None:
                coeffs = raw[b][index][:, nbox + self.nc :]  # [K, nm]
                masks_in = input_masks(protos[b], coeffs, boxes, input_hw)  # [K, H_in, W_in]
                nonempty = masks_in.flatten(1).any(1)  # the predictor drops detections without a mask pixel
                index, score, cls, boxes = index[nonempty], score[nonempty], cls[nonempty], boxes[nonempty]
                image_masks.append(unletterbox_masks(masks_in[nonempty], geometry[b]))
            out[b, : index.shape[0]] = self._rows(raw[b][index], anchors[index], stride[index], boxes, score, cls, geometry[b])
            counts[b] = index.shape[0]
        return out, counts, self._stack_masks(image_masks, counts, geometry)

    def _rows(
        self, rows: Tensor, anchors: Tensor, stride: Tensor, boxes: Tensor, score: Tensor, cls: Tensor, geometry: Tensor
    ) -> Tensor:
        """The kept detections of one image -> ``float32[K, ncols]`` output rows (original-image pixels).
        ``rows [K, no]``, ``anchors [K, 2]``, ``stride [K, 1]``, decoded ``boxes [K, 4]`` (obb ``[K, 5]``),
        ``score, cls: [K]``, ``geometry: float32[6]``."""
        n = rows.shape[0]
        cols = [torch.zeros((n, 4), device=rows.device), score.view(n, 1), cls.to(torch.float32).view(n, 1)]
        if self.obb:
            rb = unletterbox_rboxes(boxes, geometry)  # [K, 5]
            corners = rbox_corners(rb)  # [K, 4, 2]
            cols[0] = torch.cat((corners.amin(1), corners.amax(1)), 1)
            cols.append(rb)
            cols.append(corners.view(n, 8))
        else:
            cols[0] = unletterbox_points(boxes.view(n, 2, 2), geometry).view(n, 4)
        if self.nkpt > 0:
            kb = self._keypoints(rows, anchors, stride)  # [K, nkpt, 3]
            kxy = unletterbox_points(kb[..., :2], geometry)
            cols.append(torch.cat((kxy, kb[..., 2:3]), -1).view(n, 3 * self.nkpt))
        return torch.cat(cols, 1)

    def _stack_masks(self, image_masks: List[Tensor], counts: Tensor, geometry: Tensor) -> Tensor:
        """Per-image ``uint8[n_b, h_b, w_b]`` -> ``uint8[B, max(counts), max h, max w]``, zero-padded."""
        bsz = counts.shape[0]
        if len(image_masks) == 0:
            return torch.zeros((bsz, 0, 0, 0), dtype=torch.uint8, device=counts.device)
        m = int(counts.max())
        h, w = int(geometry[:, 5].max()), int(geometry[:, 4].max())
        out = torch.zeros((bsz, m, h, w), dtype=torch.uint8, device=counts.device)
        for b, im in enumerate(image_masks):
            out[b, : im.shape[0], : im.shape[1], : im.shape[2]] = im
        return out
