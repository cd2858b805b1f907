"""TorchServe handler for exported Ultralytics YOLO detect, pose, segment, OBB and classify models.

Thin on purpose: request parsing is ``handler/request.py``, decoding ``handler/decode.py``,
letterbox + batching + the two TorchScript files ``handler/pipeline.py`` (classify models:
``handler/classify.py``; :func:`task_parts` is the one place that picks by task), the JSON
``handler/response.py``, the settings ``handler/config.py`` and the status codes
``handler/errors.py``. It imports neither ultralytics nor ``export``: the worker runs from the
``.mar`` alone (``backbone.pt``, ``postprocess.pt``, ``metadata.json`` and this ``handler/`` package,
which ``torch-model-archiver --extra-files`` puts into the model directory).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import cv2
import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handler.classify import ClassifyPipeline, TopK, classify_json
from handler.config import HandlerConfig
from handler.decode import ImageDecodeError, ImageTooLargeError, decode_image
from handler.errors import InternalError, InvalidImage, RequestError, from_decode_error
from handler.pipeline import Prepared, Thresholds, YoloPipeline, load_artifacts
from handler.request import PreparedRequest, parse_served_request
from handler.response import ModelInfo, ResponseOptions, encode_response, image_json

logger = logging.getLogger(__name__)

# Names of the per-batch metrics (TorchServe metrics API; Prometheus at the metrics endpoint).
METRIC_PREPROCESS = "YoloPreprocessTime"
METRIC_INFERENCE = "YoloInferenceTime"
METRIC_POSTPROCESS = "YoloPostprocessTime"
METRIC_BATCH_SIZE = "YoloBatchSize"


def select_device(gpu_id: int | None) -> torch.device:
    """``cuda:{gpu_id}`` when CUDA is available (and TorchServe gave a GPU id), CPU otherwise."""
    if torch.cuda.is_available() and gpu_id is not None:
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def cpu_threads(device: torch.device, context) -> int:
    """The ``torch_threads: 0`` (auto) choice: on CPU, the cores shared among the model's workers.

    TorchServe starts every worker with OMP_NUM_THREADS=1, which leaves cores idle when there are
    fewer workers than cores. 0 means "leave torch alone" (CUDA, where the GPU does the work).
    """
    if device.type != "cpu":
        return 0
    yaml = getattr(context, "model_yaml_config", None) or {}
    workers = yaml.get("maxWorkers") or yaml.get("minWorkers") or 1
    return max(1, (os.cpu_count() or 1) // max(1, int(workers)))


def task_parts(task: str, config: HandlerConfig):
    """The task dispatch: ``(pipeline class, per-request defaults, response builder)`` for ``task``."""
    if task == "classify":
        return ClassifyPipeline, TopK(), classify_json
    return YoloPipeline, Thresholds(conf=config.conf, iou=config.iou, max_det=config.max_det), image_json


class YoloHandler(BaseHandler):
    def __init__(self) -> None:
        super().__init__()
        self.pipeline: YoloPipeline | None = None
        self.config: HandlerConfig | None = None
        self.defaults: Thresholds | TopK = Thresholds()
        self.info: ModelInfo | None = None
        self.to_json = image_json

    def initialize(self, context) -> None:
        """Load both TorchScript files from the model directory; do not let BaseHandler load anything."""
        props = context.system_properties
        config = HandlerConfig.from_dict((getattr(context, "model_yaml_config", None) or {}).get("handler"))
        device = select_device(props.get("gpu_id"))
        threads = config.torch_threads or cpu_threads(device, context)
        if threads:
            torch.set_num_threads(threads)
        half = config.half
        if half and device.type != "cuda":
            logger.warning("handler.half is true but the worker runs on %s; FP16 is CUDA-only, serving in FP32", device)
            half = False
        t0 = time.perf_counter()
        backbone, postprocess, meta = load_artifacts(props["model_dir"], device)
        pipeline_cls, defaults, to_json = task_parts(meta["task"], config)
        pipeline = pipeline_cls(
            backbone,
            postprocess,
            meta,
            device,
            half=half,
            imgsz=list(config.imgsz) if config.imgsz else None,
            letterbox_mode=config.letterbox,
        )
        config.check_imgsz(pipeline.stride)
        meta = pipeline.metadata
        self.info = ModelInfo(
            name=getattr(context, "model_name", None) or meta["name"],
            task=meta["task"],
            names=pipeline.names,
            nkpt=meta["kpt_shape"][0] if meta.get("kpt_shape") else 0,
        )
        t1 = time.perf_counter()
        if config.warmup:
            pipeline.warmup(config.warmup)
        logger.info(
            "loaded %s (%s, %d classes) on %s half=%s imgsz=%s letterbox=%s threads=%d in %.2f s, warmup %d runs %.2f s; "
            "handler package %s",
            self.info.name, self.info.task, pipeline.nc, device, half, pipeline.imgsz, pipeline.letterbox_mode,
            torch.get_num_threads(), t1 - t0, config.warmup, time.perf_counter() - t1,
            Path(sys.modules[YoloPipeline.__module__].__file__).parent,
        )
        self.config, self.pipeline, self.device = config, pipeline, device
        self.defaults, self.to_json = defaults, to_json
        self.context = context
        self.initialized = True

    def handle(self, data: list, context) -> list[str]:
        """One JSON text per request: detections (classify: top classes), or ``{"error": ...}`` with that request's 4xx."""
        results: list[dict | None] = [None] * len(data)
        items: list[PreparedRequest] = []
        for idx, row in enumerate(data):
            t0 = time.perf_counter()
            try:
                prepared, (h, w), options = self._prepare(row, _content_type(context, idx))
            except RequestError as e:
                self._reject(context, idx, e, results)
                continue
            except Exception:  # noqa: BLE001 - our bug; this request alone fails, the batch goes on
                logger.exception("request %d of the batch failed unexpectedly", idx)
                self._reject(context, idx, InternalError("unexpected error while reading the request"), results)
                continue
            items.append(PreparedRequest(idx, prepared, w, h, (time.perf_counter() - t0) * 1000, options))
        forwards = self._infer(items, results, context) if items else []
        logger.info("batch of %d request(s): %d served, forwards (n, h, w) %s", len(data), len(items), forwards)
        _record(context, METRIC_BATCH_SIZE, len(data), unit="count")
        for idx in range(len(data)):
            context.set_response_content_type(idx, "application/json")
        return [encode_response(r) for r in results]

    def _prepare(self, row, content_type: str | None) -> tuple[Prepared, tuple[int, int], ResponseOptions]:
        image_bytes, thresholds, options = parse_served_request(row, self.defaults, self.pipeline.names, content_type)
        try:
            image = decode_image(image_bytes, self.config.max_image_pixels)
        except (ImageDecodeError, ImageTooLargeError) as e:
            raise from_decode_error(e) from None
        except cv2.error as e:  # OpenCV can throw on malformed files instead of returning None
            raise InvalidImage(f"could not decode the image: {str(e).strip().splitlines()[-1]}") from None
        return self.pipeline.prepare(image, thresholds), image.shape[:2], options

    def _infer(self, items: list[PreparedRequest], results: list, context) -> list[tuple[int, int, int]]:
        """Run the good requests in one call; fill their result slots; return the forwards (n, h, w)."""
        outputs, masks, times = self.pipeline.infer_with_masks([it.prepared for it in items])
        n = len(items)
        for it, dets, image_masks in zip(items, outputs, masks):
            speed = {"preprocess": it.preprocess_ms, "inference": times.inference / n, "postprocess": times.postprocess / n}
            results[it.idx] = self.to_json(dets, it.width, it.height, self.info, speed, image_masks, it.options)
        _record(context, METRIC_PREPROCESS, sum(it.preprocess_ms for it in items))
        _record(context, METRIC_INFERENCE, times.inference)
        _record(context, METRIC_POSTPROCESS, times.postprocess)
        return times.forwards

    @staticmethod
    def _reject(context, idx: int, error: RequestError, results: list) -> None:
        logger.info("request %d of the batch rejected: %d %s: %s", idx, error.status, error.type, error.message)
        context.set_response_status(int(error.status), error.phrase, idx)
        results[idx] = error.body()


def _content_type(context, idx: int) -> str | None:
    """The Content-Type TorchServe recorded for the ``body`` parameter, when there is one."""
    try:
        header = context.get_request_header(idx, "body")
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    if isinstance(header, dict):
        return header.get("content-type")
    return None


def _record(context, name: str, value: float, unit: str = "ms") -> None:
    """A per-batch gauge through TorchServe's metrics API (absent in some test contexts)."""
    metrics = getattr(context, "metrics", None)
    if metrics is None:
        return
    try:
        if unit == "ms":
            metrics.add_time(name, value, idx=0, unit="ms", dimensions=[])
        else:
            metrics.add_metric(name, value, unit, idx=0, dimensions=[], metric_type=MetricTypes.GAUGE)
    except Exception:  # noqa: BLE001 - a metric must never fail a request
        logger.warning("could not record metric %s", name, exc_info=True)
