"""Load an Ultralytics checkpoint or model YAML and describe what the export needs from it."""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from export.postprocess import (
    ANGLE_DECODE_NONE,
    ANGLE_DECODE_OBB,
    ANGLE_DECODE_OBB26,
    KPT_DECODE_NONE,
    KPT_DECODE_POSE,
    KPT_DECODE_POSE26,
)

HeadChoice = Literal["auto", "one2many", "one2one"]
# The served tasks. Ultralytics calls an RT-DETR model's task "detect"; we serve it as "rtdetr", because its
# transform (a stretch, not a letterbox) and its postprocessor differ from YOLO detect's; the response is detect's.
RTDETR_TASK = "rtdetr"
SUPPORTED_TASKS = ("detect", "pose", "segment", "obb", "classify", "semantic", "depth", RTDETR_TASK)
SUPPORTED_HEADS = ("Detect", "v10Detect", "Pose", "Pose26", "Segment", "Segment26", "OBB", "OBB26")
# Tasks whose whole network is traced (export/backbone.py, WholeNetwork / RTDETRQueries), with the one head each
WHOLE_NETWORK_HEADS = {"semantic": "SemanticSegment", "depth": "Depth", RTDETR_TASK: "RTDETRDecoder"}


class ExportError(Exception):
    """A problem with the user's input to the exporter; the CLI prints it on one line and exits 2."""


@dataclass
class LoadedModel:
    """A fused fp32 Ultralytics model in eval mode, on CPU, and the facts the export needs."""

    source: str  # the --weights argument as given
    path: Path  # the file it resolved to
    seed: int  # seed of a YAML build
    model: nn.Module  # ultralytics DetectionModel / PoseModel / SegmentationModel / OBBModel / ClassificationModel /
    #                   SemanticSegmentationModel / DepthModel / RTDETRDetectionModel, fused
    task: str  # one of SUPPORTED_TASKS ("rtdetr" for an RT-DETR detector, which Ultralytics calls "detect")
    names: list[str]  # class names, index = class id
    strides: list[float]  # per detection level, e.g. [8, 16, 32]
    reg_max: int
    end2end: bool  # True: the NMS-free one-to-one head is exported
    kpt_shape: tuple[int, int] | None
    kpt_decode: int  # one of export.postprocess.KPT_DECODE_*
    head_type: str  # "Detect", "Pose", "Pose26", ...
    weights_sha256: str  # of the .pt or .yaml file
    predict_imgsz: int | list[int] | None = None  # the imgsz YOLO(weights).predict() uses (checkpoint args or 640)
    nm: int = 0  # mask coefficients per detection (segment models)
    angle_decode: int = ANGLE_DECODE_NONE  # one of export.postprocess.ANGLE_DECODE_* (obb models)
    num_queries: int = 0  # RT-DETR: decoder queries per image (the backbone's [B, num_queries, 4 + nc]), else 0

    @property
    def nc(self) -> int:
        return len(self.names)

    @property
    def max_stride(self) -> int:
        return max(int(max(self.strides)), 32)  # as Ultralytics' AutoBackend


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_source(weights: str) -> Path | None:
    """The file behind ``weights``; None for a YAML name that Ultralytics resolves from its own configs."""
    path = Path(weights)
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") and path.parent == Path("."):
        from ultralytics.utils.checks import check_yaml

        # a bare name such as yolo26n-pose.yaml: the scale letter selects a row of yolo26-pose.yaml's
        # scales, exactly as ultralytics.nn.tasks.yaml_model_load resolves it
        unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", path.stem) + path.suffix
        for name in dict.fromkeys((unified, weights)):  # yolov10n.yaml exists as such
            try:
                return Path(check_yaml(name))
            except Exception:  # noqa: BLE001 - an unknown name is reported by the caller
                continue
    return None


def _yaml_has_rtdetr_head(src: Path) -> bool:
    """True when the model YAML ``src`` ends in an ``RTDETRDecoder`` head (``rtdetr-l.yaml``, ``yolov8-rtdetr.yaml``)."""
    from ultralytics.nn.tasks import yaml_model_load

    try:
        layers = yaml_model_load(src).get("head") or []
    except Exception:  # noqa: BLE001 - an unreadable YAML is reported by the YOLO build that follows
        return False
    return any(len(layer) > 2 and str(layer[2]) == "RTDETRDecoder" for layer in layers)


def build_yolo(weights: str, src: Path, seed: int):
    """``ultralytics.YOLO`` for ``weights``, or ``ultralytics.RTDETR`` when the model has an ``RTDETRDecoder``
    head (``YOLO`` refuses an RT-DETR YAML, and serves an RT-DETR checkpoint with the wrong predictor); a YAML
    build is seeded, so two calls give the same weights."""
    from ultralytics import RTDETR, YOLO

    arg = str(src) if src.suffix == ".pt" else weights  # a YAML name keeps its scale letter
    rtdetr_yaml = src.suffix != ".pt" and _yaml_has_rtdetr_head(src)
    torch.manual_seed(seed)
    if rtdetr_yaml:
        return RTDETR(arg)
    yolo = YOLO(arg)
    if type(yolo.model.model[-1]).__name__ == "RTDETRDecoder":  # an RT-DETR checkpoint: its own predictor
        torch.manual_seed(seed)
        return RTDETR(arg)
    return yolo


def load_model(weights: str, head: HeadChoice = "auto", seed: int = 0) -> LoadedModel:
    """Load ``weights`` (a ``.pt`` checkpoint, or a model ``.yaml`` built with ``seed``) for export.

    ``head`` selects the detection head of models that have both (YOLO26, YOLOv10):
    ``auto`` keeps the checkpoint's own setting as the installed Ultralytics reads it (what
    ``YOLO(weights).predict()`` uses); ``one2one`` forces the NMS-free head (``predict(nms=False)``);
    ``one2many`` forces the NMS head.
    """
    src = _resolve_source(weights)
    if src is None:
        raise ExportError(f"weights not found: {weights}")
    if src.suffix not in (".pt", ".yaml", ".yml"):
        raise ExportError(f"{weights}: expected an Ultralytics .pt checkpoint or a model .yaml, got '{src.suffix}'")

    if src.suffix == ".pt":
        with src.open("rb") as f:
            magic = f.read(4)
        if magic[:2] != b"PK" and magic[:1] != b"\x80":  # zip (torch.save) or legacy pickle
            raise ExportError(f"{weights}: not a PyTorch checkpoint")
    try:
        yolo = build_yolo(weights, src, seed)
    except Exception as e:  # noqa: BLE001 - anything Ultralytics raises on a bad file is the user's input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{weights}: not an Ultralytics checkpoint ({first})") from None
    task = RTDETR_TASK if type(yolo.model.model[-1]).__name__ == "RTDETRDecoder" else yolo.task
    if task not in SUPPORTED_TASKS:
        raise ExportError(f"{weights}: task '{task}' is not supported yet (supported: {', '.join(SUPPORTED_TASKS)})")
    if task == "classify":
        return _classifier(yolo, weights, src, seed)
    if task in WHOLE_NETWORK_HEADS:
        if head != "auto":
            raise ExportError(f"{weights}: --head {head} applies to YOLO detection heads; a {task} model takes --head auto")
        return _whole_network(yolo, task, weights, src, seed)
    model = yolo.model
    head_module = model.model[-1]
    head_type = type(head_module).__name__
    if head_type not in SUPPORTED_HEADS:
        raise ExportError(f"{weights}: head {head_type!r} is not supported yet (supported: {', '.join(SUPPORTED_HEADS)})")
    if head != "auto":
        if getattr(head_module, "one2one_cv2", None) is None and head == "one2one":
            raise ExportError(f"{weights}: this model has no NMS-free one-to-one head; use --head auto")
        model.end2end = head == "one2one"
    model = model.float().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model.fuse(verbose=False)
    head_module = model.model[-1]
    kpt_shape = tuple(int(v) for v in head_module.kpt_shape) if task == "pose" else None
    kpt_decode = KPT_DECODE_NONE
    if task == "pose":
        kpt_decode = KPT_DECODE_POSE26 if head_type == "Pose26" else KPT_DECODE_POSE
    angle_decode = ANGLE_DECODE_NONE
    if task == "obb":
        angle_decode = ANGLE_DECODE_OBB26 if head_type == "OBB26" else ANGLE_DECODE_OBB
    return LoadedModel(
        source=weights,
        path=src,
        seed=seed,
        model=model,
        task=task,
        names=class_names(model),
        strides=[float(s) for s in head_module.stride],
        reg_max=int(head_module.reg_max),
        end2end=bool(getattr(head_module, "end2end", False)),
        kpt_shape=kpt_shape,
        kpt_decode=kpt_decode,
        head_type=head_type,
        weights_sha256=sha256_of(src),
        predict_imgsz=_predict_imgsz(yolo),
        nm=int(head_module.nm) if task == "segment" else 0,
        angle_decode=angle_decode,
    )


def class_names(model: nn.Module) -> list[str]:
    """The model's class names as a list (index = class id), from Ultralytics' ``{id: name}`` dict or a list."""
    names = model.names
    return [str(names[i]) for i in range(len(names))] if isinstance(names, dict) else [str(n) for n in names]


def _predict_imgsz(yolo) -> int | list[int]:
    """The ``imgsz`` that ``YOLO(weights).predict()`` uses: the checkpoint's training size, else the default 640."""
    from ultralytics.utils import DEFAULT_CFG

    return yolo.overrides.get("imgsz") or DEFAULT_CFG.imgsz


def _classifier(yolo, weights: str, src: Path, seed: int) -> LoadedModel:
    """A fused ``ClassificationModel`` with a YOLO ``Classify`` head (torchvision backbones are not supported)."""
    head_type = type(yolo.model.model[-1]).__name__
    if head_type != "Classify":
        raise ExportError(f"{weights}: classify head {head_type!r} is not supported (supported: Classify)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = yolo.model.float().eval().fuse(verbose=False)
    return LoadedModel(
        source=weights,
        path=src,
        seed=seed,
        model=model,
        task="classify",
        names=class_names(model),
        strides=[float(s) for s in model.stride],  # [1.0]: no constraint; max_stride 32, as AutoBackend's
        reg_max=0,
        end2end=False,
        kpt_shape=None,
        kpt_decode=KPT_DECODE_NONE,
        head_type=head_type,
        weights_sha256=sha256_of(src),
        predict_imgsz=_predict_imgsz(yolo),
    )


def _whole_network(yolo, task: str, weights: str, src: Path, seed: int) -> LoadedModel:
    """A fused semantic (``SemanticSegment``), depth (``Depth``) or RT-DETR (``RTDETRDecoder``) model: the
    backbone traces the whole network (export/backbone.py), so no per-level decode facts are needed."""
    head_type = type(yolo.model.model[-1]).__name__
    expected = WHOLE_NETWORK_HEADS[task]
    if head_type != expected:
        raise ExportError(f"{weights}: {task} head {head_type!r} is not supported (supported: {expected})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = yolo.model.float().eval().fuse(verbose=False)
    head_module = model.model[-1]
    return LoadedModel(
        source=weights,
        path=src,
        seed=seed,
        model=model,
        task=task,
        names=class_names(model),
        strides=[float(s) for s in model.stride],  # [32.0]: the input must be a multiple of the deepest stride
        reg_max=0,
        end2end=task == RTDETR_TASK,  # NMS-free
        kpt_shape=None,
        kpt_decode=KPT_DECODE_NONE,
        head_type=head_type,
        weights_sha256=sha256_of(src),
        predict_imgsz=_predict_imgsz(yolo),
        num_queries=int(head_module.num_queries) if task == RTDETR_TASK else 0,
    )
