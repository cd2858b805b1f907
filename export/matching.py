"""Two detection lists of one image, matched one to one: the export checks (``export/verify.py``), the INT8 drift
(``export/quantize.py``) and the GPU check (``bench/gpu_check/``) all compare detections this way.

Rows are the postprocessor's (``export/postprocess.py``): ``[x1, y1, x2, y2, score, class_id, ...]``, xyxy, both
lists in the same pixel space. numpy only (no Ultralytics, no torchvision), so the GPU machine can run it.
"""

from __future__ import annotations

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a: [N, 4]``, ``b: [M, 4]`` xyxy -> IoU ``float64[N, M]``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def greedy_match(reference: np.ndarray, other: np.ndarray, min_iou: float) -> list[tuple[int, int, float]]:
    """Each reference row, highest score first (ties in row order), takes the row of ``other`` of its class, not
    taken yet, with the highest IoU (the first of equal ones), when that IoU is above 0 and at least ``min_iou``.

    ``reference: [N, >=6]``, ``other: [M, >=6]`` -> ``(reference index, other index, IoU)`` in matching order.
    """
    reference, other = np.asarray(reference), np.asarray(other)
    if len(reference) == 0 or len(other) == 0:
        return []
    ious = box_iou(reference[:, :4], other[:, :4])  # [N, M]
    ious[reference[:, 5:6] != other[None, :, 5]] = -1.0  # another class never matches
    taken = np.zeros(len(other), bool)
    pairs = []
    for r in np.argsort(-reference[:, 4], kind="stable"):
        row = np.where(taken, -1.0, ious[r])
        o = int(row.argmax())
        if row[o] > 0 and row[o] >= min_iou:
            taken[o] = True
            pairs.append((int(r), o, float(row[o])))
    return pairs
