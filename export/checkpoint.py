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
# What the scripted postprocessor must know of a YOLO detection head besides its task, by the head's class.
KPT_DECODES = {"Pose": KPT_DECODE_POSE, "Pose26": KPT_DECODE_POSE26}
ANGLE_DECODES = {"OBB": ANGLE_DECODE_OBB, "OBB26": ANGLE_DECODE_OBB26}


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
    task: str  # the served task (export/tasks.py; "rtdetr" for an RT-DETR detector, which Ultralytics calls "detect")
    names: list[str]  # class names, index = class id
    strides: list[float]  # per detection level, e.g. [8, 16, 32]
    head_type: str  # the head's class: "Detect", "Pose", "Pose26", "Classify", "RTDETRDecoder", ...
    weights_sha256: str  # of the .pt or .yaml file
    predict_imgsz: int | list[int] | None = None  # the imgsz YOLO(weights).predict() uses (checkpoint args or 640)
    reg_max: int = 0  # DFL bins of a YOLO detection head (1: direct ltrb)
    end2end: bool = False  # True: an NMS-free head is exported (YOLO one-to-one, or RT-DETR's queries)
    kpt_shape: tuple[int, int] | None = None  # pose models: (keypoints, 2 or 3)
    kpt_decode: int = KPT_DECODE_NONE  # one of export.postprocess.KPT_DECODE_* (pose models)
    nm: int = 0  # mask coefficients per detection (segment models)
    angle_decode: int = ANGLE_DECODE_NONE  # one of export.postprocess.ANGLE_DECODE_* (obb models)
    num_queries: int = 0  # RT-DETR: decoder queries per image (the backbone's [B, num_queries, 4 + nc]), else 0

    @property
    def nc(self) -> int:
        return len(self.names)

    @property
    def max_stride(self) -> int:
        return max(int(max(self.strides)), 32)  # as Ultralytics' AutoBackend

    @property
    def rotated(self) -> bool:
        """Its detections are rotated boxes (an OBB head)."""
        return self.angle_decode != ANGLE_DECODE_NONE


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


def open_checkpoint(weights: str, seed: int = 0):
    """``weights`` (a ``.pt`` checkpoint, or a model ``.yaml`` built with ``seed``) -> ``(the Ultralytics model
    object, the file it came from)``; :class:`ExportError` for anything that is not one."""
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
        return build_yolo(weights, src, seed), src
    except Exception as e:  # noqa: BLE001 - anything Ultralytics raises on a bad file is the user's input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{weights}: not an Ultralytics checkpoint ({first})") from None


def head_class(yolo) -> str:
    """The class name of the model's head (its last layer): what decides how it is exported (export/tasks.py)."""
    return type(yolo.model.model[-1]).__name__


# The loaders of export/tasks.py, one per way a head is exported: ``(yolo, task, weights, file, seed, --head)``
# -> the fused model and its facts. None of them compares task names; the task is given.


def load_detection(yolo, task: str, weights: str, src: Path, seed: int, head: HeadChoice) -> LoadedModel:
    """A YOLO detection head (``Detect``, ``Pose``, ``Segment``, ``OBB`` and their v10/26 variants): its levels are
    traced raw (export/backbone.py ``RawHead``) and decoded by ``export/postprocess.py``.

    ``head`` selects the detection head of models that have both (YOLO26, YOLOv10): ``auto`` keeps the
    checkpoint's own setting as the installed Ultralytics reads it (what ``YOLO(weights).predict()`` uses);
    ``one2one`` forces the NMS-free head (``predict(nms=False)``); ``one2many`` forces the NMS head."""
    model = yolo.model
    head_module = model.model[-1]
    head_type = type(head_module).__name__
    if head != "auto":
        if getattr(head_module, "one2one_cv2", None) is None and head == "one2one":
            raise ExportError(f"{weights}: this model has no NMS-free one-to-one head; use --head auto")
        model.end2end = head == "one2one"
    model = _fused(model)
    head_module = model.model[-1]
    return _loaded(
        yolo, model, task, weights, src, seed,
        strides=[float(s) for s in head_module.stride],
        reg_max=int(head_module.reg_max),
        end2end=bool(getattr(head_module, "end2end", False)),
        kpt_shape=tuple(int(v) for v in head_module.kpt_shape) if head_type in KPT_DECODES else None,
        kpt_decode=KPT_DECODES.get(head_type, KPT_DECODE_NONE),
        nm=int(getattr(head_module, "nm", 0)),
        angle_decode=ANGLE_DECODES.get(head_type, ANGLE_DECODE_NONE),
    )


def load_classifier(yolo, task: str, weights: str, src: Path, seed: int, head: HeadChoice) -> LoadedModel:
    """A ``ClassificationModel`` with a YOLO ``Classify`` head (its logits are traced)."""
    _auto_head_only(head, weights, task)
    model = _fused(yolo.model)
    return _loaded(yolo, model, task, weights, src, seed, strides=[float(s) for s in model.stride])  # [1.0]: max_stride 32


def load_whole_network(yolo, task: str, weights: str, src: Path, seed: int, head: HeadChoice) -> LoadedModel:
    """A model whose whole network is traced (semantic ``SemanticSegment``, depth ``Depth``, RT-DETR
    ``RTDETRDecoder``; export/backbone.py), so no per-level decode facts are needed; an RT-DETR decoder adds its
    query count, and is NMS-free."""
    _auto_head_only(head, weights, task)
    model = _fused(yolo.model)
    num_queries = int(getattr(model.model[-1], "num_queries", 0))
    return _loaded(
        yolo, model, task, weights, src, seed,
        strides=[float(s) for s in model.stride],  # [32.0]: the input must be a multiple of the deepest stride
        end2end=num_queries > 0,
        num_queries=num_queries,
    )


def _auto_head_only(head: HeadChoice, weights: str, task: str) -> None:
    if head != "auto":
        raise ExportError(f"{weights}: --head {head} applies to YOLO detection heads; a {task} model takes --head auto")


def _fused(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.float().eval().fuse(verbose=False)


def _loaded(yolo, model: nn.Module, task: str, weights: str, src: Path, seed: int, **facts) -> LoadedModel:
    """The :class:`LoadedModel` of the fused ``model``: what every task has, plus its own ``facts``."""
    return LoadedModel(
        source=weights,
        path=src,
        seed=seed,
        model=model,
        task=task,
        names=class_names(model),
        head_type=type(model.model[-1]).__name__,
        weights_sha256=sha256_of(src),
        predict_imgsz=_predict_imgsz(yolo),
        **facts,
    )


def class_names(model: nn.Module) -> list[str]:
    """The model's class names as a list (index = class id), from Ultralytics' ``{id: name}`` dict or a list."""
    names = model.names
    return [str(names[i]) for i in range(len(names))] if isinstance(names, dict) else [str(n) for n in names]


def _predict_imgsz(yolo) -> int | list[int]:
    """The ``imgsz`` that ``YOLO(weights).predict()`` uses: the checkpoint's training size, else the default 640."""
    from ultralytics.utils import DEFAULT_CFG

    return yolo.overrides.get("imgsz") or DEFAULT_CFG.imgsz
