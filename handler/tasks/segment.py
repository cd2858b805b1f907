"""Instance segmentation: the detection family plus one mask per detection.

Parameters and transform: those of ``detect.py``; ``polygons=true`` also returns each mask's outline.
Postprocessor: :class:`export.postprocess.YoloPostprocess` with ``nm > 0``; its third output holds the
masks of the kept rows at the original size (contract in ``export/postprocess.py``).

Each detection of ``"detections"`` carries, besides box, score and class::

    "mask": {"size": [H, W], "counts": "<COCO RLE string>"},   # as pycocotools.mask.decode reads it
    "polygon": [[x, y], ...]                                     # with polygons=true: the largest region's outline
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from handler.encoding.masks import encode_rle, mask_polygon
from handler.response import ModelInfo, px
from handler.tasks.base import PreparedImage, ResponseOptions
from handler.tasks.detect import Detections, DetectTask, with_track_ids


class SegmentTask(DetectTask):
    def postprocess(self, module: Any, feats: list[Tensor], items: list[PreparedImage], nc: int) -> list[Detections]:
        dets, counts, masks = self.run_postprocessor(module, feats, items, nc)
        out = []
        for row, it in enumerate(items):
            n = int(counts[row])
            out.append(Detections(dets[row, :n], masks[row, :n, : it.params.orig_h, : it.params.orig_w]))
        return out

    def to_json(self, output: Detections, info: ModelInfo, options: ResponseOptions | None) -> list[dict]:
        polygons = options is not None and options.polygons
        full = options is not None and options.full_precision
        dets = []
        for row, mask in zip(output.rows.numpy().astype(np.float64), output.masks.numpy()):
            det = self.detection_json(row, info, full)
            det["mask"] = encode_rle(mask)
            if polygons:
                det["polygon"] = [[px(x, full), px(y, full)] for x, y in mask_polygon(mask)]
            dets.append(det)
        return with_track_ids(dets, output.track_ids)


SEGMENT = SegmentTask("segment")
