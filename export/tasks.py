"""The export side of each task: the one table ``python -m export`` looks a model up in.

The counterpart of the handler's registry (``handler/tasks/``): each :class:`ExportTask` names the handler task
object that serves its models (whose ``name`` is the metadata ``task``), and says which Ultralytics heads it takes,
how such a model is loaded, what ``backbone.pt`` traces, which postprocessor is scripted into ``postprocess.pt``,
which checks prove them equal to Ultralytics, and whether ``--format aoti`` applies. A model is looked up once, by
its head's class (:func:`load_model`); nothing else in ``export/`` compares task names.

Adding a task = one handler module (``handler/tasks/<family>.py``, registered in ``handler/tasks/__init__.py``)
+ one :class:`ExportTask` entry in :data:`EXPORT_TASKS` below (``docs/architecture.md``, "Adding a task").
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from export import verify, verify_tasks
from export.backbone import RawHead, RTDETRQueries, WholeNetwork
from export.checkpoint import (
    ExportError,
    HeadChoice,
    LoadedModel,
    head_class,
    load_classifier,
    load_detection,
    load_whole_network,
    open_checkpoint,
)
from export.classify import ClassifyLogits, ClassifyPostprocess
from export.depth import DepthPostprocess
from export.postprocess import YoloPostprocess
from export.rtdetr import RTDETRPostprocess
from export.semantic import SemanticPostprocess
from handler.image.decode import decode_image
from handler.pipeline import YoloPipeline
from handler.tasks import Task
from handler.tasks.classify import CLASSIFY
from handler.tasks.depth import DEPTH
from handler.tasks.detect import DETECT, OBB, POSE
from handler.tasks.rtdetr import RTDETR
from handler.tasks.segment import SEGMENT
from handler.tasks.semantic import SEMANTIC

Step = Callable[[str], AbstractContextManager]  # ``with step("what"):`` times and logs one check
Log = Callable[[str], None]
Loader = Callable[..., LoadedModel]  # (yolo, task, weights, file, seed, head) -> LoadedModel (export/checkpoint.py)


@dataclass(frozen=True)
class ExportTask:
    """How ``python -m export`` handles the models of one served task."""

    served: Task  # the handler's task object; its name is the metadata "task", its transform is the one checked
    heads: tuple[str, ...]  # the Ultralytics head classes (the model's last layer) of this task's models
    load: Loader  # the fused model and the facts its export needs
    network: Callable[[LoadedModel], nn.Module]  # the eager module that backbone.pt traces (export/backbone.py)
    postprocessor: Callable[[LoadedModel], nn.Module]  # the module to torch.jit.script into postprocess.pt
    checks: verify.Checks  # checks 2 and 3 on the written files (check 1, the trace, is every task's)
    describe_head: Callable[[LoadedModel], str]  # metadata "head", human-readable
    aoti: bool = False  # --format aoti supported

    @property
    def name(self) -> str:
        return self.served.name


def _detection_postprocessor(loaded: LoadedModel) -> nn.Module:
    return YoloPostprocess(
        loaded.nc, loaded.reg_max, loaded.strides, loaded.end2end, loaded.kpt_shape or (0, 0), loaded.kpt_decode,
        loaded.nm, loaded.angle_decode,
    )


def _detection(served: Task, heads: tuple[str, ...]) -> ExportTask:
    """A YOLO detection head: raw levels traced, decoded and NMS'd (or top-k) by ``export/postprocess.py``."""
    return ExportTask(
        served, heads, load_detection, RawHead, _detection_postprocessor, verify.DETECTION_CHECKS,
        lambda loaded: "one2one (NMS-free top-k)" if loaded.end2end else "one2many (NMS)", aoti=True,
    )


def _whole_network(loaded: LoadedModel) -> nn.Module:
    return WholeNetwork(loaded.model)


# In the handler registry's order (tests/test_export.py checks that both name the same tasks).
EXPORT_TASKS: dict[str, ExportTask] = {t.name: t for t in (
    _detection(DETECT, ("Detect", "v10Detect")),
    _detection(POSE, ("Pose", "Pose26")),
    _detection(SEGMENT, ("Segment", "Segment26")),
    _detection(OBB, ("OBB", "OBB26")),
    ExportTask(
        CLASSIFY, ("Classify",), load_classifier, lambda loaded: ClassifyLogits(loaded.model),
        lambda loaded: ClassifyPostprocess(loaded.nc), verify.CLASSIFY_CHECKS, lambda loaded: "Classify (softmax top-k)",
    ),
    ExportTask(
        SEMANTIC, ("SemanticSegment",), load_whole_network, _whole_network, lambda loaded: SemanticPostprocess(loaded.nc),
        verify_tasks.SEMANTIC_CHECKS, lambda loaded: "SemanticSegment (per-pixel argmax)",
    ),
    ExportTask(
        DEPTH, ("Depth",), load_whole_network, _whole_network, lambda loaded: DepthPostprocess(),
        verify_tasks.DEPTH_CHECKS, lambda loaded: "Depth (metres)",
    ),
    ExportTask(
        RTDETR, ("RTDETRDecoder",), load_whole_network, lambda loaded: RTDETRQueries(loaded.model),
        lambda loaded: RTDETRPostprocess(loaded.nc, loaded.num_queries), verify_tasks.RTDETR_CHECKS,
        lambda loaded: "RTDETRDecoder (NMS-free top-k)",
    ),
)}


def export_task(loaded: LoadedModel) -> ExportTask:
    """The entry of a loaded model's task."""
    try:
        return EXPORT_TASKS[loaded.task]
    except KeyError:
        raise ExportError(f"{loaded.path.name}: task {loaded.task!r} is not supported yet (supported: {', '.join(EXPORT_TASKS)})") from None


def task_of_head(head_type: str, ultralytics_task: str, weights: str) -> ExportTask:
    """The entry whose heads include ``head_type``; else an :class:`ExportError` that names what is supported (for
    Ultralytics' task ``ultralytics_task``, when we export that task with other heads)."""
    for task in EXPORT_TASKS.values():
        if head_type in task.heads:
            return task
    same = [t for t in EXPORT_TASKS.values() if t.name == ultralytics_task]
    if same:
        raise ExportError(f"{weights}: {ultralytics_task} head {head_type!r} is not supported yet "
                          f"(supported: {', '.join(same[0].heads)})")
    raise ExportError(f"{weights}: task '{ultralytics_task}' is not supported yet (supported: {', '.join(EXPORT_TASKS)})")


def load_model(weights: str, head: HeadChoice = "auto", seed: int = 0) -> LoadedModel:
    """Load ``weights`` (a ``.pt`` checkpoint, or a model ``.yaml`` built with ``seed``) for export, by the entry
    of its head's class. ``head``: the detection head of YOLO models that have two (``export/checkpoint.py``
    ``load_detection``); other models take ``auto`` only."""
    yolo, src = open_checkpoint(weights, seed)
    task = task_of_head(head_class(yolo), yolo.task, weights)
    return task.load(yolo, task.name, weights, src, seed, head)


def raw_network(loaded: LoadedModel) -> nn.Module:
    """The eager module that ``backbone.pt`` traces for ``loaded`` (and ``export.verify.check_trace`` compares)."""
    return export_task(loaded).network(loaded)


def run_checks(loaded: LoadedModel, pipeline: YoloPipeline, images: list[Path], step: Step, log: Log) -> None:
    """Checks 2 and 3 (and, for a task that has one, the transform check) of ``loaded``'s task on each image."""
    checks = export_task(loaded).checks
    if checks.transform is not None:
        with step(f"check {loaded.task} transform == Ultralytics"):
            shapes = [checks.transform(loaded, pipeline, decode_image(p.read_bytes())) for p in images]
        log(f"    pixel-equal to pre_transform ({', '.join(f'{h}x{w}' for h, w in shapes)})")
    for what, check in (("decode == Ultralytics' decode", checks.decode), ("pipeline == YOLO.predict", checks.predict)):
        with step(f"check {what}"):
            figures = [check(loaded, pipeline, p) for p in images]
        log("    " + ", ".join(f"{p.name}: {checks.figure(f)}" for p, f in zip(images, figures)))
        if checks.counts and sum(figures) == 0:
            log("    WARNING: nothing to compare (a random-weight model may detect nothing, or a segment model have "
                "only empty masks; try another --seed)")

