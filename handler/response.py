"""Postprocessor rows -> the JSON body of one served image.

Schema (one object per request)::

    {"model": "yolo", "task": "pose", "image": {"width": W, "height": H},
     "detections": [{"box": [x1, y1, x2, y2], "score": 0.91, "class_id": 0, "class_name": "person",
                     "keypoints": [[x, y, visibility], ...]}],   # keypoints: pose models only
     "speed_ms": {"preprocess": .., "inference": .., "postprocess": ..}}

Segment models add to each detection ``"mask": {"size": [H, W], "counts": "<COCO RLE string>"}``
(the instance mask at the original image size, as ``pycocotools.mask.decode`` reads it) and, when the
request asks ``polygons=true``, ``"polygon": [[x, y], ...]`` (the outline of the mask's largest region).
OBB models add ``"obb": {"cx", "cy", "w", "h", "angle"}`` (the rotated box; angle in radians) and
``"corners": [[x, y] x 4]``; their ``"box"`` is the axis-aligned hull of the corners.

Boxes, corners, polygons and keypoints x, y are in original-image pixels (2 decimals); scores,
visibilities and angles have 4 decimals; detections come sorted by score, highest first, as the
postprocessor returns them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from torch import Tensor

from handler.mask_encoding import encode_rle, mask_polygon

PIXEL_DECIMALS = 2
SCORE_DECIMALS = 4
MS_DECIMALS = 2


@dataclass(frozen=True)
class ModelInfo:
    """What every response names: the served model, its task, class names, keypoints per detection."""

    name: str
    task: str
    names: Sequence[str]
    nkpt: int  # 0 for detect models


@dataclass(frozen=True)
class ResponseOptions:
    """Per-request choices of what a response carries (not of what is detected)."""

    polygons: bool = False  # segment models: add each mask's outline as "polygon"


def _px(v: float) -> float:
    return round(float(v), PIXEL_DECIMALS)


def detection_json(
    row: np.ndarray, info: ModelInfo, mask: np.ndarray | None = None, options: ResponseOptions = ResponseOptions()
) -> dict:
    """``row``: one postprocessor row (x1, y1, x2, y2, score, class_id, then the task's columns) ->
    one detection; ``mask: uint8[H, W]`` the detection's mask at the original size (segment models)."""
    class_id = int(row[5])
    det = {
        "box": [round(float(v), PIXEL_DECIMALS) for v in row[:4]],
        "score": round(float(row[4]), SCORE_DECIMALS),
        "class_id": class_id,
        "class_name": info.names[class_id],
    }
    if info.nkpt:
        kpts = row[6 : 6 + 3 * info.nkpt].reshape(info.nkpt, 3)  # [nkpt, (x, y, visibility)]
        det["keypoints"] = [
            [round(float(x), PIXEL_DECIMALS), round(float(y), PIXEL_DECIMALS), round(float(v), SCORE_DECIMALS)]
            for x, y, v in kpts
        ]
    if info.task == "obb":
        cx, cy, w, h, angle = (float(v) for v in row[6:11])
        det["obb"] = {"cx": _px(cx), "cy": _px(cy), "w": _px(w), "h": _px(h), "angle": round(angle, SCORE_DECIMALS)}
        det["corners"] = [[_px(x), _px(y)] for x, y in row[11:19].reshape(4, 2)]
    if mask is not None:
        det["mask"] = encode_rle(mask)
        if options.polygons:
            det["polygon"] = [[_px(x), _px(y)] for x, y in mask_polygon(mask)]
    return det


def image_json(
    detections: Tensor,
    width: int,
    height: int,
    info: ModelInfo,
    speed_ms: dict[str, float],
    masks: Tensor | None = None,
    options: ResponseOptions = ResponseOptions(),
) -> dict:
    """``detections: float32[n, ncols]`` (postprocessor rows of one image, CPU) and, for segment models,
    ``masks: uint8[n, height, width]`` -> response body."""
    rows = detections.numpy().astype(np.float64)
    mask_list = list(masks.numpy()) if masks is not None else [None] * len(rows)
    return {
        "model": info.name,
        "task": info.task,
        "image": {"width": int(width), "height": int(height)},
        "detections": [detection_json(r, info, m, options) for r, m in zip(rows, mask_list)],
        "speed_ms": {k: round(float(v), MS_DECIMALS) for k, v in speed_ms.items()},
    }


def encode_response(body: dict) -> str:
    """One response body as compact JSON text, which the handler returns to TorchServe.

    Returning the dict instead lets TorchServe encode it with ``json.dumps(body, indent=2)``
    (``ts/protocol/otf_message_handler.py``), which bypasses the C encoder: measured ~25-80x slower
    and ~2x larger for a pose response (docs/benchmarks.md, "JSON encoding").
    """
    return json.dumps(body, separators=(",", ":"))
