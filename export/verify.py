"""Proof that the exported files reproduce Ultralytics. Used by ``python -m export`` and the tests.

Three checks, each raising :class:`VerificationError` that names the worst mismatch:

1. :func:`check_trace`: traced backbone vs the eager network, raw outputs, max abs diff <= 1e-4 (every task).
2. :func:`check_decode`: the same letterboxed input through (traced backbone -> our scripted
   postprocessor) and through (eager model with Ultralytics' own decode -> Ultralytics'
   ``non_max_suppression`` -> ``scale_boxes``/``scale_coords``), at a low threshold so that random-weight
   models are checked too.
3. :func:`check_predict`: the served pipeline (file bytes -> decode -> letterbox -> backbone ->
   postprocessor) vs ``YOLO(weights).predict(file)`` with default settings.

Classify models replace 2 and 3 by :func:`check_classify_decode` (our resize + crop pixels == the
predictor's, our softmax == the ``Classify`` head's) and :func:`check_classify_predict` (top-5 of the
served pipeline == ``results.probs``); semantic, depth and RT-DETR models by those of ``export/verify_tasks.py``.
Each task's entry in ``export/tasks.py`` names its checks 2 and 3 as a :class:`Checks` value.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from export.backbone import RawHead
from export.checkpoint import LoadedModel, build_yolo
from export.matching import greedy_match
from handler.image.decode import decode_image
from handler.image.letterbox import LetterboxParams
from handler.pipeline import YoloPipeline
from handler.tasks.classify import TopK
from handler.tasks.detect import Thresholds, threshold_tensors

TRACE_TOL = 1e-4
MATCH_IOU = 0.5  # below it, two detections are not the same one (then each counts as missing)


class VerificationError(AssertionError):
    """The export does not reproduce Ultralytics; the message names the worst mismatch."""


@dataclass(frozen=True)
class Checks:
    """Checks 2 and 3 of one task, run on each sample image by ``export/tasks.py`` ``run_checks``. Each function
    raises :class:`VerificationError` or returns the figure it compared."""

    decode: Callable[..., float]  # (loaded, pipeline, image_path): our postprocessor vs Ultralytics' on the same input
    predict: Callable[..., float]  # (loaded, pipeline, image_path): the served pipeline vs ``model.predict(file)``
    figure: Callable[[float], str]  # how one figure reads in the log
    transform: Callable[..., tuple[int, int]] | None = None  # (loaded, pipeline, image): pixels == Ultralytics'
    counts: bool = False  # the figures count detections: none compared means the check saw nothing


@dataclass(frozen=True)
class Tolerance:
    """How close two detection lists must be (defaults: the tolerances of the predict check, served pipeline vs ``YOLO.predict``)."""

    min_iou: float = 0.99
    score: float = 0.005
    keypoint_px: float = 0.5  # also the OBB corners
    mask_iou: float = 0.95  # per matched detection, masks at original size
    edge: float = 0.005  # a detection scored within `edge` of conf may be missing on one side


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two binary masks of the same shape (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def compare_detections(
    ours: np.ndarray,
    ref: np.ndarray,
    conf: float,
    tol: Tolerance = Tolerance(),
    obb: bool = False,
    ours_masks: np.ndarray | None = None,
    ref_masks: np.ndarray | None = None,
) -> list[str]:
    """Match two detection lists, rows of the postprocessor contract (``[x1, y1, x2, y2, score, class,
    (kx, ky, kv)*]``; with ``obb``, ``[..., cx, cy, w, h, angle, 4 corners]``) in the same pixel space,
    and, when given, their masks ``uint8[n, H, W]``. Returns the problems found, worst first (empty when
    they agree)."""
    problems: list[tuple[float, str]] = []  # (severity, message)
    pairs = greedy_match(ref, ours, MATCH_IOU)
    used = np.zeros(len(ours), bool)
    matched = np.zeros(len(ref), bool)
    for r, o, iou in pairs:
        used[o] = matched[r] = True
        if iou < tol.min_iou:
            problems.append((1 - iou, f"box IoU {iou:.4f} < {tol.min_iou} for class {int(ref[r, 5])}"))
        ds = abs(float(ours[o, 4] - ref[r, 4]))
        if ds > tol.score:
            problems.append((ds, f"score differs by {ds:.4f} (ours {ours[o, 4]:.4f}, Ultralytics {ref[r, 4]:.4f})"))
        if obb:
            d = np.abs(ours[o, 11:19] - ref[r, 11:19]).max()
            if d > tol.keypoint_px:
                problems.append((d / 100, f"rotated box corner off by {d:.3f} px for class {int(ref[r, 5])}"))
        elif ref.shape[1] > 6:
            d = np.abs(ours[o, 6:].reshape(-1, 3)[:, :2] - ref[r, 6:].reshape(-1, 3)[:, :2]).max()
            if d > tol.keypoint_px:
                problems.append((d / 100, f"keypoint off by {d:.3f} px for class {int(ref[r, 5])}"))
        if ours_masks is not None and ref_masks is not None:
            m = mask_iou(ours_masks[o], ref_masks[r])
            if m < tol.mask_iou:
                problems.append((1 - m, f"mask IoU {m:.4f} < {tol.mask_iou} for class {int(ref[r, 5])}"))
    for r in np.where(~matched)[0]:
        if ref[r, 4] - conf > tol.edge:
            problems.append((1.0, f"Ultralytics detection {ref[r, :6].round(3).tolist()} has no match"))
    for o in np.where(~used)[0]:
        if ours[o, 4] - conf > tol.edge:
            problems.append((1.0, f"our detection {ours[o, :6].round(3).tolist()} is not in Ultralytics' output"))
    return [m for _, m in sorted(problems, key=lambda p: -p[0])]


def raise_first(problems: list[str], what: str) -> None:
    """Raise :class:`VerificationError` with the first (worst) of ``problems``, if any."""
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VerificationError(f"{what}: {problems[0]}{more}")


def check_trace(network: nn.Module, traced: torch.jit.ScriptModule, shapes: list[tuple[int, int, int]]) -> float:
    """``traced`` vs the eager ``network`` it traced (``export.tasks.raw_network``: raw head outputs; classify:
    logits) at each ``(B, H, W)``; returns the max abs diff."""
    eager = network.eval()
    worst, where = 0.0, ""
    for b, h, w in shapes:
        x = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(h * w + b))
        with torch.no_grad():
            for lvl, (t, e) in enumerate(zip(traced(x), eager(x))):
                if t.shape != e.shape:
                    raise VerificationError(f"trace check: level {lvl} shape {tuple(t.shape)} != eager {tuple(e.shape)}")
                d = float((t - e).abs().max())
                if d > worst:
                    worst, where = d, f"level {lvl} at {b}x3x{h}x{w}"
    if worst > TRACE_TOL:
        raise VerificationError(f"trace check: max abs diff {worst:.2e} > {TRACE_TOL:.0e} ({where})")
    return worst


def ultralytics_reference(
    loaded: LoadedModel, images: Tensor, params: list[LetterboxParams], th: Thresholds, agnostic: bool = False
) -> list[np.ndarray]:
    """Ultralytics' own decode + NMS (or NMS-free top-k) + inverse letterbox on ``images: float32[B, 3, H, W]``.

    Rows as in the postprocessor contract, in original-image pixels.
    """
    return [rows for rows, _ in ultralytics_reference_with_masks(loaded, images, params, th, agnostic)]


def ultralytics_reference_with_masks(
    loaded: LoadedModel, images: Tensor, params: list[LetterboxParams], th: Thresholds, agnostic: bool = False
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """As :func:`ultralytics_reference`, plus per image the masks of a segment model, ``uint8[n, orig_h, orig_w]``
    (``process_mask(..., upsample=True)``, empty masks dropped as the predictor does, then ``scale_masks``
    to the original size thresholded at 0.5); None for other tasks."""
    import torchvision  # noqa: F401 - YOLO.predict imports it, which makes Ultralytics' NMS use torchvision.ops.nms
    from ultralytics.utils import nms, ops

    head = loaded.model.model[-1]
    if loaded.end2end:  # what the predictor sets before an end-to-end forward
        head.max_det, head.agnostic_nms = max(th.max_det, 300), agnostic
    with torch.no_grad():
        y = loaded.model(images)
    y = y[0] if isinstance(y, (list, tuple)) else y
    protos = None
    if loaded.nm:  # a segment model: ((decoded, protos), raw)
        y, protos = y
    dets = nms.non_max_suppression(
        y,
        th.conf,
        th.iou,
        list(th.classes) if th.classes is not None else None,
        agnostic,
        max_det=th.max_det,
        nc=loaded.nc,
        end2end=loaded.end2end,
        rotated=loaded.rotated,
    )
    out = []
    for i, (d, p) in enumerate(zip(dets, params)):
        d = d.clone()
        ratio_pad = ((p.gain_y, p.gain_x), (p.pad_left, p.pad_top))
        shape = (p.orig_h, p.orig_w)
        masks = None
        if protos is not None:
            m = ops.process_mask(protos[i], d[:, 6:], d[:, :4], images.shape[2:], upsample=True)  # [n, H, W]
            keep = m.amax((-2, -1)) > 0
            d, m = d[keep], m[keep]
            masks = (ops.scale_masks(m[None].float(), shape, ratio_pad=ratio_pad)[0] > 0.5).byte().numpy()
            d = d[:, :6]
        if loaded.rotated:  # rows x, y, w, h, score, class, angle
            rb = torch.cat((d[:, :4], d[:, 6:7]), 1)
            rb[:, :4] = ops.scale_boxes(images.shape[2:], rb[:, :4], shape, ratio_pad=ratio_pad, xywh=True)
            corners = ops.xywhr2xyxyxyxy(rb)  # [n, 4, 2]
            d = torch.cat((corners.amin(1), corners.amax(1), d[:, 4:6], rb, corners.reshape(-1, 8)), 1)
            out.append((d.numpy(), masks))
            continue
        d[:, :4] = ops.scale_boxes(images.shape[2:], d[:, :4], shape, ratio_pad=ratio_pad)
        if loaded.kpt_shape is not None:
            k = d[:, 6:].view(len(d), *loaded.kpt_shape)
            k = ops.scale_coords(images.shape[2:], k, shape, ratio_pad=ratio_pad)
            if loaded.kpt_shape[1] == 2:
                k = torch.cat((k, torch.ones_like(k[..., :1])), -1)
            d = torch.cat((d[:, :6], k.reshape(len(d), -1)), 1)
        out.append((d.numpy(), masks))
    return out


def low_threshold(loaded: LoadedModel, images: Tensor, candidates: int = 100) -> float:
    """A confidence threshold that lets about ``candidates`` boxes per image through, so that a
    random-weight model (scores ~1e-5) still has something to compare."""
    with torch.no_grad():
        out = RawHead(loaded)(images)[: len(loaded.strides)]  # the levels (a segment model appends its prototypes)
    logits = torch.cat([o[:, 4 * loaded.reg_max : 4 * loaded.reg_max + loaded.nc].flatten(2) for o in out], 2)
    best = logits.sigmoid().amax(1).flatten()  # [B * A]
    k = min(candidates * images.shape[0], best.numel())
    return float(best.topk(k).values[-1]) * 0.999


def check_decode(
    loaded: LoadedModel,
    pipeline: YoloPipeline,
    image: np.ndarray,
    classes: tuple[int, ...] | None = None,
    agnostic: bool = False,
    candidates: int = 100,
) -> int:
    """Same letterboxed input, our backbone+postprocessor vs Ultralytics' decode+NMS, at a low
    threshold that lets about ``candidates`` boxes through. Returns how many detections were compared."""
    item = pipeline.prepare(image)
    x = pipeline.to_input([item.pixels])
    conf = low_threshold(loaded, x, candidates)
    th = Thresholds(conf=conf, iou=0.7, max_det=300, classes=classes)
    ref, ref_masks = ultralytics_reference_with_masks(loaded, x, [item.params], th, agnostic)[0]
    with torch.no_grad():
        feats = list(pipeline.backbone(x))
        geometry = torch.tensor([item.params.as_row()])
        dets, counts, masks = pipeline.postprocess(feats, geometry, *threshold_tensors([th], loaded.nc), agnostic)
    n = int(counts[0])
    ours = dets[0, :n].numpy()
    ours_masks = masks[0, :n, : item.params.orig_h, : item.params.orig_w].numpy() if ref_masks is not None else None
    exact = Tolerance(min_iou=0.999, score=1e-5, keypoint_px=0.01, mask_iou=0.95, edge=0.0)
    if len(ours) != len(ref):
        raise VerificationError(f"decode check: {len(ours)} detections, Ultralytics has {len(ref)} (conf {conf:.3g})")
    problems = compare_detections(ours, ref, conf, exact, loaded.rotated, ours_masks, ref_masks)
    raise_first(problems, "decode check")
    return len(ref)


def ultralytics_predict(
    loaded: LoadedModel, image_path: Path, imgsz, rect: bool = True, conf: float = Thresholds().conf
) -> np.ndarray:
    """``YOLO(weights).predict(image_path)`` with default settings, as rows of our contract."""
    return ultralytics_predict_with_masks(loaded, image_path, imgsz, rect, conf)[0]


def ultralytics_predict_with_masks(
    loaded: LoadedModel, image_path: Path, imgsz, rect: bool = True, conf: float = Thresholds().conf
) -> tuple[np.ndarray, np.ndarray | None]:
    """``YOLO(weights).predict(image_path)`` with default settings, as rows of our contract, and for a
    segment model its ``results.masks`` mapped to the original size the way Ultralytics maps them
    (``scale_masks`` from the letterboxed input, threshold 0.5).

    ``rect=True`` is predict's own default (minimal padding); ``rect=False`` pads to the full square;
    ``conf`` is predict's score threshold (a random-weight model needs a low one)."""
    from ultralytics.utils import ops

    yolo = build_yolo(loaded.source, loaded.path, loaded.seed)
    yolo.model.end2end = loaded.end2end  # the head the export uses (AutoBackend keeps it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = yolo.predict(str(image_path), imgsz=imgsz, rect=rect, conf=conf, verbose=False)[0]
    if loaded.rotated:
        o = r.obb
        rows = [o.xyxy, o.conf[:, None], o.cls[:, None], o.xywhr, o.xyxyxyxy.reshape(-1, 8)]
        return torch.cat(rows, 1).cpu().numpy(), None
    rows = [r.boxes.xyxy, r.boxes.conf[:, None], r.boxes.cls[:, None]]
    if r.keypoints is not None and loaded.kpt_shape is not None:
        k = r.keypoints.data
        if k.shape[-1] == 2:
            k = torch.cat((k, torch.ones_like(k[..., :1])), -1)
        rows.append(k.reshape(len(k), 3 * loaded.kpt_shape[0]))
    masks = None
    if loaded.nm:
        h, w = r.orig_shape
        data = r.masks.data if r.masks is not None else torch.zeros((0, 1, 1))
        masks = (ops.scale_masks(data[None].float(), (h, w))[0] > 0.5).byte().cpu().numpy() if len(data) else np.zeros((0, h, w), np.uint8)
    return torch.cat(rows, 1).cpu().numpy(), masks


def check_predict(loaded: LoadedModel, pipeline: YoloPipeline, image_path: Path) -> int:
    """Served pipeline vs ``YOLO.predict`` on one image file; returns the number of detections."""
    image = decode_image(Path(image_path).read_bytes())
    out = pipeline.infer([pipeline.prepare(image)])[0][0]
    ours = out.rows.numpy()
    ours_masks = out.masks.numpy() if out.masks is not None else None
    ref, ref_masks = ultralytics_predict_with_masks(loaded, image_path, pipeline.imgsz, rect=pipeline.letterbox_mode == "rect")
    tol = Tolerance()
    problems = compare_detections(ours, ref, Thresholds().conf, tol, loaded.rotated, ours_masks, ref_masks)
    raise_first(problems, f"predict check on {Path(image_path).name}")
    return len(ref)


CLASSIFY_EXACT = 1e-5  # same input tensor, our softmax vs the head's
CLASSIFY_PROB_TOL = 1e-3  # |dp| of the served top-5 against ``results.probs``


def check_classify_decode(loaded: LoadedModel, pipeline: YoloPipeline, image_path: Path) -> float:
    """Our resize + crop vs the predictor's (pixel-exact), then the same input through our backbone +
    softmax top-k and through the eager model's ``Classify`` head (softmax). Returns the max |dp|
    over all classes."""
    import torchvision.transforms as T
    from PIL import Image
    from ultralytics.data.augment import classify_transforms

    image = decode_image(Path(image_path).read_bytes())
    item = pipeline.prepare(image, TopK(1))  # the pixels; the postprocessor is asked for all nc classes below
    host = T.Compose(classify_transforms(pipeline.imgsz).transforms[:2])  # what ClassificationPredictor.pre_transform runs
    ref_pixels = np.array(host(Image.fromarray(image)))
    if ref_pixels.shape != item.pixels.shape or not np.array_equal(ref_pixels, item.pixels):
        where = "shape" if ref_pixels.shape != item.pixels.shape else "pixel values"
        raise VerificationError(f"classify transform on {Path(image_path).name}: {where} differ from Ultralytics'")
    x = pipeline.to_input([item.pixels])
    with torch.no_grad():
        ref = loaded.model(x)[0][0]  # eval-mode Classify head: (softmax [B, nc], logits) -> [nc]
        scores, class_ids, counts = pipeline.postprocess(list(pipeline.backbone(x)), torch.tensor([loaded.nc]))
    if int(counts[0]) != loaded.nc:
        raise VerificationError(f"classify decode: {int(counts[0])} classes returned for top_k = nc = {loaded.nc}")
    ours = torch.zeros_like(ref).scatter_(0, class_ids[0], scores[0])  # back to class order
    diff = float((ours - ref).abs().max())
    if diff > CLASSIFY_EXACT:
        raise VerificationError(f"classify decode on {Path(image_path).name}: max |dp| {diff:.2e} > {CLASSIFY_EXACT:.0e}")
    return diff


def check_classify_predict(loaded: LoadedModel, pipeline: YoloPipeline, image_path: Path, k: int = 5) -> float:
    """Served pipeline vs ``YOLO(weights).predict(file).probs``: the top-``k`` class ids in the same
    order and each probability within :data:`CLASSIFY_PROB_TOL`. Returns the max |dp| of the top-k."""
    image = decode_image(Path(image_path).read_bytes())
    top = pipeline.infer([pipeline.prepare(image, TopK(k))])[0][0].top  # [k, 2] (class_id, score)
    yolo = build_yolo(loaded.source, loaded.path, loaded.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probs = yolo.predict(str(image_path), imgsz=pipeline.imgsz, verbose=False)[0].probs
    data = probs.data.float().cpu()
    ref_ids = torch.as_tensor(probs.top5 if k == 5 else (-data).argsort(0)[:k].tolist())  # Probs.top5's own order
    ref_p = data[ref_ids]
    ours_ids, ours_p = top[:, 0].long(), top[:, 1]
    name = Path(image_path).name
    if ours_ids.tolist() != ref_ids.tolist():
        raise VerificationError(f"classify predict on {name}: top-{k} {ours_ids.tolist()} != Ultralytics' {ref_ids.tolist()}")
    diff = float((ours_p - ref_p).abs().max())
    if diff > CLASSIFY_PROB_TOL:
        raise VerificationError(f"classify predict on {name}: |dp| {diff:.2e} > {CLASSIFY_PROB_TOL:.0e}")
    return diff


def _decode_file(loaded: LoadedModel, pipeline: YoloPipeline, image_path: Path) -> int:
    return check_decode(loaded, pipeline, decode_image(Path(image_path).read_bytes()))


DETECTION_CHECKS = Checks(_decode_file, check_predict, lambda n: f"{int(n)} detections", counts=True)
CLASSIFY_CHECKS = Checks(check_classify_decode, check_classify_predict, lambda dp: f"max |dp| {dp:.2e}")
