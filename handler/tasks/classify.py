"""Image classification: resized + cropped image -> logits -> softmax top-k -> ``"top"``.

Request parameters: ``top_k`` (1..1000; above ``nc`` all classes) and ``full_precision`` (scores unrounded). Transform: Ultralytics' resize +
center crop (:func:`handler.image.classify_crop.classify_transform`). Postprocessor:
:class:`export.classify.ClassifyPostprocess` (inputs ``feats, top_k``; outputs ``scores, class_ids,
counts``; contract in ``export/classify.py``).

Results, ``"top"``, highest score first::

    [{"class_id": 0, "class_name": "tench", "score": 0.8123}, ...]     # 4 decimals, unless full_precision=true
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from handler import request_values as p
from handler.errors import InvalidParameter
from handler.image.classify_crop import classify_transform
from handler.response import ModelInfo, score
from handler.tasks.base import ImageTransform, PreparedImage, ResponseOptions, Task, full_precision

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


@dataclass
class TopClasses:
    """One image's best classes on CPU: ``top: float32[k, 2]`` rows ``(class_id, score)``, highest first."""

    top: Tensor


class ClassifyTask(Task):
    name = "classify"
    parameters = ("top_k", "full_precision")
    foreign = "filter detections and do not apply to a classify model"
    results_key = "top"

    def default_options(self, config: Any = None) -> TopK:
        return TopK()

    def options(self, params: dict[str, Any], defaults: TopK, names: Sequence[str]) -> tuple[TopK, ResponseOptions]:
        t = TopK(p.integer("top_k", params["top_k"])) if "top_k" in params else defaults
        try:
            t = t.validate(len(names))
        except ValueError as e:
            raise InvalidParameter(str(e)) from None
        return t, ResponseOptions(full_precision=full_precision(params))

    def transform(self, imgsz, stride: int, letterbox_mode: str | None) -> ImageTransform:
        """Every input gets the shape ``imgsz``, so a batch is one forward; ``letterbox_mode`` is not used."""
        return lambda image: classify_transform(image, imgsz)

    def postprocess(self, module: Any, feats: list[Tensor], items: list[PreparedImage], nc: int) -> list[TopClasses]:
        top_k = torch.tensor([it.options.top_k for it in items], dtype=torch.long)  # [n]
        scores, class_ids, counts = (t.cpu() for t in module(feats, top_k))  # [n, K] x2, [n]
        return [
            TopClasses(torch.stack((class_ids[row, :n].to(torch.float32), scores[row, :n]), 1))  # [n_row, 2]
            for row, n in enumerate(counts.tolist())
        ]

    def to_json(self, output: TopClasses, info: ModelInfo, options: ResponseOptions | None) -> list[dict]:
        full = options is not None and options.full_precision
        return [
            {"class_id": int(c), "class_name": info.names[int(c)], "score": score(s, full)}
            for c, s in output.top.numpy().astype(np.float64)
        ]


CLASSIFY = ClassifyTask()
