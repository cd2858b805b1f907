"""TorchServe handler for exported Ultralytics YOLO models: a thin adapter over ``handler/service.py``.

TorchServe calls :meth:`YoloHandler.initialize` once per worker and :meth:`YoloHandler.handle` once
per batch. Everything else is the service's: request parsing (``handler/request.py``), decoding
(``handler/image/decode.py``), each task's transform, postprocessor call and JSON (``handler/tasks/``), the
batched forward (``handler/pipeline.py``), the settings (``handler/config.py``) and the status codes
(``handler/errors.py``). It imports neither ultralytics nor ``export``: the worker runs from the
``.mar`` alone (``backbone.pt``, ``postprocess.pt``, ``metadata.json`` and this ``handler/`` package,
which ``torch-model-archiver --extra-files`` puts into the model directory).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handler.config import HandlerConfig, TrackingConfig
from handler.contract import ArtifactError
from handler.response import encode_response
from handler.runtime.device import CPU, is_cuda_error, select_device, set_threads
from handler.service import PERMANENT_LOAD_ERRORS, Answer, FailedModel, YoloService

logger = logging.getLogger(__name__)

# Names of the per-batch metrics (TorchServe metrics API; Prometheus at the metrics endpoint).
METRIC_PREPROCESS = "YoloPreprocessTime"
METRIC_INFERENCE = "YoloInferenceTime"
METRIC_POSTPROCESS = "YoloPostprocessTime"
METRIC_BATCH_SIZE = "YoloBatchSize"
METRIC_CPU_FALLBACK = "YoloCpuFallback"  # 1 when a GPU worker serves on CPU (handler.cpu_fallback)
METRIC_LOAD_FAILED = "YoloModelLoadFailed"  # per version: 1 when the model failed to load for good (FailedModel), 0 when it loaded
# One log line per batch (TorchServe's model_log.log): requests, those served, the forwards. batches_in_log reads it.
BATCH_LOG = "batch of %d request(s): %d served, forwards (n, h, w) %s"
_BATCH_LOG_LINE = re.compile(r"batch of (\d+) request\(s\): (\d+) served")


def batches_in_log(log: str) -> list[tuple[int, int]]:
    """``(requests, served)`` of each batch a worker log holds (the tests and benchmarks read batching from it)."""
    return [(int(n), int(served)) for n, served in _BATCH_LOG_LINE.findall(log)]


class YoloHandler(BaseHandler):
    def __init__(self) -> None:
        super().__init__()
        self.service: YoloService | FailedModel | None = None

    def initialize(self, context) -> None:
        """Load both exported files from the model directory; do not let BaseHandler load anything.

        A load that fails for good (:data:`PERMANENT_LOAD_ERRORS`: bad settings, bad files) leaves the worker up
        as a :class:`FailedModel`, which answers every request with the error (503); a CUDA error fails the load,
        and TorchServe retries it. The ``YoloModelLoadFailed`` gauge says which of the two this worker is."""
        yaml = getattr(context, "model_yaml_config", None) or {}
        manifest = getattr(context, "manifest", None) or {}
        version = (manifest.get("model") or {}).get("modelVersion")  # what TorchServe routes /NAME/VERSION by
        name = getattr(context, "model_name", None)
        self.context = context
        try:
            config = HandlerConfig.from_dict(yaml.get("handler"))
            tracking = TrackingConfig.from_dict(yaml.get("tracking"))
            t0 = time.perf_counter()
            service, device = self._load(context, config, tracking, version)
        except PERMANENT_LOAD_ERRORS as e:
            self.service = FailedModel.from_load_error(e, name, version)
            logger.error("MODEL LOAD FAILED, this worker answers 503 to every request: %s", self.service.error.message, exc_info=True)
            _record(context, METRIC_LOAD_FAILED, 1, unit="count", dimensions=_version_dimension(version), at_load=True)
            self.initialized = True
            return
        warning = tracking.worker_warning(yaml)
        if warning:
            logger.warning(warning)
        pipeline, info = service.pipeline, service.info
        t1 = time.perf_counter()
        if config.warmup:
            pipeline.warmup(config.warmup)
        logger.info(
            "loaded %s (%s, %d classes) on %s half=%s imgsz=%s letterbox=%s threads=%d in %.2f s, warmup %d runs %.2f s; "
            "handler package %s",
            info.name, info.task, pipeline.nc, device, pipeline.half, pipeline.imgsz, pipeline.letterbox_mode,
            torch.get_num_threads(), t1 - t0, config.warmup, time.perf_counter() - t1,
            Path(sys.modules[YoloService.__module__].__file__).parent,
        )
        _record(context, METRIC_LOAD_FAILED, 0, unit="count", dimensions=_version_dimension(version), at_load=True)
        self.service, self.device = service, device
        self.initialized = True

    def _load(self, context, config: HandlerConfig, tracking: TrackingConfig, version: str | None) -> tuple[YoloService, torch.device]:
        """The service on the worker's device. A GPU worker whose CUDA is unusable (no CUDA, a driver error or
        out of memory while loading) fails the load with the CUDA error, or, with ``cpu_fallback: true``,
        serves on CPU with a loud log line and the ``YoloCpuFallback`` metric."""
        props = context.system_properties
        load = lambda device: YoloService.from_dir(  # noqa: E731
            props["model_dir"], config, device, name=getattr(context, "model_name", None), version=version, tracking=tracking
        )
        yaml = getattr(context, "model_yaml_config", None)
        try:
            device = select_device(props.get("gpu_id"))
            set_threads(config.torch_threads, device, yaml)
            return load(device), device
        except ArtifactError:  # the files, not the device (a RuntimeError too)
            raise
        except RuntimeError as e:  # CudaUnavailableError and torch.cuda.OutOfMemoryError among them
            if not is_cuda_error(e):
                raise
            if not config.cpu_fallback:
                raise RuntimeError(
                    f"the model cannot load on GPU {props.get('gpu_id')}: {e}. Set `cpu_fallback: true` in model-config.yaml "
                    "handler: to serve on CPU instead"
                ) from e
            logger.error("CPU FALLBACK: GPU %s is unusable (%s); this worker serves on CPU (handler.cpu_fallback)", props.get("gpu_id"), e)
            _record(context, METRIC_CPU_FALLBACK, 1, unit="count", at_load=True)
            set_threads(config.torch_threads, CPU, yaml)
            return load(CPU), CPU

    def handle(self, data: list, context) -> list[str]:
        """One JSON text per request: the task's results, or ``{"error": ...}`` with that request's 4xx (every
        request a 503 when the model failed to load). A describe request (``GET /models/NAME?customized=true``)
        gets :meth:`YoloService.describe`, or the load error."""
        if _header(context, 0, "describe") == "True":
            answer = self.service.describe_answer()
            answer.body["worker_pid"] = os.getpid()  # which worker answered (tools.rollout drains each worker of a version)
            return _respond(context, [answer])
        batch = self.service.handle(
            data,
            [_content_type(context, idx) for idx in range(len(data))],
            [_all_headers(context, idx) for idx in range(len(data))],
        )
        texts = _respond(context, batch.answers)
        logger.info(BATCH_LOG, len(data), batch.served, batch.times.forwards)
        _record(context, METRIC_BATCH_SIZE, len(data), unit="count")
        if batch.served:
            _record(context, METRIC_PREPROCESS, batch.preprocess_ms)
            _record(context, METRIC_INFERENCE, batch.times.inference)
            _record(context, METRIC_POSTPROCESS, batch.times.postprocess)
        return texts


def _respond(context, answers: list[Answer]) -> list[str]:
    """Each answer's status, content type and headers set on the context; their JSON texts, in order."""
    for idx, answer in enumerate(answers):
        if answer.status != 200:
            context.set_response_status(answer.status, answer.phrase, idx)
        context.set_response_content_type(idx, "application/json")
        for key, value in answer.headers.items():  # a tracked frame's X-Stream-Id
            context.set_response_header(idx, key, value)
    return [encode_response(a.body) for a in answers]


def _version_dimension(version: str | None) -> list[Dimension]:
    """``ModelVersion``: a gauge per version (a rollout serves two versions of one model name side by side)."""
    return [Dimension("ModelVersion", str(version or "unknown"))]


def _header(context, idx: int, name: str):
    """A request header (or TorchServe's per-parameter header dict) of request ``idx``, None when absent."""
    try:
        return context.get_request_header(idx, name)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def _all_headers(context, idx: int) -> dict | None:
    """Every header of request ``idx`` as TorchServe recorded it (the client's spelling), None when absent."""
    try:
        return context.get_all_request_header(idx)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def _content_type(context, idx: int) -> str | None:
    """The Content-Type TorchServe recorded for the ``body`` parameter, when there is one."""
    header = _header(context, idx, "body")
    if isinstance(header, dict):
        return header.get("content-type")
    return None


def _record(context, name: str, value: float, unit: str = "ms", dimensions: list[Dimension] | None = None, at_load: bool = False) -> None:
    """A gauge through TorchServe's metrics API (absent in some test contexts); TorchServe adds the dimensions
    ``ModelName`` and ``Level`` to ``dimensions``. ``at_load``: recorded in ``initialize``, where TorchServe 0.12's
    request id is one string, not a dict by batch index, and asking for index 0 raises TypeError inside it."""
    metrics = getattr(context, "metrics", None)
    if metrics is None:
        return
    idx = None if at_load else 0
    try:
        if unit == "ms":
            metrics.add_time(name, value, idx=idx, unit="ms", dimensions=list(dimensions or []))
        else:
            metrics.add_metric(name, value, unit, idx=idx, dimensions=list(dimensions or []), metric_type=MetricTypes.GAUGE)
    except Exception:  # noqa: BLE001 - a metric must never fail a request
        logger.warning("could not record metric %s", name, exc_info=True)
