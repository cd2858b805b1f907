"""Postprocessor rows -> the JSON body of one served image.

Schema (one object per request)::

    {"model": "yolo", "task": "pose", "image": {"width": W, "height": H},
     "detections": [{"box": [x1, y1, x2, y2], "score": 0.91, "class_id": 0, "class_name": "person",
                     "keypoints": [[x, y, visibility], ...]}],   # keypoints: pose models only
     "speed_ms": {"preprocess": .., "inference": .., "postprocess": ..}}

Boxes are xyxy and keypoints x, y in original-image pixels (2 decimals); scores and visibilities
have 4 decimals; detections come sorted by score, highest first, as the postprocessor returns them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from torch import Tensor

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


def detection_json(row: np.ndarray, info: ModelInfo) -> dict:
    """``row: float32[6 + 3 * nkpt]`` = x1, y1, x2, y2, score, class_id, (kx, ky, kv)* -> one detection."""
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
    return det


def image_json(
    detections: Tensor, width: int, height: int, info: ModelInfo, speed_ms: dict[str, float]
) -> dict:
    """``detections: float32[n, 6 + 3 * nkpt]`` (postprocessor rows of one image, CPU) -> response body."""
    rows = detections.numpy().astype(np.float64)
    return {
        "model": info.name,
        "task": info.task,
        "image": {"width": int(width), "height": int(height)},
        "detections": [detection_json(r, info) for r in rows],
        "speed_ms": {k: round(float(v), MS_DECIMALS) for k, v in speed_ms.items()},
    }


def encode_response(body: dict) -> str:
    """One response body as compact JSON text, which the handler returns to TorchServe.

    Returning the dict instead lets TorchServe encode it with ``json.dumps(body, indent=2)``
    (``ts/protocol/otf_message_handler.py``), which bypasses the C encoder: measured ~25-80x slower
    and ~2x larger for a pose response (docs/benchmarks.md, "JSON encoding").
    """
    return json.dumps(body, separators=(",", ":"))
