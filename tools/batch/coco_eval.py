"""``--eval``: the COCO metrics (mAP50-95, mAP50) of a batch's COCO results, computed by pycocotools.

The ground truth is a COCO annotation file (``--coco-gt``) or the YOLO label files of a dataset YAML,
converted here: a box label ``cls xc yc w h`` (normalised) becomes a COCO box in pixels of the image's
size as the server reported it; a segment label ``cls x1 y1 x2 y2 ...`` a polygon (its box the
polygon's bounds, its area the polygon's); a pose label ``cls xc yc w h x1 y1 [v1] ...`` a box with
keypoints (visibility 2 when the label has none and the point is not ``0 0``). YOLO labels carry no
segmentation area, so a pose or box annotation's ``area`` (which COCO uses for its small/medium/large
ranges and to scale OKS) is its box's. Keypoint OKS uses COCO's 17 person sigmas for 17 keypoints,
else ``1 / K`` each, as Ultralytics' pose validator does. Category ids are the class ids.

Which metrics: ``bbox`` always; ``segm`` when the results carry masks, ``keypoints`` when they carry
keypoints. OBB results (rotated boxes) are not COCO boxes: ``--eval`` refuses them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np

INSTALL_HINT = "pip install 'yolo-torchserve[eval]' (or: pip install pycocotools)"


class EvalError(ValueError):
    """``--eval`` cannot run as asked (one line, for the user)."""


def require_pycocotools() -> None:
    try:
        import pycocotools.coco  # noqa: F401
        import pycocotools.cocoeval  # noqa: F401
    except ImportError:
        raise EvalError(f"--eval needs pycocotools: {INSTALL_HINT}") from None


def iou_types(results: list[dict]) -> list[str]:
    """The COCO evaluations these results allow (see the module doc)."""
    if any("rbox" in r for r in results):
        raise EvalError("--eval: an OBB model's rotated boxes are not COCO boxes; COCO metrics cover detect, segment and pose models")
    types = ["bbox"]
    if any("segmentation" in r for r in results):
        types.append("segm")
    if any("keypoints" in r for r in results):
        types.append("keypoints")
    return types


def _polygon_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


def label_annotations(text: str, image_id: int, width: int, height: int, kind: str, nkpt: int) -> list[dict]:
    """COCO annotations (without ``id``) of one YOLO label file's ``text``; ``kind``: ``"bbox"``,
    ``"segm"`` (polygon labels) or ``"keypoints"`` (``nkpt`` keypoints per label)."""
    out = []
    scale = np.array([width, height], np.float64)
    for line in text.splitlines():
        values = line.split()
        if not values:
            continue
        cls, v = int(float(values[0])), np.array(values[1:], np.float64)
        ann: dict = {"image_id": image_id, "category_id": cls, "iscrowd": 0}
        if kind == "segm" and len(v) >= 6 and len(v) % 2 == 0:
            xy = v.reshape(-1, 2) * scale  # [n, 2] pixels
            (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
            ann.update(bbox=[x0, y0, x1 - x0, y1 - y0], area=_polygon_area(xy), segmentation=[xy.reshape(-1).tolist()])
        else:
            xc, yc, w, h = v[:4] * np.tile(scale, 2)
            ann.update(bbox=[xc - w / 2, yc - h / 2, w, h], area=w * h)
            if kind == "keypoints" and nkpt and len(v) > 4:
                k = v[4:].reshape(nkpt, -1)  # [K, 2 | 3]
                xy = k[:, :2] * scale
                vis = k[:, 2] if k.shape[1] == 3 else np.where((k[:, :2] != 0).any(1), 2.0, 0.0)
                ann["keypoints"] = np.concatenate((xy, vis[:, None]), 1).reshape(-1).tolist()
                ann["num_keypoints"] = int((vis > 0).sum())
        out.append(ann)
    return out


def ground_truth_from_labels(images: list[dict], label_of: Callable[[str], Path], names: list[str], results: list[dict]) -> dict:
    """A COCO ground-truth dict from the YOLO label files of ``images`` (``{"id", "file_name", "width",
    "height"}``, the batch's image record); an image without a label file has no object."""
    types = iou_types(results)
    kind = "segm" if "segm" in types else "keypoints" if "keypoints" in types else "bbox"
    nkpt = next((len(r["keypoints"]) // 3 for r in results if "keypoints" in r), 0)
    annotations: list[dict] = []
    for im in images:
        label = label_of(im["file_name"])
        if label.is_file():
            annotations += label_annotations(label.read_text(), im["id"], im["width"], im["height"], kind, nkpt)
    for i, ann in enumerate(annotations, 1):
        ann["id"] = i
    categories = [{"id": i, "name": n} for i, n in enumerate(names)]
    if nkpt:
        for c in categories:
            c["keypoints"] = [str(k) for k in range(nkpt)]
    return {"images": images, "annotations": annotations, "categories": categories}


def evaluate(gt: dict, results: list[dict]) -> dict[str, tuple[float, float]]:
    """``{iou_type: (mAP50-95, mAP50)}`` of ``results`` against ``gt`` (pycocotools' COCOeval, its
    printing kept out of the output)."""
    require_pycocotools()
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    types = iou_types(results)
    if not results:
        return {t: (0.0, 0.0) for t in types}
    metrics = {}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        for t in types:
            dt = coco.loadRes(copy.deepcopy(results))  # loadRes adds fields to what it is given
            e = COCOeval(coco, dt, t)
            if t == "keypoints":
                nkpt = len(results[0]["keypoints"]) // 3
                if nkpt != 17:  # Ultralytics' pose validator: equal sigmas when not COCO's 17 person keypoints
                    e.params.kpt_oks_sigmas = np.ones(nkpt) / nkpt
            e.evaluate()
            e.accumulate()
            e.summarize()
            metrics[t] = (float(e.stats[0]), float(e.stats[1]))
    return metrics


def load_coco_gt(path: Path) -> dict:
    try:
        gt = json.loads(path.read_text())
        assert isinstance(gt, dict) and {"images", "annotations", "categories"} <= set(gt)
    except (OSError, ValueError, AssertionError):
        raise EvalError(f"{path} is not a COCO annotation file (JSON with images, annotations, categories)") from None
    return gt


def format_metrics(metrics: dict[str, tuple[float, float]]) -> list[str]:
    return [f"  {t:<10} mAP50-95 {m[0]:.3f}  mAP50 {m[1]:.3f}" for t, m in metrics.items()]
