"""Association costs and the linear assignment, as Ultralytics 8.4.190's ``trackers/utils/matching.py``.

The assignment is the ``lap`` package's ``lapjv(cost, extend_cost=True, cost_limit=thresh)``, the
call Ultralytics makes, so matches are the same (ties included). Costs are ``float32[N, M]`` with
``N`` tracks and ``M`` detections: ``1 - IoU`` of axis-aligned ``xyxy`` boxes, or ``1 - probIoU``
of oriented ``xywhr`` boxes (OBB), in pixels of the original image.
"""

from __future__ import annotations

import lap
import numpy as np
import torch


def linear_assignment(cost_matrix: np.ndarray, thresh: float) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """Minimum-cost matching with pairs costing more than ``thresh`` left out.

    Returns ``matches`` (``[track_index, detection_index]`` pairs, by track index), and the unmatched
    track and detection indices.
    """
    if cost_matrix.size == 0:
        return (np.empty((0, 2), dtype=int), tuple(range(cost_matrix.shape[0])),  # type: ignore[return-value]
                tuple(range(cost_matrix.shape[1])))
    _, x, y = lap.lapjv(cost_matrix, extend_cost=True, cost_limit=thresh)
    matches = [[ix, mx] for ix, mx in enumerate(x) if mx >= 0]
    return matches, np.where(x < 0)[0], np.where(y < 0)[0]


def box_iou(box1: np.ndarray, box2: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """IoU of ``box1: float32[N, 4]`` and ``box2: float32[M, 4]`` (xyxy) -> ``float32[N, M]``.

    Ultralytics' ``bbox_ioa(..., iou=True)``.
    """
    b1_x1, b1_y1, b1_x2, b1_y2 = box1.T
    b2_x1, b2_y1, b2_x2, b2_y2 = box2.T
    inter_area = (np.minimum(b1_x2[:, None], b2_x2) - np.maximum(b1_x1[:, None], b2_x1)).clip(0) * (
        np.minimum(b1_y2[:, None], b2_y2) - np.maximum(b1_y1[:, None], b2_y1)
    ).clip(0)
    area = (b2_x2 - b2_x1) * (b2_y2 - b2_y1)
    box1_area = (b1_x2 - b1_x1) * (b1_y2 - b1_y1)
    area = area + box1_area[:, None] - inter_area
    return inter_area / (area + eps)


def _covariance(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``xywhr: [N, 5]`` -> the Gaussian covariance ``[[a, c], [c, b]]`` entries, each ``[N, 1]``."""
    gbbs = torch.cat((boxes[:, 2:4].pow(2) / 12, boxes[:, 4:]), dim=-1)
    a, b, c = gbbs.split(1, dim=-1)
    cos, sin = c.cos(), c.sin()
    cos2, sin2 = cos.pow(2), sin.pow(2)
    return a * cos2 + b * sin2, a * sin2 + b * cos2, (a - b) * cos * sin


def probiou(obb1: np.ndarray, obb2: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Probabilistic IoU of ``obb1: float32[N, 5]`` and ``obb2: float32[M, 5]`` (xywhr, radians)
    -> ``float32[N, M]``. Ultralytics' ``batch_probiou`` (torch ops, so the float32 rounding is the same)."""
    t1_, t2_ = torch.from_numpy(obb1), torch.from_numpy(obb2)
    x1, y1 = t1_[..., :2].split(1, dim=-1)
    x2, y2 = (x.squeeze(-1)[None] for x in t2_[..., :2].split(1, dim=-1))
    a1, b1, c1 = _covariance(t1_)
    a2, b2, c2 = (x.squeeze(-1)[None] for x in _covariance(t2_))
    denom = (a1 + a2) * (b1 + b2) - (c1 + c2).pow(2) + eps
    t1 = (((a1 + a2) * (y1 - y2).pow(2) + (b1 + b2) * (x1 - x2).pow(2)) / denom) * 0.25
    t2 = (((c1 + c2) * (x2 - x1) * (y1 - y2)) / denom) * 0.5
    t3 = (
        ((a1 + a2) * (b1 + b2) - (c1 + c2).pow(2))
        / (4 * ((a1 * b1 - c1.pow(2)).clamp_(0) * (a2 * b2 - c2.pow(2)).clamp_(0)).sqrt() + eps)
        + eps
    ).log() * 0.5
    bd = (t1 + t2 + t3).clamp(eps, 100.0)
    hd = (1.0 - (-bd).exp() + eps).sqrt()
    return (1 - hd).numpy()


def iou_distance(a_boxes: list[np.ndarray], b_boxes: list[np.ndarray]) -> np.ndarray:
    """``1 - IoU`` cost ``float32[N, M]`` of two lists of boxes: each ``xyxy[4]``, or ``xywha[5]`` (OBB, probIoU)."""
    ious = np.zeros((len(a_boxes), len(b_boxes)), dtype=np.float32)
    if len(a_boxes) and len(b_boxes):
        a = np.ascontiguousarray(a_boxes, dtype=np.float32)
        b = np.ascontiguousarray(b_boxes, dtype=np.float32)
        ious = probiou(a, b) if len(a_boxes[0]) == 5 and len(b_boxes[0]) == 5 else box_iou(a, b)
    return 1 - ious


def fuse_score(cost_matrix: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``1 - (1 - cost) * score``: the IoU similarity weighted by each detection's score (``[M]``)."""
    if cost_matrix.size == 0:
        return cost_matrix
    iou_sim = 1 - cost_matrix
    det_scores = np.asarray(scores)[None].repeat(cost_matrix.shape[0], axis=0)
    return 1 - iou_sim * det_scores
