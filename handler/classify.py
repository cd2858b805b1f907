"""Classify models: resized + cropped image -> logits -> softmax top-k -> the ``"top"`` JSON.

:class:`ClassifyPipeline` is :class:`handler.pipeline.YoloPipeline` with the classification transform
(chosen by ``handler/preprocess.py`` from the metadata's task) and the classify postprocessor, whose
contract is in ``export/classify.py``. Response body of one image::

    {"model": "yolo", "task": "classify", "image": {"width": W, "height": H},
     "top": [{"class_id": 0, "class_name": "tench", "score": 0.8123}, ...],   # highest first
     "speed_ms": {"preprocess": .., "inference": .., "postprocess": ..}}
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from handler.pipeline import Prepared, StageTimes, YoloPipeline
from handler.response import MS_DECIMALS, SCORE_DECIMALS, ModelInfo, ResponseOptions

DEFAULT_TOP_K = 5
MAX_TOP_K = 1000  # above nc the postprocessor returns all nc classes


@dataclass(frozen=True)
class TopK:
    """Per-request option of a classify model: how many of the best classes to return."""

    top_k: int = DEFAULT_TOP_K

    def validate(self, nc: int) -> "TopK":
        """Raise ``ValueError`` naming the bad value; return self when it is in range."""
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be an integer between 1 and {MAX_TOP_K}, got {self.top_k!r}")
        return self


class ClassifyPipeline(YoloPipeline):
    """Resize + center crop to ``imgsz`` (so all inputs share one shape), one backbone forward, softmax top-k."""

    def prepare(self, image: np.ndarray, thresholds: TopK = TopK()) -> Prepared:  # type: ignore[override]
        return super().prepare(image, thresholds)

    def infer(self, items: list[Prepared]) -> tuple[list[Tensor], StageTimes]:
        """Run prepared images; returns per image ``float32[k_i, 2]`` rows ``(class_id, score)`` on CPU,
        highest score first, and the stage times."""
        times = StageTimes()
        if not items:
            return [], times
        with torch.inference_mode():  # every input has the pipeline's imgsz: one forward for the batch
            t0 = time.perf_counter()
            feats = list(self.backbone(self.to_input([item.pixels for item in items])))  # [logits [n, nc]]
            self._sync()
            t1 = time.perf_counter()
            top_k = torch.tensor([item.thresholds.top_k for item in items], dtype=torch.long)  # [n]
            scores, class_ids, counts = (t.cpu() for t in self.postprocess(feats, top_k))  # [n, K] x2, [n]
            t2 = time.perf_counter()
        results = [
            torch.stack((class_ids[row, :n].to(torch.float32), scores[row, :n]), 1)  # [n_row, 2]
            for row, n in enumerate(counts.tolist())
        ]
        times.inference, times.postprocess = (t1 - t0) * 1000, (t2 - t1) * 1000
        times.forwards.append((len(items), *items[0].pixels.shape[:2]))
        return results, times

    def infer_with_masks(self, items: list[Prepared]) -> tuple[list[Tensor], list[None], StageTimes]:
        """:meth:`infer` in the handler's calling convention; a classify model has no masks."""
        results, times = self.infer(items)
        return results, [None] * len(results), times


def classify_json(
    top: Tensor,
    width: int,
    height: int,
    info: ModelInfo,
    speed_ms: dict[str, float],
    masks: None = None,
    options: ResponseOptions | None = None,
) -> dict:
    """``top: float32[k, 2]`` rows ``(class_id, score)`` of one image (CPU) -> response body.

    ``masks`` and ``options`` are there for the handler's one calling convention (see
    :func:`handler.response.image_json`); neither applies to a classify model."""
    return {
        "model": info.name,
        "task": info.task,
        "image": {"width": int(width), "height": int(height)},
        "top": [
            {"class_id": int(c), "class_name": info.names[int(c)], "score": round(float(s), SCORE_DECIMALS)}
            for c, s in top.numpy().astype(np.float64)
        ],
        "speed_ms": {k: round(float(v), MS_DECIMALS) for k, v in speed_ms.items()},
    }
