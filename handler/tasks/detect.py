"""The detection family: detect, pose and OBB models (segment extends it in ``segment.py``).

Request parameters: ``conf``, ``iou``, ``max_det``, ``classes`` (ids or names), ``polygons`` (which
only a segment model uses; the others accept and ignore it) and ``full_precision`` (numbers unrounded). Transform: the one letterbox
(``handler/image/letterbox.py``, :class:`~handler.tasks.base.Letterboxed`). Postprocessor: :class:`export.postprocess.YoloPostprocess`, whose contract
(inputs ``feats, geometry, conf, iou, max_det, class_mask``; outputs ``detections, counts, masks``) is
written down in ``export/postprocess.py``.

Results, ``"detections"``: one object per detection, sorted by score, highest first::

    {"box": [x1, y1, x2, y2], "score": 0.91, "class_id": 0, "class_name": "person",
     "keypoints": [[x, y, visibility], ...]}       # pose models only

OBB models add ``"obb": {"cx", "cy", "w", "h", "angle"}`` (the rotated box; angle in radians) and
``"corners": [[x, y] x 4]``; their ``"box"`` is the axis-aligned hull of the corners. Boxes, corners and
keypoints are in original-image pixels (2 decimals); scores, visibilities and angles have 4 decimals
(with ``full_precision=true``: not rounded).

Tracked frames (``handler/video.py``): what ``YOLO.track(frame, persist=True)`` shows. Each detection
starts with ``"track_id"``; the detections are in the tracker's order (not by score), their boxes (OBB:
``obb``, corners and hull) are the tracker's, clipped to the image as ``Results.update`` clips them (OBB
not clipped), keypoints and masks those of the detection the track took. A frame on which the tracker
confirms nothing shows no detection while a new track awaits confirmation, else the frame's detections
as they are, with ``"track_id": null``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from handler import request_values as p
from handler.errors import InvalidParameter
from handler.response import ModelInfo, px, score
from handler.tasks.base import Letterboxed, PreparedImage, ResponseOptions, full_precision
from handler.tracking import FrameDetections
from handler.tracking import FrameTracks

DETECTION_PARAMETERS: tuple[str, ...] = ("conf", "iou", "max_det", "classes", "polygons", "full_precision")
# The values a request (Thresholds.validate) and the archive's defaults (handler/config.py) may set, inclusive.
LIMITS: dict[str, tuple[float, float]] = {"conf": (0.0, 1.0), "iou": (0.0, 1.0), "max_det": (1, 10000)}


@dataclass(frozen=True)
class Thresholds:
    """Per-request filtering; the defaults are Ultralytics' predict defaults (and the defaults of
    ``model-config.yaml``'s ``handler:`` section, which may change them per model)."""

    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    classes: tuple[int, ...] | None = None  # class ids to keep; None keeps all

    def validate(self, nc: int) -> "Thresholds":
        """Raise ``ValueError`` naming the bad value; return self when all are in range."""
        for key, (lo, hi) in LIMITS.items():
            value = getattr(self, key)
            if not lo <= value <= hi:
                raise ValueError(f"{key} must be between {lo:g} and {hi:g}, got {value}")
        if self.classes is not None:
            bad = [c for c in self.classes if not 0 <= c < nc]
            if bad:
                raise ValueError(f"class ids {bad} out of range 0..{nc - 1}")
        return self


@dataclass
class Detections:
    """One image's detections on CPU: ``rows: float32[n, ncols]`` (postprocessor rows, see
    ``export/postprocess.py``) and, for segment models, ``masks: uint8[n, orig_h, orig_w]`` 0/1, mask ``j``
    belonging to row ``j`` (None for the other tasks)."""

    rows: Tensor
    masks: Tensor | None = None
    track_ids: list[int | None] | None = None  # tracked frames: each row's track ID (None: shown without one)


def threshold_tensors(thresholds: list[Thresholds], nc: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Per-image thresholds -> the postprocessor's ``conf: float32[B]``, ``iou: float32[B]``,
    ``max_det: int64[B]`` and ``class_mask: bool[B, nc]`` (None when no image filters classes)."""
    conf = torch.tensor([t.conf for t in thresholds], dtype=torch.float32)
    iou = torch.tensor([t.iou for t in thresholds], dtype=torch.float32)
    max_det = torch.tensor([t.max_det for t in thresholds], dtype=torch.long)
    class_mask = None
    if any(t.classes is not None for t in thresholds):
        class_mask = torch.ones(len(thresholds), nc, dtype=torch.bool)
        for row, t in enumerate(thresholds):
            if t.classes is not None:
                class_mask[row] = False
                class_mask[row, list(t.classes)] = True
    return conf, iou, max_det, class_mask


class DetectTask(Letterboxed):
    """detect, pose (keypoint columns, from the metadata's ``kpt_shape``) and obb (``rotated``)."""

    parameters = DETECTION_PARAMETERS
    trackable = True
    results_key = "detections"

    def __init__(self, name: str, rotated: bool = False) -> None:
        self.name = name
        self.rotated = rotated
        self.foreign = f"do not apply to a {name} model"

    def default_options(self, config: Any = None) -> Thresholds:
        if config is None:
            return Thresholds()
        return Thresholds(conf=config.conf, iou=config.iou, max_det=config.max_det)

    def options(self, params: dict[str, Any], defaults: Thresholds, names: Sequence[str]) -> tuple[Thresholds, ResponseOptions]:
        t = defaults
        if "conf" in params:
            t = replace(t, conf=p.number("conf", params["conf"]))
        if "iou" in params:
            t = replace(t, iou=p.number("iou", params["iou"]))
        if "max_det" in params:
            t = replace(t, max_det=p.integer("max_det", params["max_det"]))
        if "classes" in params:
            t = replace(t, classes=p.class_ids(params["classes"], names))
        try:
            t = t.validate(len(names))
        except ValueError as e:
            raise InvalidParameter(str(e)) from None
        polygons = p.boolean("polygons", params["polygons"]) if "polygons" in params else False
        return t, ResponseOptions(polygons=polygons, full_precision=full_precision(params))

    def run_postprocessor(self, module: Any, feats: list[Tensor], items: list[PreparedImage], nc: int) -> tuple[Tensor, Tensor, Tensor]:
        """``detections: float32[B, K, ncols]``, ``counts: int64[B]``, ``masks: uint8[B, M, H0, W0]`` on CPU."""
        geometry = torch.tensor([it.params.as_row() for it in items], dtype=torch.float32)  # [B, 6]
        dets, counts, masks = module(feats, geometry, *threshold_tensors([it.options for it in items], nc))
        return dets.cpu(), counts.cpu(), masks.cpu()

    def postprocess(self, module: Any, feats: list[Tensor], items: list[PreparedImage], nc: int) -> list[Detections]:
        dets, counts, _ = self.run_postprocessor(module, feats, items, nc)
        return [Detections(dets[row, : int(counts[row])]) for row in range(len(items))]

    def detection_json(self, row: np.ndarray, info: ModelInfo, full: bool = False) -> dict:
        """One postprocessor row (x1, y1, x2, y2, score, class_id, then the task's columns) -> one detection
        (``full``: numbers not rounded)."""
        class_id = int(row[5])
        det = {
            "box": [px(v, full) for v in row[:4]],
            "score": score(row[4], full),
            "class_id": class_id,
            "class_name": info.names[class_id],
        }
        if info.nkpt:
            kpts = row[6 : 6 + 3 * info.nkpt].reshape(info.nkpt, 3)  # [nkpt, (x, y, visibility)]
            det["keypoints"] = [[px(x, full), px(y, full), score(v, full)] for x, y, v in kpts]
        if self.rotated:
            cx, cy, w, h, angle = row[6:11]
            det["obb"] = {"cx": px(cx, full), "cy": px(cy, full), "w": px(w, full), "h": px(h, full), "angle": score(angle, full)}
            det["corners"] = [[px(x, full), px(y, full)] for x, y in row[11:19].reshape(4, 2)]
        return det

    def to_json(self, output: Detections, info: ModelInfo, options: ResponseOptions | None) -> list[dict]:
        full = options is not None and options.full_precision
        rows = output.rows.numpy().astype(np.float64)
        return with_track_ids([self.detection_json(r, info, full) for r in rows], output.track_ids)

    # -- tracked frames (handler/video.py) ------------------------------------------------------------
    def tracking_defaults(self, config: Any, conf: float) -> Thresholds:
        return replace(self.default_options(config), conf=conf)

    def tracker_detections(self, output: Detections) -> FrameDetections:
        """Rows -> boxes ``float32[N, 4]`` xyxy (OBB: ``float32[N, 5]`` xywhr, columns 6..10), scores, classes."""
        rows = output.rows.numpy()
        boxes = rows[:, 6:11] if self.rotated else rows[:, :4]
        return FrameDetections(np.ascontiguousarray(boxes), rows[:, 4].copy(), rows[:, 5].copy())

    def with_tracks(self, output: Detections, tracks: FrameTracks, height: int, width: int) -> Detections:
        """``output`` as ``YOLO.track`` shows it (see the module docstring): the rows the tracker took, in its
        order, with its boxes; ``tracks.rows`` ``[M, 8]`` ``[x1, y1, x2, y2, id, score, cls, idx]`` (OBB
        ``[M, 9]``, xywhr first)."""
        if tracks.shows_untracked_detections:
            return replace(output, track_ids=[None] * len(output.rows))
        shown = tracks.clipped(height, width)  # [M, 8|9]; empty while a new track awaits confirmation
        idx = torch.from_numpy(shown[:, -1].astype(np.int64))  # [M] rows of output
        rows = output.rows[idx].clone()  # [M, ncols]
        if self.rotated:
            xywhr = torch.from_numpy(np.ascontiguousarray(shown[:, :5]))  # [M, 5]
            corners = rbox_corners(xywhr)  # [M, 4, 2]
            rows[:, 6:11] = xywhr
            rows[:, 11:19] = corners.reshape(-1, 8)
            rows[:, :4] = torch.cat((corners.amin(1), corners.amax(1)), 1)  # the hull, as the postprocessor's
        else:
            rows[:, :4] = torch.from_numpy(np.ascontiguousarray(shown[:, :4]))
        masks = None if output.masks is None else output.masks[idx]
        return Detections(rows, masks, track_ids=[int(t) for t in shown[:, -4]])


def rbox_corners(rboxes: Tensor) -> Tensor:
    """``rboxes: float32[N, 5]`` xywhr -> ``[N, 4, 2]`` corners in Ultralytics' ``xywhr2xyxyxyxy`` order. TorchScript:
    the scripted postprocessor (``export/postprocess.py``) calls it for its OBB rows, the tracked frame for the
    tracker's boxes, so both give the same corners."""
    ctr = rboxes[:, :2]
    w, h, angle = rboxes[:, 2:3], rboxes[:, 3:4], rboxes[:, 4:5]
    cos, sin = angle.cos(), angle.sin()
    vec1 = torch.cat((w / 2 * cos, w / 2 * sin), -1)  # [N, 2]
    vec2 = torch.cat((-h / 2 * sin, h / 2 * cos), -1)
    return torch.stack((ctr + vec1 + vec2, ctr + vec1 - vec2, ctr - vec1 - vec2, ctr - vec1 + vec2), -2)


def with_track_ids(detections: list[dict], track_ids: list[int | None] | None) -> list[dict]:
    """Each detection with its ``"track_id"`` first; unchanged for an untracked request (``track_ids`` None)."""
    if track_ids is None:
        return detections
    return [{"track_id": t, **d} for t, d in zip(track_ids, detections)]


DETECT = DetectTask("detect")
POSE = DetectTask("pose")
OBB = DetectTask("obb", rotated=True)
