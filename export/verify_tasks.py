"""Proof that semantic, depth and RT-DETR exports reproduce Ultralytics. Used by the tests (and ``python -m export``).

The same three checks as ``export/verify.py`` (whose :func:`export.verify.check_trace` serves these tasks
unchanged), each raising :class:`export.verify.VerificationError` that names the worst mismatch:

* transform: our transform's pixels == the predictor's own ``pre_transform`` (letterbox for semantic,
  ``LetterBox(scale_fill=True)`` for depth and RT-DETR), bit for bit;
* decode: the same raw backbone output through our scripted postprocessor and through the Ultralytics
  predictor's own ``postprocess`` (``SemanticSegmentationPredictor``, ``DepthPredictor``,
  ``RTDETRPredictor``), on the same input tensor;
* predict: file bytes -> decode -> our transform -> ``backbone.pt`` -> ``postprocess.pt`` vs
  ``model.predict(file)`` (``results.semantic_mask``, ``results.depth``, ``results.boxes``).

The modules are passed in (``backbone``: the traced backbone; ``postprocess``: the scripted postprocessor), so
these checks do not depend on how the handler wires them; :func:`network_input` is the handler's
``BGR uint8 -> RGB float / 255`` step.

Tolerances: semantic maps >= :data:`SEMANTIC_SHARE` of pixels equal and every difference on a class
boundary; depth relative error at the 99th percentile of pixels <= :data:`DEPTH_P99_REL`; RT-DETR detections
matched as ``export.verify.compare_detections`` does for detect (exact tolerances at the decode level).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from export.checkpoint import LoadedModel, build_yolo
from export.verify import Tolerance, VerificationError, compare_detections
from handler.image.decode import decode_image
from handler.image.letterbox import LetterboxParams, letterbox
from handler.image.stretch import stretch

SEMANTIC_SHARE = 0.995  # share of pixels equal to results.semantic_mask
DEPTH_P99_REL = 1e-3  # relative error at the 99th percentile of pixels, against results.depth
RTDETR_EXACT = Tolerance(min_iou=0.999, score=1e-5, keypoint_px=0.01, mask_iou=0.95, edge=0.0)  # same raw tensors

Module = Callable[..., tuple]


def network_input(pixels: Sequence[np.ndarray]) -> Tensor:
    """``n x uint8[H, W, 3]`` BGR -> ``float32[n, 3, H, W]`` RGB 0..1, the handler's and the predictor's step."""
    rgb = np.stack([cv2.cvtColor(p, cv2.COLOR_BGR2RGB) for p in pixels])
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div_(255)


def _hw(imgsz: int | Sequence[int]) -> list[int]:
    return [int(imgsz), int(imgsz)] if isinstance(imgsz, int) else [int(imgsz[0]), int(imgsz[1])]


def _predictor(loaded: LoadedModel, imgsz: int | Sequence[int], image_path: str = "image.jpg", **overrides):
    """The task's Ultralytics predictor with a stand-in model (names, stride), ready for ``pre_transform`` and
    ``postprocess`` on tensors we give it; ``overrides`` as ``predict(**overrides)`` (``rect=True`` is predict's)."""
    from ultralytics.models.rtdetr import RTDETRPredictor
    from ultralytics.models.yolo.depth import DepthPredictor
    from ultralytics.models.yolo.semantic import SemanticSegmentationPredictor

    cls = {"semantic": SemanticSegmentationPredictor, "depth": DepthPredictor, "rtdetr": RTDETRPredictor}[loaded.task]
    predictor = cls(overrides={"verbose": False, "rect": True, "save": False, **overrides})
    names = dict(enumerate(loaded.names))
    predictor.model = SimpleNamespace(names=names, stride=loaded.max_stride, format="pt", fp16=False)
    predictor.imgsz = _hw(imgsz)
    predictor.batch = ([str(image_path)], None, None)
    return predictor


def transform(
    loaded: LoadedModel, image: np.ndarray, imgsz: int | Sequence[int], letterbox_mode: str = "rect"
) -> tuple[np.ndarray, LetterboxParams]:
    """The serving transform of ``loaded``'s task: :func:`handler.image.stretch.stretch` for depth and RT-DETR (their
    predictors set ``scale_fill``), else the letterbox."""
    if loaded.task in ("depth", "rtdetr"):
        return stretch(image, _hw(imgsz))
    return letterbox(image, _hw(imgsz), loaded.max_stride, letterbox_mode)


def check_transform(
    loaded: LoadedModel, image: np.ndarray, imgsz: int | Sequence[int], letterbox_mode: str = "rect"
) -> tuple[int, int]:
    """Our transform's pixels == the predictor's ``pre_transform`` (one image, so ``rect`` applies where the
    predictor allows it). Returns the input ``(H, W)``."""
    ours, _ = transform(loaded, image, imgsz, letterbox_mode)
    ref = _predictor(loaded, imgsz, rect=letterbox_mode == "rect").pre_transform([image])[0]
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


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VerificationError(f"{what}: {problems[0]}{more}")


def _run(backbone: Module, postprocess: Module, x: Tensor, params: LetterboxParams, *extra):
    with torch.no_grad():
        feats = list(backbone(x))
        return feats, postprocess(feats, torch.tensor([params.as_row()], dtype=torch.float32), *extra)


def _class_mask(classes: Sequence[int] | None, nc: int) -> Tensor | None:
    """``classes=`` of one image -> the postprocessors' ``class_mask: bool[1, nc]`` (None keeps every class)."""
    if classes is None:
        return None
    mask = torch.zeros(1, nc, dtype=torch.bool)
    mask[0, list(classes)] = True
    return mask


def _rtdetr_inputs(conf: float, max_det: int, nc: int, classes: Sequence[int] | None):
    """The detect-contract options after ``geometry``: conf, iou (ignored), max_det, class_mask, agnostic."""
    return torch.tensor([conf]), torch.tensor([0.7]), torch.tensor([max_det]), _class_mask(classes, nc), False


def check_decode(
    loaded: LoadedModel,
    backbone: Module,
    postprocess: Module,
    image_path: Path,
    imgsz: int | Sequence[int],
    letterbox_mode: str = "rect",
    classes: Sequence[int] | None = None,
    conf: float | None = None,
) -> float:
    """One image: the same input tensor through ``backbone``; its raw output through ``postprocess`` and through
    the predictor's ``postprocess``. Returns the figure compared: semantic, the share of equal pixels; depth, the
    p99 relative error; RT-DETR, the number of detections (``conf`` None: a threshold that lets about 100 through)."""
    image = decode_image(Path(image_path).read_bytes())
    pixels, params = transform(loaded, image, imgsz, letterbox_mode)
    x = network_input([pixels])
    name = f"{loaded.task} decode on {Path(image_path).name}"
    if loaded.task == "semantic":
        feats, (maps, sizes, _) = _run(backbone, postprocess, x, params, _class_mask(classes, loaded.nc))
        ref = _predictor(loaded, imgsz, str(image_path), classes=classes).postprocess(feats[0], x, [image])[0]
        ours = maps[0, : int(sizes[0, 0]), : int(sizes[0, 1])].numpy()
        return compare_class_maps(ours, ref.semantic_mask.data.numpy(), name)
    if loaded.task == "depth":
        feats, (depth, sizes, _) = _run(backbone, postprocess, x, params)
        ref = _predictor(loaded, imgsz, str(image_path)).postprocess(feats[0], x, [image])[0].depth.data.numpy()
        ours = depth[0, : int(sizes[0, 0]), : int(sizes[0, 1])].numpy()
        if ours.shape != ref.shape:
            raise VerificationError(f"{name}: depth shape {ours.shape} != Ultralytics' {ref.shape}")
        err = depth_p99_rel(ours, ref)
        if err > DEPTH_P99_REL:
            raise VerificationError(f"{name}: p99 relative error {err:.2e} > {DEPTH_P99_REL:.0e}")
        return err
    if loaded.task == "rtdetr":
        with torch.no_grad():
            feats = list(backbone(x))
        if conf is None:
            conf = low_threshold(feats[0], loaded.nc)
        geometry = torch.tensor([params.as_row()], dtype=torch.float32)
        with torch.no_grad():
            dets, counts, _ = postprocess(feats, geometry, *_rtdetr_inputs(conf, 300, loaded.nc, classes))
        predictor = _predictor(loaded, imgsz, str(image_path), conf=conf, classes=classes, max_det=300)
        ref = predictor.postprocess(_ultralytics_rtdetr_head(loaded, feats[0]), x, [image])[0].boxes
        ref_rows = torch.cat((ref.xyxy, ref.conf[:, None], ref.cls[:, None]), 1).numpy()
        ours = dets[0, : int(counts[0])].numpy()
        if len(ours) != len(ref_rows):
            raise VerificationError(f"{name}: {len(ours)} detections, Ultralytics has {len(ref_rows)} (conf {conf:.3g})")
        _raise_if(compare_detections(ours, ref_rows, conf, RTDETR_EXACT), name)
        return len(ref_rows)
    raise VerificationError(f"check_decode: task {loaded.task!r} is not one of semantic, depth, rtdetr")


def _ultralytics_rtdetr_head(loaded: LoadedModel, queries: Tensor) -> Tensor:
    """``RTDETRDecoder.postprocess`` (eval) of our backbone's ``[B, Q, 4 + nc]``: ``[B, k, 6]`` rows
    ``cx, cy, w, h, score, class``, what the predictor's ``postprocess`` receives."""
    head = loaded.model.model[-1]
    return head.postprocess(queries[..., :4], queries[..., 4:])


def low_threshold(queries: Tensor, nc: int, candidates: int = 100) -> float:
    """A score threshold that lets about ``candidates`` (query, class) pairs of image 0 through, so that a
    random-weight RT-DETR (scores ~0.01) still has something to compare; halfway between two distinct scores."""
    top = queries[0, :, 4:].flatten().float().topk(min(300, queries.shape[1] * nc)).values.unique(sorted=True).flip(0)
    k = min(candidates, len(top) - 1)
    return float((top[k - 1] + top[k]) / 2) if k >= 1 else 0.0


def _served(loaded: LoadedModel, backbone: Module, postprocess: Module, image_path: Path, imgsz, letterbox_mode: str, *extra):
    image = decode_image(Path(image_path).read_bytes())
    pixels, params = transform(loaded, image, imgsz, letterbox_mode)
    return _run(backbone, postprocess, network_input([pixels]), params, *extra)[1]


def _predict(loaded: LoadedModel, image_path: Path, imgsz, **kwargs):
    yolo = build_yolo(loaded.source, loaded.path, loaded.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return yolo.predict(str(image_path), imgsz=_hw(imgsz), verbose=False, **kwargs)[0]


def check_predict(
    loaded: LoadedModel,
    backbone: Module,
    postprocess: Module,
    image_path: Path,
    imgsz: int | Sequence[int],
    letterbox_mode: str = "rect",
    conf: float | None = None,
) -> float:
    """The served steps (bytes -> decode -> transform -> backbone -> postprocessor) vs ``model.predict(file)``
    with default settings (``conf`` for RT-DETR: predict's threshold, default 0.25). Returns the figure compared
    (semantic: share of equal pixels; depth: p99 relative error; RT-DETR: detections matched)."""
    name = f"{loaded.task} predict on {Path(image_path).name}"
    if loaded.task == "semantic":
        maps, sizes, _ = _served(loaded, backbone, postprocess, image_path, imgsz, letterbox_mode, None)
        ref = _predict(loaded, image_path, imgsz, rect=letterbox_mode == "rect").semantic_mask.data.cpu().numpy()
        return compare_class_maps(maps[0, : int(sizes[0, 0]), : int(sizes[0, 1])].numpy(), ref, name)
    if loaded.task == "depth":
        depth, sizes, _ = _served(loaded, backbone, postprocess, image_path, imgsz, letterbox_mode)
        ref = _predict(loaded, image_path, imgsz).depth.data.cpu().numpy()
        ours = depth[0, : int(sizes[0, 0]), : int(sizes[0, 1])].numpy()
        if ours.shape != ref.shape:
            raise VerificationError(f"{name}: depth shape {ours.shape} != Ultralytics' {ref.shape}")
        err = depth_p99_rel(ours, ref)
        if err > DEPTH_P99_REL:
            raise VerificationError(f"{name}: p99 relative error {err:.2e} > {DEPTH_P99_REL:.0e}")
        return err
    if loaded.task == "rtdetr":
        conf = 0.25 if conf is None else conf
        inputs = _rtdetr_inputs(conf, 300, loaded.nc, None)
        dets, counts, _ = _served(loaded, backbone, postprocess, image_path, imgsz, letterbox_mode, *inputs)
        boxes = _predict(loaded, image_path, imgsz, conf=conf).boxes
        ref_rows = torch.cat((boxes.xyxy, boxes.conf[:, None], boxes.cls[:, None]), 1).cpu().numpy()
        _raise_if(compare_detections(dets[0, : int(counts[0])].numpy(), ref_rows, conf, Tolerance()), name)
        return len(ref_rows)
    raise VerificationError(f"check_predict: task {loaded.task!r} is not one of semantic, depth, rtdetr")


def run_checks(
    loaded: LoadedModel,
    backbone: Module,
    postprocess: Module,
    images: Sequence[Path],
    imgsz: int | Sequence[int],
    letterbox_mode: str = "rect",
) -> list[str]:
    """Transform, decode and predict checks on each image (``export.verify.check_trace`` is separate and
    task-independent); raises :class:`VerificationError` on the first mismatch, else returns one log line per
    check with the figures. What ``python -m export`` runs for a semantic, depth or RT-DETR model."""
    lines = []
    shapes = [check_transform(loaded, decode_image(Path(p).read_bytes()), imgsz, letterbox_mode) for p in images]
    lines.append(f"transform == Ultralytics pre_transform, pixel-equal ({', '.join(f'{h}x{w}' for h, w in shapes)})")
    for check in (check_decode, check_predict):
        figures = [check(loaded, backbone, postprocess, p, imgsz, letterbox_mode) for p in images]
        what = "decode == predictor.postprocess" if check is check_decode else "pipeline == model.predict"
        lines.append(f"{what}: " + ", ".join(f"{Path(p).name} {_figure(loaded.task, f)}" for p, f in zip(images, figures)))
    return lines


def _figure(task: str, figure: float) -> str:
    if task == "semantic":
        return f"{figure:.4%} pixels equal"
    if task == "depth":
        return f"p99 relative error {figure:.2e}"
    return f"{int(figure)} detections"
