"""The response body every task shares, and its encoding.

Schema (one object per request)::

    {"model": "yolo", "model_version": "1.0", "task": "pose", "image": {"width": W, "height": H},
     "<results key>": ...,            # "detections" (detect, pose, segment, obb) or "top" (classify)
     "speed_ms": {"preprocess": .., "inference": .., "postprocess": ..}}

``model_version`` is the version that answered (TorchServe's, from the archive), so that a client sees
a rollout happen. What the results hold is each task's own (``handler/tasks/``). Coordinates are in original-image
pixels with 2 decimals; scores have 4 decimals. A request with ``full_precision=true`` gets them unrounded: the
float32 values the postprocessor computed, written as JSON numbers that convert back to the same float32
(``numpy.float32(value)``), for clients that recompute from them what Ultralytics computes from its tensors
(``yolo-ts-client --format yolo`` writes Ultralytics' label files from them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

PIXEL_DECIMALS = 2
SCORE_DECIMALS = 4
MS_DECIMALS = 2
# The largest response TorchServe sends: ``max_response_size`` in config.properties and deploy/kserve/config.properties
# (tests/test_facts.py checks that both say this). A task whose answer could outgrow it names a smaller encoding (413).
MAX_RESPONSE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class ModelInfo:
    """What every response names: the served model, its task, class names, keypoints per detection."""

    name: str
    task: str
    names: Sequence[str]
    nkpt: int  # 0 for models without keypoints
    version: str = "1.0"
    precision: str = "fp32"  # "int8" | "bf16": the backbone runtime's reduced precision (--quantize), not equal to Ultralytics

    @classmethod
    def from_metadata(cls, meta: dict, name: str | None = None, version: str | None = None,
                      precision: str | None = None) -> "ModelInfo":
        """The one place that reads these from ``metadata.json``; ``name`` and ``version`` override the
        exported ones (TorchServe's model name and the archive's version), ``precision`` the exported one (the
        precision of the runtime that answers)."""
        kpt_shape = meta.get("kpt_shape")
        return cls(
            name=name or meta["name"],
            task=meta["task"],
            names=list(meta["names"]),
            nkpt=kpt_shape[0] if kpt_shape else 0,
            version=str(version or meta["model_version"]),
            precision=str(precision or meta.get("precision", "fp32")),
        )


def px(v: float, full: bool = False) -> float:
    """A coordinate in original-image pixels, as the response rounds it (``full``: not rounded)."""
    return float(v) if full else round(float(v), PIXEL_DECIMALS)


def score(v: float, full: bool = False) -> float:
    """A score, probability, visibility or angle, as the response rounds it (``full``: not rounded)."""
    return float(v) if full else round(float(v), SCORE_DECIMALS)


def response_body(info: ModelInfo, width: int, height: int, key: str, results: Any, speed_ms: dict[str, float]) -> dict:
    """The body of one answered request, keys in schema order. ``"precision"`` is there only when the
    backbone does not run in FP32 (INT8, BF16), the one case where the answer is not Ultralytics' own."""
    body: dict = {"model": info.name, "model_version": info.version}
    if info.precision != "fp32":
        body["precision"] = info.precision
    body.update(task=info.task, image={"width": int(width), "height": int(height)})
    body[key] = results
    body["speed_ms"] = {k: round(float(v), MS_DECIMALS) for k, v in speed_ms.items()}
    return body


def encode_response(body: dict) -> str:
    """One response body as compact JSON text, which the handler returns to TorchServe.

    Returning the dict instead lets TorchServe encode it with ``json.dumps(body, indent=2)``
    (``ts/protocol/otf_message_handler.py``), which bypasses the C encoder: measured ~25-80x slower
    and ~2x larger for a pose response (docs/benchmarks.md, "JSON encoding").
    """
    return json.dumps(body, separators=(",", ":"))
