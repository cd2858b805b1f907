"""The export side of each task: which postprocessor to script, which checks prove it, what it supports.

The counterpart of the handler's registry (``handler/tasks/``), keyed by the same metadata ``task``.
Adding a task to the exporter means one :class:`ExportTask` entry in :data:`EXPORT_TASKS` (and its
serving side in ``handler/tasks/``). Nothing else in ``export/`` compares task names to choose what
to do.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from export import verify, verify_tasks
from export.checkpoint import ExportError, LoadedModel
from export.classify import ClassifyPostprocess
from export.depth import DepthPostprocess
from export.postprocess import YoloPostprocess
from export.rtdetr import RTDETRPostprocess
from export.semantic import SemanticPostprocess
from handler.image.decode import decode_image
from handler.pipeline import YoloPipeline

Step = Callable[[str], AbstractContextManager]  # ``with step("what"):`` times and logs one check
Log = Callable[[str], None]


def detection_postprocessor(loaded: LoadedModel) -> nn.Module:
    return YoloPostprocess(
        loaded.nc,
        loaded.reg_max,
        loaded.strides,
        loaded.end2end,
        loaded.kpt_shape or (0, 0),
        loaded.kpt_decode,
        loaded.nm,
        loaded.angle_decode,
    )


def check_detections(loaded: LoadedModel, pipeline: YoloPipeline, images: list[Path], step: Step, log: Log) -> None:
    """Checks 2 and 3 of ``export/verify.py`` for the detection family (detect, pose, segment, obb)."""
    with step("check decode == Ultralytics decode+NMS"):
        n = [verify.check_decode(loaded, pipeline, decode_image(p.read_bytes())) for p in images]
    log(f"    {sum(n)} detections compared at a low threshold")
    if sum(n) == 0:
        log("    WARNING: nothing to compare (a random-weight segment model may have only empty masks; try another --seed)")
    with step("check pipeline == YOLO.predict"):
        n = [verify.check_predict(loaded, pipeline, p) for p in images]
    log(f"    {', '.join(f'{p.name}: {k}' for p, k in zip(images, n))} detections matched")


def check_classify(loaded: LoadedModel, pipeline: YoloPipeline, images: list[Path], step: Step, log: Log) -> None:
    """The classify halves of checks 2 and 3: softmax top-k == Ultralytics' head, pipeline == ``results.probs``."""
    with step("check preprocess + softmax == Ultralytics"):
        diffs = [verify.check_classify_decode(loaded, pipeline, p) for p in images]
    log(f"    max |dp| {max(diffs):.2e} over all classes")
    with step("check pipeline == YOLO.predict results.probs"):
        diffs = [verify.check_classify_predict(loaded, pipeline, p) for p in images]
    log(f"    {', '.join(f'{p.name}: top-5 equal, max |dp| {d:.2e}' for p, d in zip(images, diffs))}")


def check_dense(loaded: LoadedModel, pipeline: YoloPipeline, images: list[Path], step: Step, log: Log) -> None:
    """Checks 2 and 3 for semantic, depth and RT-DETR (``export/verify_tasks.py``): the transform pixel-equal to the
    predictor's, the decode on the same raw tensors, and the pipeline against ``predict``."""
    with step(f"check {loaded.task} transform, decode, predict == Ultralytics"):
        lines = verify_tasks.run_checks(
            loaded, pipeline.backbone, pipeline.postprocess, images, pipeline.imgsz, pipeline.letterbox_mode or "rect"
        )
    for line in lines:
        log(f"    {line}")


@dataclass(frozen=True)
class ExportTask:
    """How ``python -m export`` handles the models of one task."""

    postprocessor: Callable[[LoadedModel], nn.Module]  # the module to torch.jit.script into postprocess.pt
    check: Callable[[LoadedModel, YoloPipeline, list[Path], Step, Log], None]  # checks 2 and 3 on the written files
    letterbox: bool = True  # served through the letterbox (metadata "letterbox"); False: the task's own transform
    aoti: bool = True  # --format aoti supported
    head: Callable[[LoadedModel], str] = lambda loaded: "one2one (NMS-free top-k)" if loaded.end2end else "one2many (NMS)"


_DETECTION = ExportTask(detection_postprocessor, check_detections)
EXPORT_TASKS: dict[str, ExportTask] = {
    "detect": _DETECTION,
    "pose": _DETECTION,
    "segment": _DETECTION,
    "obb": _DETECTION,
    "classify": ExportTask(
        lambda loaded: ClassifyPostprocess(loaded.nc),
        check_classify,
        letterbox=False,
        aoti=False,
        head=lambda loaded: "Classify (softmax top-k)",
    ),
    "semantic": ExportTask(
        lambda loaded: SemanticPostprocess(loaded.nc), check_dense, aoti=False, head=lambda loaded: "SemanticSegment (per-pixel argmax)"
    ),
    "depth": ExportTask(
        lambda loaded: DepthPostprocess(), check_dense, letterbox=False, aoti=False, head=lambda loaded: "Depth (metres)"
    ),
    "rtdetr": ExportTask(
        lambda loaded: RTDETRPostprocess(loaded.nc, loaded.num_queries),
        check_dense,
        letterbox=False,
        aoti=False,
        head=lambda loaded: "RTDETRDecoder (NMS-free top-k)",
    ),
}


def export_task(loaded: LoadedModel) -> ExportTask:
    try:
        return EXPORT_TASKS[loaded.task]
    except KeyError:
        raise ExportError(f"{loaded.path.name}: task {loaded.task!r} is not supported yet (supported: {', '.join(EXPORT_TASKS)})") from None
