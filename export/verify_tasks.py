"""Proof that semantic, depth and RT-DETR exports reproduce Ultralytics. Used by ``python -m export`` (through each
task's :class:`export.verify.Checks` in ``export/tasks.py``) and the tests.

The same three checks as ``export/verify.py`` (whose :func:`export.verify.check_trace` serves these tasks
unchanged), each raising :class:`export.verify.VerificationError` that names the worst mismatch:

* transform: the served transform's pixels (``YoloPipeline.transform``: the letterbox for semantic, the stretch
  for depth and RT-DETR) == the predictor's own ``pre_transform``, bit for bit;
* decode: the same network input through the exported backbone, its raw output through our scripted
  postprocessor and through the Ultralytics predictor's own ``postprocess`` (``SemanticSegmentationPredictor``,
  ``DepthPredictor``, ``RTDETRPredictor``);
* predict: the served pipeline (file bytes -> decode -> transform -> ``backbone.pt`` -> ``postprocess.pt`` -> the
  task's output) vs ``model.predict(file)`` (``results.semantic_mask``, ``results.depth``, ``results.boxes``).

Every check takes the :class:`handler.pipeline.YoloPipeline` of the exported files, so what is checked is the
served transform and network input, not a copy of them.

Tolerances: semantic maps >= :data:`SEMANTIC_SHARE` of pixels equal and every difference on a class boundary;
depth relative error at the 99th percentile of pixels <= :data:`DEPTH_P99_REL`; RT-DETR detections matched as
``export.verify.compare_detections`` does for detect (exact tolerances at the decode level).
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from export.checkpoint import LoadedModel, build_yolo
from export.verify import Checks, Tolerance, VerificationError, compare_detections, raise_first
from handler.image.decode import decode_image
from handler.image.letterbox import target_hw
from handler.pipeline import YoloPipeline
from handler.tasks.base import PreparedImage
from handler.tasks.detect import Thresholds

SEMANTIC_SHARE = 0.995  # share of pixels equal to results.semantic_mask
DEPTH_P99_REL = 1e-3  # relative error at the 99th percentile of pixels, against results.depth
RTDETR_EXACT = Tolerance(min_iou=0.999, score=1e-5, keypoint_px=0.01, mask_iou=0.95, edge=0.0)  # same raw tensors

# The Ultralytics predictor of each task (imported when a check runs: the module itself needs no Ultralytics).
SEMANTIC_PREDICTOR = "ultralytics.models.yolo.semantic.SemanticSegmentationPredictor"
DEPTH_PREDICTOR = "ultralytics.models.yolo.depth.DepthPredictor"
RTDETR_PREDICTOR = "ultralytics.models.rtdetr.RTDETRPredictor"


def predictor(name: str, loaded: LoadedModel, imgsz: int | Sequence[int], image_path: str = "image.jpg", **overrides):
    """The Ultralytics predictor ``name`` with a stand-in model (names, stride), ready for ``pre_transform`` and
    ``postprocess`` on tensors we give it; ``overrides`` as ``predict(**overrides)`` (``rect=True`` is predict's)."""
    module, cls = name.rsplit(".", 1)
    p = getattr(importlib.import_module(module), cls)(overrides={"verbose": False, "rect": True, "save": False, **overrides})
    p.model = SimpleNamespace(names=dict(enumerate(loaded.names)), stride=loaded.max_stride, format="pt", fp16=False)
    p.imgsz = list(target_hw(imgsz))
    p.batch = ([str(image_path)], None, None)
    return p


def check_transform(predictor_name: str, loaded: LoadedModel, pipeline: YoloPipeline, image: np.ndarray) -> tuple[int, int]:
    """The served transform's pixels == the predictor's ``pre_transform`` (one image, so ``rect`` applies where the
    predictor allows it). Returns the input ``(H, W)``."""
    ours, _ = pipeline.transform(image)
    p = predictor(predictor_name, loaded, pipeline.imgsz, rect=pipeline.letterbox_mode == "rect")
    ref = p.pre_transform([image])[0]
    if ref.shape != ours.shape:
        raise VerificationError(f"{loaded.task} transform: shape {ours.shape} != Ultralytics' {ref.shape}")
    if not np.array_equal(ref, ours):
        n = int((ref != ours).any(-1).sum())
        raise VerificationError(f"{loaded.task} transform: {n} pixels differ from Ultralytics' pre_transform")
    return ours.shape[0], ours.shape[1]


def class_boundaries(class_map: np.ndarray) -> np.ndarray:
    """``bool[H, W]``: True where a pixel's 3x3 neighbourhood holds another class."""
    m = class_map.astype(np.int32)
    lo = cv2.erode(m.astype(np.float32), np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
    hi = cv2.dilate(m.astype(np.float32), np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
    return (lo != m) | (hi != m)


def compare_class_maps(ours: np.ndarray, ref: np.ndarray, what: str, share: float = SEMANTIC_SHARE) -> float:
    """Share of equal pixels of two class maps of one image; raises unless it is >= ``share`` and every
    differing pixel lies on a class boundary of either map. Returns the share."""
    if ours.shape != ref.shape:
        raise VerificationError(f"{what}: class map shape {ours.shape} != Ultralytics' {ref.shape}")
    differ = ours.astype(np.int64) != ref.astype(np.int64)
    equal = 1.0 - float(differ.mean())
    if equal < share:
        raise VerificationError(f"{what}: {equal:.4%} of pixels equal Ultralytics' class map (< {share:.1%})")
    inside = differ & ~(class_boundaries(ours) | class_boundaries(ref))
    if inside.any():
        y, x = np.argwhere(inside)[0]
        raise VerificationError(f"{what}: {int(inside.sum())} pixels differ away from any class boundary, e.g. ({x}, {y})")
    return equal


def depth_p99_rel(ours: np.ndarray, ref: np.ndarray) -> float:
    """Relative error ``|ours - ref| / ref`` at the 99th percentile of pixels."""
    return float(np.percentile(np.abs(ours.astype(np.float64) - ref) / np.maximum(np.abs(ref), 1e-12), 99))


def compare_depth(ours: np.ndarray, ref: np.ndarray, what: str) -> float:
    """Raises unless the two depth maps of one image have one shape and :func:`depth_p99_rel` <= :data:`DEPTH_P99_REL`;
    returns that error."""
    if ours.shape != ref.shape:
        raise VerificationError(f"{what}: depth shape {ours.shape} != Ultralytics' {ref.shape}")
    err = depth_p99_rel(ours, ref)
    if err > DEPTH_P99_REL:
        raise VerificationError(f"{what}: p99 relative error {err:.2e} > {DEPTH_P99_REL:.0e}")
    return err


def class_mask(classes: Sequence[int] | None, nc: int) -> Tensor | None:
    """``classes=`` of one image -> the postprocessors' ``class_mask: bool[1, nc]`` (None keeps every class)."""
    if classes is None:
        return None
    mask = torch.zeros(1, nc, dtype=torch.bool)
    mask[0, list(classes)] = True
    return mask


def served_input(pipeline: YoloPipeline, image_path: Path) -> tuple[np.ndarray, PreparedImage, Tensor]:
    """One image file as served: ``(decoded uint8[H, W, 3] BGR, its prepared item, float32[1, 3, h, w] network input)``."""
    image = decode_image(Path(image_path).read_bytes())
    item = pipeline.prepare(image)
    return image, item, pipeline.network_input([item])


def _postprocess(pipeline: YoloPipeline, feats: list[Tensor], item: PreparedImage, *options):
    """The scripted postprocessor on one image's backbone output, with its geometry and ``options``."""
    with torch.no_grad():
        return pipeline.postprocess(feats, torch.tensor([item.params.as_row()], dtype=torch.float32), *options)


def _features(pipeline: YoloPipeline, x: Tensor) -> list[Tensor]:
    with torch.no_grad():
        return list(pipeline.backbone(x))


def _predict(loaded: LoadedModel, image_path: Path, imgsz, **kwargs):
    """``model.predict(file)`` of the checkpoint itself (a YAML build is seeded: the same weights)."""
    yolo = build_yolo(loaded.source, loaded.path, loaded.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return yolo.predict(str(image_path), imgsz=list(target_hw(imgsz)), verbose=False, **kwargs)[0]


def _infer(pipeline: YoloPipeline, image_path: Path, options=None):
    """The served pipeline's output for one image file (the task's output type, on CPU)."""
    image = decode_image(Path(image_path).read_bytes())
    return pipeline.infer([pipeline.prepare(image, options)])[0][0]


# ---------------------------------------------------------------- semantic


def semantic_decode(loaded: LoadedModel, pipeline: YoloPipeline, image_path: Path, classes: Sequence[int] | None = None) -> float:
    """Share of pixels equal to ``SemanticSegmentationPredictor.postprocess`` of the same logits."""
    image, item, x = served_input(pipeline, image_path)
    feats = _features(pipeline, x)
    maps, sizes, _ = _postprocess(pipeline, feats, item, class_mask(classes, loaded.nc))
    ref = predictor(SEMANTIC_PREDICTOR, loaded, pipeline.imgsz, str(image_path), classes=classes).postprocess(feats[0], x, [image])[0]
    ours = maps[0, : int(sizes[0, 0]), : int(sizes[0, 1])].numpy()
    return compare_class_maps(ours, ref.semantic_mask.data.numpy(), f"semantic decode on {Path(image_path).name}")


def semantic_predict(loaded: LoadedModel, pipeline: YoloPipeline, image_path: Path) -> float:
    """Share of pixels of the served class map equal to ``model.predict(file).semantic_mask``."""
    ours = _infer(pipeline, image_path).class_map.numpy()
    ref = _predict(loaded, image_path, pipeline.imgsz, rect=pipeline.letterbox_mode == "rect").semantic_mask.data.cpu().numpy()
    return compare_class_maps(ours, ref, f"semantic predict on {Path(image_path).name}")


# ---------------------------------------------------------------- depth


def depth_decode(loaded: LoadedModel, pipeline: YoloPipeline, image_path: Path) -> float:
    """p99 relative error against ``DepthPredictor.postprocess`` of the same raw depth."""
    image, item, x = served_input(pipeline, image_path)
    feats = _features(pipeline, x)
    depth, sizes, _ = _postprocess(pipeline, feats, item)
    ref = predictor(DEPTH_PREDICTOR, loaded, pipeline.imgsz, str(image_path)).postprocess(feats[0], x, [image])[0]
    ours = depth[0, : int(sizes[0, 0]), : int(sizes[0, 1])].numpy()
    return compare_depth(ours, ref.depth.data.numpy(), f"depth decode on {Path(image_path).name}")


def depth_predict(loaded: LoadedModel, pipeline: YoloPipeline, image_path: Path) -> float:
    """p99 relative error of the served depth map against ``model.predict(file).depth``."""
    ours = _infer(pipeline, image_path).depth.numpy()
    ref = _predict(loaded, image_path, pipeline.imgsz).depth.data.cpu().numpy()
    return compare_depth(ours, ref, f"depth predict on {Path(image_path).name}")


# ---------------------------------------------------------------- RT-DETR


def low_query_threshold(queries: Tensor, nc: int, candidates: int = 100) -> float:
    """A score threshold that lets about ``candidates`` (query, class) pairs of image 0 through, so that a
    random-weight RT-DETR (scores ~0.01) still has something to compare; halfway between two distinct scores."""
    top = queries[0, :, 4:].flatten().float().topk(min(300, queries.shape[1] * nc)).values.unique(sorted=True).flip(0)
    k = min(candidates, len(top) - 1)
    return float((top[k - 1] + top[k]) / 2) if k >= 1 else 0.0


def _ultralytics_rtdetr_head(loaded: LoadedModel, queries: Tensor) -> Tensor:
    """``RTDETRDecoder.postprocess`` (eval) of our backbone's ``[B, Q, 4 + nc]``: ``[B, k, 6]`` rows
    ``cx, cy, w, h, score, class``, what the predictor's ``postprocess`` receives."""
    head = loaded.model.model[-1]
    return head.postprocess(queries[..., :4], queries[..., 4:])


def _boxes_rows(boxes) -> np.ndarray:
    """Ultralytics ``Boxes`` -> rows ``[x1, y1, x2, y2, score, class]`` of our contract."""
    return torch.cat((boxes.xyxy, boxes.conf[:, None], boxes.cls[:, None]), 1).cpu().numpy()


def rtdetr_decode(
    loaded: LoadedModel, pipeline: YoloPipeline, image_path: Path, classes: Sequence[int] | None = None, conf: float | None = None
) -> float:
    """Detections of the same queries through our postprocessor and ``RTDETRPredictor.postprocess`` (``conf`` None:
    a threshold that lets about 100 through); returns how many were compared."""
    image, item, x = served_input(pipeline, image_path)
    feats = _features(pipeline, x)
    conf = low_query_threshold(feats[0], loaded.nc) if conf is None else conf
    # the detection contract's options after ``geometry``: conf, iou (unused: NMS-free), max_det, class_mask, agnostic
    options = (torch.tensor([conf]), torch.tensor([0.7]), torch.tensor([300]), class_mask(classes, loaded.nc), False)
    dets, counts, _ = _postprocess(pipeline, feats, item, *options)
    p = predictor(RTDETR_PREDICTOR, loaded, pipeline.imgsz, str(image_path), conf=conf, classes=classes, max_det=300)
    ref = _boxes_rows(p.postprocess(_ultralytics_rtdetr_head(loaded, feats[0]), x, [image])[0].boxes)
    ours = dets[0, : int(counts[0])].numpy()
    name = f"rtdetr decode on {Path(image_path).name}"
    if len(ours) != len(ref):
        raise VerificationError(f"{name}: {len(ours)} detections, Ultralytics has {len(ref)} (conf {conf:.3g})")
    raise_first(compare_detections(ours, ref, conf, RTDETR_EXACT), name)
    return len(ref)


def rtdetr_predict(loaded: LoadedModel, pipeline: YoloPipeline, image_path: Path, conf: float | None = None) -> float:
    """The served detections against ``model.predict(file, conf=conf).boxes`` (``conf`` None: predict's default);
    returns how many Ultralytics found."""
    conf = Thresholds().conf if conf is None else conf
    ours = _infer(pipeline, image_path, Thresholds(conf=conf)).rows.numpy()
    ref = _boxes_rows(_predict(loaded, image_path, pipeline.imgsz, conf=conf).boxes)
    raise_first(compare_detections(ours, ref, conf, Tolerance()), f"rtdetr predict on {Path(image_path).name}")
    return len(ref)


def _transform_check(predictor_name: str):
    return lambda loaded, pipeline, image: check_transform(predictor_name, loaded, pipeline, image)


SEMANTIC_CHECKS = Checks(semantic_decode, semantic_predict, lambda share: f"{share:.4%} pixels equal", _transform_check(SEMANTIC_PREDICTOR))
DEPTH_CHECKS = Checks(depth_decode, depth_predict, lambda err: f"p99 relative error {err:.2e}", _transform_check(DEPTH_PREDICTOR))
RTDETR_CHECKS = Checks(rtdetr_decode, rtdetr_predict, lambda n: f"{int(n)} detections", _transform_check(RTDETR_PREDICTOR), counts=True)
