"""Tracked requests in the service: the request options that track objects over a stream, and how the service
checks, opens and advances a request's stream (the streams themselves, one tracker each, are
``handler/tracking/registry.py``'s).

A tracked request is an ordinary prediction request (one frame, any of the usual forms) with:

* ``track=bytetrack`` or ``track=botsort`` (``track=true``: the configured ``tracking.tracker``), plus
  optional tracker parameters (the keys of Ultralytics' ``bytetrack.yaml`` / ``botsort.yaml``:
  ``track_buffer=60``, ...): starts a stream with a fresh tracker. The answer names the stream;
* ``stream=<id>`` (or the request header ``X-Stream-Id: <id>``): the next frame of that stream;
* ``end=true`` together with ``stream=<id>``: the stream's last request, with a last frame or without one.

The detections of a tracked frame are what ``YOLO(weights).track(frame, persist=True, tracker=...)``
shows (the task's :meth:`~handler.tasks.base.Task.with_tracks`); the default ``conf`` is
``tracking.conf`` (0.1, as ``track()``). The streams live in this worker process
(:class:`handler.tracking.StreamRegistry`), not in TorchServe's sequence batching, which in 0.12 never
restarts a crashed worker (``docs/tracking.md``). Hence one worker per model, and a stream that a
restarted worker cannot continue is refused with 410 ``stream_restarted``, never answered with new IDs.

Per request, in the service: :meth:`VideoStreams.check` before the frame is decoded (so a request for a
lost stream is refused without decoding), :meth:`VideoStreams.open` after it decoded (a frame that does
not decode leaves the stream as it was), :meth:`VideoStreams.track` after the batched forward, in the
batch's row order (two frames of one stream in one batch are tracked in order).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Mapping

import numpy as np

from handler.config import TrackingConfig
from handler.errors import InvalidParameter, StreamUnavailable
from handler.request_values import boolean
from handler.tasks import TASKS
from handler.tracking import (
    BotSortParams,
    FrameDetections,
    FrameTracks,
    Stream,
    StreamError,
    StreamRegistry,
    TrackerParams,
    tracker_name,
    tracker_params,
)

STREAM_HEADER = "X-Stream-Id"  # request header (continue a stream) and response header (the stream's id)
STREAM_PARAMETERS: tuple[str, ...] = ("track", "stream", "end")
TRACKER_PARAMETERS: tuple[str, ...] = tuple(f.name for f in fields(BotSortParams))  # botsort.yaml's keys ⊇ bytetrack.yaml's
VIDEO_PARAMETERS: tuple[str, ...] = STREAM_PARAMETERS + TRACKER_PARAMETERS  # what a tracked request may set
MAX_STREAM_ID_CHARS = 200
_DEFAULT_TRACKER = ("true", "1")


@dataclass(frozen=True)
class StreamOptions:
    """What one request asks of a stream, as sent (checked against the worker's streams by
    :meth:`VideoStreams.check`)."""

    track: Any = None  # track=NAME|true: start a stream (None: continue one)
    overrides: Mapping[str, Any] = field(default_factory=dict)  # tracker parameters (at the start only)
    stream_id: str | None = None  # stream=ID: continue this stream
    end: bool = False  # end=true: the stream's last request

    @property
    def frameless(self) -> bool:
        """A request that may come without a frame: the end of a stream."""
        return self.end and self.stream_id is not None


def stream_options(params: Mapping[str, Any], header_id: str | None = None) -> StreamOptions | None:
    """The stream options among a request's ``params`` (text or JSON values) and its ``X-Stream-Id``
    header; None for a stateless request. Raises ``InvalidParameter`` for a contradictory combination."""
    given = {k: v for k, v in params.items() if k in VIDEO_PARAMETERS}
    if not given and header_id is None:
        return None
    track, stream_id, end = given.pop("track", None), given.pop("stream", None), given.pop("end", None)
    if header_id is not None:
        header_id = header_id.strip()
        if stream_id is not None and stream_id != header_id:
            raise InvalidParameter(f"stream={_short(stream_id)} and the header {STREAM_HEADER}: {_short(header_id)} differ; "
                                   "give the stream id once")
        stream_id = header_id
    end = False if end is None else boolean("end", end)
    if track is not None:
        if stream_id is not None:
            raise InvalidParameter("track=... starts a new stream (the answer gives its id) and stream=<id> continues one; "
                                   "send one of them")
        if end:
            raise InvalidParameter("end=true ends a running stream: send it with stream=<id>, not with track")
    elif given:
        raise InvalidParameter(f"tracker parameter(s) {sorted(given)} are set when a stream starts, together with "
                               "track=bytetrack|botsort; a running stream keeps its own")
    elif stream_id is None:
        raise InvalidParameter("end=true ends a stream: give its id as stream=<id>")
    if stream_id is not None and (not isinstance(stream_id, str) or not stream_id or len(stream_id) > MAX_STREAM_ID_CHARS):
        raise InvalidParameter(f"stream must be the id a tracked answer gave (text, 1 to {MAX_STREAM_ID_CHARS} characters), "
                               f"got {_short(stream_id)}")
    return StreamOptions(track, given, stream_id, end)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class StreamPlan:
    """A checked request, before its frame is decoded: start a stream with ``params``, or continue ``stream``."""

    params: TrackerParams | None = None
    stream: Stream | None = None
    end: bool = False


@dataclass
class TrackedFrame:
    """A tracked request of a batch: its stream, the decoded frame (``uint8[H, W, 3]`` BGR, the original
    image: BoT-SORT's motion compensation reads it; None for an end without a frame), whether it ends the
    stream."""

    stream: Stream
    frame: np.ndarray | None
    ended: bool = False

    def describe(self) -> dict:
        """The response's ``"stream"`` object: the id, the frames tracked so far (this one included), the tracker."""
        return {"id": self.stream.id, "frame": self.stream.frames, "tracker": self.stream.params.tracker_type, "ended": self.ended}


class VideoStreams:
    """One worker's streams under the ``tracking:`` settings; ``trackable``: whether the model's task tracks
    (the detection family), ``task_name`` for the refusal message of the others."""

    def __init__(self, config: TrackingConfig, trackable: bool, task_name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.trackable = trackable
        self.task_name = task_name
        self.registry = StreamRegistry(config.max_streams, config.idle_seconds, clock)

    def expire_idle(self) -> list[str]:
        """Drop the streams idle longer than ``tracking.idle_seconds`` (the service calls it per batch)."""
        return self.registry.expire_idle()

    def check(self, options: StreamOptions) -> StreamPlan:
        """Before the frame is decoded: the tracker and its parameters of a start, or the open stream of a
        continuation; raises ``InvalidParameter`` (400) or ``StreamUnavailable`` (404/410)."""
        if not self.config.enabled:
            raise InvalidParameter("tracking is off for this model (model-config.yaml tracking.enabled: false); "
                                   "send frames without track, stream and end")
        if not self.trackable:
            trackable = ", ".join(name for name, task in TASKS.items() if task.trackable)
            raise InvalidParameter(f"a {self.task_name} model does not track objects: track, stream and end apply to "
                                   f"models that detect objects ({trackable})")
        if options.track is not None:
            return StreamPlan(params=self._params(options))
        try:
            stream = self.registry.get(options.stream_id)
        except StreamError as e:
            raise StreamUnavailable(e.kind, e.message) from None
        return StreamPlan(stream=stream, end=options.end)

    def open(self, plan: StreamPlan, frame: np.ndarray | None) -> TrackedFrame:
        """After the frame decoded: start the stream (429 when ``max_streams`` are open), or take the open
        one; an ``end`` closes it now, so later requests of this batch already get 410 ``stream_ended``."""
        if plan.params is not None:
            try:
                return TrackedFrame(self.registry.start(plan.params), frame)
            except StreamError as e:
                raise StreamUnavailable(e.kind, e.message) from None
        if plan.end:
            self.registry.end(plan.stream.id)
        return TrackedFrame(plan.stream, frame, plan.end)

    def track(self, tracked: TrackedFrame, detections: FrameDetections) -> FrameTracks:
        """Advance the stream's tracker by this frame (its detections, after NMS, in original-image pixels)."""
        tracks = tracked.stream.tracker.update(detections, tracked.frame)
        self.registry.touch(tracked.stream)
        return tracks

    def _params(self, options: StreamOptions) -> TrackerParams:
        """``track=`` and the request's tracker parameters over the configured ones."""
        value = options.track
        try:
            if value is True or (isinstance(value, str) and value.strip().lower() in _DEFAULT_TRACKER):
                name = self.config.tracker
            else:
                name = tracker_name(value)
            return tracker_params(name, {**asdict(self.config.params(name)), **options.overrides})
        except ValueError as e:
            raise InvalidParameter(f"{e} (track=bytetrack|botsort|true)" if "tracker must be" in str(e) else str(e)) from None
