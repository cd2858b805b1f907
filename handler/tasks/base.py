"""What every task object provides, and the values that travel between the pipeline and a task.

A task (``handler/tasks/<family>.py``) owns, for the models of its metadata ``task``:

* the request parameters it takes, their parsing and validation (:meth:`Task.options`);
* the image transform that makes the network input (:meth:`Task.transform`), and its geometry alone for
  ``preprocess: device`` (:meth:`Task.placement`; :class:`Letterboxed` and :class:`Stretched` give both);
* the scripted postprocessor's inputs and outputs (:meth:`Task.postprocess`);
* the JSON of one answer (:meth:`Task.to_json`);
* for tasks that track objects over a video stream (``trackable``, the detection family): the tracker's
  input (:meth:`Task.tracker_detections`) and what a tracked frame shows (:meth:`Task.with_tracks`).

The pipeline (``handler/pipeline.py``), the service (``handler/service.py``), the export check and the
benchmark ask the task object; none of them compares task names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import numpy as np
from torch import Tensor

from handler import request_values as p
from handler.image.classify_crop import CropParams
from handler.image.letterbox import LETTERBOX_MODES, LetterboxParams, letterbox, letterbox_params
from handler.image.stretch import stretch, stretch_params
from handler.response import ModelInfo

ImageParams = Union[LetterboxParams, CropParams]  # where an image went in the network input
# uint8[H, W, 3] BGR -> (uint8[h, w, 3] BGR network input, its geometry)
ImageTransform = Callable[[np.ndarray], "tuple[np.ndarray, ImageParams]"]
# (orig_h, orig_w) -> where an image of that size goes in the network input (handler/image/letterbox_torch.py
# ``place`` then moves its pixels there on the model's device)
Placement = Callable[[tuple[int, int]], LetterboxParams]


@dataclass(frozen=True)
class ResponseOptions:
    """Per-request choices of what a response carries (not of what is computed)."""

    polygons: bool = False  # segment models: add each mask's outline as "polygon"
    full_precision: bool = False  # coordinates and scores unrounded (handler/response.py)


def full_precision(params: dict[str, Any]) -> bool:
    """A request's ``full_precision`` (``true``/``false``, ``1``/``0``; default false), which the tasks whose
    answers hold coordinates or scores take."""
    return p.boolean("full_precision", params["full_precision"]) if "full_precision" in params else False


@dataclass
class PreparedImage:
    """One transformed image, ready to batch: ``pixels: uint8[H, W, 3]`` BGR (the network input before
    the RGB swap and /255), its geometry, and the postprocessor options of its request (the task's type:
    ``Thresholds`` for the detection family, ``TopK`` for classify)."""

    pixels: np.ndarray
    params: ImageParams
    options: Any


class Task:
    """Base of the task objects; see the module docstring. Subclasses set the class attributes."""

    name: str = ""  # the metadata "task" this object serves
    parameters: tuple[str, ...] = ()  # request parameters of this task
    foreign: str = ""  # why a parameter of another task is refused: "... {foreign}; this model's parameters are ..."
    results_key: str = ""  # the response key that holds the results ("detections", "top")
    trackable: bool = False  # requests may track objects over a stream (handler/video.py)
    letterbox: bool = False  # the transform is the letterbox, so metadata.json and model-config.yaml name its mode

    def default_options(self, config: Any = None) -> Any:
        """The postprocessor options of a request that sets no parameter (``config``: a ``HandlerConfig``)."""
        raise NotImplementedError

    def options(self, params: dict[str, Any], defaults: Any, names: Sequence[str]) -> tuple[Any, ResponseOptions | None]:
        """``params`` (this task's parameters only, values as they arrived) over ``defaults`` -> validated
        postprocessor options and response options; raises ``InvalidParameter``."""
        raise NotImplementedError

    def transform(self, imgsz: int | Sequence[int], stride: int, letterbox_mode: str | None) -> ImageTransform:
        raise NotImplementedError

    def placement(self, imgsz: int | Sequence[int], stride: int, letterbox_mode: str | None) -> Placement | None:
        """The geometry of :meth:`transform` with these settings, without pixels, for ``preprocess: device``;
        None: the transform has no device version (the pipeline then refuses ``preprocess: device``)."""
        return None

    def postprocess(self, module: Any, feats: list[Tensor], items: list[PreparedImage], nc: int) -> list[Any]:
        """Run the scripted postprocessor ``module`` on the backbone outputs ``feats`` of one batch of
        equal-shape inputs (``nc`` classes); one output per item, on CPU."""
        raise NotImplementedError

    def to_json(self, output: Any, info: ModelInfo, options: ResponseOptions | None) -> Any:
        """One item's output -> the value of ``results_key`` in its response."""
        raise NotImplementedError

    def tracking_defaults(self, config: Any, conf: float) -> Any:
        """The postprocessor options of a tracked request that sets no parameter (``conf``: the
        ``tracking.conf`` default). Trackable tasks only."""
        raise NotImplementedError

    def tracker_detections(self, output: Any) -> Any:
        """One item's output -> the tracker's input, ``handler.tracking.FrameDetections`` (``rows`` = this
        output's row index). Trackable tasks only."""
        raise NotImplementedError

    def with_tracks(self, output: Any, tracks: Any, height: int, width: int) -> Any:
        """One item's output and the tracker's ``handler.tracking.FrameTracks`` for it -> the output a tracked
        frame shows (as ``YOLO.track``), same type, each result with its track ID. Trackable tasks only."""
        raise NotImplementedError


class Letterboxed(Task):
    """A task whose transform is the one letterbox (``handler/image/letterbox.py``), in the model's mode."""

    letterbox = True

    def transform(self, imgsz: int | Sequence[int], stride: int, letterbox_mode: str | None) -> ImageTransform:
        if letterbox_mode not in LETTERBOX_MODES:
            raise ValueError(f"letterbox must be one of {LETTERBOX_MODES}, got {letterbox_mode!r}")
        return lambda image: letterbox(image, imgsz, stride, letterbox_mode)

    def placement(self, imgsz: int | Sequence[int], stride: int, letterbox_mode: str | None) -> Placement:
        return lambda hw: letterbox_params(hw, imgsz, stride, letterbox_mode)  # type: ignore[arg-type]


class Stretched(Task):
    """A task whose transform stretches every image to ``imgsz`` (``handler/image/stretch.py``), as Ultralytics'
    predictors with ``scale_fill`` do; every input gets that shape, and ``letterbox_mode`` is not used."""

    letterbox = False

    def transform(self, imgsz: int | Sequence[int], stride: int, letterbox_mode: str | None) -> ImageTransform:
        return lambda image: stretch(image, imgsz)

    def placement(self, imgsz: int | Sequence[int], stride: int, letterbox_mode: str | None) -> Placement:
        return lambda hw: stretch_params(hw, imgsz)
