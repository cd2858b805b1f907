"""The public service: request bytes (or parsed request rows) -> response bodies and statuses.

No TorchServe here. The TorchServe handler (``handler/yolo_handler.py``) is a thin adapter over
:class:`YoloService`; the tests, the benchmark's in-process level and the C++ comparison call it
directly, and so can any other frontend::

    service = YoloService.from_dir("exports/yolo")
    answer = service.predict(Path("bus.jpg").read_bytes(), conf=0.5)   # Answer(status=200, body={...})

A batch (:meth:`YoloService.handle`) answers every request on its own: a request that cannot be read
gets its own 4xx (or a 500 for our own bug), and the others still run in one batched forward.

A model that cannot load for good (:data:`PERMANENT_LOAD_ERRORS`) is served by :class:`FailedModel`, with the
same ``handle``/``describe_answer``/``predict``: every request gets the load error as a 503.

Video streams (``handler/video.py``, ``docs/tracking.md``): a request with ``track=bytetrack|botsort``
starts a stream, ``stream=<id>`` continues it, ``end=true`` ends it; its answer carries ``"stream"`` and a
``track_id`` per detection, and the header ``X-Stream-Id`` (:attr:`Answer.headers`)::

    first = service.predict(frame0_png, track="botsort")           # first.body["stream"]["id"] == "trk-..."
    nxt = service.predict(frame1_png, stream=first.body["stream"]["id"])
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import torch

from handler import oip
from handler.config import HandlerConfig, TrackingConfig
from handler.contract import ArtifactError
from handler.errors import InternalError, InvalidImage, ModelLoadFailed, RequestError, from_decode_error
from handler.image.decode import ImageDecodeError, ImageTooLargeError, decode_image
from handler.pipeline import StageTimes, YoloPipeline
from handler.request import parse_request
from handler.response import ModelInfo, encode_response, response_body
from handler.runtime.artifacts import load_artifacts
from handler.runtime.device import threads_beside
from handler.tasks import PreparedImage, ResponseOptions
from handler.video import STREAM_HEADER, StreamPlan, TrackedFrame, VideoStreams

logger = logging.getLogger(__name__)


@dataclass
class Answer:
    """One request's answer: HTTP status, its reason phrase, the JSON body and response headers of its own
    (a tracked frame's ``X-Stream-Id``)."""

    status: int
    body: dict
    phrase: str = "OK"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def error(cls, error: RequestError) -> "Answer":
        return cls(int(error.status), error.body(), error.phrase)


@dataclass
class PreparedRequest:
    """A request of the batch that passed parsing and decoding, waiting for the batched forward."""

    idx: int  # position in the batch
    prepared: PreparedImage | None  # transformed pixels, geometry, the task's options; None: a stream's end without a frame
    width: int  # original image size
    height: int
    preprocess_ms: float  # parse + decode + transform of this request
    options: ResponseOptions | None = None  # what the response carries besides the results
    tracked: TrackedFrame | None = None  # a tracked request's stream and frame


@dataclass
class BatchResult:
    """The answers of one batch, in request order, and what the batch cost."""

    answers: list[Answer]
    preprocess_ms: float = 0.0  # summed over the served requests
    times: StageTimes = field(default_factory=StageTimes)
    served: int = 0  # requests that reached the forward


class YoloService:
    """An exported model, ready to answer requests."""

    def __init__(
        self,
        pipeline: YoloPipeline,
        config: HandlerConfig = HandlerConfig(),
        name: str | None = None,
        version: str | None = None,
        tracking: TrackingConfig = TrackingConfig(),
    ) -> None:
        self.pipeline = pipeline
        self.config = config
        self.task = pipeline.task
        self.info = ModelInfo.from_metadata(pipeline.metadata, name, version, precision=pipeline.precision)
        self.defaults = self.task.default_options(config)
        self.tracking = tracking
        self.streams = VideoStreams(tracking, self.task.trackable, self.task.name)  # this process's video streams
        self.tracked_defaults = self.task.tracking_defaults(config, tracking.conf) if self.task.trackable else None

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        config: HandlerConfig = HandlerConfig(),
        device: torch.device | str = "cpu",
        name: str | None = None,
        version: str | None = None,
        tracking: TrackingConfig = TrackingConfig(),
    ) -> "YoloService":
        """Load ``backbone.pt`` + ``postprocess.pt`` from ``model_dir`` with the ``handler:`` settings
        ``config`` (and the ``tracking:`` ones); raises ``ValueError`` (bad settings) or ``ArtifactError`` (bad
        files) at load time."""
        device = torch.device(device)
        half = config.half
        if half and device.type != "cuda":
            logger.warning("handler.half is true but the worker runs on %s; FP16 is CUDA-only, serving in FP32", device)
            half = False
        backbone, postprocess, meta = load_artifacts(model_dir, device, config.runtime)
        if getattr(backbone, "threads", None):  # a runtime with its own thread pool took the worker's threads
            threads_beside(backbone.threads)
        config.check_model(meta)
        pipeline = YoloPipeline(
            backbone,
            postprocess,
            meta,
            device,
            half=half,
            imgsz=list(config.imgsz) if config.imgsz else None,
            letterbox_mode=config.letterbox,
            preprocess=config.preprocess,
        )
        return cls(pipeline, config, name, version, tracking)

    def prepare(
        self, row: Any, content_type: str | None = None, idx: int = 0, headers: Mapping[str, Any] | None = None
    ) -> PreparedRequest:
        """Parse, decode and transform one request row; raises :class:`RequestError` for a bad request.

        A tracked request's stream is checked before its frame is decoded (a lost stream is refused at once)
        and opened after (a frame that does not decode leaves the stream as it was)."""
        t0 = time.perf_counter()
        parsed = parse_request(
            row, self.task, self.defaults, self.pipeline.names, content_type,
            tracked_defaults=self.tracked_defaults, stream_header=oip.header(headers, STREAM_HEADER),
        )
        plan: StreamPlan | None = self.streams.check(parsed.stream) if parsed.stream is not None else None
        if parsed.image is None:  # the end of a stream without a last frame (the parser allows nothing else)
            tracked = self.streams.open(plan, None)
            return PreparedRequest(idx, None, 0, 0, (time.perf_counter() - t0) * 1000, parsed.response, tracked)
        try:
            image = decode_image(parsed.image, self.config.max_image_pixels)
        except (ImageDecodeError, ImageTooLargeError) as e:
            raise from_decode_error(e) from None
        except cv2.error as e:  # OpenCV can throw on malformed files instead of returning None
            raise InvalidImage(f"could not decode the image: {str(e).strip().splitlines()[-1]}") from None
        prepared = self.pipeline.prepare(image, parsed.options)
        tracked = self.streams.open(plan, image) if plan is not None else None
        h, w = image.shape[:2]
        return PreparedRequest(idx, prepared, w, h, (time.perf_counter() - t0) * 1000, parsed.response, tracked)

    def infer(self, items: list[PreparedRequest]) -> tuple[list[dict | RequestError], StageTimes]:
        """The response bodies of prepared requests, run in one call of the pipeline; a request whose answer
        cannot be given as asked (e.g. ``encoding=float32`` over the response limit) gets its error instead."""
        outputs, times = self.pipeline.infer([it.prepared for it in items])
        n = max(1, len(items))
        bodies: list[dict | RequestError] = []
        for it, out in zip(items, outputs):  # request order: two frames of one stream are tracked in order
            speed = {"preprocess": it.preprocess_ms, "inference": times.inference / n, "postprocess": times.postprocess / n}
            if it.tracked is not None:
                t0 = time.perf_counter()
                try:
                    tracks = self.streams.track(it.tracked, self.task.tracker_detections(out))
                    out = self.task.with_tracks(out, tracks, it.height, it.width)
                except Exception:  # noqa: BLE001 - our bug; this frame alone fails, the batch and the other streams go on
                    logger.exception("tracking frame %d of stream %s failed", it.tracked.stream.frames + 1, it.tracked.stream.id)
                    bodies.append(InternalError("unexpected error while tracking this frame"))
                    continue
                speed["tracking"] = (time.perf_counter() - t0) * 1000
            try:
                results = self.task.to_json(out, self.info, it.options)
            except RequestError as e:
                bodies.append(e)
                continue
            body = response_body(self.info, it.width, it.height, self.task.results_key, results, speed)
            bodies.append(body if it.tracked is None else _with_stream(body, it.tracked.describe()))
        return bodies, times

    def handle(
        self,
        rows: Sequence[Any],
        content_types: Sequence[str | None] | None = None,
        headers: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> BatchResult:
        """Answer a batch of request rows (TorchServe's layout, see ``handler/request.py``).

        A row whose body is an Open Inference Protocol (KServe v2) inference request (``handler/oip.py``;
        ``headers``: each request's headers, for the binary data extension) gets its answer in v2 shape:
        the response JSON inside a v2 response, or ``{"error": "<message>"}`` with its own status.
        """
        content_types = content_types or [None] * len(rows)
        headers = headers or [None] * len(rows)
        answers: list[Answer | None] = [None] * len(rows)
        expired = self.streams.expire_idle()
        if expired:
            logger.info("%d stream(s) expired after %g s without a frame", len(expired), self.tracking.idle_seconds)
        v2: dict[int, oip.V2Request] = {}
        items: list[PreparedRequest] = []
        for idx, row in enumerate(rows):
            content_type = content_types[idx]
            try:
                request = oip.parse_v2_request(row, headers[idx])
            except RequestError as e:  # a malformed v2 body
                answers[idx] = self._reject(idx, e, v2=True)
                continue
            if request is not None:
                v2[idx] = request
                row, content_type = request.as_row(), None  # raw image bytes now, whatever the Content-Type said
            try:
                item = self.prepare(row, content_type, idx, headers[idx])
                if item.prepared is None:  # a stream's end without a frame: answered here, no forward
                    answers[idx] = self._stream_answer(_with_stream(self._info_body(), item.tracked.describe()), item)
                else:
                    items.append(item)
            except RequestError as e:
                answers[idx] = self._reject(idx, e)
            except Exception:  # noqa: BLE001 - our bug; this request alone fails, the batch goes on
                logger.exception("request %d of the batch failed unexpectedly", idx)
                answers[idx] = self._reject(idx, InternalError("unexpected error while reading the request"))
        result = BatchResult(answers=[], served=len(items), preprocess_ms=sum(it.preprocess_ms for it in items))
        if items:
            bodies, result.times = self.infer(items)
            for it, body in zip(items, bodies):
                answers[it.idx] = self._reject(it.idx, body) if isinstance(body, RequestError) else self._stream_answer(body, it)
        for idx, request in v2.items():
            answers[idx] = self._v2_answer(answers[idx], request)
        result.answers = answers  # type: ignore[assignment]  # every slot is filled now
        return result

    def describe(self) -> dict:
        """What a client needs to know to call this model (TorchServe's ``GET /models/NAME?customized=true``
        shows it as ``customizedMetadata``): its task, class names, request parameters and input size, and the
        runtime and precision that answer (``precision`` other than fp32: not equal to Ultralytics)."""
        meta = self.pipeline.metadata
        return {
            "model": self.info.name,
            "model_version": self.info.version,
            "task": self.info.task,
            "names": list(self.info.names),
            "parameters": list(self.task.parameters),
            "imgsz": list(self.pipeline.imgsz) if not isinstance(self.pipeline.imgsz, int) else [self.pipeline.imgsz] * 2,
            "letterbox": self.pipeline.letterbox_mode,
            "kpt_shape": meta.get("kpt_shape"),
            "format": meta.get("format"),
            "runtime": self.pipeline.runtime,
            "precision": self.info.precision,
            "contract": meta.get("contract"),
            "exported_with": meta.get("versions"),
            "tracking": self._describe_tracking(),
            # Open Inference Protocol model metadata: TorchServe's REST frontend answers no GET /v2/models/NAME
            "v2": oip.v2_model_metadata(self.info.name, self.info.version, meta),
        }

    def describe_answer(self) -> Answer:
        """The describe request's answer: 200 with :meth:`describe`."""
        return Answer(int(HTTPStatus.OK), self.describe())

    def _describe_tracking(self) -> dict | None:
        """How to stream video to this model (None: it does not track, or tracking is off)."""
        if not (self.task.trackable and self.tracking.enabled):
            return None
        return {
            "parameters": ["track", "stream", "end"],
            "trackers": {"bytetrack": asdict(self.tracking.bytetrack), "botsort": asdict(self.tracking.botsort)},
            "default_tracker": self.tracking.tracker,
            "conf": self.tracking.conf,
            "max_streams": self.tracking.max_streams,
            "idle_seconds": self.tracking.idle_seconds,
            "header": STREAM_HEADER,
        }

    def _info_body(self) -> dict:
        """The keys every answer starts with (an answer without a frame has nothing else)."""
        return {"model": self.info.name, "model_version": self.info.version, "task": self.info.task}

    @staticmethod
    def _stream_answer(body: dict, item: PreparedRequest) -> Answer:
        """200 with ``body``; a tracked request's answer also carries its stream id as a response header."""
        headers = {} if item.tracked is None else {STREAM_HEADER: item.tracked.stream.id}
        return Answer(int(HTTPStatus.OK), body, headers=headers)

    def _v2_answer(self, answer: Answer, request: oip.V2Request) -> Answer:
        """A plain answer -> the same answer in v2 shape (the result JSON text inside the ``result`` output)."""
        if answer.status != HTTPStatus.OK:
            return Answer(answer.status, oip.v2_error(answer.body["error"]["message"]), answer.phrase)
        body = oip.v2_response(encode_response(answer.body), self.info.name, self.info.version, request.request_id)
        return Answer(answer.status, body, answer.phrase, answer.headers)

    def predict(self, image: bytes, **params: Any) -> Answer:
        """One request: the encoded image file and its parameters (``conf=0.5``, ``classes="person"``, ...)."""
        return self.handle([{"body": bytearray(image), **params}]).answers[0]

    @staticmethod
    def _reject(idx: int, error: RequestError, v2: bool = False) -> Answer:
        logger.info("%srequest %d of the batch rejected: %d %s: %s", "v2 " if v2 else "", idx, error.status, error.type, error.message)
        if v2:
            return Answer(int(error.status), oip.v2_error(error.message), error.phrase)
        return Answer.error(error)


# Load errors that a retry cannot fix: bad settings (``ValueError`` from ``handler/config.py``, ``check_model`` and the
# pipeline), missing, corrupt or foreign files, another contract version, an unknown task (``ArtifactError``). A CUDA
# error (out of memory, a busy device) is not among them: that load fails, and TorchServe retries it.
PERMANENT_LOAD_ERRORS: tuple[type[Exception], ...] = (ValueError, ArtifactError)


class FailedModel:
    """What a worker serves when its model cannot load for good (:data:`PERMANENT_LOAD_ERRORS`): every request of
    a batch, and the describe request, get :class:`ModelLoadFailed` (503) with the load error and what to do.

    Without it the worker would die at load, TorchServe would restart it for ever, and a request would wait in
    the queue unanswered; with it the worker answers at once, and readiness checks (``yolo-ts-serve``,
    ``deploy/ready.py``, ``tools.rollout``) read the failure from the describe answer."""

    def __init__(self, error: ModelLoadFailed, name: str | None = None, version: str | None = None) -> None:
        self.error, self.name, self.version = error, name, version

    @classmethod
    def from_load_error(cls, error: Exception, name: str | None = None, version: str | None = None) -> "FailedModel":
        model = " ".join(str(p) for p in (name, version) if p) or "the model"
        return cls(ModelLoadFailed(
            f"{model} could not load: {type(error).__name__}: {error}. Every request gets this 503 until a fixed archive is "
            "registered (`yolo-ts-export --archive` checks the settings and files before it packs); full error: logs/model_log.log"
        ), name, version)

    def handle(
        self,
        rows: Sequence[Any],
        content_types: Sequence[str | None] | None = None,
        headers: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> BatchResult:
        """Every request gets the load error; an Open Inference Protocol request in the v2 error shape."""
        headers = headers or [None] * len(rows)
        answers = []
        for row, request_headers in zip(rows, headers):
            try:
                v2 = oip.parse_v2_request(row, request_headers) is not None
            except RequestError:  # a malformed v2 body: still v2
                v2 = True
            error = self.error
            answers.append(Answer(int(error.status), oip.v2_error(error.message), error.phrase) if v2 else Answer.error(error))
        return BatchResult(answers=answers)

    def describe(self) -> dict:
        """The describe body: which model, and the load error (the same body every request gets)."""
        return {"model": self.name, "model_version": self.version, **self.error.body()}

    def describe_answer(self) -> Answer:
        return Answer(int(self.error.status), self.describe(), self.error.phrase)

    def predict(self, image: bytes, **params: Any) -> Answer:
        return self.handle([{"body": bytearray(image), **params}]).answers[0]


def _with_stream(body: dict, stream: dict) -> dict:
    """A tracked answer: ``body`` with ``"stream"`` after ``"image"`` (or after ``"task"`` without a frame)."""
    out: dict = {}
    for key, value in body.items():
        out[key] = value
        if key == "image" or (key == "task" and "image" not in body):
            out["stream"] = stream
    return out
