"""Outputs of the same model in two places (the CPU reference, FP32 and FP16 on the device) compared, and the
pass criteria applied. The detection matcher is the project's one (``export/matching.py``)."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from bench.gpu_check import FP16_MAX_DSCORE, FP16_MIN_IOU, FP32_MIN_IOU, FP32_TOL
from export.matching import greedy_match


def match_rows(ref: Tensor, other: Tensor) -> dict:
    """Detections ``rows: float32[n, ncols]`` (x1, y1, x2, y2, score, class_id, then the task's columns; see
    ``export/postprocess.py``) matched as ``export.matching.greedy_match`` matches them (any IoU above 0).
    Returns counts, the smallest matched IoU, the largest |dscore|, the largest |d| over all columns, and over
    the columns after the sixth (keypoints: x, y, visibility)."""
    ref, other = ref.double().numpy(), other.double().numpy()
    ious, dscores, dall, dextra = [], [], [], []
    for i, j, iou in greedy_match(ref, other, 0.0):
        ious.append(iou)
        dscores.append(abs(float(ref[i, 4] - other[j, 4])))
        diff = np.abs(ref[i] - other[j])
        dall.append(float(diff.max()))
        if ref.shape[1] > 6:
            dextra.append(float(diff[6:].max()))
    return {
        "ref": len(ref), "other": len(other), "matched": len(ious),
        "min_iou": round(min(ious), 6) if ious else None,
        "max_dscore": max(dscores) if dscores else None,
        "max_abs_diff": max(dall) if dall else None,
        "max_abs_diff_extra": max(dextra) if dextra else None,
    }


def compare_top(ref: Tensor, other: Tensor) -> dict:
    """Classify ``top: float32[k, 2]`` (class_id, probability): same ids in order, and the largest |dp| of the
    reference's classes (looked up by id, so a reordering of near-equal probabilities is still measured)."""
    ids_ref, ids_other = ref[:, 0].long().tolist(), other[:, 0].long().tolist()
    lookup = {c: float(p) for c, p in other.tolist()}
    dps = [abs(float(p) - lookup[int(c)]) for c, p in ref.tolist() if int(c) in lookup]
    return {"same_ids": ids_ref == ids_other, "common": len(dps), "k": len(ids_ref), "max_dp": max(dps) if dps else None}


def compare(kind: str, ref: Tensor, other: Tensor) -> dict:
    return match_rows(ref, other) if kind == "rows" else compare_top(ref, other)


def fp32_ok(kind: str, c: dict) -> bool:
    if kind == "rows":
        same = c["ref"] == c["other"] == c["matched"]
        return same and (c["min_iou"] is None or (c["min_iou"] >= FP32_MIN_IOU and c["max_dscore"] <= FP32_TOL))
    return c["same_ids"] and c["max_dp"] is not None and c["max_dp"] <= FP32_TOL


def fp16_ok(kind: str, c: dict) -> bool:
    if kind == "rows":
        same = c["ref"] == c["other"] == c["matched"]
        return same and (c["min_iou"] is None or (c["min_iou"] >= FP16_MIN_IOU and c["max_dscore"] <= FP16_MAX_DSCORE))
    return c["common"] == c["k"] and c["max_dp"] is not None and c["max_dp"] <= FP16_MAX_DSCORE
